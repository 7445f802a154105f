"""Prompt tuning, prefix tuning, P-Tuning v2: PEFT parity both ways, generation, the seam's invariants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune import AdapterMismatchError
from deltatune.methods import prompts
from deltatune.methods.prompts import PromptConfig
from deltatune.testing import make_tiny_gpt2, make_tiny_llama
from deltatune.train.evaluate import greedy_generate_ids

peft = pytest.importorskip("peft")

K = 4  # virtual tokens
IDS = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [0, 0] + [1] * 5])  # row 1 left-padded


def ours(make, kind: str, **kw) -> torch.nn.Module:
    # init='random' (N(0, 1), PEFT's default) so the virtual tokens visibly change every output.
    return prompts.inject(make(), PromptConfig(kind=kind, num_virtual_tokens=K, init="random", **kw))


def peft_config(kind: str, projection: bool = False) -> object:
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K)
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, prefix_projection=projection,
                                   encoder_hidden_size=16)


def peft_logits(pm: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = pm(input_ids=IDS, attention_mask=MASK).logits
    return out[:, K:] if kind == "prompt" else out  # PEFT also returns logits at the virtual positions


CASES = [("llama-prompt", make_tiny_llama, "prompt", False), ("llama-prefix", make_tiny_llama, "prefix", False),
         ("llama-prefix-projection", make_tiny_llama, "prefix", True), ("gpt2-prompt", make_tiny_gpt2, "prompt", False),
         ("gpt2-prefix", make_tiny_gpt2, "prefix", False)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_our_file_loads_in_peft_with_same_logits(case, tmp_path: Path) -> None:
    _, make, kind, projection = case
    model = ours(make, kind, projection=projection, projection_hidden=16 if projection else None)
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=MASK).logits
        base = make()(input_ids=IDS, attention_mask=MASK).logits
    assert want.shape == base.shape and (want - base).abs().max() > 1e-2  # the adapter does something
    deltatune.save_adapter(model, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    torch.testing.assert_close(peft_logits(pm, kind), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_peft_file_loads_in_deltatune_with_same_logits(case, tmp_path: Path) -> None:
    _, make, kind, projection = case
    pm = peft.get_peft_model(make(), peft_config(kind, projection)).eval()
    with torch.no_grad():  # PEFT's projection MLP starts random too; perturb it so nothing is at init
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    want = peft_logits(pm, kind)
    pm.save_pretrained(tmp_path / "p")  # a projected prefix is folded on save
    model = deltatune.load_adapter(make(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, want, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference by default


def peft_greedy(pm: torch.nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding through PEFT's forward, recomputing the whole sequence each step. (PEFT 0.21's own
    generate() looks for the pre-5.x `past_key_values` kwarg: under transformers 5.x it re-prepends the
    prompt at every decoding step and drops the prefix, so it is not a usable oracle here.)"""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            out = torch.cat([out, pm(input_ids=out).logits[:, -1:].argmax(-1)], dim=1)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generate_equals_peft_greedy_and_padded_batches(kind: str, tmp_path: Path) -> None:
    model = ours(make_tiny_llama, kind)
    deltatune.save_adapter(model, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a").eval()
    prompt = IDS[:1]
    got = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)[0, 7:].tolist()
    assert got == peft_greedy(pm, prompt, 6)
    assert got != make_tiny_llama().generate(input_ids=prompt, max_new_tokens=6, do_sample=False)[0, 7:].tolist()
    # deltatune's own batched greedy loop: left padding, explicit positions and cache; each row as if alone.
    rows = [IDS[0].tolist(), IDS[1, 3:].tolist()]
    batched = greedy_generate_ids(model, rows, max_new_tokens=5, stop_ids={-1}, pad_id=0)
    single = [greedy_generate_ids(model, [r], max_new_tokens=5, stop_ids={-1}, pad_id=0)[0] for r in rows]
    assert batched == single and batched[0] == got[:5]


def test_parameter_counts() -> None:
    d, layers, d_kv = 64, 2, 32  # tiny Llama: 4 heads of 16, 2 KV heads → d_kv = 32
    assert deltatune.parameter_report(ours(make_tiny_llama, "prompt"))["trainable"] == K * d
    assert deltatune.parameter_report(ours(make_tiny_llama, "prefix"))["trainable"] == K * d_kv * layers * 2
    h = 16
    projected = ours(make_tiny_llama, "prefix", projection=True, projection_hidden=h)
    mlp = K * d_kv + (d_kv * h + h) + (h * layers * 2 * d_kv + layers * 2 * d_kv)
    assert deltatune.parameter_report(projected)["trainable"] == mlp
    # GPT-2 has no GQA: d_kv = d.
    assert deltatune.parameter_report(ours(make_tiny_gpt2, "prefix"))["trainable"] == K * 64 * 2 * 2


def test_vocab_init_prompt_equals_prefix_equals_base_on_the_tokens() -> None:
    """Prompt tuning from tokens x and prefix tuning from x (their keys/values) both start exactly where the
    base model is on [x; input] — the prefix is the cache the prompt would have produced."""
    a, b, base = make_tiny_llama(), make_tiny_llama(), make_tiny_llama()  # (each call reseeds torch)
    torch.manual_seed(5)
    prompts.inject(a, PromptConfig(kind="prompt", num_virtual_tokens=K, init="vocab"))
    torch.manual_seed(5)
    prompts.inject(b, PromptConfig(kind="prefix", num_virtual_tokens=K, init="vocab"))
    torch.manual_seed(5)
    x = torch.randint(0, 256, (K,))  # the same draw the init made
    with torch.no_grad():
        want = base(torch.cat([x.expand(2, K), IDS], dim=1)).logits[:, K:]
        torch.testing.assert_close(a(IDS).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_text_init_cycles_tokens_like_peft() -> None:
    from deltatune.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    prompts.inject(model, PromptConfig(num_virtual_tokens=7, init="text", init_text="Paris"), tokenizer=tok)
    ids = tok("Paris")["input_ids"]
    want = (ids * 7)[:7]
    rows = prompts.get_seam(model).encoders["default"].embedding  # type: ignore[union-attr]
    torch.testing.assert_close(rows, model.model.embed_tokens.weight[want])


def test_key_value_layout_round_trip() -> None:
    dims = prompts.model_dims(make_tiny_llama())
    flat = torch.randn(K, dims.num_layers * 2 * dims.kv_width)
    kv = prompts.prefix_key_values(flat, dims, batch=1)
    assert kv[1][0].shape == (1, dims.kv_heads, K, dims.head_dim)
    # PEFT's order per virtual token: [layer][key|value][head][dim]
    torch.testing.assert_close(kv[1][1][0, 1, 2], flat[2].view(2, 2, dims.kv_heads, dims.head_dim)[1, 1, 1])
    torch.testing.assert_close(prompts.flatten_key_values(kv), flat)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_disable_is_base_labels_loss_and_only_prompt_trains(kind: str) -> None:
    model = ours(make_tiny_llama, kind)
    base = make_tiny_llama()
    with prompts.disable(model), torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=0)
    model.train()
    out = model(input_ids=IDS, labels=IDS)  # labels have the caller's length; no -100 padding needed
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), IDS[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"deltatune_prompts.encoders.default.embedding"}


def test_named_adapters_switch_and_delete() -> None:
    model = ours(make_tiny_llama, "prompt")
    prompts.inject(model, PromptConfig(kind="prefix", num_virtual_tokens=2, init="random"), name="b")
    with torch.no_grad():
        out_b = model(IDS).logits
        prompts.set_active(model, "default")
        out_a = model(IDS).logits
    assert (out_a - out_b).abs().max() > 1e-2
    prompts.delete(model, "default")
    prompts.delete(model, "b")
    assert not hasattr(model, prompts.SEAM_ATTR)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, make_tiny_llama()(IDS).logits, rtol=0, atol=0)


def test_wrong_base_is_a_clear_error_and_model_unchanged(tmp_path: Path) -> None:
    deltatune.save_adapter(ours(make_tiny_llama, "prefix"), tmp_path / "a")
    other = make_tiny_llama(num_key_value_heads=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=r"shape \[4, 128\] .* needs \[4, 256\]"):
        deltatune.load_adapter(other, tmp_path / "a")
    assert other.state_dict().keys() == before.keys() and not hasattr(other, prompts.SEAM_ATTR)


def test_prefix_refuses_gradient_checkpointing() -> None:
    model = ours(make_tiny_llama, "prefix")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(IDS)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_train_loop_saves_what_it_trained(method: str, tmp_path: Path) -> None:
    """deltatune.train.loop end to end: its loss path (backbone + head on labelled positions, where the seam
    must apply too), the adapter file; the file reloads to the trained model's logits."""
    from deltatune.config import load_config
    from deltatune.testing import build_tiny_tokenizer
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import run

    tok = build_tiny_tokenizer()
    make = lambda: make_tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id,  # noqa: E731
                                   eos_token_id=tok.eos_token_id)
    sets = ["model.dtype=fp32", "data.num_train=8", "data.num_eval=2", "train.batch_size=4", "train.max_steps=2",
            "train.lr=1e-2", f"output_dir={tmp_path / 'run'}", "eval.exact_match=false", "train.bf16=false",
            f"method={method}", f"prompt.num_virtual_tokens={K}", "prompt.projection=" + str(method == "prefix_tuning").lower()]
    model = make()
    res = run(load_config(TrainConfig, None, sets), model=model, tokenizer=tok, progress=False)
    assert len(res.losses) == 2 and res.losses[1] != res.losses[0]
    n_trained = res.summary["trainable_params"]
    assert n_trained == (K * 64 if method == "prompt_tuning" else K * 32 + 32 * 32 + 32 + 32 * 128 + 128)
    loaded = deltatune.load_adapter(make(), tmp_path / "run" / "adapter")
    ids = IDS % len(tok)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_p_tuning_v2_is_prefix_tuning_without_projection(tmp_path: Path) -> None:
    from deltatune.config import load_config
    from deltatune.registry import METHODS
    from deltatune.train.config import TrainConfig
    from deltatune.train.hooks import RunInfo

    cfg = load_config(TrainConfig, None, ["method=p_tuning_v2", f"prompt.num_virtual_tokens={K}"])
    model = make_tiny_llama()
    assert METHODS["p_tuning_v2"].apply(model, cfg, RunInfo(total_steps=1, steps_per_epoch=1)) == []
    enc = prompts.get_seam(model).encoder("default")  # type: ignore[union-attr]
    assert enc.kind == "prefix" and enc.transform is None
    assert deltatune.parameter_report(model)["trainable"] == K * 2 * 2 * 32  # l·L·2·d_kv
    deltatune.save_adapter(model, tmp_path / "a")
    saved = (tmp_path / "a" / "adapter_config.json").read_text()
    assert '"peft_type": "PREFIX_TUNING"' in saved and '"prefix_projection": false' in saved
    with pytest.raises(ValueError, match="use method 'prefix_tuning'"):
        load_config(TrainConfig, None, ["method=p_tuning_v2", "prompt.projection=true"])

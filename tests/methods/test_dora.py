"""DoRA: a naive formula written here, PEFT as the oracle (same weights), and the invariants."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import LoraConfig
from deltatune.methods.dora import DoraLayer
from deltatune.testing import make_tiny_gpt2, make_tiny_llama

IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def naive_dora_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, s: float) -> torch.Tensor:
    """W' = m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖ per output row; W₀ (d, k). The norm detached (paper §4.3)."""
    v = w0 + s * b @ a
    return m[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True).detach()


def perturb(model: nn.Module, std: float = 0.1) -> None:
    """B ≠ 0 and m ≠ ‖W₀‖, so both parts of DoRA change the output (invariants must be able to fail)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + std * torch.randn(p.shape, generator=g))


def dora_layer(base: nn.Module, r: int = 4, alpha: float = 8, dropout: float = 0.0) -> DoraLayer:
    layer = DoraLayer(base)
    layer.add("a", r=r, alpha=alpha, dropout=dropout)
    layer.enable_dora("a")
    layer.active = ["a"]
    perturb(layer)
    return layer


# ----------------------------------------------------------------------------- the formula, per kind
def test_linear_matches_naive_formula_and_gradients() -> None:
    torch.manual_seed(0)
    layer = dora_layer(nn.Linear(32, 24))
    a, b = layer.factors("a")
    m = layer.magnitude("a")
    x = torch.randn(3, 5, 32)
    want = x @ naive_dora_weight(layer.base_layer.weight, a, b, m, 2.0).T + layer.base_layer.bias
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    got_g = torch.autograd.grad(got, [a, b, m], g, retain_graph=True)
    for u, v in zip(got_g, torch.autograd.grad(want, [a, b, m], g)):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    # The norm is detached: gradients differ from those of the undetached formula (this can fail).
    v = layer.base_layer.weight + 2.0 * b @ a
    full = x @ (m[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)).T
    assert (torch.autograd.grad(full, b, g)[0] - got_g[1]).abs().max() > 1e-4


def test_start_equals_base_and_magnitude_is_row_norm() -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = DoraLayer(base)
    layer.add("a", r=4, alpha=8)
    layer.enable_dora("a")
    layer.active = ["a"]
    torch.testing.assert_close(layer.magnitude("a"), torch.linalg.norm(base.weight, dim=1), rtol=1e-6, atol=1e-6)
    x = torch.randn(7, 32)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


def test_conv1d_matches_naive_formula() -> None:
    torch.manual_seed(0)
    base = Conv1D(24, 32)  # W (k=32, d=24)
    layer = dora_layer(base)
    a, b = layer.factors("a")
    x = torch.randn(2, 6, 32)
    want = x @ naive_dora_weight(base.weight.T, a, b, layer.magnitude("a"), 2.0).T + base.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_embedding_matches_naive_formula() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(50, 16)
    layer = dora_layer(base)
    a, b = layer.factors("a")  # (r, V), (d, r)
    ids = torch.randint(0, 50, (3, 9))
    # (d, V) view: the norm runs over the vocabulary for each embedding dimension, as in PEFT.
    w = naive_dora_weight(base.weight.T, a, b, layer.magnitude("a"), 2.0).T  # (V, d)
    torch.testing.assert_close(layer(ids), w[ids], rtol=1e-5, atol=1e-5)


def test_dropout_matches_peft_formula() -> None:
    """With dropout in training PEFT (and the paper's code) compute base(x) + (f−1)⊙W₀·drop(x) + f⊙s·BA·drop(x)."""
    torch.manual_seed(0)
    layer = dora_layer(nn.Linear(16, 12), dropout=0.3)
    layer.train()
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.factors("a")
    m = layer.magnitude("a")
    x = torch.randn(4, 16)
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.3, True)
    f = m / torch.linalg.norm(w0 + 2.0 * b @ a, dim=1).detach()
    want = x @ w0.T + bias + (f - 1) * (xd @ w0.T) + f * (2.0 * (xd @ a.T) @ b.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_keeps_small_magnitude_updates() -> None:
    """f = m/‖·‖ stays fp32 under bf16 autocast (as in PEFT): a 0.3 % change of m, below half of bf16's
    step above 1 (2⁻⁸ ≈ 0.39 %), still reaches the output (a bf16 f would round back to 1)."""
    torch.manual_seed(0)
    layer = DoraLayer(nn.Linear(64, 64))
    layer.add("a", r=4, alpha=8)
    layer.enable_dora("a")  # B = 0, m = ‖W₀‖: f = 1, where bf16's step is 2⁻⁷
    layer.active = ["a"]
    x = torch.randn(256, 64)
    with torch.autocast("cpu", torch.bfloat16):
        before = layer(x)
        with torch.no_grad():
            layer.magnitude("a").mul_(1.003)
        after = layer(x)
    assert before.dtype == after.dtype == torch.bfloat16
    assert (after.float() - before.float()).abs().sum() > 0


# ----------------------------------------------------------------------------- PEFT as the oracle
def _peft_twin(model: nn.Module, base: nn.Module, cfg: LoraConfig, **extra: object) -> nn.Module:
    peft = pytest.importorskip("peft")
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules, use_dora=True, **extra))
    missing = twin.base_model.model.load_state_dict(model.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys  # same in-memory keys as PEFT
    return twin


@pytest.mark.parametrize("make,targets", [(make_tiny_llama, TARGETS), (make_tiny_gpt2, ["c_attn", "c_fc"]),
                                          (make_tiny_llama, ["embed_tokens", "q_proj"])],
                         ids=["llama", "gpt2-conv1d", "llama-embedding"])
def test_matches_peft_logits_and_gradients(make, targets) -> None:
    base = make()
    model = copy.deepcopy(base)
    cfg = LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True)
    deltatune.inject(model, cfg)
    perturb(model)
    twin = _peft_twin(model, base, cfg)
    ours, theirs = model(IDS).logits, twin(IDS).logits
    assert (ours - base(IDS).logits).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    grads = {k.removeprefix("base_model.model."): p.grad for k, p in twin.named_parameters() if p.grad is not None}
    n = 0
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6)
            n += 1
    assert n == len(grads) > 0


def test_deltatune_file_loads_in_peft_and_back(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    model = copy.deepcopy(base)
    deltatune.inject(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
    perturb(model)
    want = model(IDS).logits
    deltatune.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(theirs(IDS).logits, want, rtol=1e-5, atol=1e-5)
    # PEFT's own file back into deltatune
    theirs.save_pretrained(tmp_path / "b")
    back = deltatune.load_adapter(copy.deepcopy(base), tmp_path / "b")
    torch.testing.assert_close(back(IDS).logits, want, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in back.parameters())
    trainable = deltatune.load_adapter(copy.deepcopy(base), tmp_path / "b", trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_magnitude_vector" in n)


def test_magnitude_missing_from_file_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = make_tiny_llama()
    deltatune.inject(model, LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    deltatune.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "down_proj.lora_magnitude" not in k}, path)
    fresh = make_tiny_llama()
    with pytest.raises(deltatune.AdapterFileError, match="magnitude"):
        deltatune.load_adapter(fresh, tmp_path)
    assert not hasattr(fresh, "deltatune_state")


# ----------------------------------------------------------------------------- merge and mixes
def test_merged_equals_unmerged_equals_unloaded_and_unmerge_restores() -> None:
    model = make_tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltatune.inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    perturb(model)
    want = model(IDS).logits
    deltatune.merge(model)
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    deltatune.unmerge(model)
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    deltatune.merge(model)
    plain = deltatune.unload(model)
    assert not any(isinstance(m, DoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(IDS).logits, want, rtol=1e-5, atol=1e-5)
    model = make_tiny_gpt2()
    deltatune.inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    perturb(model)
    deltatune.merge(model)
    deltatune.unmerge(model)
    for k, v in deltatune.unload(model, merge_adapters=False).state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", [["lora", "dora", "dora2"], ["dora", "lora", "dora2"], ["dora2", "dora"]])
def test_partial_merges_of_mixed_adapters(order: list[str]) -> None:
    """Plain LoRA and DoRA adapters on one layer, merged one at a time in any order: the output
    never changes, and unmerge brings back W₀ (needs W₀ recovered from the merged weight)."""
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    w0 = base.weight.detach().clone()
    layer = DoraLayer(base)
    for name in ("lora", "dora", "dora2"):
        layer.add(name, r=3, alpha=6)
        if name != "lora":
            layer.enable_dora(name)
    perturb(layer)
    layer.active = ["lora", "dora", "dora2"]
    x = torch.randn(5, 20)
    # Reference: W₀ + Σ (W'ᵢ − W₀) with each W'ᵢ from the naive formula on the pristine W₀.
    delta = torch.zeros_like(w0)
    for name in layer.active:
        a, b = layer.factors(name)
        s = layer.adapters[name].scale
        delta += s * b @ a if name == "lora" else naive_dora_weight(w0, a, b, layer.magnitude(name), s) - w0
    want = x @ (w0 + delta).T + base.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    for name in order:
        layer.merge([name])
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_dora_added_to_a_lora_layer_and_per_sample_routing() -> None:
    model = make_tiny_llama()
    base_logits = model(IDS).logits
    deltatune.inject(model, LoraConfig(r=4, target_modules=TARGETS), name="plain")
    deltatune.inject(model, LoraConfig(r=4, target_modules=TARGETS, use_dora=True), name="dora")
    assert all(isinstance(m, DoraLayer) for _, m in deltatune.lora_layers(model))
    perturb(model)
    outs = {}
    for name in ("plain", "dora"):
        deltatune.set_active(model, name)
        outs[name] = model(IDS).logits
    with deltatune.adapter_per_sample(model, ["dora", None]):
        mixed = model(IDS).logits
    torch.testing.assert_close(mixed[0], outs["dora"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base_logits[1], rtol=1e-5, atol=1e-5)
    with deltatune.disable_adapters(model):
        torch.testing.assert_close(model(IDS).logits, base_logits, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- integration
def test_parameter_report_and_trainable_set() -> None:
    model = make_tiny_llama()
    deltatune.inject(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    report = deltatune.parameter_report(model)
    # q_proj: k=d=64; down_proj: k=128, d=64. DoRA trains r(d+k) + d per layer, 2 layers.
    assert report["trainable"] == 2 * ((4 * (64 + 64) + 64) + (4 * (128 + 64) + 64))
    assert report["per_module"]["model.layers.0.self_attn.q_proj"] == 4 * 128 + 64
    assert {n.split(".")[-2] if n.endswith("weight") else n for n, p in model.named_parameters() if p.requires_grad} \
        == {"default"}


def test_method_dora_in_registry_and_train_config() -> None:
    from deltatune.registry import METHODS
    from deltatune.train.config import TrainConfig
    from deltatune.train.hooks import RunInfo

    assert "dora" in METHODS
    cfg = TrainConfig(method="dora", lora=LoraConfig(r=4, target_modules=["q_proj"]))
    model = make_tiny_llama()
    assert METHODS["dora"].apply(model, cfg, RunInfo(total_steps=1, steps_per_epoch=1)) == []
    layers = [m for _, m in deltatune.lora_layers(model)]
    assert layers and all(isinstance(m, DoraLayer) and m.is_dora("default") for m in layers)
    assert not cfg.lora.use_dora  # the user's config object is not changed


def test_train_end_to_end_dora_pissa_loraplus(tmp_path: Path) -> None:
    """`deltatune train` with method dora, PiSSA init and LoRA+: the saved adapter is a rank-2r DoRA file
    that loads on the untouched base and changes it; B's group trained at 16 × lr."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.cli import main
    from deltatune.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    sets = [f"model.spec={tmp_path / 'base'}", "model.dtype=fp32", "method=dora", "lora.init=pissa", "lora.r=4",
            "train.loraplus_ratio=16", "train.lr=1e-3", "train.max_steps=2", "train.batch_size=4", "train.bf16=false",
            "data.num_train=8", "data.num_eval=2", "eval.exact_match=false", f"output_dir={out}"]
    assert main(["train", "--no-progress", *[a for kv in sets for a in ("--set", kv)]]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["r"] == 8 and cfg["init_lora_weights"] is True
    state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
    groups = {g["name"]: g["initial_lr"] for g in state["optimizer"]["param_groups"]}
    assert groups["B"] == pytest.approx(16 * groups["A"]) and groups["A"] == pytest.approx(1e-3)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = torch.randint(3, len(tok), (1, 8))
    before = base(ids).logits
    after = deltatune.load_adapter(base, out / "adapter")(ids).logits
    assert (after - before).abs().max() > 1e-4


def test_qdora_equals_dora_on_dequantized_weights() -> None:
    """DoRA over a Linear4bit base (QDoRA) computes DoRA on the dequantized weights; merging requantizes."""
    from deltatune.quant.linear4bit import Linear4bit, quantize_model

    qmodel = quantize_model(make_tiny_llama(), compute_dtype=torch.float32)
    ref = copy.deepcopy(qmodel)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, Linear4bit):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=False)
            lin.weight.data = mod.dequantized_weight(torch.float32)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin)
    for m in (qmodel, ref):
        deltatune.inject(m, LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
        perturb(m)
    ref.load_state_dict({k: v for k, v in qmodel.state_dict().items() if "lora_" in k}, strict=False)
    want = ref(IDS).logits
    torch.testing.assert_close(qmodel(IDS).logits, want, rtol=1e-4, atol=1e-4)
    deltatune.merge(qmodel)
    assert (qmodel(IDS).logits - want).abs().max() < 0.1  # requantized: close, not equal
    deltatune.unmerge(qmodel)
    assert (qmodel(IDS).logits - want).abs().max() < 0.1  # the adapter's effect is ~0.5 here

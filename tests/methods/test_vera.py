"""VeRA: the naive formula, PEFT's projections bit for bit, init, merge, gradients, the parameter
count, PEFT-format files both ways, and a 2-step training run through the loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.methods.vera import VeraConfig, VeraLayer, inject_vera, merge, unload, unmerge, vera_layers

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: a second intra-op thread only adds contention on a loaded 2-core machine (~5× slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
QVD = ["q_proj", "v_proj", "down_proj"]  # q (64→64), v (64→32), down (128→64): k_max 128, d_max 64


def tiny_llama(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def randomise_vectors(model: nn.Module, seed: int = 3) -> None:
    """Force b ≠ 0 (and a non-constant d) so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def naive_projections(r: int, k_max: int, d_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Kaiming-uniform with gain √2 over fan_in = columns: U(−√(6/fan_in), √(6/fan_in)); A drawn before B.
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(r, k_max).uniform_(-math.sqrt(6 / k_max), math.sqrt(6 / k_max), generator=g)
    b = torch.empty(d_max, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
    return a, b


def test_linear_and_conv1d_match_naive_formula() -> None:
    for make, targets, kind in ((tiny_llama, QVD, "linear"), (tiny_gpt2, ["c_attn", "c_fc"], "conv1d")):
        model = inject_vera(make(), VeraConfig(r=8, target_modules=targets, projection_prng_key=7))
        randomise_vectors(model)
        layers = vera_layers(model)
        k_max = max(layer.in_features for _, layer in layers)
        d_max = max(layer.out_features for _, layer in layers)
        a, b = naive_projections(8, k_max, d_max, 7)
        x = torch.randn(3, 5, layers[0][1].in_features)
        for _, layer in layers:
            assert layer.kind == kind
            x = torch.randn(3, 5, layer.in_features)
            lam_d, lam_b = layer.vectors()
            a_s, b_s = a[:, : layer.in_features], b[: layer.out_features]
            want = layer.base_layer(x) + lam_b * ((lam_d * (x @ a_s.t())) @ b_s.t())
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_layers_reading_one_input_share_the_projection_and_get_exact_gradients() -> None:
    # q_proj and v_proj read the same tensor: one A·x product serves both (forward and backward).
    model = inject_vera(tiny_llama(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"])).train()
    randomise_vectors(model)
    attn = model.model.layers[0].self_attn
    a, b = naive_projections(8, 64, 64, 0)
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = attn.q_proj(x).square().sum()
    shared = attn.q_proj.vera_proj._last[2]()
    out = out + attn.v_proj(x).square().sum()
    assert shared is not None and attn.v_proj.vera_proj._last[2]() is shared  # v reused q's product
    del shared
    out.backward()
    got = [x.grad] + [p.grad for layer in (attn.q_proj, attn.v_proj) for p in layer.vectors()]
    x2 = x.detach().clone().requires_grad_(True)
    want_out = 0
    vecs = []
    for layer in (attn.q_proj, attn.v_proj):
        lam_d, lam_b = (v.detach().clone().requires_grad_(True) for v in layer.vectors())
        vecs += [lam_d, lam_b]
        y = layer.base_layer(x2) + lam_b * ((lam_d * (x2 @ a[:, :64].t())) @ b[: layer.out_features].t())
        want_out = want_out + y.square().sum()
    want_out.backward()
    torch.testing.assert_close(out, want_out)
    for g, w in zip(got, [x2.grad] + [v.grad for v in vecs]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    model.eval()
    del out, want_out
    assert attn.q_proj.vera_proj._last[2]() is None  # the product died with its graph: no stale reuse
    import copy
    import pickle

    pickle.dumps(copy.deepcopy(model))  # the weak references are dropped, not pickled


def test_projections_equal_peft_bit_for_bit() -> None:
    peft = pytest.importorskip("peft")
    model = inject_vera(tiny_llama(), VeraConfig(r=16, target_modules=QVD, projection_prng_key=11))
    pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=16, target_modules=QVD, projection_prng_key=11))
    proj = vera_layers(model)[0][1].vera_proj
    assert torch.equal(proj.A, pm.base_model.vera_A["default"]) and proj.A.shape == (16, 128)
    assert torch.equal(proj.B, pm.base_model.vera_B["default"]) and proj.B.shape == (64, 16)


def test_one_shared_copy_of_the_projections() -> None:
    model = inject_vera(tiny_llama(), VeraConfig(r=8, target_modules=QVD))
    model.double()  # moving/casting must keep one shared copy, not one per layer
    ptrs = {layer.vera_proj.A.data_ptr() for _, layer in vera_layers(model)}
    assert len(ptrs) == 1 and vera_layers(model)[0][1].vera_proj.A.dtype == torch.float64
    assert not any("vera_proj" in k for k in model.state_dict())  # never in the model's checkpoint


def test_default_init_is_base_model_and_ones_init_is_not() -> None:
    base = tiny_llama()(IDS).logits
    model = inject_vera(tiny_llama(), VeraConfig(r=8, target_modules=QVD))
    for _, layer in vera_layers(model):
        lam_d, lam_b = layer.vectors()
        assert torch.all(lam_b == 0) and torch.all(lam_d == 0.1)
    torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=0)
    ones = inject_vera(tiny_llama(), VeraConfig(r=8, target_modules=QVD, b_init="ones"))
    assert (ones(IDS).logits - base).abs().max() > 1e-3


def test_merged_equals_unmerged_equals_unloaded() -> None:
    for make, targets in ((tiny_llama, QVD), (tiny_gpt2, ["c_attn", "c_proj"])):
        model = inject_vera(make(), VeraConfig(r=8, target_modules=targets))
        randomise_vectors(model)
        ids = IDS % 128
        want = model(ids).logits
        assert (want - make()(ids).logits).abs().max() > 1e-3
        merge(model)
        assert all(layer.merged for _, layer in vera_layers(model))
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        unmerge(model)
        for path, layer in vera_layers(model):  # unmerge restores the base weights
            torch.testing.assert_close(layer.base_layer.weight, make().get_submodule(path).weight, rtol=0, atol=1e-6)
        plain = unload(model)
        assert not vera_layers(plain) and not hasattr(plain, "deltatune_state")
        torch.testing.assert_close(plain(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_only_vectors_train_and_base_and_projections_stay() -> None:
    model = inject_vera(tiny_llama(), VeraConfig(r=8, target_modules=QVD)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".vera_lambda_b." in n or ".vera_lambda_d." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    proj = vera_layers(model)[0][1].vera_proj.A.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in before.items())
    assert torch.equal(vera_layers(model)[0][1].vera_proj.A, proj)
    assert any(layer.vectors()[1].abs().sum() > 0 for _, layer in vera_layers(model))  # b moved off 0


def test_parameter_report_counts_d_out_plus_r() -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    inject_vera(model, VeraConfig(r=8, target_modules=QVD))
    rep = deltatune.parameter_report(model)
    want = 2 * ((64 + 8) + (32 + 8) + (64 + 8))  # d_out + r for q, v, down in 2 blocks; A, B are buffers
    assert rep["trainable"] == want and rep["total"] == total + want
    assert rep["per_module"]["model.layers.1.self_attn.v_proj"] == 32 + 8 and len(rep["per_module"]) == 6
    pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=QVD))
    assert (rep["trainable"], rep["total"]) == pm.get_nb_trainable_parameters()


CASES = [
    ("llama-save-projection", tiny_llama, QVD, True),
    ("llama-seed-only", tiny_llama, QVD, False),
    ("gpt2", tiny_gpt2, ["c_attn", "c_fc"], True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_deltatune_file_loads_in_peft_with_same_logits(case, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    _, make, targets, save_projection = case
    model = inject_vera(make(), VeraConfig(r=8, target_modules=targets, projection_prng_key=5,
                                           save_projection=save_projection))
    randomise_vectors(model)
    ours = model(IDS).logits
    deltatune.save_adapter(model, tmp_path / "a")
    keys = set(deltatune.read_adapter_info(tmp_path / "a").tensors)
    assert ("base_model.vera_A" in keys) == save_projection
    with pytest.warns(UserWarning) if not save_projection else _no_warning():
        pm = peft.PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    torch.testing.assert_close(pm(IDS).logits, ours, rtol=1e-5, atol=1e-5)
    # … and back into deltatune
    again = deltatune.load_adapter(make(), tmp_path / "a")
    torch.testing.assert_close(again(IDS).logits, ours, rtol=1e-5, atol=1e-5)


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_file_loads_in_deltatune_with_same_logits(save_projection: bool, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=QVD, projection_prng_key=9,
                                                           save_projection=save_projection)).eval()
    randomise_vectors(pm)
    want = pm(IDS).logits
    pm.save_pretrained(tmp_path / "p")
    model = deltatune.load_adapter(tiny_llama(), tmp_path / "p")
    assert isinstance(model.model.layers[0].self_attn.q_proj, VeraLayer)
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_load_onto_wrong_base_fails_before_changing_the_model(tmp_path: Path) -> None:
    model = inject_vera(tiny_llama(), VeraConfig(r=8, target_modules=QVD))
    deltatune.save_adapter(model, tmp_path / "a")
    other = tiny_llama(hidden=32)
    with pytest.raises(deltatune.AdapterMismatchError, match="vera_lambda_b"):
        deltatune.load_adapter(other, tmp_path / "a")
    assert not vera_layers(other) and not hasattr(other, "deltatune_state")


def test_config_errors_and_unsupported_targets() -> None:
    with pytest.raises(ValueError, match="vera.r"):
        VeraConfig(r=0)
    with pytest.raises(TypeError, match="VeRA supports"):
        inject_vera(tiny_llama(), VeraConfig(target_modules=["embed_tokens"]))
    model = inject_vera(tiny_llama(), VeraConfig(r=4))
    with pytest.raises(ValueError, match="already has deltatune adapters"):
        inject_vera(model, VeraConfig(r=4))



def test_train_two_steps_through_the_loop(model_dir: Path, tmp_path: Path) -> None:
    from deltatune.config import load_config
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import run

    sets = [f"model.spec={model_dir}", "model.dtype=fp32", "data.num_train=8", "data.num_eval=2",
            "train.batch_size=4", "train.max_steps=2", "train.lr=1e-2", f"output_dir={tmp_path / 'run'}",
            "eval.max_new_tokens=4", "train.bf16=false", "method=vera", "vera.r=16"]
    res = run(load_config(TrainConfig, None, sets), progress=False)
    assert res.summary["steps"] == 2 and res.summary["trainable_params"] == 2 * ((64 + 16) + (32 + 16))
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["r"] == 16

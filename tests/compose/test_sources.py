"""Adapters as plain LoRA factors (LoRA, rsLoRA, VeRA, AdaLoRA, PiSSA-converted files; GPT-2 Conv1D),
the refused kinds, and the atomic writer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune import compose
from deltatune.testing import make_tiny_gpt2, make_tiny_llama

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _randomize(model: torch.nn.Module, seed: int, keys: tuple[str, ...] = ("lora_",)) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in keys):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _lora(base: torch.nn.Module, seed: int, **cfg: object) -> torch.nn.Module:
    m = copy.deepcopy(base)
    deltatune.inject(m, deltatune.LoraConfig(**cfg))  # type: ignore[arg-type]
    _randomize(m, seed)
    return m


def _layer_delta(model: torch.nn.Module, path: str) -> torch.Tensor:
    """The wrapped layer's own ΔW (its merge formula), in the nn.Linear (d, k) layout."""
    layer = model.get_submodule(path)
    d = layer.delta() if callable(getattr(layer, "delta", None)) and not hasattr(layer, "adapters") else None
    if d is None:
        d = layer.delta("default")
    return d.t() if layer.kind in ("conv1d", "embedding") else d


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_file_round_trip_with_patterns(tmp_path: Path, rslora: bool) -> None:
    base = make_tiny_llama(vocab_size=64)
    m = _lora(base, 1, r=4, alpha=8, use_rslora=rslora, target_modules=["q_proj", "v_proj", "embed_tokens"],
              rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0})
    deltatune.save_adapter(m, tmp_path / "a")
    ad = compose.read_adapter(tmp_path / "a")
    assert {mm.kind for mm in ad.modules.values()} == {"linear", "embedding"}
    for path, mf in ad.modules.items():
        torch.testing.assert_close(mf.delta(), _layer_delta(m, path), rtol=1e-5, atol=1e-6)
    # the composed file loads into deltatune with the same logits as the source model (scale 1, no rsLoRA)
    out = compose.save_composed(compose.combine([ad], [1.0], "task_arithmetic"), tmp_path / "c")
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is False
    fresh = copy.deepcopy(base)
    deltatune.load_adapter(fresh, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, m(IDS).logits, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d(tmp_path: Path) -> None:
    base = make_tiny_gpt2(vocab_size=64)
    a, b = _lora(base, 1, r=4, target_modules=["c_attn"]), _lora(base, 2, r=2, target_modules=["c_attn", "c_fc"])
    deltatune.save_adapter(a, tmp_path / "a")
    deltatune.save_adapter(b, tmp_path / "b")
    ads = [compose.read_adapter(tmp_path / n) for n in ("a", "b")]
    assert {mm.kind for ad in ads for mm in ad.modules.values()} == {"conv1d"}
    out = compose.save_composed(compose.combine(ads, [0.5, 0.5], "cat"), tmp_path / "c")
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    ours = copy.deepcopy(base)
    deltatune.load_adapter(ours, tmp_path / "a", name="a")
    deltatune.load_adapter(ours, tmp_path / "b", name="b")
    compose.set_weighted(ours, {"a": 0.5, "b": 0.5})
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS).logits, ours(IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_to_lora_factors_any_seed(tmp_path: Path, save_projection: bool) -> None:
    """VeRA's ΔW = Λ_b B Λ_d A as plain factors; adapters with different projection seeds combine
    (each keeps its own projections), the result equals Σ λ ΔWᵢ of the VeRA layers."""
    base = make_tiny_llama(vocab_size=64)
    models = []
    for seed in (0, 7):
        m = copy.deepcopy(base)
        deltatune.inject_vera(m, deltatune.VeraConfig(r=16, projection_prng_key=seed, save_projection=save_projection))
        _randomize(m, seed + 1, ("vera_lambda",))
        deltatune.save_adapter(m, tmp_path / f"v{seed}")
        models.append(m)
    ads = [compose.read_adapter(tmp_path / f"v{s}") for s in (0, 7)]
    out = compose.combine(ads, [1.0, -0.5], "task_arithmetic")
    for path, mf in out.modules.items():
        want = _layer_delta(models[0], path) - 0.5 * _layer_delta(models[1], path)
        assert want.abs().max() > 1e-4
        torch.testing.assert_close(mf.delta(), want, rtol=1e-5, atol=1e-6)
    one = compose.from_model(models[0], "default")
    for path, mf in one.modules.items():
        torch.testing.assert_close(mf.delta(), ads[0].modules[path].delta(), rtol=1e-5, atol=1e-7)


def test_adalora_to_lora_factors(tmp_path: Path) -> None:
    base = make_tiny_llama(vocab_size=64)
    m = copy.deepcopy(base)
    deltatune.inject_adalora(m, deltatune.AdaLoraConfig(init_r=6, target_r=4, total_step=10))
    _randomize(m, 3, ("lora_A", "lora_B", "lora_E"))
    deltatune.save_adapter(m, tmp_path / "ada")
    ad = compose.read_adapter(tmp_path / "ada")
    for path, mf in ad.modules.items():
        torch.testing.assert_close(mf.delta(), _layer_delta(m, path), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(compose.from_model(m, "default").modules[path].delta(), mf.delta())


def test_pissa_converted_file_composes_relative_to_the_original_base(tmp_path: Path) -> None:
    base = make_tiny_llama(vocab_size=64)
    m = _lora(base, 1, r=4, init="pissa")
    deltatune.save_adapter(m, tmp_path / "p")  # converted: rank 2r, relative to the original base
    ad = compose.read_adapter(tmp_path / "p")
    out = compose.save_composed(compose.combine([ad], [1.0], "cat"), tmp_path / "c")
    fresh = copy.deepcopy(base)
    deltatune.load_adapter(fresh, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, m(IDS).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(compose.CompositionError, match="PiSSA/OLoRA adapter in memory"):
        compose.add_weighted_adapter(m, ["default"], [1.0], "x")


def test_refused_kinds_name_adapter_and_module(tmp_path: Path) -> None:
    base = make_tiny_llama(vocab_size=64)
    deltatune.save_adapter(_lora(base, 1, use_dora=True), tmp_path / "dora")
    with pytest.raises(compose.CompositionError, match=r"'dora-in', module 'model\.layers\.0\.self_attn\.q_proj'.*DoRA"):
        compose.read_adapter(tmp_path / "dora", name="dora-in")
    deltatune.save_adapter(_lora(base, 1, bias="all"), tmp_path / "bias")
    with pytest.raises(compose.CompositionError, match="trains biases"):
        compose.read_adapter(tmp_path / "bias")
    dm = _lora(base, 1, use_dora=True)
    with pytest.raises(compose.CompositionError, match="'default', module .*DoRA"):
        compose.from_model(dm, "default")
    # a PEFT file whose ΔW is relative to a residual base (unconverted PiSSA)
    deltatune.save_adapter(_lora(base, 1), tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    (tmp_path / "pissa").mkdir()
    (tmp_path / "pissa" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    from safetensors.torch import load_file, save_file

    save_file(load_file(tmp_path / "plain" / "adapter_model.safetensors"), tmp_path / "pissa" / "adapter_model.safetensors")
    with pytest.raises(compose.CompositionError, match="residual base"):
        compose.read_adapter(tmp_path / "pissa")
    # adapters of two different bases (fingerprints differ)
    other = make_tiny_llama(vocab_size=64, seed=5)
    deltatune.save_adapter(_lora(other, 2), tmp_path / "other")
    ads = [compose.read_adapter(tmp_path / "plain"), compose.read_adapter(tmp_path / "other")]
    with pytest.raises(compose.CompositionError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*share their base"):
        compose.combine(ads, [1, 1], "cat")


def test_writer_is_atomic_and_never_overwrites_inputs(tmp_path: Path) -> None:
    base = make_tiny_llama(vocab_size=64)
    deltatune.save_adapter(_lora(base, 1), tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    c = compose.combine([compose.read_adapter(tmp_path / "a")], [2.0], "cat")
    for bad in (tmp_path / "a", tmp_path / "a" / "sub", tmp_path):
        with pytest.raises(ValueError, match="overwrite input adapter"):
            compose.save_composed(c, bad, inputs=[tmp_path / "a"])
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an adapter directory"):
        compose.save_composed(c, tmp_path / "notes")
    out = compose.save_composed(c, tmp_path / "o")
    compose.save_composed(compose.combine([compose.read_adapter(tmp_path / "a")], [3.0], "cat"), out)  # replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "notes", "o"]  # no temp dirs left
    meta = deltatune.read_adapter_info(out)
    assert meta.fingerprint is not None

"""PEFT's ``add_weighted_adapter`` as the live oracle: the same adapters combined by PEFT and by
deltatune give the same logits, for every combination type PEFT has (DARE: same seed ⇒ same masks)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune import compose
from deltatune.testing import make_tiny_llama

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _randomize(pm: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A PEFT model with adapters a (r=4), b (r=4), c (r=6, other targets) and their files."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    d = tmp_path_factory.mktemp("adapters")
    base = make_tiny_llama(vocab_size=64)
    pm = get_peft_model(copy.deepcopy(base), PeftLora(r=4, lora_alpha=8, target_modules=TARGETS), adapter_name="a")
    pm.add_adapter("b", PeftLora(r=4, lora_alpha=4, target_modules=TARGETS))
    pm.add_adapter("c", PeftLora(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj"]))
    _randomize(pm, 1)
    dirs = {}
    for n in ("a", "b", "c"):
        pm.save_pretrained(d / n, selected_adapters=[n])
        dirs[n] = d / n / n  # PEFT writes a non-default adapter into a subdirectory of its name
    return {"base": base, "peft": pm, "dirs": dirs}


def _ours(pair: dict[str, object], names: list[str]) -> torch.nn.Module:
    model = copy.deepcopy(pair["base"])
    for n in names:
        deltatune.load_adapter(model, pair["dirs"][n], name=n)  # type: ignore[index]
    return model


def _peft_logits(pm: torch.nn.Module, adapters: list[str], weights: list[float], method: str, **kw: object) -> torch.Tensor:
    pm.add_weighted_adapter(adapters, weights, "m", combination_type=method, **kw)
    try:
        pm.set_adapter("m")
        with torch.no_grad():
            return pm(IDS).logits
    finally:
        pm.set_adapter("a")
        pm.delete_adapter("m")


def _our_logits(model: torch.nn.Module, adapters: list[str], weights: list[float], method: str, **kw: object) -> torch.Tensor:
    compose.add_weighted_adapter(model, adapters, weights, "m", method, **kw)
    try:
        deltatune.set_active(model, "m")
        with torch.no_grad():
            return model(IDS).logits
    finally:
        deltatune.delete_adapter(model, "m")


EXACT_PEFT = ["cat", "linear", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
RANDOM_PEFT = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]


@pytest.mark.parametrize("method", EXACT_PEFT + RANDOM_PEFT)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_same_logits_as_peft(pair: dict[str, object], method: str, sign: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if sign == "frequency" and "ties" not in method:
        pytest.skip("majority_sign_method only matters for the TIES types")
    pm = pair["peft"]
    model = _ours(pair, ["a", "b"])
    kw: dict[str, object] = {"density": 0.6, "majority_sign_method": sign} if method not in ("cat", "linear", "svd") else {}
    weights = [0.7, -0.4]
    # PEFT's DARE draws from the global RNG, after initialising the new adapter from it too; give its
    # draws their own Generator(5), so the same masks arise iff both draw in the same order and shapes.
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(5)

    def random_pruning(t: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        out = t * torch.bernoulli(torch.full_like(t, density), generator=g)
        return out / density if rescale else out

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    want = _peft_logits(pm, ["a", "b"], weights, method, **kw)  # type: ignore[arg-type]
    got = _our_logits(model, ["a", "b"], weights, method, seed=5, **kw)
    with torch.no_grad():
        base = pair["base"](IDS).logits  # type: ignore[operator]
    assert (want - base).abs().max() > 1e-3  # the composition changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_mixed_ranks_and_targets_as_peft(pair: dict[str, object], method: str) -> None:
    """a (r=4 on q, v, down) with c (r=6 on q, k): PEFT's cat and svd accept these; the union of targets."""
    model = _ours(pair, ["a", "c"])
    want = _peft_logits(pair["peft"], ["a", "c"], [1.0, 0.5], method, svd_rank=12)  # type: ignore[arg-type]
    got = _our_logits(model, ["a", "c"], [1.0, 0.5], method, svd_rank=12)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_svd_default_rank_truncates_like_peft(pair: dict[str, object]) -> None:
    """Default svd_rank = max rᵢ (4 here, the sum has rank 8): both truncate the same way, and we say how much."""
    model = _ours(pair, ["a", "b"])
    want = _peft_logits(pair["peft"], ["a", "b"], [1.0, 1.0], "svd")  # type: ignore[arg-type]
    got = _our_logits(model, ["a", "b"], [1.0, 1.0], "svd")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    composed = compose.combine([compose.from_model(model, "a"), compose.from_model(model, "b")], [1, 1], "svd")
    assert all(m.rank == 4 for m in composed.modules.values())
    assert all(e is not None and 0.3 < e < 1.0 for e in composed.energy.values())


def test_composed_file_loads_in_peft_with_same_logits(pair: dict[str, object], tmp_path: Path) -> None:
    """A composition with per-module ranks (rank_pattern) written by deltatune: PEFT loads it, same logits."""
    from peft import PeftModel

    adapters = [compose.read_adapter(pair["dirs"][n], name=n) for n in ("a", "c")]  # type: ignore[index]
    composed = compose.combine(adapters, [0.5, -1.0], "task_arithmetic")
    assert {m.rank for m in composed.modules.values()} == {4, 6, 10}  # q: 4+6, k: 6, v/down: 4
    out = compose.save_composed(composed, tmp_path / "m")
    model = copy.deepcopy(pair["base"])
    deltatune.load_adapter(model, out, name="m")
    pm = PeftModel.from_pretrained(copy.deepcopy(pair["base"]), out)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, pm(IDS).logits, rtol=1e-5, atol=1e-5)

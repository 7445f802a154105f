"""Pure combinations: the exact types against a naive Σ λᵢ sᵢ BᵢAᵢ in fp64, negation, mixed ranks and
targets, rsLoRA, truncation energy, the new operators, and the error cases."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.compose import AdapterFactors, CompositionError, ModuleFactors, combine, ops


def _adapter(name: str, seed: int, spec: dict[str, tuple[int, int, int]], alpha: float = 8.0, rslora: bool = False,
             fingerprint: dict[str, object] | None = None) -> AdapterFactors:
    """spec: module path → (r, k, d); fp64 random factors with B ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for path, (r, k, d) in spec.items():
        a = torch.randn(r, k, generator=g, dtype=torch.float64)
        b = torch.randn(d, r, generator=g, dtype=torch.float64)
        mods[path] = ModuleFactors("linear", a, b, alpha / math.sqrt(r) if rslora else alpha / r)
    return AdapterFactors(name, mods, fingerprint)


SPEC_A = {"q": (4, 12, 10), "v": (4, 12, 8)}
SPEC_B = {"q": (2, 12, 10), "o": (3, 8, 12)}  # another rank and another target set


def naive(adapters: list[AdapterFactors], weights: list[float], path: str) -> torch.Tensor:
    total = None
    for ad, lam in zip(adapters, weights):
        if path in ad.modules:
            m = ad.modules[path]
            term = lam * m.scale * (m.b.double() @ m.a.double())
            total = term if total is None else total + term
    assert total is not None
    return total


@pytest.mark.parametrize("method", ["cat", "task_arithmetic", "svd"])
@pytest.mark.parametrize("rslora", [False, True])
def test_exact_types_equal_naive_sum(method: str, rslora: bool) -> None:
    ads = [_adapter("a", 0, SPEC_A, rslora=rslora), _adapter("b", 1, SPEC_B, alpha=3.0, rslora=rslora)]
    w = [0.7, -1.3]
    out = combine(ads, w, method, svd_rank=64)
    assert set(out.modules) == {"q", "v", "o"}  # union of targets
    for path, m in out.modules.items():
        assert m.scale == 1.0
        torch.testing.assert_close(m.delta(torch.float64), naive(ads, w, path), rtol=1e-10, atol=1e-10)
        assert out.energy[path] == pytest.approx(1.0)
    assert out.modules["q"].rank == 6 and out.modules["v"].rank == 4 and out.modules["o"].rank == 3


def test_svd_rank_capped_and_energy_reported() -> None:
    ads = [_adapter("a", 0, SPEC_A), _adapter("b", 1, {"q": (4, 12, 10)})]
    out = combine(ads, [1.0, 1.0], "svd", svd_rank=3)
    full = naive(ads, [1.0, 1.0], "q")
    s = torch.linalg.svdvals(full)
    assert out.modules["q"].rank == 3
    assert out.energy["q"] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
    # the best rank-3 approximation (Eckart–Young): error² = Σ_{i>3} σᵢ²
    err = (out.modules["q"].delta(torch.float64) - full).norm() ** 2
    assert float(err) == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-8)
    # svd_rank beyond the layer's smaller side (PEFT crashes in forward): capped at min(d, k) / Σr
    big = combine(ads, [1.0, 1.0], "svd", svd_rank=1000)
    assert big.modules["q"].rank == 8 and big.modules["v"].rank == 4
    tw = combine(ads, [1.0, 1.0], "ties_svd", density=0.5, svd_rank=1000)
    assert tw.modules["q"].rank == 10  # min(d=10, k=12): the pruned ΔW is full rank


def test_negation_is_exact() -> None:
    a, b = _adapter("a", 0, SPEC_A), _adapter("b", 1, SPEC_A)
    zero = combine([a, AdapterFactors("a_again", a.modules)], [1.0, -1.0], "task_arithmetic")
    for m in zero.modules.values():
        assert torch.count_nonzero(m.delta(torch.float64)) == 0  # exactly: a − a, not rounding noise
    only_b = combine([a, b, AdapterFactors("minus_a", a.modules)], [1.0, 0.5, -1.0], "task_arithmetic")
    for path, m in only_b.modules.items():
        assert m.rank == b.modules[path].rank
        assert torch.equal(m.a, b.modules[path].a * (0.5 * b.modules[path].scale))
        assert torch.equal(m.b, b.modules[path].b)


def test_linear_is_peft_rough_approximation() -> None:
    """PEFT's 'linear' scales A and B by √|λs| each: B@A has cross terms BᵢAⱼ; the formula, written out."""
    a, b = _adapter("a", 0, {"q": (4, 12, 10)}), _adapter("b", 1, {"q": (4, 12, 10)})
    w = [0.7, -0.4]
    ma, mb = a.modules["q"], b.modules["q"]
    sa, sb = w[0] * ma.scale, w[1] * mb.scale
    A = math.sqrt(abs(sa)) * ma.a + math.copysign(math.sqrt(abs(sb)), sb) * mb.a
    B = math.sqrt(abs(sa)) * ma.b + math.sqrt(abs(sb)) * mb.b
    out = combine([a, b], w, "linear")
    torch.testing.assert_close(out.modules["q"].delta(torch.float64), B @ A, rtol=1e-12, atol=1e-12)
    assert (B @ A - naive([a, b], w, "q")).norm() > 0.1  # ≠ the exact sum


def test_factorwise_pads_different_ranks() -> None:
    a, b = _adapter("a", 0, {"q": (4, 12, 10)}), _adapter("b", 1, {"q": (2, 12, 10)})
    out = combine([a, b], [1.0, 1.0], "ties", density=0.5)
    assert out.modules["q"].rank == 4


def test_single_adapter_is_exact_whatever_the_type() -> None:
    """As PEFT: one adapter combines as 'linear' (λ·s·BA exactly)."""
    a = _adapter("a", 0, SPEC_A)
    for method in ("ties", "svd", "dare_ties_svd"):
        out = combine([a], [-0.5], method, density=0.3)
        for path, m in out.modules.items():
            torch.testing.assert_close(m.delta(torch.float64), naive([a], [-0.5], path), rtol=1e-10, atol=1e-10)


def test_dare_seeded_reproducible_and_unbiased() -> None:
    a, b = _adapter("a", 0, {"q": (4, 40, 40)}), _adapter("b", 1, {"q": (4, 40, 40)})
    state = torch.random.get_rng_state()
    one = combine([a, b], [1.0, 1.0], "dare_linear_svd", density=0.5, seed=3, svd_rank=40)
    two = combine([a, b], [1.0, 1.0], "dare_linear_svd", density=0.5, seed=3, svd_rank=40)
    three = combine([a, b], [1.0, 1.0], "dare_linear_svd", density=0.5, seed=4, svd_rank=40)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(one.modules["q"].delta(), two.modules["q"].delta())
    assert not torch.equal(one.modules["q"].delta(), three.modules["q"].delta())
    # E[DARE(ΔW)] = ΔW: the mean of 200 draws is within a few standard errors of the exact sum
    exact = naive([a, b], [1.0, 1.0], "q")
    g = torch.Generator().manual_seed(0)
    deltas = torch.stack([ops.prune_random(exact, 0.5, g) for _ in range(200)])
    se = deltas.std(0) / math.sqrt(200)
    assert ((deltas.mean(0) - exact).abs() <= 5 * se + 1e-12).float().mean() > 0.999


def test_della_and_breadcrumbs_operators() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, 400, generator=g, dtype=torch.float64)
    # breadcrumbs keeps exactly ⌊density·n⌋ entries, none of the top-γ outliers nor the smallest
    kept = ops.prune_breadcrumbs(t, 0.5, gamma=0.01)
    mask = kept != 0
    assert int(mask.sum()) == int(0.5 * t.numel())
    mags = t.abs().flatten().sort().values
    n = t.numel()
    assert kept.abs().max() <= mags[n - int(0.01 * n) - 1] and kept.abs()[mask].min() >= mags[n - int(0.5 * n) - int(0.01 * n)]
    # DELLA: unbiased, and larger entries survive more often
    draws = torch.stack([ops.prune_della(t, 0.5, g, epsilon=0.2) for _ in range(300)])
    keep_rate = (draws != 0).double().mean(0)
    big = t.abs() > t.abs().median(dim=1, keepdim=True).values
    assert keep_rate[big].mean() > keep_rate[~big].mean() + 0.1
    rel = (draws.mean(0) - t).norm() / t.norm()
    assert rel < 0.1
    for method in ("della", "della_linear", "breadcrumbs", "breadcrumbs_ties"):
        out = combine([_adapter("a", 0, SPEC_A), _adapter("b", 1, SPEC_A)], [1, 1], method, density=0.5, seed=1)
        assert all(m.rank == 4 for m in out.modules.values())


def test_majority_sign_methods_differ() -> None:
    t = torch.tensor([[3.0], [-1.0], [-1.0]])
    assert ops.majority_sign_mask(t, "total").flatten().tolist() == [True, False, False]
    assert ops.majority_sign_mask(t, "frequency").flatten().tolist() == [False, True, True]


# ------------------------------------------------------------------------------------- errors
def test_errors_name_adapter_and_module() -> None:
    a = _adapter("first", 0, SPEC_A)
    bad = _adapter("second", 1, {"q": (4, 12, 9)})  # q has another output width
    with pytest.raises(CompositionError, match=r"module 'q'.*'second'.*'first'"):
        combine([a, bad], [1, 1], "cat")
    fa = _adapter("x", 0, SPEC_A, fingerprint={"architecture": "L", "modules": {"q": {"shape": [12, 10], "checksum": 5.0}}})
    fb = _adapter("y", 1, SPEC_A, fingerprint={"architecture": "L", "modules": {"q": {"shape": [12, 10], "checksum": 7.0}}})
    with pytest.raises(CompositionError, match=r"module 'q'.*'y'.*'x'.*share their base"):
        combine([fa, fb], [1, 1], "cat")
    fc = _adapter("z", 1, SPEC_A, fingerprint={"architecture": "G", "modules": {}})
    with pytest.raises(CompositionError, match="'z'.*G.*'x'.*L"):
        combine([fa, fc], [1, 1], "cat")
    with pytest.raises(ValueError, match="did you mean 'ties'"):
        combine([a], [1], "tiess")
    with pytest.raises(ValueError, match="needs density"):
        combine([a, _adapter("b", 1, SPEC_A)], [1, 1], "ties")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        combine([a, _adapter("b", 1, SPEC_A)], [1], "cat")
    with pytest.raises(ValueError, match="density must be in"):
        combine([a, _adapter("b", 1, SPEC_A)], [1, 1], "ties", density=1.5)

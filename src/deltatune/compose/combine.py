"""Combining LoRA adapters that share a base into one new LoRA adapter: pure functions over factors.

Every adapter enters as plain factors per module, ΔWᵢ = sᵢ·BᵢAᵢ with A (r, k) and B (d, r) in the
``nn.Linear`` layout (Conv1D / embedding ΔW is stored transposed by its layer, which changes
nothing here; Conv2d A is (r, k, kh, kw) and is flattened to (r, k·kh·kw) for the SVD). The result
has scale 1 (alpha = r per module), so its file needs no rsLoRA flag and loads the same anywhere.

Combination types (``METHODS``):

* PEFT's, with PEFT's semantics (``peft.tuners.lora.model.LoraModel.add_weighted_adapter``):
  ``cat`` exact, rank Σrᵢ · ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` /
  ``magnitude_prune`` act on A and B *separately* with weights sign·√|λs| (A) and √|λs| (B), so
  they add cross terms BᵢAⱼ (PEFT: "a very rough approximation") · ``svd`` / ``ties_svd`` /
  ``dare_linear_svd`` / ``dare_ties_svd`` / ``magnitude_prune_svd`` act on ΔW, then truncate to
  ``svd_rank`` (default max rᵢ, as PEFT) by SVD with B = U·S, A = Vᵀ, optional ``svd_clamp``.
  Like PEFT, a single adapter always combines as ``linear`` (exact for one adapter).
* ``task_arithmetic``: the exact signed sum Σ λᵢ sᵢ BᵢAᵢ (Ilharco et al. 2023), stored at rank Σrᵢ;
  identical factor pairs are collapsed first, so a − a is exactly zero.
* Beyond PEFT (mergekit's): ``della`` / ``della_linear`` (DELLA MagPrune on ΔW, with/without sign
  election) and ``breadcrumbs`` / ``breadcrumbs_ties``, all followed by the SVD truncation.

Where PEFT differs, we do what is right: different ranks and target sets combine (a module gets
the adapters that have it; the factor-wise types zero-pad to the largest rank); the true scale of
each adapter (rsLoRA α/√r) is used and the output has scale 1 (PEFT copies ``use_rslora`` and so
scales its result by √r); ``svd_rank`` is capped per module at min(d, k) and, for ``svd``, at Σrᵢ
where the truncation is exact; the fraction of ‖ΔW‖² the truncation keeps is reported per module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import ops

__all__ = ["ModuleFactors", "AdapterFactors", "Composed", "METHODS", "combine", "CompositionError"]


class CompositionError(ValueError):
    """An impossible composition request; the message names the adapter and the module."""


@dataclass
class ModuleFactors:
    """One module of one adapter: ΔW = scale·B@A. kind: 'linear' | 'conv1d' | 'embedding' | 'conv2d'."""

    kind: str
    a: torch.Tensor  # (r, k) or (r, k, kh, kw)
    b: torch.Tensor  # (d, r) or (d, r, 1, 1)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale·B@A as a (d, k[·kh·kw]) matrix."""
        return (self.b.flatten(1).to(dtype) @ self.a.flatten(1).to(dtype)) * self.scale


@dataclass
class AdapterFactors:
    """A whole adapter as plain LoRA factors, module path → factors (in model order), plus what is
    needed to check that adapters share a base and to write the result."""

    name: str  # for messages: the directory or the adapter name
    modules: dict[str, ModuleFactors]
    fingerprint: dict[str, object] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None


@dataclass
class Composed:
    """The combined adapter (every module at scale 1) and the per-module report."""

    modules: dict[str, ModuleFactors]
    energy: dict[str, float | None]  # fraction of ‖ΔW‖² kept by the SVD truncation (None: no SVD)
    method: str
    weights: list[float]
    sources: list[str]
    fingerprint: dict[str, object] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    settings: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class _Method:
    space: Literal["cat", "factors", "delta"]
    sparsify: str = "none"
    consensus: bool = False
    svd: bool = False


METHODS: dict[str, _Method] = {
    "cat": _Method("cat"),
    "task_arithmetic": _Method("cat"),
    "linear": _Method("factors"),
    "ties": _Method("factors", "magnitude", True),
    "dare_linear": _Method("factors", "random"),
    "dare_ties": _Method("factors", "random", True),
    "magnitude_prune": _Method("factors", "magnitude"),
    "svd": _Method("delta", svd=True),
    "ties_svd": _Method("delta", "magnitude", True, svd=True),
    "dare_linear_svd": _Method("delta", "random", svd=True),
    "dare_ties_svd": _Method("delta", "random", True, svd=True),
    "magnitude_prune_svd": _Method("delta", "magnitude", svd=True),
    "della": _Method("delta", "della", True, svd=True),
    "della_linear": _Method("delta", "della", svd=True),
    "breadcrumbs": _Method("delta", "breadcrumbs", svd=True),
    "breadcrumbs_ties": _Method("delta", "breadcrumbs", True, svd=True),
}


def _work_dtype(parts: Sequence[ModuleFactors]) -> torch.dtype:
    # fp32 like PEFT (adapters are fp32 masters); fp64 inputs stay fp64 (the tests' reference precision).
    return torch.float64 if any(p.a.dtype == torch.float64 for p in parts) else torch.float32


def _union_paths(adapters: Sequence[AdapterFactors]) -> list[str]:
    seen: dict[str, None] = {}
    for ad in adapters:
        for path in ad.modules:
            seen.setdefault(path, None)
    return list(seen)


def _check_compatible(adapters: Sequence[AdapterFactors]) -> None:
    """Same module shapes/kinds everywhere and, where both files carry one, the same base fingerprint."""
    first: dict[str, tuple[str, ModuleFactors]] = {}
    for ad in adapters:
        for path, m in ad.modules.items():
            if path not in first:
                first[path] = (ad.name, m)
                continue
            other_name, o = first[path]
            if m.kind != o.kind or m.a.shape[1:] != o.a.shape[1:] or m.b.shape[0] != o.b.shape[0]:
                raise CompositionError(
                    f"module {path!r}: adapter {ad.name!r} has a {m.kind} with A {list(m.a.shape)}, B {list(m.b.shape)} "
                    f"but adapter {other_name!r} has a {o.kind} with A {list(o.a.shape)}, B {list(o.b.shape)}; "
                    "adapters must share their base model")
    _check_fingerprints(adapters)


def _check_fingerprints(adapters: Sequence[AdapterFactors]) -> None:
    seen: dict[str, tuple[str, float]] = {}
    arch: tuple[str, object] | None = None
    for ad in adapters:
        fp = ad.fingerprint
        if not fp:
            continue
        if arch is None:
            arch = (ad.name, fp.get("architecture"))
        elif fp.get("architecture") != arch[1]:
            raise CompositionError(f"adapter {ad.name!r} was trained on a {fp.get('architecture')} but adapter "
                                   f"{arch[0]!r} on a {arch[1]}; adapters must share their base model")
        modules = fp.get("modules")
        for path, info in (modules.items() if isinstance(modules, dict) else []):
            checksum = float(info["checksum"])
            if path in seen and not math.isclose(checksum, seen[path][1], rel_tol=1e-4, abs_tol=1e-6):
                raise CompositionError(
                    f"module {path!r}: the base weights adapter {ad.name!r} was trained on differ from those of "
                    f"adapter {seen[path][0]!r} (fingerprint checksum {checksum:.6g} vs {seen[path][1]:.6g}); "
                    "adapters must share their base model")
            seen.setdefault(path, (ad.name, checksum))


def _collapse(terms: list[tuple[float, ModuleFactors]]) -> list[tuple[float, ModuleFactors]]:
    """Merge terms whose factors are the very same tensors (λ₁·X + λ₂·X → (λ₁+λ₂)·X); drop zero ones."""
    out: list[tuple[float, ModuleFactors]] = []
    for lam, m in terms:
        for i, (lam2, m2) in enumerate(out):
            if m2.scale == m.scale and m2.a.shape == m.a.shape and m2.b.shape == m.b.shape and torch.equal(
                    m2.a, m.a) and torch.equal(m2.b, m.b):
                out[i] = (lam2 + lam, m2)
                break
        else:
            out.append((lam, m))
    return [(lam, m) for lam, m in out if lam != 0.0]


def _cat(terms: list[tuple[float, ModuleFactors]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # PEFT's cat: A ← [λ₁s₁A₁; λ₂s₂A₂; …] (Σr, k), B ← [B₁ B₂ …] (d, Σr): B@A = Σ λᵢsᵢBᵢAᵢ exactly.
    a = torch.cat([m.a.to(dtype) * (lam * m.scale) for lam, m in terms], dim=0)
    b = torch.cat([m.b.to(dtype) for _, m in terms], dim=1)
    return a, b


def _pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == r:
        return t
    shape = list(t.shape)
    shape[dim] = r - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _factorwise(terms: list[tuple[float, ModuleFactors]], spec: _Method, dtype: torch.dtype, density: float | None,
                sign: ops.SignMethod, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    # PEFT: λ·s split as sign·√|λs| onto A and √|λs| onto B; A's and B's merged independently.
    r = max(m.rank for _, m in terms)
    wa = torch.tensor([math.copysign(math.sqrt(abs(lam * m.scale)), lam * m.scale) for lam, m in terms], dtype=dtype)
    wb = torch.tensor([math.sqrt(abs(lam * m.scale)) for lam, m in terms], dtype=dtype)
    As = [_pad_rank(m.a.to(dtype), r, 0) for _, m in terms]
    Bs = [_pad_rank(m.b.to(dtype), r, 1) for _, m in terms]
    kw = {"sparsify": spec.sparsify, "consensus": spec.consensus, "density": density, "majority_sign_method": sign,
          "generator": gen}
    a = ops.merge_tensors(As, wa, **kw)  # type: ignore[arg-type]
    b = ops.merge_tensors(Bs, wb, **kw)  # type: ignore[arg-type]
    return a, b


def _lowrank_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B@A (d×k, rank ≤ R) from its factors in O((d+k)R²): B = Q_b R_b, Aᵀ = Q_a R_a,
    B@A = Q_b (R_b R_aᵀ) Q_aᵀ and the R×R middle is SVD'd. a (R, k), b (d, R)."""
    qb, rb = torch.linalg.qr(b)  # (d, m), (m, R)
    qa, ra = torch.linalg.qr(a.t())  # (k, n), (n, R)
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    return qb @ u, s, vh @ qa.t()


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, clamp: float | None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    total = float((s.double() ** 2).sum())
    kept = float((s[:rank].double() ** 2).sum())
    b = u[:, :rank] * s[:rank]  # U·S → B (d, r), as PEFT (after kohya-ss's svd_merge_lora)
    a = vh[:rank]  # Vᵀ → A (r, k)
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a, b, (kept / total if total > 0 else 1.0)


def combine(adapters: Sequence[AdapterFactors], weights: Sequence[float], method: str = "task_arithmetic", *,
            density: float | None = None, svd_rank: int | None = None, svd_clamp: float | None = None,
            majority_sign_method: ops.SignMethod = "total", seed: int | None = None,
            generator: torch.Generator | None = None, epsilon: float = 0.1, gamma: float = 0.01) -> Composed:
    """Combine ``adapters`` with weights λ (negative allowed) into a new scale-1 LoRA adapter.

    DARE/DELLA draw from ``generator`` (or a fresh one seeded with ``seed``; 0 when neither is
    given), module by module in the adapters' module order, A's before B's for the factor-wise types.
    """
    if method not in METHODS:
        import difflib

        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown combination method {method!r}{hint}; choose one of {', '.join(METHODS)}")
    if not adapters:
        raise ValueError("combine: no adapters given")
    if len(weights) != len(adapters):
        raise ValueError(f"combine: {len(adapters)} adapters but {len(weights)} weights")
    if len({ad.name for ad in adapters}) != len(adapters):
        raise ValueError(f"combine: adapter names repeat ({[ad.name for ad in adapters]}); name each input once")
    if svd_rank is not None and svd_rank < 1:
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and not 0.0 < svd_clamp <= 1.0:
        raise ValueError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp!r}")
    _check_compatible(adapters)
    effective = "linear" if len(adapters) == 1 and method not in ("cat", "task_arithmetic") else method  # as PEFT
    spec = METHODS[effective]
    if spec.sparsify not in ("none",) and density is None:
        raise ValueError(f"method {method!r} needs density (the fraction of entries kept), e.g. density=0.5")
    gen = generator
    if gen is None and spec.sparsify in ("random", "della"):
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
    default_rank = max(m.rank for ad in adapters for m in ad.modules.values())  # PEFT: max rᵢ
    out: dict[str, ModuleFactors] = {}
    energy: dict[str, float | None] = {}
    for path in _union_paths(adapters):
        terms = [(float(lam), ad.modules[path]) for ad, lam in zip(adapters, weights) if path in ad.modules]
        kind = terms[0][1].kind
        a_shape = terms[0][1].a.shape  # (r, k[, kh, kw])
        d = int(terms[0][1].b.shape[0])
        dtype = _work_dtype([m for _, m in terms])
        e: float | None = None
        if spec.space == "cat":
            if method == "task_arithmetic":
                terms = _collapse(terms) or [(0.0, terms[0][1])]  # all cancelled: a zero term keeps rank ≥ 1
            a, b = _cat(terms, dtype)
            e = 1.0
        elif spec.space == "factors":
            a, b = _factorwise(terms, spec, dtype, density, majority_sign_method, gen)
        else:
            if spec.sparsify == "none":  # plain svd: factored SVD of the exact sum
                ca, cb = _cat(terms, dtype)
                u, s, vh = _lowrank_svd(ca.flatten(1), cb.flatten(1))
                cap = min(svd_rank or default_rank, ca.shape[0], d, ca.flatten(1).shape[1])
            else:
                deltas = [m.delta(dtype) for _, m in terms]  # (d, k'), one per adapter, pruned in this order
                lam = torch.tensor([t[0] for t in terms], dtype=dtype)
                merged = ops.merge_tensors(deltas, lam, sparsify=spec.sparsify, consensus=spec.consensus,
                                           density=density, majority_sign_method=majority_sign_method,
                                           generator=gen, epsilon=epsilon, gamma=gamma)
                u, s, vh = torch.linalg.svd(merged, full_matrices=False)
                cap = min(svd_rank or default_rank, *merged.shape)
            a, b, e = _truncate(u, s, vh, max(cap, 1), svd_clamp)
        if kind == "conv2d":
            a = a.reshape(a.shape[0], *a_shape[1:])
            b = b.reshape(d, b.shape[1], 1, 1)
        out[path] = ModuleFactors(kind, a.contiguous(), b.contiguous(), 1.0)
        energy[path] = e
    first = adapters[0]
    return Composed(out, energy, method, [float(w) for w in weights], [ad.name for ad in adapters],
                    fingerprint=_merged_fingerprint(adapters), base_model_name_or_path=first.base_model_name_or_path,
                    task_type=first.task_type,
                    settings={"density": density, "svd_rank": svd_rank, "svd_clamp": svd_clamp,
                              "majority_sign_method": majority_sign_method, "seed": seed})


def _merged_fingerprint(adapters: Sequence[AdapterFactors]) -> dict[str, object] | None:
    """The union of the inputs' fingerprints (they agree where they overlap: checked)."""
    fps = [ad.fingerprint for ad in adapters if ad.fingerprint]
    if not fps:
        return None
    modules: dict[str, object] = {}
    for fp in fps:
        m = fp.get("modules")
        if isinstance(m, dict):
            for path, info in m.items():
                modules.setdefault(path, info)
    return {**fps[0], "modules": modules}

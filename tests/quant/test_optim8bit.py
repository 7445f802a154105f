"""AdamW8bit against fp32 AdamW (a naive loop and torch.optim.AdamW) and bitsandbytes' CPU path."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from deltatune.quant.optim8bit import AdamW8bit, PagedAdamW, optimizer_state_bytes


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least squares ||X W - Y||² with W (128, 64) = 8192 elements (8-bit path) and a bias (64,)
    (< 4096 elements: fp32 path)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=g)
    w_true = torch.randn(128, 64, generator=g) * 0.1
    return x, x @ w_true + 0.01 * torch.randn(256, 64, generator=g), torch.randn(128, 64, generator=g) * 0.1


def _run(make_opt, steps: int = 60) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:  # type: ignore[no-untyped-def]
    x, y, w0 = _problem()
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(64, requires_grad=True)
    opt = make_opt([w, b])
    for _ in range(steps):
        opt.zero_grad()
        loss = ((x @ w + b - y) ** 2).mean()
        loss.backward()
        opt.step()
    return [w.detach(), b.detach()], opt


def test_small_tensors_match_naive_adamw_exactly() -> None:
    """< 4096 elements: fp32 states; the update is bnb's 32-bit formula, written out here."""
    torch.manual_seed(0)
    p = torch.randn(50, requires_grad=True)
    ref = p.detach().clone()
    opt = AdamW8bit([p], lr=1e-2, weight_decay=0.1)
    m = torch.zeros(50)
    v = torch.zeros(50)
    for t in range(1, 6):
        g = torch.randn(50)
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        c1, c2 = 1 - 0.9**t, (1 - 0.999**t) ** 0.5
        ref = ref * (1 - 1e-2 * 0.1)
        ref = ref + (m / (v.sqrt() + 1e-8 * c2)) * (-1e-2 * c2 / c1)
        torch.testing.assert_close(p.detach(), ref, atol=1e-6, rtol=1e-6)
    assert opt.state[p]["state1"].dtype == torch.float32


def test_tracks_fp32_adamw() -> None:
    """8-bit states add relative error ~ code spacing (dynamic map: ≤ ~1.6 % near |x|≈1, much
    finer near 0); after 60 steps the distance to fp32 AdamW stays a small fraction of the
    distance travelled.  Bound 5 % of the travelled distance, loss within 5 % (bnb's
    AdamW8bit shows the same ~2 % loss gap at step 60 on this problem)."""
    (w8, b8), _ = _run(lambda ps: AdamW8bit(ps, lr=1e-2))
    (w32, b32), _ = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    _, _, w0 = _problem()
    travelled = (w32 - w0).norm()
    print(f"|w8 - w32| / travelled = {float((w8 - w32).norm() / travelled):.4f}")
    assert (w8 - w32).norm() < 0.05 * travelled
    x, y, _ = _problem()
    l8 = float(((x @ w8 + b8 - y) ** 2).mean())
    l32 = float(((x @ w32 + b32 - y) ** 2).mean())
    assert abs(l8 - l32) <= 0.05 * l32


def test_tracks_bitsandbytes_adamw8bit() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    (w8, _), ours = _run(lambda ps: AdamW8bit(ps, lr=1e-2))
    (wb, _), theirs = _run(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2))
    (w32, _), _ = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    # Same state layout and sizes as bnb.
    st, sb = next(iter(ours.state.values())), next(iter(theirs.state.values()))
    for k in ("state1", "state2", "absmax1", "absmax2"):
        assert st[k].dtype == sb[k].dtype and st[k].shape == sb[k].shape
    # bnb's CPU requantization rounds via a lookup table, ours to the exact nearest code, so
    # the trajectories differ by a fraction of the 8-bit noise: closer to each other than
    # either is to fp32 AdamW... within a factor 2, and both small.
    print(f"|ours - bnb| = {float((w8 - wb).norm()):.3e}, |bnb - fp32| = {float((wb - w32).norm()):.3e}")
    assert (w8 - wb).norm() <= 2 * (wb - w32).norm()


def test_state_dict_round_trip_and_memory() -> None:
    (w, b), opt = _run(lambda ps: AdamW8bit(ps, lr=1e-2), steps=5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf)
    p2 = [w.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    opt2 = AdamW8bit(p2, lr=1e-2)
    opt2.load_state_dict(loaded)
    for st_a, p_b in zip(opt.state.values(), p2):
        st_b = opt2.state[p_b]
        assert st_a["step"] == st_b["step"] == 5
        for k, v in st_a.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == st_b[k].dtype and torch.equal(v, st_b[k]), k
    # one more identical step from both
    p1 = [w.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    opt1 = AdamW8bit(p1, lr=1e-2)
    opt1.load_state_dict(copy.deepcopy(opt.state_dict()))
    for ps in (p1, p2):
        for p in ps:
            p.grad = torch.ones_like(p)
    opt1.step()
    opt2.step()
    assert all(torch.equal(a, c) for a, c in zip(p1, p2))
    # memory: 2 bytes/element + 8 bytes per 256 for the big tensor vs 8 bytes/element in fp32
    n_w, n_b = 128 * 64, 64
    assert optimizer_state_bytes(opt) == 2 * n_w + 2 * 4 * (n_w // 256) + 8 * n_b
    (_, _), opt32 = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2), steps=1)
    assert optimizer_state_bytes(opt32) == 8 * (n_w + n_b)


def test_bf16_params_keep_fp32_state_after_load() -> None:
    p = torch.nn.Parameter(torch.randn(100, dtype=torch.bfloat16))
    opt = AdamW8bit([p])
    p.grad = torch.randn(100, dtype=torch.bfloat16)
    opt.step()
    opt2 = AdamW8bit([p])
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["state1"].dtype == torch.float32


def test_paged_adamw_on_cpu_warns_and_falls_back() -> None:
    p = torch.nn.Parameter(torch.randn(10))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = PagedAdamW([p], optim_bits=8)
    assert isinstance(opt, AdamW8bit)
    assert any("paging applies only to CUDA" in str(r.message) for r in rec)
    with pytest.warns(UserWarning):
        assert isinstance(PagedAdamW([p]), torch.optim.AdamW)

"""``pairs=`` of the manifold loss ("tokens", "samples", "batch") on every backend against an independent
fp64 formula that builds the full pair matrices with einsum; gradients included."""

from __future__ import annotations

import pytest
import torch

import repa_fused as rf
from repa_fused.ops import api as functional, dispatch, pairs as pair_ops
from helpers import ODD_CASES, independent_losses, rel_rmse, resample, unit

BACKENDS = [b for b in ("reference", "cpp", "triton") if b in dispatch.available_backends("cpu")]
# The Triton interpreter is slow: it sees the small cases only.
SMALL_CASES = [c for c in ODD_CASES if c[0] * c[1][0] * c[1][1] * c[3] <= 120]


def independent_pairs(h, y, h_grid, y_grid, target, pairs):
    """(B,) fp64 shares: the full pair matrix by einsum, each sample's rows summed, scaled so that the
    mean of the shares is the loss of the issue's formula."""
    if pairs == "tokens":
        return independent_losses(h, y, h_grid, y_grid, target)[1]
    hh, yy = unit(resample(h, h_grid, target)), unit(resample(y, y_grid, target))
    b, n, _ = hh.shape
    if pairs == "samples":
        p, q = unit(hh.mean(1)), unit(yy.mean(1))
        sim = torch.einsum("ad,bd->ab", p, p) - torch.einsum("ad,bd->ab", q, q)
        return sim.square().sum(1) / b  # mean over a: (1/B²) Σ_ab
    sim = torch.einsum("aid,bjd->aibj", hh, hh) - torch.einsum("aid,bjd->aibj", yy, yy)
    return sim.square().sum((1, 2, 3)) / (b * n * n)  # mean over a: (1/(B·N)²) Σ


def _close(want, got, tol) -> bool:
    """Relative RMSE within tol; an exact value of 0 (B=1 and N=1: one pair, always equal) leaves only
    rounding, compared against a floor instead."""
    return rel_rmse(want, got.double()) < tol or float(got.double().sub(want).square().mean().sqrt()) < tol * 1e-4


def _case(b, h_grid, y_grid, d, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, h_grid[0] * h_grid[1], d, generator=g, dtype=torch.float64)
    y = torch.randn(b, y_grid[0] * y_grid[1], d, generator=g, dtype=torch.float64)
    return h.to(dtype).requires_grad_(requires_grad), y.to(dtype).requires_grad_(requires_grad)


def _check(backend, case, pairs, reduction, dtype, tol, seed=0):
    b, h_grid, y_grid, d, align = case
    h, y = _case(b, h_grid, y_grid, d, dtype, seed)
    target = functional.resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)[2]
    out = rf.manifold_loss(h, y, h_grid=h_grid, y_grid=y_grid, align=align, pairs=pairs,
                           reduction=reduction, backend=backend)
    h64, y64 = (x.detach().double().requires_grad_() for x in (h, y))
    shares = independent_pairs(h64, y64, h_grid, y_grid, target, pairs)
    exact = shares.mean() if reduction == "mean" else shares
    weights = torch.rand(exact.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    (out * weights.to(out.dtype)).sum().backward()
    (exact * weights).sum().backward()
    assert out.shape == exact.shape
    assert _close(exact.detach(), out.detach(), tol)
    for got, want in ((h.grad, h64.grad), (y.grad, y64.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        assert _close(want, got, tol)


@pytest.mark.parametrize("pairs", ["samples", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", ODD_CASES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_fp64_against_independent_formula(backend, case, pairs, reduction):
    _check(backend, case, pairs, reduction, torch.float64, 1e-10)


@pytest.mark.parametrize("pairs", ["samples", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", SMALL_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_every_backend(backend, case, pairs, reduction):
    _check(backend, case, pairs, reduction, torch.float32, 1e-4, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", ["samples", "batch"])
def test_bfloat16_every_backend(backend, pairs):
    _check(backend, (2, (3, 5), (4, 4), 7, "min"), pairs, "none", torch.bfloat16, 3e-2, seed=5)


@pytest.mark.parametrize("pairs", ["samples", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck(backend, pairs, reduction):
    h, y = _case(2, (2, 3), (3, 3), 5, torch.float64, seed=7)

    def loss(h, y):
        return rf.manifold_loss(h, y, h_grid=(2, 3), y_grid=(3, 3), align="y", pairs=pairs,
                                reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(loss, (h, y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", ["tokens", "samples", "batch"])
def test_urepa_stacks_cosine_and_the_pairs_term(backend, pairs):
    h, y = _case(3, (3, 4), (4, 4), 6, torch.float32, seed=11, requires_grad=False)
    total, alignment, manifold = rf.urepa_loss(h, y, h_grid=(3, 4), manifold_weight=2.0, pairs=pairs,
                                               reduction="none", backend=backend)
    ref = rf.manifold_loss(h, y, h_grid=(3, 4), pairs=pairs, reduction="none", backend="reference")
    cos = rf.cosine_alignment_loss(h, y, h_grid=(3, 4), reduction="none", backend="reference")
    torch.testing.assert_close(manifold, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alignment, cos, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, cos + 2.0 * ref, rtol=1e-5, atol=1e-7)
    mean_total = rf.urepa_loss(h, y, h_grid=(3, 4), manifold_weight=2.0, pairs=pairs, backend=backend)[0]
    torch.testing.assert_close(mean_total, total.mean(), rtol=1e-5, atol=1e-7)


def test_pairs_differ_and_agree_where_they_must():
    """B=1: "batch" is "tokens"; N=1: "samples" is "batch"; otherwise three different numbers."""
    h, y = _case(1, (3, 3), (3, 3), 5, torch.float64, requires_grad=False)
    values = {p: rf.manifold_loss(h, y, pairs=p, backend="reference") for p in ("tokens", "batch")}
    torch.testing.assert_close(values["tokens"], values["batch"])
    h, y = _case(4, (1, 1), (1, 1), 5, torch.float64, requires_grad=False)
    torch.testing.assert_close(rf.manifold_loss(h, y, pairs="samples", backend="reference"),
                               rf.manifold_loss(h, y, pairs="batch", backend="reference"))
    h, y = _case(3, (3, 3), (3, 3), 5, torch.float64, requires_grad=False)
    found = [float(rf.manifold_loss(h, y, pairs=p, backend="reference")) for p in functional.PAIRS]
    assert len({round(v, 12) for v in found}) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", ["samples", "batch"])
def test_zero_vectors_give_finite_values_and_gradients(backend, pairs):
    h, y = _case(2, (2, 2), (2, 2), 5, torch.float32, requires_grad=False)
    h[0, 1] = 0.0
    y[1] = 0.0  # a whole image of zero tokens: its mean unit token is zero too
    h.requires_grad_()
    for reduction in ("mean", "none"):
        out = rf.manifold_loss(h, y, pairs=pairs, reduction=reduction, backend=backend)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(h.grad).all()
        h.grad = None


def test_bad_pairs_is_a_clear_error():
    h, y = _case(1, (2, 2), (2, 2), 3, torch.float32, requires_grad=False)
    for fn in (rf.manifold_loss, rf.urepa_loss):
        with pytest.raises(ValueError, match="pairs must be one of"):
            fn(h, y, pairs="images")


def test_batch_gram_shares_are_cancellation_free():
    """h ≈ y (late training): the shares, O(|Δ|²) = 1e-12 here, keep their digits in float32 where the
    plain ĤᵀĤ − ŶᵀŶ form would lose them all."""
    h, y = _case(2, (4, 4), (4, 4), 8, torch.float64, requires_grad=False)
    y = h + 1e-6 * y
    grids = ((4, 4),) * 3
    exact = independent_pairs(h, y, *grids, "batch")
    got = pair_ops.batch_shares(h.float(), y.float(), *grids)[0].double()
    assert rel_rmse(exact, got) < 0.05


def test_custom_ops_pass_opcheck():
    h, y = _case(2, (2, 3), (3, 3), 5, torch.float32, seed=2)
    for backend in [b for b in BACKENDS if b != "triton"]:
        for op in dispatch.PAIR_OP_NAMES:
            custom = dispatch.BACKENDS[backend].ops[op].custom_op
            for mean in (False, True):
                torch.library.opcheck(custom, (h, y, [2, 3], [3, 3], [2, 3], mean))


@pytest.mark.cuda
@pytest.mark.parametrize("pairs", ["samples", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_triton(pairs, reduction, dtype, tol):
    b, h_grid, y_grid, d = 3, (5, 7), (6, 6), 67
    h, y = _case(b, h_grid, y_grid, d, torch.float64, seed=13, requires_grad=False)
    h, y = (x.to("cuda", dtype).requires_grad_() for x in (h, y))
    out = rf.manifold_loss(h, y, h_grid=h_grid, y_grid=y_grid, align="y", pairs=pairs, reduction=reduction,
                           backend="triton")
    h64, y64 = (x.detach().cpu().double().requires_grad_() for x in (h, y))
    shares = independent_pairs(h64, y64, h_grid, y_grid, y_grid, pairs)
    exact = shares.mean() if reduction == "mean" else shares
    out.sum().backward()
    exact.sum().backward()
    assert _close(exact.detach(), out.detach().cpu(), tol)
    assert _close(h64.grad, h.grad.cpu(), tol) and _close(y64.grad, y.grad.cpu(), tol)

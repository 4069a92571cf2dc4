"""The reference against an independent fp64 formula, gradcheck, and PyTorch's own interpolation."""

import pytest
import torch
import torch.nn.functional as F

from repa_fused.ops import reference
from repa_fused.ops.grids import resolve_grids

from helpers import ODD_CASES, bilinear_matrix, independent_losses, resample


def random_case(b, h_grid, y_grid, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, h_grid[0] * h_grid[1], d, generator=g, dtype=dtype)
    y = torch.randn(b, y_grid[0] * y_grid[1], d, generator=g, dtype=dtype)
    return h, y


@pytest.mark.parametrize("src,dst", [(1, 4), (3, 7), (7, 3), (5, 5), (8, 37), (64, 37), (37, 32)])
def test_bilinear_formula_matches_torch(src, dst):
    x = torch.randn(1, 1, src, 1, dtype=torch.float64)
    ours = bilinear_matrix(src, dst) @ x[0, 0, :, 0]
    theirs = F.interpolate(x, size=(dst, 1), mode="bilinear", align_corners=False)[0, 0, :, 0]
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("case", ODD_CASES)
def test_reference_matches_independent_formula(case):
    b, h_grid, y_grid, d, align = case
    h, y = random_case(b, h_grid, y_grid, d, seed=hash(str(case)) % 1000)
    g_h, g_y, target = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
    cosine, manifold = independent_losses(h, y, g_h, g_y, target)
    torch.testing.assert_close(reference.cosine_alignment(h, y, g_h, g_y, target), cosine)
    torch.testing.assert_close(reference.manifold(h, y, g_h, g_y, target), manifold)
    torch.testing.assert_close(reference.urepa(h, y, g_h, g_y, target), torch.stack((cosine, manifold)))


def test_resample_tokens_matches_interpolate_tokens():
    x = torch.randn(2, 6 * 5, 3, dtype=torch.float64)
    torch.testing.assert_close(reference.interpolate_tokens(x, (6, 5), (4, 9)), resample(x, (6, 5), (4, 9)))


def test_identity_grid_is_no_copy():
    x = torch.randn(2, 12, 3)
    assert reference.interpolate_tokens(x, (3, 4), (3, 4)) is x


@pytest.mark.parametrize("loss", ["cosine_alignment", "manifold"])
@pytest.mark.parametrize("case", [ODD_CASES[2], ODD_CASES[4], ODD_CASES[6]])
def test_reference_gradcheck(loss, case):
    b, h_grid, y_grid, d, align = case
    h, y = random_case(b, h_grid, y_grid, d, seed=3)
    h.requires_grad_(True)
    y.requires_grad_(True)
    grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
    fn = getattr(reference, loss)
    assert torch.autograd.gradcheck(lambda a, c: fn(a, c, *grids), (h, y))


def test_reference_gradients_match_the_closed_form():
    """docs/design.md's gradients, written out, against autograd through the reference (identity grid)."""
    b, n, d = 2, 9, 5
    h, y = random_case(b, (3, 3), (3, 3), d, seed=5)
    h.requires_grad_(True)
    loss = reference.cosine_alignment(h, y, (3, 3), (3, 3), (3, 3)).mean() \
        + reference.manifold(h, y, (3, 3), (3, 3), (3, 3)).mean()
    (grad,) = torch.autograd.grad(loss, h)
    norm = h.detach().norm(dim=-1, keepdim=True)
    h_hat, y_hat = h.detach() / norm, y / y.norm(dim=-1, keepdim=True)
    g = -y_hat / (b * n)
    g = g + 4 / (b * n * n) * (h_hat @ h_hat.mT - y_hat @ y_hat.mT) @ h_hat
    expected = (g - (g * h_hat).sum(-1, keepdim=True) * h_hat) / norm
    torch.testing.assert_close(grad, expected)


def test_zero_vectors_are_finite():
    h, y = random_case(2, (3, 3), (4, 4), 6, dtype=torch.float32)
    h[0, 2] = 0
    y[1, :5] = 0
    h.requires_grad_(True)
    for fn in (reference.cosine_alignment, reference.manifold):
        out = fn(h, y, (3, 3), (4, 4), (3, 3))
        (grad,) = torch.autograd.grad(out.sum(), h)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("op", ["cosine", "manifold", "urepa"])
@pytest.mark.parametrize("case", ODD_CASES)
def test_explicit_gradients_match_autograd(op, case):
    b, h_grid, y_grid, d, align = case
    h, y = random_case(b, h_grid, y_grid, d, seed=11)
    h[0, 0] = 0  # a zero vector among the tokens
    h.requires_grad_(True)
    y.requires_grad_(True)
    grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
    out = reference.LOSSES[op](h, y, *grids)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (h, y), grad)
    got = reference.loss_gradients(op, grad, h.detach(), y.detach(), *grids, True, True)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])

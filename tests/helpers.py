"""Shared test utilities: random odd-shaped cases and an independent fp64 formula of every loss."""

from __future__ import annotations

import torch


from repa_fused.tools.cases import ODD_CASES  # noqa: F401  (one list of cases, shared with repa-fused check)
from repa_fused.tools.check import rel_rmse  # noqa: F401  (one definition, shared with repa-fused check)


def bilinear_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) fp64 matrix of 1-D linear interpolation, align_corners=False, written from the formula."""
    m = torch.zeros(dst, src, dtype=torch.float64)
    scale = src / dst
    for r in range(dst):
        s = max((r + 0.5) * scale - 0.5, 0.0)
        r0 = int(s)
        r1 = min(r0 + 1, src - 1)
        lam = s - r0
        m[r, r0] += 1 - lam
        m[r, r1] += lam
    return m


def resample(x: torch.Tensor, grid, target) -> torch.Tensor:
    """(B, H·W, D) -> (B, H_t·W_t, D) through the Kronecker product of the two 1-D operators."""
    op = torch.kron(bilinear_matrix(grid[0], target[0]), bilinear_matrix(grid[1], target[1]))
    return torch.einsum("ts,bsd->btd", op, x.double())


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def independent_losses(h, y, h_grid, y_grid, target):
    """(cosine (B,), manifold (B,)) in fp64 with explicit loops over pairs' einsums."""
    hh, yy = unit(resample(h, h_grid, target)), unit(resample(y, y_grid, target))
    n = hh.shape[1]
    cosine = -torch.einsum("bnd,bnd->b", hh, yy) / n
    sim_h = torch.einsum("bid,bjd->bij", hh, hh)
    sim_y = torch.einsum("bid,bjd->bij", yy, yy)
    manifold = ((sim_h - sim_y) ** 2).sum((1, 2)) / n**2
    return cosine, manifold

"""Eager PyTorch reference of every loss, written as the math of docs/design.md reads.

This module is the truth the fused backends are tested against and the CPU fallback. Shapes:
``h`` (B, N_h, D) hidden tokens on ``h_grid`` = (H_h, W_h); ``y`` (B, N_y, D) encoder tokens on
``y_grid``; both are brought to ``target_grid`` (H_t, W_t) with N = H_t·W_t tokens. Tokens are
row-major. Every function computes in float32 (float64 when an input is float64, for gradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Grid = tuple[int, int]

NORM_EPS = 1e-12


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), float32 otherwise (bf16/fp16/fp32 training)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def interpolate_tokens(x: torch.Tensor, grid: Grid, target_grid: Grid) -> torch.Tensor:
    """Bilinear resample of a (B, H·W, D) token grid to (B, H_t·W_t, D), ``align_corners=False``.

    The same grid is the identity (the input itself is returned, no copy).
    """
    grid, target_grid = tuple(grid), tuple(target_grid)
    if grid == target_grid:
        return x
    batch, _, dim = x.shape
    image = x.transpose(1, 2).reshape(batch, dim, *grid)
    image = F.interpolate(image, size=target_grid, mode="bilinear", align_corners=False)
    return image.flatten(2).transpose(1, 2)


def token_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ per token, (…, 1), with no overflow: the token's max-abs (a constant to autograd, so the
    gradient is ‖x‖'s) is taken out before squaring, so tokens with elements around 1e19, whose squares
    overflow fp32, still get their norm."""
    x = x.contiguous()  # one summation order whatever the layout: strided inputs give the same bits
    scale = x.detach().abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / scale).norm(dim=-1, keepdim=True) * scale


def normalize_tokens(x: torch.Tensor) -> torch.Tensor:
    """x / max(‖x‖₂, 1e-12) per token (F.normalize's formula, with token_norms): zero vectors stay zero
    (never NaN), and the result is scale-invariant however large the tokens."""
    return x / token_norms(x).clamp_min(NORM_EPS)


def aligned_unit_tokens(h, y, h_grid: Grid, y_grid: Grid, target_grid: Grid):
    """(ĥ, ŷ) on the target grid: upcast, interpolate, then normalise (interpolation comes first)."""
    dtype = compute_dtype(h, y)
    h_hat = normalize_tokens(interpolate_tokens(h.to(dtype), h_grid, target_grid))
    y_hat = normalize_tokens(interpolate_tokens(y.to(dtype), y_grid, target_grid))
    return h_hat, y_hat


def cosine_alignment(h, y, h_grid: Grid, y_grid: Grid, target_grid: Grid) -> torch.Tensor:
    """Per-sample negative mean cosine similarity, (B,): −(1/N) Σ_n ĥ_bn·ŷ_bn."""
    h_hat, y_hat = aligned_unit_tokens(h, y, h_grid, y_grid, target_grid)
    return -(h_hat * y_hat).sum(-1).mean(-1)


def manifold(h, y, h_grid: Grid, y_grid: Grid, target_grid: Grid) -> torch.Tensor:
    """Per-sample manifold loss, (B,): (1/N²) Σ_ij (ĥ_i·ĥ_j − ŷ_i·ŷ_j)², diagonal included.

    Builds the two B×N×N similarity matrices: this is the memory cost the fused kernels remove.
    """
    h_hat, y_hat = aligned_unit_tokens(h, y, h_grid, y_grid, target_grid)
    sim_h = h_hat @ h_hat.transpose(1, 2)
    sim_y = y_hat @ y_hat.transpose(1, 2)
    return (sim_h - sim_y).square().mean((-2, -1))


def urepa(h, y, h_grid: Grid, y_grid: Grid, target_grid: Grid) -> torch.Tensor:
    """Both U-REPA terms per sample, (2, B): row 0 the cosine alignment, row 1 the manifold loss.

    The total is ``row0 + manifold_weight·row1``; the functional layer applies the weight.
    """
    h_hat, y_hat = aligned_unit_tokens(h, y, h_grid, y_grid, target_grid)
    alignment = -(h_hat * y_hat).sum(-1).mean(-1)
    sim_h = h_hat @ h_hat.transpose(1, 2)
    sim_y = y_hat @ y_hat.transpose(1, 2)
    return torch.stack((alignment, (sim_h - sim_y).square().mean((-2, -1))))


# --------------------------------------------------------------------------------------------------
# The manifold term over other pairs (``pairs=``). "tokens" is :func:`manifold` above. Both modes below
# are a set of R unit rows U (from h) and V (from y) with S = UUᵀ − VVᵀ and a weight per row w_r, the loss
# Σ_r w_r Σ_c S_rc²; each sample's share sums the rows it owns, so that the shares' mean is the loss.
#   "samples": rows p_b = normalize(mean_n ĥ_bn), q_b likewise (R = B), loss (1/B²) Σ_ab S_ab²,
#              share_a = (1/B) Σ_b S_ab².
#   "batch":   rows all B·N unit tokens (R = B·N), loss (1/(B·N)²) Σ_rc S_rc²,
#              share_a = (1/(B·N²)) Σ_(i of a) Σ_c S_(ai),c².
# This eager truth builds the R×R matrices; for "batch" that is the (B·N)² cost the fused backends avoid.

PAIRS = ("tokens", "samples", "batch")


def sample_units(x_hat: torch.Tensor) -> torch.Tensor:
    """(B, D): each image's mean unit token, normalised with the same eps as the tokens."""
    return normalize_tokens(x_hat.mean(1))


def _pair_rows(h_hat, y_hat, pairs: str):
    """(U, V) of shape (B, R/B, D): each sample's rows, R = B (samples) or B·N (batch)."""
    if pairs == "samples":
        return sample_units(h_hat).unsqueeze(1), sample_units(y_hat).unsqueeze(1)
    return h_hat, y_hat


def _pair_scale(batch: int, rows: int) -> float:
    """The share's factor: 1/(B·k²) for k rows per sample (k = 1 samples, k = N batch)."""
    return 1.0 / (batch * rows**2)


def manifold_pairs(h, y, h_grid: Grid, y_grid: Grid, target_grid: Grid, pairs: str) -> torch.Tensor:
    """Each sample's share (B,) of the manifold loss over ``pairs`` ("samples" or "batch")."""
    u, v = _pair_rows(*aligned_unit_tokens(h, y, h_grid, y_grid, target_grid), pairs)
    batch, k, dim = u.shape
    flat_u, flat_v = u.reshape(-1, dim), v.reshape(-1, dim)
    sim = flat_u @ flat_u.T - flat_v @ flat_v.T
    return sim.square().view(batch, k, -1).sum((1, 2)) * _pair_scale(batch, k)


def _pairs_unit_gradients(g_man, h_hat, y_hat, pairs: str):
    """(∂/∂ĥ, ∂/∂ŷ) of Σ_b g_man[b]·share_b: with row weights w, ∂/∂U = 2(WS + SW)U and ∂/∂V = −2(WS + SW)V,
    then for "samples" back through the per-image normaliser and the mean over tokens."""
    u, v = _pair_rows(h_hat, y_hat, pairs)
    batch, k, dim = u.shape
    flat_u, flat_v = u.reshape(-1, dim), v.reshape(-1, dim)
    sim = flat_u @ flat_u.T - flat_v @ flat_v.T
    w = (g_man * _pair_scale(batch, k)).repeat_interleave(k).unsqueeze(1)
    grad_u = 2.0 * (w * (sim @ flat_u) + sim @ (w * flat_u))
    grad_v = -2.0 * (w * (sim @ flat_v) + sim @ (w * flat_v))
    if pairs == "batch":
        return grad_u.view_as(h_hat), grad_v.view_as(y_hat)
    n = h_hat.shape[1]

    def spread(grad_unit, x_hat):  # through p = normalize(mean_n x̂): the mean's adjoint spreads 1/N
        return (normalize_tokens_backward(grad_unit, x_hat.mean(1)) / n).unsqueeze(1).expand_as(x_hat)

    return spread(grad_u, h_hat), spread(grad_v, y_hat)


# Each loss returns per-sample values with a leading "terms" axis, the layout every backend shares.
LOSSES = {
    "cosine": lambda *args: cosine_alignment(*args).unsqueeze(0),
    "manifold": lambda *args: manifold(*args).unsqueeze(0),
    "urepa": urepa,
    "manifold_samples": lambda *args: manifold_pairs(*args, "samples").unsqueeze(0),
    "manifold_batch": lambda *args: manifold_pairs(*args, "batch").unsqueeze(0),
}


# --------------------------------------------------------------------------------------------------
# Gradients written out (docs/design.md), no autograd: custom-op implementations run below the autograd
# dispatch key, so the reference backend's backward must be explicit. Tests check it against autograd.


def interpolate_tokens_backward(grad: torch.Tensor, grid: Grid, target_grid: Grid) -> torch.Tensor:
    """The adjoint of :func:`interpolate_tokens`: (B, H_t·W_t, D) -> (B, H·W, D)."""
    grid, target_grid = tuple(grid), tuple(target_grid)
    if grid == target_grid:
        return grad
    batch, _, dim = grad.shape
    image = grad.transpose(1, 2).reshape(batch, dim, *target_grid)
    image = torch.ops.aten.upsample_bilinear2d_backward(
        image.contiguous(), list(target_grid), [batch, dim, *grid], False, None, None)
    return image.flatten(2).transpose(1, 2)


def normalize_tokens_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∂L/∂x = (G − (G·x̂) x̂) / max(‖x‖, eps) per token, G = ∂L/∂x̂."""
    norm = token_norms(x)
    unit = x / norm.clamp_min(NORM_EPS)
    # Below eps the normaliser is x/eps, a plain scaling: no projection.
    projected = torch.where(norm > NORM_EPS, grad - (grad * unit).sum(-1, keepdim=True) * unit, grad)
    return projected / norm.clamp_min(NORM_EPS)


def loss_gradients(op: str, grad: torch.Tensor, h, y, h_grid: Grid, y_grid: Grid, target_grid: Grid,
                   needs_h: bool = True, needs_y: bool = False):
    """(∂/∂h, ∂/∂y) of Σ_t Σ_b grad[t, b]·LOSSES[op][t, b], in the inputs' dtypes (None where not needed).

    Per sample: ∂L_cos/∂ĥ_n = −ŷ_n/N and ∂L_man/∂Ĥ = (4/N²)(ĤĤᵀ − ŶŶᵀ)Ĥ (y symmetric), then through the
    normaliser and the transposed interpolation.
    """
    dtype = compute_dtype(h, y)
    h_t = interpolate_tokens(h.to(dtype), h_grid, target_grid)
    y_t = interpolate_tokens(y.to(dtype), y_grid, target_grid)
    h_hat, y_hat = normalize_tokens(h_t), normalize_tokens(y_t)
    n = h_hat.shape[1]
    grad = grad.to(dtype)
    pairs = op.partition("_")[2]  # "samples" / "batch" for the pair modes' ops
    g_cos = grad[0] if op in ("cosine", "urepa") else None
    g_man = grad[-1] if op in ("manifold", "urepa") else None
    diff = (h_hat @ h_hat.transpose(1, 2) - y_hat @ y_hat.transpose(1, 2)) if g_man is not None else None
    pair_grads = _pairs_unit_gradients(grad[0], h_hat, y_hat, pairs) if pairs else None

    def through(g_unit, x_t, x, grid):
        g = normalize_tokens_backward(g_unit, x_t)
        return interpolate_tokens_backward(g, grid, target_grid).to(x.dtype).contiguous()

    def unit_grad(other_hat, own_hat, sign):
        if pair_grads is not None:
            return pair_grads[0] if sign > 0 else pair_grads[1]
        g = torch.zeros_like(own_hat)
        if g_cos is not None:
            g = g - g_cos.view(-1, 1, 1) * other_hat / n
        if g_man is not None:
            g = g + sign * (4.0 / n**2) * g_man.view(-1, 1, 1) * (diff @ own_hat)
        return g

    grad_h = through(unit_grad(y_hat, h_hat, 1.0), h_t, h, h_grid) if needs_h else None
    grad_y = through(unit_grad(h_hat, y_hat, -1.0), y_t, y, y_grid) if needs_y else None
    return grad_h, grad_y

"""The fused backends' manifold term over sample pairs and whole-batch pairs (``pairs=`` of the losses).

Math (reference.py, "the manifold term over other pairs"): rows U from h, V from y, S = UUᵀ − VVᵀ, loss
Σ_r w_r Σ_c S_rc², each sample's share the sum over its own rows.

* ``"batch"``: the rows are all B·N unit tokens on the target grid, (B·N)² pairs. It is never built:
  - the batch mean (training's case) is the backend's own fused "tokens" op run on the resampled tokens
    viewed as ONE image of B·N tokens (its grid (B·N, 1) is its own target: no resample there); that op
    normalises per token, so the result is exactly the batch loss, in the backend's memory, linear in B·N;
  - the per-sample shares (``reduction="none"``) come from D×D Gram forms, linear in B·N. Written with
    X = Ĥ + Ŷ and Δ = Ĥ − Ŷ, S = ½(XΔᵀ + ΔXᵀ) has no difference of large numbers:
      Σ_c S_rc² = ¼[x_rᵀ(ΔᵀΔ)x_r + 2 x_rᵀ(ΔᵀX)δ_r + δ_rᵀ(XᵀX)δ_r]
    every term scales as |Δ|², as the loss does (the plain ĤᵀĤ − ŶᵀŶ form subtracts O(1) Grams).
    Gradient of Σ_r w_r Σ_c S_rc²: ∂/∂Ĥ = 2(W S + S W)Ĥ, ∂/∂Ŷ = −2(W S + S W)Ŷ, with
      SX = ½(X(ΔᵀX) + Δ(XᵀX)),  SΔ = ½(X(ΔᵀΔ) + Δ(XᵀΔ)),  and SWX, SWΔ the same with weighted Grams,
    Ĥ = (X + Δ)/2, Ŷ = (X − Δ)/2. Cost 12·B·N·D² forward + backward, memory B·N·D + D².
* ``"samples"``: a B×B problem on each image's normalised mean unit token. The reference computes it in
  O(B·N·D) memory already (no token-pair matrix), so every backend shares that implementation.
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import OpImpl


def _batch_rows(h, y, h_grid, y_grid, target_grid):
    """(h, y) on the target grid in their own dtypes, each viewed as one image (1, B·N, D)."""
    h_t = reference.interpolate_tokens(h, h_grid, target_grid)
    y_t = reference.interpolate_tokens(y, y_grid, target_grid)
    return h_t.reshape(1, -1, h.shape[2]), y_t.reshape(1, -1, y.shape[2])


def _targets(h, y, h_grid, y_grid, target_grid):
    """(h_t, y_t): both on the target grid in the compute dtype (fp32, fp64 for fp64 inputs)."""
    dtype = reference.compute_dtype(h, y)
    return (reference.interpolate_tokens(h.to(dtype), h_grid, target_grid),
            reference.interpolate_tokens(y.to(dtype), y_grid, target_grid))


def _xd(h_t, y_t):
    """(X, Δ): the unit tokens' sum and difference, (B·N, D)."""
    h_hat = reference.normalize_tokens(h_t).flatten(0, 1)
    y_hat = reference.normalize_tokens(y_t).flatten(0, 1)
    return h_hat + y_hat, h_hat - y_hat


def _row_weights(grad_row: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """(B·N, 1) weights w_r = grad[b]/(B·N²) of each token row (share_b = (1/(B·N²)) Σ_(i of b) Σ_c S²)."""
    return (grad_row / (batch * n * n)).repeat_interleave(n).unsqueeze(1)


def batch_shares(h, y, h_grid, y_grid, target_grid) -> torch.Tensor:
    """(1, B) per-sample shares of the "batch" manifold loss by the Gram forms above."""
    x, d = _xd(*_targets(h, y, h_grid, y_grid, target_grid))
    rows = (x @ (d.T @ d) * x).sum(1) + 2.0 * (x @ (d.T @ x) * d).sum(1) + (d @ (x.T @ x) * d).sum(1)
    batch = h.shape[0]
    n = x.shape[0] // batch
    return (0.25 / (batch * n * n)) * rows.view(1, batch, n).sum(2)


def batch_shares_backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y):
    """(∂/∂h | None, ∂/∂y | None) of Σ_b grad[0, b]·share_b, through the normaliser and the resample."""
    h_t, y_t = _targets(h, y, h_grid, y_grid, target_grid)
    x, d = _xd(h_t, y_t)
    batch = h.shape[0]
    w = _row_weights(grad[0].to(x.dtype), batch, x.shape[0] // batch)
    c, wc = d.T @ x, d.T @ (w * x)                          # ΔᵀX and ΔᵀWX; XᵀΔ is their transpose
    s_x = x @ c + d @ (x.T @ x)                             # 2·SX
    s_d = x @ (d.T @ d) + d @ c.T                           # 2·SΔ
    s_wx = x @ wc + d @ (x.T @ (w * x))                     # 2·S(WX)
    s_wd = x @ (d.T @ (w * d)) + d @ wc.T                   # 2·S(WΔ)
    # ∂/∂Ĥ = 2(W S + S W)(X + Δ)/2 and ∂/∂Ŷ = −2(W S + S W)(X − Δ)/2, with the ½ of each S·M above.
    grads = []
    for needed, sign, src_t, src, grid in ((needs_h, 1.0, h_t, h, h_grid), (needs_y, -1.0, y_t, y, y_grid)):
        g_unit = (0.5 * sign) * (w * (s_x + sign * s_d) + s_wx + sign * s_wd) if needed else None
        grads.append(_to_source(reference.normalize_tokens_backward(g_unit.view_as(src_t), src_t), src, grid,
                                target_grid) if needed else None)
    return tuple(grads)


def batch_op(tokens: OpImpl) -> OpImpl:
    """The "manifold_batch" OpImpl of a backend whose per-image manifold OpImpl is ``tokens``."""

    def run_tokens(h_rows, y_rows, needs_h=False, needs_y=False):
        """(losses, saved, parts) of the tokens op on one image, whichever protocol it follows."""
        grid = (h_rows.shape[1], 1)
        if tokens.grad_in_forward:  # the gradient comes with the loss: ask for it only when needed
            losses, saved, part_h, part_y = tokens.forward(h_rows, y_rows, grid, grid, grid, needs_h=needs_h,
                                                           needs_y=needs_y)
            return losses, saved, (part_h, part_y)
        if tokens.fused_mean:
            result = tokens.forward(h_rows, y_rows, grid, grid, grid, mean=True)
        else:
            result = tokens.forward(h_rows, y_rows, grid, grid, grid)
        losses, saved = result if isinstance(result, tuple) else (result, None)
        return losses, saved, None

    def forward(h, y, h_grid, y_grid, target_grid, mean=False):
        if not mean:
            return batch_shares(h, y, h_grid, y_grid, target_grid)
        # One image: its (1, B=1) per-sample loss is its (1, 1) mean.
        return run_tokens(*_batch_rows(h, y, h_grid, y_grid, target_grid))[0]

    def backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y, mean=False):
        if not mean:
            return batch_shares_backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y)
        h_rows, y_rows = _batch_rows(h, y, h_grid, y_grid, target_grid)
        grid = (h_rows.shape[1], 1)
        kwargs = {"mean": True} if tokens.fused_mean else {}
        if tokens.saved_shape is not None or tokens.grad_in_forward:
            # the tokens op wants its forward's by-products (saved scalars, or the gradient itself): recompute
            _, saved, parts = run_tokens(h_rows, y_rows, needs_h, needs_y)
            if tokens.saved_shape is not None:
                kwargs["saved"] = saved
            if parts is not None:
                kwargs["parts"] = parts
        # One image: its (1, 1) mean gradient is its (1, B=1) per-sample gradient.
        g_rows = tokens.backward(grad, h_rows, y_rows, grid, grid, grid, needs_h, needs_y, **kwargs)
        return tuple(None if g is None else _to_source(g.view(src.shape[0], -1, src.shape[2]), src, grid_s,
                                                       target_grid)
                     for g, src, grid_s in zip(g_rows, (h, y), (h_grid, y_grid)))

    return OpImpl(forward, backward, fused_mean=True)


def _to_source(g_target: torch.Tensor, src: torch.Tensor, grid, target_grid) -> torch.Tensor:
    """A (B, N_t, D) gradient on the target grid back to src's (B, N_s, D) grid, in src's dtype."""
    # The adjoint sums up to 4·k taps per source token: in the compute dtype, not bf16.
    g_target = g_target.to(reference.compute_dtype(g_target))
    return reference.interpolate_tokens_backward(g_target, grid, target_grid).to(src.dtype).contiguous()


def samples_forward(h, y, h_grid, y_grid, target_grid) -> torch.Tensor:
    with torch.no_grad():
        return reference.manifold_pairs(h, y, h_grid, y_grid, target_grid, "samples").unsqueeze(0)


def samples_backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y):
    with torch.no_grad():
        return reference.loss_gradients("manifold_samples", grad, h, y, h_grid, y_grid, target_grid,
                                        needs_h, needs_y)


def implementations(tokens) -> dict:
    """{"manifold_samples", "manifold_batch"} OpImpls of a backend given its "manifold" implementation
    (an OpImpl or its (forward, backward[, saved_shape]) tuple)."""

    tokens = tokens if isinstance(tokens, OpImpl) else OpImpl(*tokens)
    return {"manifold_samples": OpImpl(samples_forward, samples_backward), "manifold_batch": batch_op(tokens)}

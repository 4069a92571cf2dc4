"""U-REPA's manifold loss and the fused U-REPA loss in Triton, in one pass, with memory that never grows as N².

Math (docs/design.md), per image b, N target tokens, Ĥ, Ŷ ∈ R^{N×D} the interpolated, normalised tokens:

    L_man = (1/N²) Σ_ij (ĥ_i·ĥ_j − ŷ_i·ŷ_j)² = (1/N²) ‖S_h − S_y‖²_F,   S_h = ĤĤᵀ, S_y = ŶŶᵀ
    ∂L_man/∂Ĥ = (4/N²)(S_h − S_y) Ĥ,   ∂L_man/∂Ŷ = −(4/N²)(S_h − S_y) Ŷ
    ∂L/∂x_n   = (G_n − (G_n·x̂_n) x̂_n) / max(‖x_n‖, eps),   then the transposed bilinear interpolation.

One pass. The loss is a scalar per image, so when an input needs a gradient the forward makes it
there (as fused loss kernels do), sharing each tile of S_h − S_y between the loss and the gradient. It
stays on the target grid (the op protocol's part, _runtime.part_like): the op's backward scales it by
the upstream gradient and takes it back through the transposed interpolation in one pass. For U-REPA that
pass is kernels/cosine.py's backward, which adds the part to the cosine term's gradient before the
adjoint they share (its EXTRA argument), fed with the per-token scalars the pre-pass writes.

Pipeline. A pre-pass interpolates and normalises both inputs once into Z (B, N, 2D) in the compute dtype,
with per-token scalars: every token is then read N/BLOCK times by the similarity tiles, so paying the
4-tap interpolation and the norm once beats redoing them in every tile load. The norm pre-scales each
token by its running max-abs (online, as a softmax's running max), so tokens whose squared norm
overflows fp32 (elements ~1e19) still normalise. Two algorithms, chosen per shape by a cost model:

* tiled (flash-attention style), Z = [Ĥ | Ŷ]: only the tiles i ≤ j of S_h − S_y are computed (2·N²·D).
  Loss only, they are squared and summed in registers. With a gradient, a row block's gradient
  (BLOCK_M × D, D ≈ 1–2K) does not fit in registers, so the tiles go to a fixed workspace, with the
  normaliser's radial terms G_i·x̂_i = (4/N²) Σ_j (S_h − S_y)_ij S_x,ij summed on the way; a product kernel
  multiplies them by X̂, one D chunk per program, and leaves through the normaliser (2·N²·D per gradient).
  "symmetric" rounds hold whole images, each tile stored once and read transposed left of the diagonal;
  where one image's N² panel would not fit the workspace, "rows" rounds make row panels whole (4·N²·D).
* gram, Z = [X | Δ], X = Ĥ + Ŷ, Δ = Ĥ − Ŷ (made in fp32 before rounding, so Δ keeps its own relative
  precision when h and y align). S_h − S_y = ½(XΔᵀ + ΔXᵀ) gives, from the blocks XᵀX, ΔᵀX (ZᵀX) and ΔᵀΔ
  (fp32, 6·N·D²; XᵀΔ is ΔᵀX transposed):
      N²·L = ½(⟨XᵀX, ΔᵀΔ⟩ + ⟨ΔᵀX, (ΔᵀX)ᵀ⟩)
      (S_h − S_y)X̂ = ½ Z·[ΔᵀX̂; XᵀX̂],  ΔᵀĤ = ½(ΔᵀX + ΔᵀΔ), XᵀĤ = ½(XᵀX + XᵀΔ),  Ŷ: signs of Δ flipped
  (4·N·D² per gradient). No term subtracts two large numbers as ‖ĤᵀĤ‖² + ‖ŶᵀŶ‖² − 2‖ĤᵀŶ‖² did, so no
  accuracy guard (and no host synchronisation) is needed. Images go in chunks that fit the workspace.

Choice: the ``algorithm`` argument of the entry points (ALGORITHMS: "auto", "tiled", "gram", or a tiled
form forced, "tiled-symmetric" | "tiled-rows"); "auto" takes ALGORITHM (REPA_FUSED_MANIFOLD_ALGO at import,
default "auto"), where "auto" is the cost model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import cosine, interp
from .cosine import FLOAT32_TINY, NORM_EPS
from ._runtime import check_kernel_dtype, part_like, triton_interpreter

# "tiled" takes its gradient form by size (_tiled_form); "tiled-symmetric" and "tiled-rows" force one.
ALGORITHMS = ("auto", "tiled", "gram", "tiled-symmetric", "tiled-rows")
ALGORITHM = os.environ.get("REPA_FUSED_MANIFOLD_ALGO", "auto")
# Gram is chosen only when it needs this fraction of the tiled FLOPs or fewer: a margin for its memory
# passes (combine, the fp32 product's normaliser pass). Conservative on the H200, where at 64² tokens its
# FLOPs ran 1.14× faster than the tiles' (docs/manifold.md).
GRAM_EFFICIENCY = 0.85
# The Gram path takes about four launches more than the tiled one (its products, the combine kernel): about
# 10 µs, the time of this many FLOPs at the tiles' rate. It decides small problems (H200: N = 32², D = 64,
# B = 1 ran 0.96× torch.compile by Gram, whose FLOPs were 6× fewer).
GRAM_FIXED_FLOPS = 4e9
# Up to this width the Gram path multiplies back by its D×D products in fp32 (see _gram_loss_and_grads).
SMALL_DIM = 128
# Stats planes (P, B, N) fp32 from the pre-pass: the first three are kernels/cosine.py's saved scalars
# (cosine.store_token_scalars), then r_h, r_y (the products' normaliser reads plane 3 + own) and c.
S0, S1, S2, RNORM_H, RNORM_Y, COS = range(6)
N_STATS = 6


def algorithm_costs(n_tokens: int, dim: int, grads: int, symmetric: bool = True) -> dict[str, float]:
    """FLOPs per image of each algorithm for the loss and ``grads`` (0–2) input gradients: tiled, the
    i ≤ j similarity tiles (2·N²·D; with a gradient in the "rows" form, ``symmetric`` False, all tiles:
    4·N²·D) plus a panel product per gradient (2·N²·D; see _tiled_form); gram, three D×D blocks (6·N·D²)
    plus a product per gradient (4·N·D²)."""
    tiles = 2.0 if symmetric or grads == 0 else 4.0
    return {"tiled": (tiles + 2.0 * grads) * n_tokens**2 * dim, "gram": (6.0 + 4.0 * grads) * n_tokens * dim**2}


def choose_algorithm(n_tokens: int, dim: int, grads: int = 0, algorithm: str = "auto", batch: int = 1,
                     element_size: int = 2) -> str:
    """"tiled" or "gram": ``algorithm`` when forced (else ALGORITHM when forced), else the cheaper one for
    ``batch`` images of ``element_size``-byte tokens, the Gram path's extra launches counted as
    GRAM_FIXED_FLOPS."""
    for value, where in ((algorithm, "algorithm"), (ALGORITHM, "REPA_FUSED_MANIFOLD_ALGO")):
        if value not in ALGORITHMS:
            raise ValueError(f"{where} must be one of {ALGORITHMS}, got {value!r}")
    if grads not in (0, 1, 2):
        raise ValueError(f"grads must be 0, 1 or 2 (input gradients), got {grads!r}")
    if batch < 1 or element_size not in (2, 4):
        raise ValueError(f"batch must be ≥ 1 and element_size 2 or 4 (bytes), got {batch!r} and {element_size!r}")
    forced = algorithm if algorithm != "auto" else ALGORITHM
    if forced != "auto":
        return "tiled" if forced.startswith("tiled") else forced
    symmetric = _tiled_form(batch, n_tokens, element_size, Tiles.current(element_size), "tiled")[0] == "symmetric"
    cost = algorithm_costs(n_tokens, dim, grads, symmetric)
    gram = batch * cost["gram"] + GRAM_FIXED_FLOPS
    return "gram" if gram < batch * cost["tiled"] * GRAM_EFFICIENCY else "tiled"


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _rounded(x, dtype: tl.constexpr, RTNE: tl.constexpr):
    """x as ``dtype``. RTNE (set under the interpreter for bf16 outputs): the interpreter truncates fp32
    to bf16, a 2^-9 bias in every stored value; round to nearest even by hand, as the GPU does."""
    if RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _similarity_tiles(z_ptr, h_desc, y_desc, stride_n, row0, col0, rows, cols, n_tokens, dim,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      COMPUTE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """(Ĥ[rows] Ĥ[cols]ᵀ, Ŷ[rows] Ŷ[cols]ᵀ) in fp32 for one image's Z = [Ĥ | Ŷ]; rows ≥ N read as 0.
    One K loop with both products (H200, sdxl_y: two loops of one product each took 15% longer).
    TMA: the tiles come by the copy engine through h_desc, y_desc (Ĥ, Ŷ over all images' B·N rows; row0,
    col0 = the tiles' first rows there), which read the next image's rows past N: those products are zeroed."""
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_r = rows < n_tokens
    m_c = cols < n_tokens
    if TMA:
        for k0 in range(0, dim, BLOCK_K):
            b_hr = h_desc.load([row0, k0]).to(COMPUTE)
            b_hc = h_desc.load([col0, k0]).to(COMPUTE)
            acc_h = tl.dot(b_hr, tl.trans(b_hc), acc_h, input_precision=PRECISION)
            b_yr = y_desc.load([row0, k0]).to(COMPUTE)
            b_yc = y_desc.load([col0, k0]).to(COMPUTE)
            acc_y = tl.dot(b_yr, tl.trans(b_yc), acc_y, input_precision=PRECISION)
        inside = m_r[:, None] & m_c[None, :]
        acc_h = tl.where(inside, acc_h, 0.0)
        acc_y = tl.where(inside, acc_y, 0.0)
    else:
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m_k = ks < dim
            p_r = z_ptr + rows[:, None] * stride_n + ks[None, :]
            p_c = z_ptr + cols[:, None] * stride_n + ks[None, :]
            m_rk = m_r[:, None] & m_k[None, :]
            m_ck = m_c[:, None] & m_k[None, :]
            b_hr = tl.load(p_r, mask=m_rk, other=0.0).to(COMPUTE)
            b_hc = tl.load(p_c, mask=m_ck, other=0.0).to(COMPUTE)
            acc_h = tl.dot(b_hr, tl.trans(b_hc), acc_h, input_precision=PRECISION)
            b_yr = tl.load(p_r + dim, mask=m_rk, other=0.0).to(COMPUTE)
            b_yc = tl.load(p_c + dim, mask=m_ck, other=0.0).to(COMPUTE)
            acc_y = tl.dot(b_yr, tl.trans(b_yc), acc_y, input_precision=PRECISION)
    return acc_h, acc_y


@triton.jit
def _pair_tiles(pair):
    """(i, j), i ≤ j, of tile pair number pair = j(j+1)/2 + i."""
    # The float root can be one off either way, so correct it.
    tj = ((tl.sqrt(8.0 * pair.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > pair, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pair, tj + 1, tj)
    return pair - tj * (tj + 1) // 2, tj


@triton.jit
def _pair_difference(z_ptr, h_desc, y_desc, b, pair, n_tokens, dim, stride_zb, stride_zn, BLOCK: tl.constexpr,
                     BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Tile pair number ``pair`` (i ≤ j) of image b: (ti, tj, S_h, S_y, S_h − S_y tiles, and the pair's
    share of Σ(S_h − S_y)², weighted 2 off the diagonal for the tile (j, i) it stands for)."""
    ti, tj = _pair_tiles(pair)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    acc_h, acc_y = _similarity_tiles(z_ptr + b.to(tl.int64) * stride_zb, h_desc, y_desc, stride_zn,
                                     b * n_tokens + ti * BLOCK, b * n_tokens + tj * BLOCK, rows, cols, n_tokens,
                                     dim, BLOCK, BLOCK, BLOCK_K, COMPUTE, PRECISION, TMA)
    diff = acc_h - acc_y
    total = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
    return ti, tj, acc_h, acc_y, diff, tl.where(ti == tj, 1.0, 2.0) * total


@triton.jit
def manifold_fwd_tiled_kernel(z_ptr, h_desc, y_desc, partial_ptr, n_tokens, dim, n_pairs, scale, stride_zb,
                              stride_zn, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                              COMPUTE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Loss only: partial[b, pair] = scale·w·‖(S_h − S_y)[tile i, tile j]‖²_F over tile pairs i ≤ j
    (w = 2 off the diagonal). grid (pairs, B); pair = j(j+1)/2 + i; the partials are summed in a fixed
    order afterwards (deterministic)."""
    pair = tl.program_id(0)
    b = tl.program_id(1)
    _, _, _, _, _, total = _pair_difference(z_ptr, h_desc, y_desc, b, pair, n_tokens, dim, stride_zb, stride_zn,
                                            BLOCK, BLOCK_K, COMPUTE, PRECISION, TMA)
    tl.store(partial_ptr + b * n_pairs + pair, scale * total)


@triton.jit(do_not_specialize=["item0"])
def manifold_fwd_panel_kernel(z_ptr, h_desc, y_desc, panel_ptr, radial_ptr, loss_ptr, n_tokens, dim, row_tiles,
                              item0, scale, stride_zb, stride_zn, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                              COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                              RTNE: tl.constexpr, TMA: tl.constexpr):
    """With a gradient, phase 1; grid (column tiles, items of this round), item = b·row_tiles + row tile.

    panel[local, :, cols] = (S_h − S_y)[rows, cols] (compute dtype); radial[local, 0|1, tile, :] =
    Σ_cols (S_h − S_y)·S_h | S_y (fp32); loss[item, tile] = scale·‖(S_h − S_y)[rows, cols]‖²_F: the one
    tile serves the loss and both gradients.
    """
    tj = tl.program_id(0)
    local = tl.program_id(1)
    item = item0 + local
    b = item // row_tiles
    r_local = tl.arange(0, BLOCK_M)
    rows = (item % row_tiles) * BLOCK_M + r_local
    cols = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    acc_h, acc_y = _similarity_tiles(z_ptr + b.to(tl.int64) * stride_zb, h_desc, y_desc, stride_zn,
                                     b * n_tokens + (item % row_tiles) * BLOCK_M, b * n_tokens + tj * BLOCK_M,
                                     rows, cols, n_tokens, dim, BLOCK_M, BLOCK_M, BLOCK_K, COMPUTE, PRECISION, TMA)
    diff = acc_h - acc_y
    col_tiles = tl.num_programs(0)
    tl.store(loss_ptr + item * col_tiles + tj, scale * tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    p_panel = panel_ptr + local.to(tl.int64) * BLOCK_M * col_tiles * BLOCK_M
    stored = _rounded(diff, panel_ptr.dtype.element_ty, RTNE)
    tl.store(p_panel + r_local[:, None] * (col_tiles * BLOCK_M) + cols[None, :], stored)
    # The radial terms from the panel as stored: G·x̂ then matches the G the product kernel makes from
    # it, so the projection removes the radial part exactly (a 1-D token's gradient is exactly 0).
    diff = stored.to(tl.float32)
    p_radial = radial_ptr + (local * 2 * col_tiles + tj) * BLOCK_M + r_local
    tl.store(p_radial, tl.sum(diff * acc_h, axis=1))
    tl.store(p_radial + col_tiles * BLOCK_M, tl.sum(diff * acc_y, axis=1))


@triton.jit(do_not_specialize=["image0"])
def manifold_fwd_sym_panel_kernel(z_ptr, h_desc, y_desc, panel_ptr, radial_ptr, loss_ptr, n_tokens, dim, tiles,
                                  n_pairs, image0, scale, stride_zb, stride_zn, BLOCK: tl.constexpr,
                                  BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                                  RTNE: tl.constexpr, TMA: tl.constexpr):
    """With a gradient, phase 1 by symmetry; grid (tile pairs i ≤ j, images of this round).

    One tile of S_h − S_y serves two: it is stored once, at (i, j) of the image's whole panel (tiles·BLOCK
    square, compute dtype; the tiles below the diagonal are never written), and the product kernel reads
    tile (j, i) as its transpose, so the similarity products run over the i ≤ j half (2·N²·D instead of
    4·N²·D). The radial sums go to the layout of manifold_fwd_panel_kernel (item = image·tiles + row tile,
    slot = the other tile): row sums for rows i at slot j, column sums for rows j at slot i; the loss
    partial (weight 2 off the diagonal) to loss[b, pair]. Every slot is written once.
    """
    pair = tl.program_id(0)
    local = tl.program_id(1)
    b = image0 + local
    ti, tj, acc_h, acc_y, diff, total = _pair_difference(z_ptr, h_desc, y_desc, b, pair, n_tokens, dim, stride_zb,
                                                         stride_zn, BLOCK, BLOCK_K, COMPUTE, PRECISION, TMA)
    tl.store(loss_ptr + b * n_pairs + pair, scale * total)
    r_local = tl.arange(0, BLOCK)
    rows = ti * BLOCK + r_local
    cols = tj * BLOCK + r_local
    width = tiles * BLOCK
    p_image = panel_ptr + local.to(tl.int64) * width * width
    stored = _rounded(diff, panel_ptr.dtype.element_ty, RTNE)
    tl.store(p_image + rows[:, None] * width + cols[None, :], stored)
    diff = stored.to(tl.float32)  # the radial terms from the panel as stored (manifold_fwd_panel_kernel)
    p_row = radial_ptr + ((local * tiles + ti) * 2 * tiles + tj) * BLOCK + r_local
    tl.store(p_row, tl.sum(diff * acc_h, axis=1))
    tl.store(p_row + tiles * BLOCK, tl.sum(diff * acc_y, axis=1))
    if ti != tj:
        p_col = radial_ptr + ((local * tiles + tj) * 2 * tiles + ti) * BLOCK + r_local
        tl.store(p_col, tl.sum(diff * acc_h, axis=0))
        tl.store(p_col + tiles * BLOCK, tl.sum(diff * acc_y, axis=0))


@triton.jit
def _leave_normaliser(grad, radial, b_own, rnorm):
    """(G − (G·x̂) x̂)·rnorm; below eps the normaliser is a plain scaling, with no projection (as
    F.normalize's backward)."""
    radial = tl.where(rnorm < 1.0 / NORM_EPS, radial, 0.0)
    return (grad - radial[:, None] * b_own) * rnorm[:, None]


@triton.jit(do_not_specialize=["item0"])
def manifold_fwd_panel_grad_kernel(panel_ptr, radial_ptr, z_ptr, stats_ptr, out_ptr, panel_desc, column_desc, x_desc,
                                   n_tokens, dim, batch, row_tiles, item0, own, coef, stride_zb,
                                   stride_zn, stride_ob, stride_on, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                   BLOCK_D: tl.constexpr, SYMMETRIC: tl.constexpr, COMPUTE: tl.constexpr,
                                   PRECISION: tl.constexpr, RTNE: tl.constexpr, TMA: tl.constexpr):
    """With a gradient, phase 2; grid (D chunks, items of this round): the panel (square tiles, row_tiles of
    them across: width = padded N) times
    X̂ = Ĥ (own = 0) or Ŷ (own = 1), out of the normaliser: G = coef·(panel @ X̂) (coef = ±4/N²),
    G·x̂ = coef·Σ radial[own] (no second pass over D); out: the target-grid gradient. SYMMETRIC: the panel
    holds only the tiles on and above the diagonal (manifold_fwd_sym_panel_kernel), so the columns left of
    the row tile are read, transposed, from the column below it. TMA: the operands come by the copy engine,
    the panel's (BLOCK_M × BLOCK_K) tiles through panel_desc, its transposed ones (BLOCK_K × BLOCK_M) through
    column_desc, X̂'s through x_desc (over all images' B·N rows, so only for the K steps that end by N)."""
    d_chunk = tl.program_id(0)
    local = tl.program_id(1)
    item = item0 + local
    b = item // row_tiles
    r_local = tl.arange(0, BLOCK_M)
    rows = (item % row_tiles) * BLOCK_M + r_local
    m_r = rows < n_tokens
    d0 = d_chunk * BLOCK_D
    ds = d0 + tl.arange(0, BLOCK_D)
    m_d = ds < dim
    z_b = z_ptr + b.to(tl.int64) * stride_zb
    own_off = own * dim
    width = row_tiles * BLOCK_M
    p_panel = panel_ptr + local.to(tl.int64) * BLOCK_M * width
    panel_row = local * BLOCK_M  # this item's first row in the round's panel, as (rows, width)
    x_row = b * n_tokens
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_start = 0
    if SYMMETRIC:
        row_tile = item % row_tiles
        k_start = row_tile * BLOCK_M
        # (image base) + the row tile's columns, read down the rows k < k_start
        p_column = p_panel - k_start * width + k_start + r_local[None, :]
        for k0 in range(0, k_start, BLOCK_K):
            if TMA:
                b_t = column_desc.load([panel_row - k_start + k0, k_start]).to(COMPUTE)
                b_x = x_desc.load([x_row + k0, d0]).to(COMPUTE)
            else:
                ks = k0 + tl.arange(0, BLOCK_K)
                b_t = tl.load(p_column + ks[:, None] * width).to(COMPUTE)
                b_x = tl.load(z_b + ks[:, None] * stride_zn + own_off + ds[None, :], mask=m_d[None, :],
                              other=0.0).to(COMPUTE)
            acc = tl.dot(tl.trans(b_t), b_x, acc, input_precision=PRECISION)
    k_masked = k_start  # from here on, masked pointer loads
    if TMA:
        # Whole K steps only: a step past N would read the next image's rows, and a non-finite one (from a
        # non-finite input) times the panel's zero columns is NaN. The partial last step takes the loop below.
        k_masked = n_tokens // BLOCK_K * BLOCK_K
        for k0 in range(k_start, k_masked, BLOCK_K):
            b_p = panel_desc.load([panel_row, k0]).to(COMPUTE)
            b_x = x_desc.load([x_row + k0, d0]).to(COMPUTE)
            acc = tl.dot(b_p, b_x, acc, input_precision=PRECISION)
    for k0 in range(k_masked, n_tokens, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        b_p = tl.load(p_panel + r_local[:, None] * width + ks[None, :]).to(COMPUTE)
        b_x = tl.load(z_b + ks[:, None] * stride_zn + own_off + ds[None, :],
                      mask=(ks < n_tokens)[:, None] & m_d[None, :], other=0.0).to(COMPUTE)
        acc = tl.dot(b_p, b_x, acc, input_precision=PRECISION)
    radial = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_radial = radial_ptr + (local * 2 + own) * row_tiles * BLOCK_M + r_local
    for t in range(row_tiles):
        radial += tl.load(p_radial + t * BLOCK_M)
    m_rd = m_r[:, None] & m_d[None, :]
    rnorm = tl.load(stats_ptr + ((3 + own) * batch + b).to(tl.int64) * n_tokens + rows, mask=m_r, other=0.0)
    b_own = tl.load(z_b + rows[:, None] * stride_zn + own_off + ds[None, :], mask=m_rd, other=0.0).to(tl.float32)
    out = _leave_normaliser(coef * acc, coef * radial, b_own, rnorm)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + rows[:, None] * stride_on + ds[None, :],
             _rounded(out, out_ptr.dtype.element_ty, RTNE), mask=m_rd)


@triton.jit
def manifold_fwd_gram_grad_kernel(g_ptr, z_ptr, stats_ptr, out_ptr, n_tokens, dim, batch, b0, own, coef,
                                  stride_zb, stride_zn, stride_ob, stride_on,
                                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, RTNE: tl.constexpr):
    """Gram path, out of the normaliser: G = coef·g (g: this chunk's (c, N, D) fp32 Z·factor, the combine
    kernel's factor scaled by 1/N, so coef = ±1/N), x̂ = ½(X ± Δ) from Z = [X | Δ] (+ for h: own = 0, − for
    y: own = 1); two passes over D (the radial dot needs the whole row). grid (token blocks, images of the
    chunk); image b0 + program 1."""
    local = tl.program_id(1)
    b = b0 + local
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = toks < n_tokens
    z_b = z_ptr + b.to(tl.int64) * stride_zb
    g_b = local.to(tl.int64) * n_tokens * dim
    own_sign = 1.0 - 2.0 * own
    rnorm = tl.load(stats_ptr + ((3 + own) * batch + b).to(tl.int64) * n_tokens + toks, mask=m_t, other=0.0)
    radial = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for pass_ in tl.static_range(2):
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m = m_t[:, None] & (ds < dim)[None, :]
            grad = coef * tl.load(g_ptr + g_b + toks[:, None] * dim + ds[None, :], mask=m, other=0.0)
            p_z = z_b + toks[:, None] * stride_zn + ds[None, :]
            b_x = tl.load(p_z, mask=m, other=0.0).to(tl.float32)
            b_d = tl.load(p_z + dim, mask=m, other=0.0).to(tl.float32)
            b_own = 0.5 * (b_x + own_sign * b_d)
            if pass_ == 0:
                radial += tl.sum(grad * b_own, axis=1)
            else:
                out = _leave_normaliser(grad, radial, b_own, rnorm)
                tl.store(out_ptr + b.to(tl.int64) * stride_ob + toks[:, None] * stride_on + ds[None, :],
                         _rounded(out, out_ptr.dtype.element_ty, RTNE), mask=m)


@triton.jit
def manifold_fwd_gram_combine_kernel(zx_ptr, dd_ptr, factor_ptr, partial_ptr, dim, factor_stride, scale,
                                     factor_scale, SIGN_0: tl.constexpr, SIGN_1: tl.constexpr,
                                     FACTORS: tl.constexpr, BLOCK: tl.constexpr, RTNE: tl.constexpr):
    """Gram path, from the blocks XᵀX, ΔᵀX (zx = [XᵀX; ΔᵀX], (c, 2D, D) fp32) and ΔᵀΔ (dd, (c, D, D)):
    partial[b, tile] = scale·Σ_tile (XᵀX ∘ ΔᵀΔ + ΔᵀX ∘ (ΔᵀX)ᵀ), and for each of the FACTORS gradients
    (factor k with sign s = SIGN_k: +1 for h's, −1 for y's) its factor factor_scale·[ΔᵀX + s·ΔᵀΔ;
    XᵀX + s·XᵀΔ] (2D × D, the module notes'
    ½·[ΔᵀX̂; XᵀX̂] times 4; factor_scale = 1/N keeps its entries, sums over N tokens of rows of norm ≤ 2,
    within 4 and so within float16's range). grid (row tiles, column tiles, images of the chunk)."""
    ta = tl.program_id(0)
    tb = tl.program_id(1)
    local = tl.program_id(2)
    rows = ta * BLOCK + tl.arange(0, BLOCK)
    cols = tb * BLOCK + tl.arange(0, BLOCK)
    m = (rows < dim)[:, None] & (cols < dim)[None, :]
    square = dim * dim
    zx_b = zx_ptr + local.to(tl.int64) * 2 * square
    at = rows[:, None] * dim + cols[None, :]       # [a, b]
    at_t = cols[None, :] * dim + rows[:, None]     # [b, a]
    xx = tl.load(zx_b + at, mask=m, other=0.0)
    dx = tl.load(zx_b + square + at, mask=m, other=0.0)
    dx_t = tl.load(zx_b + square + at_t, mask=m, other=0.0)
    dd = tl.load(dd_ptr + local.to(tl.int64) * square + at, mask=m, other=0.0)
    total = tl.sum(tl.sum(xx * dd + dx * dx_t, axis=1), axis=0)
    tl.store(partial_ptr + local * tl.num_programs(0) * tl.num_programs(1) + ta * tl.num_programs(1) + tb,
             scale * total)
    for index in tl.static_range(FACTORS):
        sign = SIGN_0 if index == 0 else SIGN_1
        f_b = factor_ptr + index * factor_stride + local.to(tl.int64) * 2 * square
        tl.store(f_b + at, _rounded((dx + sign * dd) * factor_scale, factor_ptr.dtype.element_ty, RTNE), mask=m)
        tl.store(f_b + square + at, _rounded((xx + sign * dx_t) * factor_scale, factor_ptr.dtype.element_ty, RTNE),
                 mask=m)


@triton.jit
def manifold_fwd_finish_kernel(partial_ptr, cos_ptr, out_ptr, n_partials, n_tokens, batch, COSINE: tl.constexpr,
                               BLOCK: tl.constexpr):
    """The losses (T, B) from the partials (B, P), each summed in a fixed order (deterministic): the manifold
    loss in the last row and, with COSINE, −(1/N) Σ_n ĥ_n·ŷ_n from the stats plane COS (B, N) in row 0.
    grid (B,)."""
    b = tl.program_id(0)
    loss = cosine.ordered_sum(partial_ptr + b * n_partials, n_partials, BLOCK)
    if COSINE:
        cos = cosine.ordered_sum(cos_ptr + b.to(tl.int64) * n_tokens, n_tokens, BLOCK)
        tl.store(out_ptr + b, -cos / n_tokens)
        tl.store(out_ptr + batch + b, loss)
    else:
        tl.store(out_ptr + b, loss)


@triton.jit
def manifold_bwd_scale_kernel(part_ptr, grad_ptr, out_ptr, per_image, grad_stride, BLOCK: tl.constexpr,
                              RTNE: tl.constexpr):
    """The whole backward of a gradient made in the forward on the input's own grid: out[b] =
    grad[b]·part[b] (contiguous (B, ...) tensors, per_image elements each); grid (blocks, B)."""
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < per_image
    base = b.to(tl.int64) * per_image
    value = tl.load(part_ptr + base + offs, mask=m, other=0.0).to(tl.float32) * tl.load(grad_ptr + b * grad_stride)
    tl.store(out_ptr + base + offs, _rounded(value, out_ptr.dtype.element_ty, RTNE), mask=m)


@triton.jit
def _resampled_pair(h_b, y_b, toks, m_t, d0, dim, width_t, stride_hn, stride_hd, h_height, h_width, h_scale_h,
                    h_scale_w, stride_yn, stride_yd, y_height, y_width, y_scale_h, y_scale_w,
                    H_IDENTITY: tl.constexpr, Y_IDENTITY: tl.constexpr, BLOCK_D: tl.constexpr):
    """(features ds, mask, fp32 tiles of h and y) resampled at target tokens ``toks`` (mask m_t), features
    d0 … d0 + BLOCK_D (both passes of the pre-pass)."""
    ds = d0 + tl.arange(0, BLOCK_D)
    m = m_t[:, None] & (ds < dim)[None, :]
    v_h = interp.load_resampled(h_b, toks, stride_hn, ds * stride_hd, m, width_t, h_height, h_width,
                                h_scale_h, h_scale_w, H_IDENTITY)
    v_y = interp.load_resampled(y_b, toks, stride_yn, ds * stride_yd, m, width_t, y_height, y_width,
                                y_scale_h, y_scale_w, Y_IDENTITY)
    return ds, m, v_h, v_y


@triton.jit
def _safe_inverse(m):
    """1/m for a max-abs m, 0 for m = 0 (a zero token stays zero); m below fp32's smallest normal is taken
    as that normal, since 1/m would overflow to inf (and 0·inf is NaN) while x/normal ≤ 1 still holds."""
    return tl.where(m > 0.0, 1.0 / tl.maximum(m, FLOAT32_TINY), 0.0)


@triton.jit
def _norms_step(v_h, v_y, max_h, max_y, sq_h, sq_y, dot):
    """Pass 1 over one D chunk: the running max-abs m of each token and Σ(x/m)², Σ(h/m_h)(y/m_y), the sums
    rescaled by (m_old/m_new)² when m grows (as a softmax's running max), so that no square overflows."""
    new_h = tl.maximum(max_h, tl.max(tl.abs(v_h), axis=1))
    new_y = tl.maximum(max_y, tl.max(tl.abs(v_y), axis=1))
    inv_h = _safe_inverse(new_h)
    inv_y = _safe_inverse(new_y)
    keep_h = max_h * inv_h
    keep_y = max_y * inv_y
    u_h = v_h * inv_h[:, None]
    u_y = v_y * inv_y[:, None]
    sq_h = sq_h * keep_h * keep_h + tl.sum(u_h * u_h, axis=1)
    sq_y = sq_y * keep_y * keep_y + tl.sum(u_y * u_y, axis=1)
    dot = dot * keep_h * keep_y + tl.sum(u_h * u_y, axis=1)
    return new_h, new_y, sq_h, sq_y, dot


@triton.jit
def _store_units(p_z, m, dim, v_h, v_y, r_h, r_y, SUM_DIFF: tl.constexpr, RTNE: tl.constexpr):
    """Pass 2 over one D chunk: [ĥ | ŷ] (or [ĥ + ŷ | ĥ − ŷ]) into Z."""
    u_h = v_h * r_h[:, None]
    u_y = v_y * r_y[:, None]
    if SUM_DIFF:
        u_h, u_y = u_h + u_y, u_h - u_y
    tl.store(p_z, _rounded(u_h, p_z.dtype.element_ty, RTNE), mask=m)
    tl.store(p_z + dim, _rounded(u_y, p_z.dtype.element_ty, RTNE), mask=m)


@triton.jit
def manifold_prepass_kernel(h_ptr, y_ptr, z_ptr, stats_ptr, batch, n_tokens, dim, width_t,
                            stride_hb, stride_hn, stride_hd, stride_yb, stride_yn, stride_yd, stride_zb, stride_zn,
                            h_height, h_width, h_scale_h, h_scale_w, y_height, y_width, y_scale_h, y_scale_w,
                            H_IDENTITY: tl.constexpr, Y_IDENTITY: tl.constexpr, SUM_DIFF: tl.constexpr,
                            ONE_CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                            RTNE: tl.constexpr):
    """Z[b, t] = [ĥ_t | ŷ_t] (or with SUM_DIFF [ĥ_t + ŷ_t | ĥ_t − ŷ_t]) on the target grid, and the stats
    planes (P, B, N): s0 = r_h·r_y, s1 = [‖h‖ > eps]·c·r_h², s2 = [‖y‖ > eps]·c·r_y² (kernels/cosine.py's
    saved scalars), r_h, r_y, c = ĥ·ŷ, with r_x = 1/max(‖x‖, eps).

    grid (token blocks, B). Pass 1 takes the norms and the dot (_norms_step), pass 2 writes. ONE_CHUNK
    (BLOCK_D ≥ D): a token's whole row stays in registers between the passes, so h and y are read once;
    otherwise pass 2 reads them again (from L2).
    """
    b = tl.program_id(1)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = toks < n_tokens
    h_b = h_ptr + b.to(tl.int64) * stride_hb
    y_b = y_ptr + b.to(tl.int64) * stride_yb
    z_b = z_ptr + b.to(tl.int64) * stride_zb
    max_h = tl.zeros((BLOCK_T,), dtype=tl.float32)
    max_y = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sq_h = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sq_y = tl.zeros((BLOCK_T,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if ONE_CHUNK:
        ds, m, v_h, v_y = _resampled_pair(h_b, y_b, toks, m_t, 0, dim, width_t, stride_hn, stride_hd, h_height,
                                          h_width, h_scale_h, h_scale_w, stride_yn, stride_yd, y_height, y_width,
                                          y_scale_h, y_scale_w, H_IDENTITY, Y_IDENTITY, BLOCK_D)
        max_h, max_y, sq_h, sq_y, dot = _norms_step(v_h, v_y, max_h, max_y, sq_h, sq_y, dot)
    else:
        for d0 in range(0, dim, BLOCK_D):
            ds, m, v_h, v_y = _resampled_pair(h_b, y_b, toks, m_t, d0, dim, width_t, stride_hn, stride_hd,
                                              h_height, h_width, h_scale_h, h_scale_w, stride_yn, stride_yd,
                                              y_height, y_width, y_scale_h, y_scale_w, H_IDENTITY, Y_IDENTITY,
                                              BLOCK_D)
            max_h, max_y, sq_h, sq_y, dot = _norms_step(v_h, v_y, max_h, max_y, sq_h, sq_y, dot)
    plane = batch * n_tokens
    p_stats = stats_ptr + b.to(tl.int64) * n_tokens + toks
    r_h, r_y, cos = cosine.store_token_scalars(p_stats, plane, m_t, max_h, max_y, sq_h, sq_y, dot)
    tl.store(p_stats + 3 * plane, r_h, mask=m_t)
    tl.store(p_stats + 4 * plane, r_y, mask=m_t)
    tl.store(p_stats + 5 * plane, cos, mask=m_t)
    if ONE_CHUNK:
        _store_units(z_b + toks[:, None] * stride_zn + ds[None, :], m, dim, v_h, v_y, r_h, r_y, SUM_DIFF, RTNE)
    else:
        for d0 in range(0, dim, BLOCK_D):
            ds, m, v_h, v_y = _resampled_pair(h_b, y_b, toks, m_t, d0, dim, width_t, stride_hn, stride_hd,
                                              h_height, h_width, h_scale_h, h_scale_w, stride_yn, stride_yd,
                                              y_height, y_width, y_scale_h, y_scale_w, H_IDENTITY, Y_IDENTITY,
                                              BLOCK_D)
            _store_units(z_b + toks[:, None] * stride_zn + ds[None, :], m, dim, v_h, v_y, r_h, r_y, SUM_DIFF,
                         RTNE)


@triton.jit
def manifold_bwd_adjoint_kernel(g_ptr, grad_ptr, out_ptr, start_r_ptr, start_c_ptr, n_src, dim, height_t, width_t,
                                height_s, width_s, scale_h, scale_w, k_rows, k_cols, stride_gb, stride_gn, stride_ob,
                                stride_on, grad_stride, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                                RTNE: tl.constexpr):
    """out[b, s] = grad[b]·Σ_t w(t, s)·g[b, t]: a target-grid gradient made in the forward, scaled by the
    upstream gradient and taken back by the transposed bilinear resampling, as a gather (deterministic).

    Source token s = (row, col) is read by target rows start_r[row] … + k_rows − 1 and columns
    start_c[col] … + k_cols − 1 (interp.adjoint_span); interp.tap_weight zeroes the rest.
    """
    b = tl.program_id(1)
    src = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    m_s = src < n_src
    row = src // width_s
    col = src % width_s
    r_start = tl.load(start_r_ptr + row, mask=m_s, other=0)
    c_start = tl.load(start_c_ptr + col, mask=m_s, other=0)
    g_b = g_ptr + b.to(tl.int64) * stride_gb
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m_d = ds < dim
        acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        for a in range(k_rows):
            t_row = r_start + a
            w_row = interp.tap_weight(row, t_row, height_t, scale_h, height_s)
            for c in range(k_cols):
                t_col = c_start + c
                w = w_row * interp.tap_weight(col, t_col, width_t, scale_w, width_s)
                m = (m_s & (w != 0.0))[:, None] & m_d[None, :]
                taps = tl.load(g_b + (t_row * width_t + t_col)[:, None] * stride_gn + ds[None, :], mask=m,
                               other=0.0)
                acc += w[:, None] * taps.to(tl.float32)
        acc *= tl.load(grad_ptr + b * grad_stride)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + src[:, None] * stride_on + ds[None, :],
                 _rounded(acc, out_ptr.dtype.element_ty, RTNE), mask=m_s[:, None] & m_d[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class Tiles:
    """Tile shapes: 128-wide tl.dot tiles (wgmma on Hopper) for 2-byte operands; 4-byte (fp32) operands
    halve the K steps to fit shared memory. Under the interpreter the tiles are 16 (the smallest tl.dot)
    so that tiny test shapes cross tile edges, and the workspace a few KB so that the panels and the
    Gram chunks take several rounds."""

    fwd_block: int = 128
    fwd_block_k: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    panel_block: int = 128  # square panel tiles (the symmetric form reads them transposed)
    panel_block_k: int = 64
    panel_warps: int = 8
    panel_stages: int = 3
    prod_block_k: int = 64
    prod_block_d: int = 256
    prod_warps: int = 8
    prod_stages: int = 3
    prepass_block_t: int = 2
    prepass_max_row: int = 2048  # the pre-pass keeps a token's row in registers up to this (power of 2) D
    vec_block_t: int = 4
    vec_block_d: int = 512
    vec_warps: int = 4
    scale_block: int = 4096
    finish_block: int = 1024
    gram_block: int = 64
    gram_warps: int = 4
    # Panels of S_h − S_y and Gram chunks are processed in rounds that fit this many bytes: peak memory
    # has no term in N² (a round holds what fits: whole images' panels, or row panels of BLOCK × N).
    workspace_bytes: int = 32 * 2**20
    # Where 128-wide panel tiles would give fewer programs than this many per multiprocessor (small N,
    # small B), the panels take 64-wide tiles and the products 128-wide D chunks (for_panels).
    small_programs_per_sm: int = 1
    small_block: int = 64
    small_warps: int = 4
    small_prod_block_d: int = 128
    # The tl.dot kernels take their operands by TMA (the copy engine) where the GPU has it (_tma).
    tma: bool = True

    @classmethod
    def current(cls, element_size: int = 2) -> "Tiles":
        if triton_interpreter():
            return cls(fwd_block=16, fwd_block_k=32, fwd_warps=1, fwd_stages=1, panel_block=16, panel_block_k=32,
                       panel_warps=1, panel_stages=1, prod_block_k=16, prod_block_d=16, prod_warps=1,
                       prod_stages=1, prepass_block_t=16, prepass_max_row=32, vec_block_t=16, vec_block_d=32,
                       vec_warps=1, scale_block=64, finish_block=16, gram_block=16, gram_warps=1,
                       workspace_bytes=8 * 2**10)
        if element_size > 2:
            return dataclasses.replace(TILES, fwd_block_k=TILES.fwd_block_k // 2,
                                       panel_block_k=TILES.panel_block_k // 2,
                                       prod_block_k=TILES.prod_block_k // 2)
        return TILES

    @classmethod
    def for_panels(cls, batch: int, n_tokens: int, z: torch.Tensor) -> "Tiles":
        """current(), with the small panel tiles where the large ones would leave the GPU mostly idle."""
        cfg = cls.current(z.element_size())
        if triton_interpreter() or z.device.type != "cuda":
            return cfg
        return cfg.sized_for(batch, n_tokens, _multiprocessors(z.device))

    def sized_for(self, batch: int, n_tokens: int, multiprocessors: int) -> "Tiles":
        """These tiles, or with the small panel tiles where the large ones would give fewer than
        small_programs_per_sm programs per multiprocessor (B·tiles² of them)."""
        programs = batch * triton.cdiv(n_tokens, self.panel_block) ** 2
        if programs >= self.small_programs_per_sm * multiprocessors:
            return self
        return dataclasses.replace(self, panel_block=self.small_block, panel_warps=self.small_warps,
                                   prod_block_d=self.small_prod_block_d, prod_warps=self.small_warps)


TILES = Tiles()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma(cfg: Tiles, z: torch.Tensor) -> bool:
    """Whether the tl.dot kernels load by TMA descriptors: cfg.tma, a Hopper or later GPU (or the
    interpreter, which emulates them; NVIDIA), and the 16-byte alignment the copy engine needs (rows of Ĥ and Ŷ
    start 16-byte aligned: D·element size a multiple of 16)."""
    if not cfg.tma or z.data_ptr() % 16 or (z.shape[2] // 2 * z.element_size()) % 16:
        return False
    if triton_interpreter():
        return True
    # NVIDIA only: ROCm reports its own capabilities (MI300: 9.x) and its TMA support is not what was measured.
    return z.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(z.device)[0] >= 9


def _row_descriptors(z: torch.Tensor, block_rows: int, block_k: int) -> tuple:
    """TMA descriptors of Z's two halves Ĥ and Ŷ, each as (B·N, D) rows, in
    (block_rows × block_k) tiles."""
    flat = z.view(-1, z.shape[2])
    dim = z.shape[2] // 2
    return tuple(TensorDescriptor.from_tensor(half, [block_rows, block_k]) for half in (flat[:, :dim], flat[:, dim:]))


@dataclass
class _Prepared:
    """The pre-pass output: z (B, N, 2D) in the compute dtype, [Ĥ | Ŷ] (tiled) or [X | Δ] (gram);
    stats (N_STATS, B, N) fp32 on the target grid."""

    z: torch.Tensor
    stats: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        batch, n_tokens, two_d = self.z.shape
        return batch, n_tokens, two_d // 2

    def dot_args(self) -> dict:
        """constexprs of the tl.dot kernels: the operand dtype (fp32 under the interpreter, whose bf16
        arithmetic is wrong) and the fp32 precision PyTorch allows for matmuls (TF32 or IEEE)."""
        dtype = self.z.dtype
        compute = tl.float32 if triton_interpreter() else _TL_DTYPES[dtype]
        tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
        return {"COMPUTE": compute, "PRECISION": "tf32" if tf32 and not triton_interpreter() else "ieee"}


def _rtne(out: torch.Tensor) -> bool:
    """Whether a kernel writing ``out`` rounds bf16 by hand (see _rounded)."""
    return triton_interpreter() and out.dtype == torch.bfloat16


def _prepare(h, y, h_grid, y_grid, target_grid, sum_diff: bool) -> _Prepared:
    batch, _, dim = h.shape
    n_tokens = target_grid[0] * target_grid[1]
    z = torch.empty(batch, n_tokens, 2 * dim, dtype=torch.promote_types(h.dtype, y.dtype), device=h.device)
    stats = torch.empty(N_STATS, batch, n_tokens, dtype=torch.float32, device=h.device)
    cfg = Tiles.current()
    # A token's whole row in registers when it fits (h and y read once), else D chunks and a second read.
    row = triton.next_power_of_2(dim)
    one_chunk = row <= cfg.prepass_max_row
    block_d = row if one_chunk else cfg.vec_block_d
    warps = cfg.vec_warps if cfg.prepass_block_t * block_d <= 2048 else 2 * cfg.vec_warps
    manifold_prepass_kernel[(triton.cdiv(n_tokens, cfg.prepass_block_t), batch)](
        h_ptr=h, y_ptr=y, z_ptr=z, stats_ptr=stats, batch=batch, n_tokens=n_tokens, dim=dim,
        width_t=target_grid[1], stride_hb=h.stride(0), stride_hn=h.stride(1), stride_hd=h.stride(2),
        stride_yb=y.stride(0), stride_yn=y.stride(1), stride_yd=y.stride(2), stride_zb=z.stride(0),
        stride_zn=z.stride(1), h_height=h_grid[0], h_width=h_grid[1],
        h_scale_h=interp.axis_scale(h_grid[0], target_grid[0]), h_scale_w=interp.axis_scale(h_grid[1], target_grid[1]),
        y_height=y_grid[0], y_width=y_grid[1],
        y_scale_h=interp.axis_scale(y_grid[0], target_grid[0]), y_scale_w=interp.axis_scale(y_grid[1], target_grid[1]),
        H_IDENTITY=tuple(h_grid) == tuple(target_grid), Y_IDENTITY=tuple(y_grid) == tuple(target_grid),
        SUM_DIFF=sum_diff, ONE_CHUNK=one_chunk, RTNE=_rtne(z), BLOCK_T=cfg.prepass_block_t, BLOCK_D=block_d,
        num_warps=warps)
    return _Prepared(z, stats)


def _tiled_loss(prep: _Prepared) -> torch.Tensor:
    """The manifold loss's partials (B, P) by the symmetric tiles (no gradient)."""
    batch, n_tokens, dim = prep.shape
    cfg = Tiles.current(prep.z.element_size())
    tiles = triton.cdiv(n_tokens, cfg.fwd_block)
    pairs = tiles * (tiles + 1) // 2
    # (B, pairs) with pairs ≈ N²/(2·BLOCK²): a few KB, summed in a fixed order (deterministic).
    partial = torch.empty(batch, pairs, dtype=torch.float32, device=prep.z.device)
    tma = _tma(cfg, prep.z)
    h_desc, y_desc = _row_descriptors(prep.z, cfg.fwd_block, cfg.fwd_block_k) if tma else (prep.z, prep.z)
    manifold_fwd_tiled_kernel[(pairs, batch)](
        z_ptr=prep.z, h_desc=h_desc, y_desc=y_desc, partial_ptr=partial, n_tokens=n_tokens, dim=dim,
        n_pairs=pairs, scale=1.0 / n_tokens**2, stride_zb=prep.z.stride(0), stride_zn=prep.z.stride(1),
        BLOCK=cfg.fwd_block, BLOCK_K=cfg.fwd_block_k, TMA=tma, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages, **prep.dot_args())
    return partial


def _tiled_form(batch: int, n_tokens: int, element_size: int, cfg: Tiles, algorithm: str) -> tuple[str, int]:
    """(form, items per round) of the tiled path with a gradient. "symmetric": rounds of whole images, each
    image's panel made from the i ≤ j tiles (4·N²·D in all with one gradient); "rows": rounds of row
    panels, each made whole (6·N²·D), where one image's panel (N² elements) would not fit the workspace.
    Items are images (symmetric) or (image, row tile) pairs (rows)."""
    width = triton.cdiv(n_tokens, cfg.panel_block) * cfg.panel_block
    images = cfg.workspace_bytes // (width * width * element_size)
    form = algorithm[len("tiled-"):] if algorithm.startswith("tiled-") else ("symmetric" if images else "rows")
    if form == "symmetric":  # forced: at least one image per round
        return form, min(batch, max(1, images))
    items = batch * (width // cfg.panel_block)
    per_round = max(1, cfg.workspace_bytes // (cfg.panel_block * width * element_size))
    return form, triton.cdiv(items, triton.cdiv(items, per_round))


def _tiled_loss_and_grads(prep: _Prepared, grads, algorithm: str = "tiled") -> torch.Tensor:
    """The loss's partials (B, P); grads: [(own, target-grid buffer)] get ∂L_man/∂x (x = h: own 0, y: own 1).
    ``algorithm``: "tiled" (the form by size), "tiled-symmetric" or "tiled-rows" (_tiled_form)."""
    batch, n_tokens, dim = prep.shape
    z = prep.z
    cfg = Tiles.for_panels(batch, n_tokens, z)
    block = cfg.panel_block
    tiles = triton.cdiv(n_tokens, block)
    width = tiles * block
    # The symmetric product walks the tiles above its row tile in BLOCK_K steps, unmasked: they must divide.
    if block % cfg.prod_block_k:
        raise ValueError(f"Tiles: panel_block {block} must be a multiple of prod_block_k {cfg.prod_block_k}")
    form, group = _tiled_form(batch, n_tokens, z.element_size(), cfg, algorithm)
    if form == "symmetric" and width * width >= 2**31:
        raise ValueError(f"algorithm='tiled-symmetric': {n_tokens} tokens make a panel past int32 indexing; "
                         f"use 'tiled' (it takes row panels there)")
    dot_args = prep.dot_args()
    scale = 1.0 / n_tokens**2
    # Both forms leave the same layout: panel rows of item (image, row tile) at item·BLOCK·width, radial
    # partials (item, own, slot, BLOCK); the product kernel takes it from there.
    if form == "symmetric":
        pairs = tiles * (tiles + 1) // 2
        loss = torch.empty(batch, pairs, dtype=torch.float32, device=z.device)
        panel = torch.empty(group, width, width, dtype=z.dtype, device=z.device)
        rounds = [(image0 * tiles, min(group, batch - image0) * tiles, image0) for image0 in range(0, batch, group)]
    else:
        loss = torch.empty(batch, tiles * tiles, dtype=torch.float32, device=z.device)
        panel = torch.empty(group, block, width, dtype=z.dtype, device=z.device)
        items = batch * tiles
        rounds = [(item0, min(group, items - item0), None) for item0 in range(0, items, group)]
    radial = torch.empty(panel.numel() // (block * width), 2, tiles, block, dtype=torch.float32, device=z.device)
    tma = _tma(cfg, z)
    if tma:
        h_desc, y_desc = _row_descriptors(z, block, cfg.panel_block_k)
        x_descs = _row_descriptors(z, cfg.prod_block_k, cfg.prod_block_d)
        flat_panel = panel.view(-1, width)
        panel_desc = TensorDescriptor.from_tensor(flat_panel, [block, cfg.prod_block_k])
        column_desc = TensorDescriptor.from_tensor(flat_panel, [cfg.prod_block_k, block])
    else:
        h_desc = y_desc = panel_desc = column_desc = z
        x_descs = (z, z)
    for item0, count, image0 in rounds:
        if form == "symmetric":
            manifold_fwd_sym_panel_kernel[(pairs, count // tiles)](
                z_ptr=z, h_desc=h_desc, y_desc=y_desc, panel_ptr=panel, radial_ptr=radial, loss_ptr=loss,
                n_tokens=n_tokens, dim=dim, tiles=tiles, n_pairs=pairs, image0=image0, scale=scale, stride_zb=z.stride(0),
                stride_zn=z.stride(1), BLOCK=block, BLOCK_K=cfg.panel_block_k, RTNE=_rtne(panel), TMA=tma,
                num_warps=cfg.panel_warps, num_stages=cfg.panel_stages, **dot_args)
        else:
            manifold_fwd_panel_kernel[(tiles, count)](
                z_ptr=z, h_desc=h_desc, y_desc=y_desc, panel_ptr=panel, radial_ptr=radial, loss_ptr=loss,
                n_tokens=n_tokens, dim=dim, row_tiles=tiles, item0=item0, scale=scale, stride_zb=z.stride(0),
                stride_zn=z.stride(1), BLOCK_M=block, BLOCK_K=cfg.panel_block_k, RTNE=_rtne(panel), TMA=tma,
                num_warps=cfg.panel_warps, num_stages=cfg.panel_stages, **dot_args)
        for own, buf in grads:
            manifold_fwd_panel_grad_kernel[(triton.cdiv(dim, cfg.prod_block_d), count)](
                panel_ptr=panel, radial_ptr=radial, z_ptr=z, stats_ptr=prep.stats, out_ptr=buf,
                panel_desc=panel_desc, column_desc=column_desc, x_desc=x_descs[own], n_tokens=n_tokens, dim=dim,
                batch=batch, row_tiles=tiles, item0=item0, own=own, coef=(1.0 - 2.0 * own) * 4.0 / n_tokens**2,
                stride_zb=z.stride(0), stride_zn=z.stride(1), stride_ob=buf.stride(0), stride_on=buf.stride(1),
                BLOCK_M=block, BLOCK_K=cfg.prod_block_k, BLOCK_D=cfg.prod_block_d, SYMMETRIC=form == "symmetric",
                RTNE=_rtne(buf), TMA=tma, num_warps=cfg.prod_warps, num_stages=cfg.prod_stages, **dot_args)
    return loss


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (fp32 accumulation; cuBLAS writes 16-bit inputs straight to fp32)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _gram_loss_and_grads(prep: _Prepared, grads) -> torch.Tensor:
    """The loss's partials (B, P) and the gradients (as _tiled_loss_and_grads) by the Gram path on
    Z = [X | Δ], in chunks of images that fit the workspace (see the module notes):
    two products give the three D×D blocks it needs (6·N·D²: ZᵀX = [XᵀX; ΔᵀX] and ΔᵀΔ; XᵀΔ is ΔᵀX
    transposed), one kernel takes the loss and the right-hand factors of the gradients from them, and
    one more product per gradient (4·N·D²) goes through manifold_fwd_gram_grad_kernel."""
    batch, n_tokens, dim = prep.shape
    z = prep.z
    cfg = Tiles.current()
    # A bf16 factor is rounded by 2^-9 before the normaliser's projection removes most of G: at small D
    # (launch-bound anyway) multiply by the fp32 factor (bf16 fuzz: 1.1e-2 -> < 1e-2).
    exact = dim <= SMALL_DIM or z.dtype == torch.float32
    factor_dtype = torch.float32 if exact else z.dtype
    per_image = 4 * 3 * dim * dim + len(grads) * (2 * dim * dim * factor_dtype.itemsize + 4 * n_tokens * dim)
    chunk = max(1, min(batch, cfg.workspace_bytes // per_image))
    block = cfg.gram_block
    tiles = triton.cdiv(dim, block)
    partial = torch.empty(batch, tiles * tiles, dtype=torch.float32, device=z.device)
    for b0 in range(0, batch, chunk):
        zc = z[b0:b0 + chunk]
        count = zc.shape[0]
        zx = _bmm_f32(zc.mT, zc[:, :, :dim])                  # [XᵀX; ΔᵀX]   (count, 2D, D)
        dd = _bmm_f32(zc[:, :, dim:].mT, zc[:, :, dim:])      # ΔᵀΔ          (count, D, D)
        factors = torch.empty(len(grads), count, 2 * dim, dim, dtype=factor_dtype, device=z.device)
        manifold_fwd_gram_combine_kernel[(tiles, tiles, count)](
            zx_ptr=zx, dd_ptr=dd, factor_ptr=factors, partial_ptr=partial[b0:], dim=dim,
            factor_stride=count * 2 * dim * dim, scale=0.5 / n_tokens**2, factor_scale=1.0 / n_tokens,
            SIGN_0=1.0 if grads and grads[0][0] == 0 else -1.0, SIGN_1=-1.0,
            FACTORS=len(grads), BLOCK=block, RTNE=_rtne(factors), num_warps=cfg.gram_warps)
        del zx, dd
        for index, (own, buf) in enumerate(grads):
            factor = factors[index]
            g = torch.bmm(zc.float(), factor) if exact else _bmm_f32(zc, factor)
            manifold_fwd_gram_grad_kernel[(triton.cdiv(n_tokens, cfg.vec_block_t), count)](
                g_ptr=g, z_ptr=z, stats_ptr=prep.stats, out_ptr=buf, n_tokens=n_tokens, dim=dim, batch=batch,
                b0=b0, own=own, coef=(1.0 - 2.0 * own) / n_tokens, stride_zb=z.stride(0),
                stride_zn=z.stride(1), stride_ob=buf.stride(0), stride_on=buf.stride(1), RTNE=_rtne(buf),
                BLOCK_T=cfg.vec_block_t, BLOCK_D=cfg.vec_block_d, num_warps=cfg.vec_warps)
            del g
    return partial


def _scaled_adjoint(part: torch.Tensor, grad_row: torch.Tensor, like: torch.Tensor, grid, target_grid) -> torch.Tensor:
    """grad_row[b]·part[b] taken back to ``like``'s grid by the transposed resampling (a gather), in
    like's dtype."""
    batch, n_src, dim = like.shape
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    start_r, k_rows = interp.adjoint_start_table(grid[0], target_grid[0], like.device)
    start_c, k_cols = interp.adjoint_start_table(grid[1], target_grid[1], like.device)
    cfg = Tiles.current()
    manifold_bwd_adjoint_kernel[(triton.cdiv(n_src, cfg.vec_block_t), batch)](
        g_ptr=part, grad_ptr=grad_row, out_ptr=out, start_r_ptr=start_r, start_c_ptr=start_c, n_src=n_src,
        dim=dim, height_t=target_grid[0], width_t=target_grid[1], height_s=grid[0], width_s=grid[1],
        scale_h=interp.axis_scale(grid[0], target_grid[0]), scale_w=interp.axis_scale(grid[1], target_grid[1]),
        k_rows=k_rows, k_cols=k_cols, stride_gb=part.stride(0), stride_gn=part.stride(1),
        stride_ob=out.stride(0), stride_on=out.stride(1), grad_stride=grad_row.stride(0), RTNE=_rtne(out),
        BLOCK_S=cfg.vec_block_t, BLOCK_D=cfg.vec_block_d, num_warps=cfg.vec_warps)
    return out


def _check_dtypes(h, y) -> None:
    # float64 has no tensor-core dot: refused here, as by the cosine kernel (backend="auto" sends float64
    # to the reference).
    check_kernel_dtype("h", h)
    check_kernel_dtype("y", y)


def manifold_terms(h, y, h_grid, y_grid, target_grid, needs_h=False, needs_y=False, algorithm="auto",
                   with_cosine=False):
    """(losses (T, B) fp32, stats (N_STATS, B, N) fp32, part_h | None, part_y | None) of the per-image
    manifold loss (1/N²) Σ_ij (ĥ_i·ĥ_j − ŷ_i·ŷ_j)² (the last row), after the cosine alignment term
    −(1/N) Σ_n ĥ_n·ŷ_n with ``with_cosine`` (T = 2). h: (B, N_h, D) on h_grid, y: (B, N_y, D) on y_grid, both
    resampled to target_grid. part_x: the gradient with respect to x resampled to the target grid
    (_runtime.part_like: x's dtype, float32 for float16; row b: image b's own gradient); the backward
    scales it and takes it back through the transposed resampling. ``algorithm``: one of ALGORITHMS."""
    _check_dtypes(h, y)
    _, _, dim = h.shape
    n_tokens = target_grid[0] * target_grid[1]
    # Token × feature offsets within an image are int32 in the kernels: Z's (N_target × 2D), h's, y's.
    if max(n_tokens * 2 * dim, h.shape[1] * dim, y.shape[1] * dim) >= 2**31:
        raise ValueError(f"the Triton manifold kernels index an image's tokens × features in int32, which "
                         f"{n_tokens} target tokens (h: {h.shape[1]}, y: {y.shape[1]}) × D = {dim} exceed; use "
                         f"backend='reference' (or 'cpp' on a CPU), or fewer tokens per image")
    wanted = [(0, h, h_grid)] if needs_h else []
    wanted += [(1, y, y_grid)] if needs_y else []
    choice = choose_algorithm(n_tokens, dim, len(wanted), algorithm, batch=h.shape[0],
                              element_size=torch.promote_types(h.dtype, y.dtype).itemsize)
    prep = _prepare(h, y, h_grid, y_grid, target_grid, sum_diff=choice == "gram")
    buffers = [(own, part_like(x, target_grid)) for own, x, _ in wanted]
    if choice == "gram":
        partial = _gram_loss_and_grads(prep, buffers)
    elif buffers:
        forced = algorithm if algorithm != "auto" else ALGORITHM
        partial = _tiled_loss_and_grads(prep, buffers, forced if forced.startswith("tiled") else "tiled")
    else:
        partial = _tiled_loss(prep)
    losses = torch.empty(2 if with_cosine else 1, h.shape[0], dtype=torch.float32, device=h.device)
    manifold_fwd_finish_kernel[(h.shape[0],)](
        partial_ptr=partial, cos_ptr=prep.stats[COS], out_ptr=losses, n_partials=partial.shape[1],
        n_tokens=n_tokens, batch=h.shape[0], COSINE=with_cosine, BLOCK=Tiles.current().finish_block, num_warps=4)
    parts = [None, None]
    for own, buf in buffers:
        parts[own] = buf
    return losses, prep.stats, parts[0], parts[1]


# --------------------------------------------------------------------------------------------------
# The op implementations (ops._triton_implementations, OpImpl.grad_in_forward).


def manifold_forward(h, y, h_grid, y_grid, target_grid, *, needs_h=False, needs_y=False, algorithm="auto"):
    """((1, B) fp32 manifold losses, None, part_h | None, part_y | None): the parts are ∂(Σ_b L_b)/∂x̃ on the
    target grid (manifold_terms)."""
    losses, _, part_h, part_y = manifold_terms(h, y, h_grid, y_grid, target_grid, needs_h, needs_y, algorithm)
    return losses, None, part_h, part_y


def _scale_into(out: torch.Tensor, part: torch.Tensor, grad_row: torch.Tensor) -> torch.Tensor:
    """out[b] = grad_row[b]·part[b], in one pass; the part stays as saved, so a second backward
    (retain_graph=True) sees it unchanged."""
    cfg = Tiles.current()
    per_image = part[0].numel()
    manifold_bwd_scale_kernel[(triton.cdiv(per_image, cfg.scale_block), part.shape[0])](
        part_ptr=part, grad_ptr=grad_row, out_ptr=out, per_image=per_image, grad_stride=grad_row.stride(0),
        BLOCK=cfg.scale_block, RTNE=_rtne(out), num_warps=4)
    return out


def manifold_backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y, *, parts):
    """(∂/∂h | None, ∂/∂y | None) of Σ_b grad[0, b]·L_man[b]: the forward's target-grid gradients, scaled
    and taken back to each input's grid (one pass each)."""
    row = grad[0].float()
    out = []
    for part, x, grid, needs in zip(parts, (h, y), (h_grid, y_grid), (needs_h, needs_y)):
        if not needs:
            out.append(None)
        elif tuple(grid) == tuple(target_grid):
            out.append(_scale_into(torch.empty(x.shape, dtype=x.dtype, device=x.device), part, row))
        else:
            out.append(_scaled_adjoint(part, row, x, grid, target_grid))
    return tuple(out)


def urepa_saved_shape(h, y, h_grid, y_grid, target_grid) -> tuple[int, int, int]:
    """The cosine term's per-token scalars, (3, B, N): kernels/cosine.py's saved tensor."""
    return (3, h.shape[0], target_grid[0] * target_grid[1])


def urepa_forward(h, y, h_grid, y_grid, target_grid, *, needs_h=False, needs_y=False, algorithm="auto"):
    """((2, B) fp32: row 0 −(1/N) Σ_n ĥ_n·ŷ_n, row 1 the manifold loss; the cosine scalars (3, B, N);
    the manifold term's parts, its gradients on the target grid), from one pre-pass."""
    losses, stats, part_h, part_y = manifold_terms(h, y, h_grid, y_grid, target_grid, needs_h, needs_y, algorithm,
                                                   with_cosine=True)
    return losses, stats[:3], part_h, part_y


def urepa_backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y, *, saved, parts):
    """(∂/∂h | None, ∂/∂y | None) of Σ_b grad[0, b]·L_cos[b] + grad[1, b]·L_man[b], in one pass per input:
    kernels/cosine.py's backward makes the cosine term from the pre-pass's scalars and adds the forward's
    target-grid manifold gradients, weighted by grad[1], before the transposed resampling they share."""
    return cosine.backward(grad[:1], h, y, h_grid, y_grid, target_grid, needs_h, needs_y, saved=saved,
                           extra=parts, extra_grad=grad[1])

"""U-REPA's manifold loss and the fused U-REPA loss in Triton, with no N×N tensor.

Math (DESIGN §1), per image b, N target tokens, Ĥ, Ŷ ∈ R^{N×D} the interpolated, normalised tokens:

    L_man = (1/N²) Σ_ij (ĥ_i·ĥ_j − ŷ_i·ŷ_j)² = (1/N²) ‖S_h − S_y‖²_F,   S_h = ĤĤᵀ, S_y = ŶŶᵀ
    L_cos = −(1/N) Σ_n ĥ_n·ŷ_n
    ∂L_man/∂Ĥ = (4/N²)(S_h − S_y) Ĥ,   ∂L_man/∂Ŷ = −(4/N²)(S_h − S_y) Ŷ
    ∂L/∂x_n   = (G_n − (G_n·x̂_n) x̂_n) / max(‖x_n‖, eps),   then the transposed bilinear interpolation.

Pipeline. A pre-pass interpolates and normalises both inputs once into Z = [Ĥ | Ŷ] (B, N, 2D) in the
compute dtype, with per-token 1/‖x‖ and ĥ·ŷ (the cosine term): every token is then read N/BLOCK times
by the similarity tiles, so paying the 4-tap interpolation and the norm once beats redoing them in
every tile load (measured: notes/manifold.md). Two algorithms then give the same loss:

* tiled (flash-attention style): forward streams the (i ≤ j) tiles of S_h − S_y through registers and
  sums their squares (symmetry halves the work: 2·N²·D FLOPs). The backward cannot keep a row block's
  gradient in registers as flash attention does (it is BLOCK_M × D, D ≈ 1–2K), so it works in rounds:
  one kernel writes the row panels (BLOCK_M × N each) of S_h − S_y for as many (image, row block)
  items as a fixed workspace holds (32 MiB, whatever N is), a second multiplies each panel
  by Ĥ, one D chunk per program (6·N²·D FLOPs in all). The normaliser's radial term needs
  G_i·ĥ_i = (4g/N²) Σ_j (S_h − S_y)_ij (S_h)_ij − (g_cos/N) ĥ_i·ŷ_i, which the first kernel sums on
  the way, so the gradient leaves the second kernel projected and scaled, never stored unnormalised.
* gram: ‖S_h − S_y‖²_F = ‖ĤᵀĤ‖²_F + ‖ŶᵀŶ‖²_F − 2‖ĤᵀŶ‖²_F and (S_h − S_y)Ĥ = Ĥ(ĤᵀĤ) − Ŷ(ŶᵀĤ), i.e.
  Zᵀ Z with signs (8·N·D² FLOPs) and Z·[ĤᵀĤ; −ŶᵀĤ] (4·N·D² each way), through cuBLAS. It subtracts large
  numbers, so the D×D products are kept in fp32 and the second product multiplies by a bf16 hi + lo
  split of them; the forward falls back to tiled when the cancellation ratio is too large (see
  GRAM_MAX_CANCELLATION). Cost model and accuracy bound: notes/manifold.md.

Choice: REPA_FUSED_MANIFOLD_ALGO=auto|tiled|gram (read at import) or the module attribute ALGORITHM.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._runtime import EPS, triton_interpreter

from . import interp

NORM_EPS = EPS
ALGORITHMS = ("auto", "tiled", "gram")
ALGORITHM = os.environ.get("REPA_FUSED_MANIFOLD_ALGO", "auto")

# Cost model (FLOPs per image, h-gradient only; y's gradient adds the same again to both backward paths):
#   tiled: forward 2·N²·D, backward 6·N²·D;  gram: forward 8·N·D², backward 12·N·D²
# and the Gram path runs its FLOPs at GRAM_EFFICIENCY times the Triton tiles' rate (H100, N = 4096,
# D = 1024, notes/manifold.md: 447 vs 533 TFLOP/s forward, 431 vs 510 backward; the Frobenius
# reductions and the hi/lo split eat cuBLAS's edge). Gram then wins for N > 4.7·D (forward) and
# N > 2.35·D (backward).
GRAM_EFFICIENCY = {"forward": 0.85, "backward": 0.85}
# The Gram forward's relative error against fp64 grew as ≈ 5e-6·ratio on an H100 (N = 4096, D = 1024),
# ratio = (‖ĤᵀĤ‖² + ‖ŶᵀŶ‖²) / ‖S_h − S_y‖²; above this ratio (error ≳ 1e-3) the tiled kernel recomputes
# the loss. The backward needs no guard: with the hi/lo split its error stayed ≤ 1e-3 up to ratio 3e5,
# the size of the tiled backward's own (bf16 panel) error.
GRAM_MAX_CANCELLATION = 200.0


def choose_algorithm(n_tokens: int, dim: int, backward: bool = False) -> str:
    """"tiled" or "gram" for N target tokens of width D: ALGORITHM when forced, else the cheaper one."""
    if ALGORITHM not in ALGORITHMS:
        raise ValueError(f"REPA_FUSED_MANIFOLD_ALGO / manifold.ALGORITHM must be one of {ALGORITHMS}, "
                         f"got {ALGORITHM!r}")
    if ALGORITHM != "auto":
        return ALGORITHM
    tiled = (6.0 if backward else 2.0) * n_tokens * n_tokens * dim
    gram = (12.0 if backward else 8.0) * n_tokens * dim * dim
    return "gram" if gram < tiled * GRAM_EFFICIENCY["backward" if backward else "forward"] else "tiled"


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _similarity_tiles(z_ptr, stride_n, rows, cols, n_tokens, dim,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """(Ĥ[rows] Ĥ[cols]ᵀ, Ŷ[rows] Ŷ[cols]ᵀ) in fp32 for one image's Z = [Ĥ | Ŷ]; rows ≥ N read as 0."""
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_r = rows < n_tokens
    m_c = cols < n_tokens
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
def _tiled_forward_kernel(z_ptr, partial_ptr, n_tokens, dim, n_pairs, scale, stride_zb, stride_zn,
                          BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                          COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """partial[b, pair] = scale·w·‖(S_h − S_y)[tile i, tile j]‖²_F, tile pairs i ≤ j (w = 2 off the diagonal).

    grid (pairs, B); pair = j(j+1)/2 + i. The (B, pairs) partials are summed on the host in a fixed order.
    """
    pair = tl.program_id(0)
    b = tl.program_id(1)
    # Invert pair = j(j+1)/2 + i; the float root can be one off either way, so correct it.
    tj = ((tl.sqrt(8.0 * pair.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > pair, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pair, tj + 1, tj)
    ti = pair - tj * (tj + 1) // 2
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    acc_h, acc_y = _similarity_tiles(z_ptr + b.to(tl.int64) * stride_zb, stride_zn, rows, cols, n_tokens,
                                     dim, BLOCK, BLOCK, BLOCK_K, COMPUTE, PRECISION)
    diff = acc_h - acc_y
    total = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
    tl.store(partial_ptr + b * n_pairs + pair, tl.where(ti == tj, scale, 2.0 * scale) * total)


@triton.jit(do_not_specialize=["item0"])
def _panel_kernel(z_ptr, panel_ptr, radial_ptr, n_tokens, dim, row_tiles, item0, stride_zb, stride_zn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """Backward phase 1, grid (column tiles, items of this round); item = b·row_tiles + row tile.

    panel[item, :, cols] = (S_h − S_y)[rows, cols] (compute dtype), and the radial partial sums
    radial[item, 0|1, column tile, :] = Σ_cols (S_h − S_y)·S_h | S_y (fp32).
    """
    tj = tl.program_id(0)
    local = tl.program_id(1)
    item = item0 + local
    b = item // row_tiles
    r_local = tl.arange(0, BLOCK_M)
    rows = (item % row_tiles) * BLOCK_M + r_local
    cols = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_h, acc_y = _similarity_tiles(z_ptr + b.to(tl.int64) * stride_zb, stride_zn, rows, cols, n_tokens,
                                     dim, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, PRECISION)
    diff = acc_h - acc_y
    col_tiles = tl.num_programs(0)
    p_panel = panel_ptr + local.to(tl.int64) * BLOCK_M * col_tiles * BLOCK_N
    tl.store(p_panel + r_local[:, None] * (col_tiles * BLOCK_N) + cols[None, :],
             diff.to(panel_ptr.dtype.element_ty))
    p_radial = radial_ptr + (local * 2 * col_tiles + tj) * BLOCK_M + r_local
    tl.store(p_radial, tl.sum(diff * acc_h, axis=1))
    tl.store(p_radial + col_tiles * BLOCK_M, tl.sum(diff * acc_y, axis=1))


@triton.jit(do_not_specialize=["item0"])
def _panel_product_kernel(panel_ptr, radial_ptr, z_ptr, stats_ptr, grad_ptr, out_ptr, n_tokens, dim,
                          row_tiles, col_tiles, width, item0, own, sign, man_off, man_scale, cos_scale,
                          stride_zb, stride_zn, stride_ob, stride_on, HAS_COS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """Backward phase 2, grid (D chunks, items of this round): the panel (width = padded N) times X̂ = Ĥ (own = 0) or Ŷ
    (own = 1), leaving through the normaliser:

        G = sign·c_man·(panel @ X̂) − c_cos·other,   out = (G − (G·x̂) x̂)·rnorm,
        G·x̂ = sign·c_man·Σ radial[own] − c_cos·ĥ·ŷ   (no second pass over D).

    c_man = man_scale·grad[man_off + b] = 4·g_man/N², c_cos = cos_scale·grad[b] = g_cos/N (grad: the
    op's (T, B) upstream gradient); stats (B, 3, N) = (1/‖h‖, 1/‖y‖, ĥ·ŷ).
    """
    d_chunk = tl.program_id(0)
    local = tl.program_id(1)
    item = item0 + local
    b = item // row_tiles
    r_local = tl.arange(0, BLOCK_M)
    rows = (item % row_tiles) * BLOCK_M + r_local
    m_r = rows < n_tokens
    ds = d_chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = ds < dim
    z_b = z_ptr + b.to(tl.int64) * stride_zb
    own_off = own * dim
    p_panel = panel_ptr + local.to(tl.int64) * BLOCK_M * width
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, n_tokens, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        b_p = tl.load(p_panel + r_local[:, None] * width + ks[None, :]).to(COMPUTE)
        b_x = tl.load(z_b + ks[:, None] * stride_zn + own_off + ds[None, :],
                      mask=(ks < n_tokens)[:, None] & m_d[None, :], other=0.0).to(COMPUTE)
        acc = tl.dot(b_p, b_x, acc, input_precision=PRECISION)
    radial = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_radial = radial_ptr + (local * 2 + own) * col_tiles * BLOCK_M + r_local
    for t in range(col_tiles):
        radial += tl.load(p_radial + t * BLOCK_M)
    c_man = sign * man_scale * tl.load(grad_ptr + man_off + b)
    c_cos = cos_scale * tl.load(grad_ptr + b)
    stats_b = stats_ptr + b.to(tl.int64) * 3 * n_tokens
    radial = c_man * radial
    m_rd = m_r[:, None] & m_d[None, :]
    grad = c_man * acc
    if HAS_COS:
        radial -= c_cos * tl.load(stats_b + 2 * n_tokens + rows, mask=m_r, other=0.0)
        grad -= c_cos * tl.load(z_b + rows[:, None] * stride_zn + (dim - own_off) + ds[None, :], mask=m_rd,
                                other=0.0).to(tl.float32)
    rnorm = tl.load(stats_b + own * n_tokens + rows, mask=m_r, other=0.0)
    # Below eps the normaliser is a plain scaling: no radial projection (as the reference).
    radial = tl.where(rnorm < 1.0 / 1e-12, radial, 0.0)
    b_own = tl.load(z_b + rows[:, None] * stride_zn + own_off + ds[None, :], mask=m_rd,
                    other=0.0).to(tl.float32)
    grad = (grad - radial[:, None] * b_own) * rnorm[:, None]
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + rows[:, None] * stride_on + ds[None, :],
             grad.to(out_ptr.dtype.element_ty), mask=m_rd)


@triton.jit
def _unit_backward_kernel(g_ptr, g_lo_ptr, z_ptr, stats_ptr, grad_ptr, out_ptr, n_tokens, dim, own, sign,
                          man_off, man_scale, cos_scale, stride_zb, stride_zn, stride_ob, stride_on,
                          HAS_LO: tl.constexpr, HAS_COS: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gram path: out = (G − (G·x̂) x̂)·rnorm, G = sign·c_man·(g + g_lo) − c_cos·other; g: (B, N, D) fp32.

    Two passes over D: the radial dot needs the whole row first. own, sign, c_man, c_cos as in
    _panel_product_kernel.
    """
    b = tl.program_id(1)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = toks < n_tokens
    c_man = sign * man_scale * tl.load(grad_ptr + man_off + b)
    c_cos = cos_scale * tl.load(grad_ptr + b)
    z_b = z_ptr + b.to(tl.int64) * stride_zb
    own_off = own * dim
    g_b = b.to(tl.int64) * n_tokens * dim
    radial = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for pass_ in tl.static_range(2):
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m = m_t[:, None] & (ds < dim)[None, :]
            offs = toks[:, None] * dim + ds[None, :]
            grad = tl.load(g_ptr + g_b + offs, mask=m, other=0.0)
            if HAS_LO:
                grad += tl.load(g_lo_ptr + g_b + offs, mask=m, other=0.0).to(tl.float32)
            grad *= c_man
            if HAS_COS:
                grad -= c_cos * tl.load(z_b + toks[:, None] * stride_zn + (dim - own_off) + ds[None, :], mask=m,
                                        other=0.0).to(tl.float32)
            b_own = tl.load(z_b + toks[:, None] * stride_zn + own_off + ds[None, :], mask=m,
                            other=0.0).to(tl.float32)
            if pass_ == 0:
                radial += tl.sum(grad * b_own, axis=1)
            else:
                rnorm = tl.load(stats_ptr + (b * 3 + own) * n_tokens + toks, mask=m_t, other=0.0)
                proj = tl.where(rnorm < 1.0 / 1e-12, radial, 0.0)
                out = (grad - proj[:, None] * b_own) * rnorm[:, None]
                tl.store(out_ptr + b.to(tl.int64) * stride_ob + toks[:, None] * stride_on + ds[None, :],
                         out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _resampled_pair(h_b, y_b, toks, ds, m, width_t, stride_hn, stride_hd, h_height, h_width, h_scale_h, h_scale_w,
                    stride_yn, stride_yd, y_height, y_width, y_scale_h, y_scale_w,
                    H_IDENTITY: tl.constexpr, Y_IDENTITY: tl.constexpr):
    """fp32 tiles of h and y resampled at target tokens ``toks``, features ``ds`` (both passes of the pre-pass)."""
    v_h = interp.load_resampled(h_b, toks, stride_hn, ds * stride_hd, m, width_t, h_height, h_width,
                                h_scale_h, h_scale_w, H_IDENTITY)
    v_y = interp.load_resampled(y_b, toks, stride_yn, ds * stride_yd, m, width_t, y_height, y_width,
                                y_scale_h, y_scale_w, Y_IDENTITY)
    return v_h, v_y


@triton.jit
def _prepass_kernel(h_ptr, y_ptr, z_ptr, stats_ptr, n_tokens, dim, width_t,
                    stride_hb, stride_hn, stride_hd, stride_yb, stride_yn, stride_yd, stride_zb, stride_zn,
                    h_height, h_width, h_scale_h, h_scale_w, y_height, y_width, y_scale_h, y_scale_w,
                    H_IDENTITY: tl.constexpr, Y_IDENTITY: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Z[b, t] = [ĥ_t | ŷ_t] on the target grid; stats[b] = (1/max(‖h_t‖, eps), 1/max(‖y_t‖, eps), ĥ_t·ŷ_t).

    grid (token blocks, B). Pass 1 gathers the norms and the dot, pass 2 re-reads (from L2) and writes.
    """
    b = tl.program_id(1)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = toks < n_tokens
    h_b = h_ptr + b.to(tl.int64) * stride_hb
    y_b = y_ptr + b.to(tl.int64) * stride_yb
    z_b = z_ptr + b.to(tl.int64) * stride_zb
    sq_h = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sq_y = tl.zeros((BLOCK_T,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = m_t[:, None] & (ds < dim)[None, :]
        v_h, v_y = _resampled_pair(h_b, y_b, toks, ds, m, width_t, stride_hn, stride_hd, h_height, h_width,
                                   h_scale_h, h_scale_w, stride_yn, stride_yd, y_height, y_width, y_scale_h,
                                   y_scale_w, H_IDENTITY, Y_IDENTITY)
        sq_h += tl.sum(v_h * v_h, axis=1)
        sq_y += tl.sum(v_y * v_y, axis=1)
        dot += tl.sum(v_h * v_y, axis=1)
    rnorm_h = 1.0 / tl.maximum(tl.sqrt(sq_h), 1e-12)
    rnorm_y = 1.0 / tl.maximum(tl.sqrt(sq_y), 1e-12)
    stats_b = stats_ptr + b.to(tl.int64) * 3 * n_tokens
    tl.store(stats_b + toks, rnorm_h, mask=m_t)
    tl.store(stats_b + n_tokens + toks, rnorm_y, mask=m_t)
    tl.store(stats_b + 2 * n_tokens + toks, dot * rnorm_h * rnorm_y, mask=m_t)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = m_t[:, None] & (ds < dim)[None, :]
        v_h, v_y = _resampled_pair(h_b, y_b, toks, ds, m, width_t, stride_hn, stride_hd, h_height, h_width,
                                   h_scale_h, h_scale_w, stride_yn, stride_yd, y_height, y_width, y_scale_h,
                                   y_scale_w, H_IDENTITY, Y_IDENTITY)
        p_z = z_b + toks[:, None] * stride_zn + ds[None, :]
        tl.store(p_z, (v_h * rnorm_h[:, None]).to(z_ptr.dtype.element_ty), mask=m)
        tl.store(p_z + dim, (v_y * rnorm_y[:, None]).to(z_ptr.dtype.element_ty), mask=m)


@triton.jit
def _adjoint_kernel(g_ptr, out_ptr, start_r_ptr, start_c_ptr, n_src, dim, height_t, width_t, height_s,
                    width_s, scale_h, scale_w, k_rows, k_cols, stride_gb, stride_gn, stride_ob, stride_on,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, s] = Σ_t w(t, s)·g[b, t]: the transposed bilinear resampling as a gather (deterministic).

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
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + src[:, None] * stride_on + ds[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m_s[:, None] & m_d[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass
class _Config:
    """Tile shapes: the H100 measurements of notes/manifold.md for 2-byte operands; 4-byte (fp32)
    operands halve the K steps to fit shared memory. Under the interpreter the tiles are 16 (the
    smallest tl.dot) so that tiny test shapes cross tile edges, the D-wide loops 32 (its cost is per
    operation), and the workspace a few KB so that the backward runs in several rounds."""

    fwd_block: int = 128
    fwd_block_k: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    panel_block_m: int = 128
    panel_block_n: int = 128
    panel_block_k: int = 64
    panel_warps: int = 8
    panel_stages: int = 3
    prod_block_k: int = 64
    prod_block_d: int = 256
    prod_warps: int = 8
    prod_stages: int = 3
    vec_block_t: int = 4
    vec_block_d: int = 512
    vec_warps: int = 4
    # Backward workspace: row panels of S_h − S_y, processed in rounds that fit this many bytes. 64 MiB
    # (one round for SDXL) saved two launches but put the SDXL peak over 1.5× (h + y + grad h).
    workspace_bytes: int = 32 * 2**20

    @classmethod
    def current(cls, element_size: int = 2) -> "_Config":
        if triton_interpreter():
            return cls(16, 32, 1, 1, 16, 16, 32, 1, 1, 16, 16, 1, 1, 16, 32, 1, 8 * 2**10)
        if element_size > 2:
            return dataclasses.replace(CONFIG, fwd_block_k=CONFIG.fwd_block_k // 2,
                                       panel_block_k=CONFIG.panel_block_k // 2,
                                       prod_block_k=CONFIG.prod_block_k // 2)
        return CONFIG


CONFIG = _Config()


@dataclass
class _Prepared:
    """The pre-pass output: z (B, N, 2D) = [Ĥ | Ŷ] in the compute dtype; stats (B, 3, N) fp32 =
    (1/‖h‖, 1/‖y‖, ĥ·ŷ) on the target grid."""

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


def _compute_dtype(h: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    return torch.promote_types(h.dtype, y.dtype)


def _prepare(h, y, h_grid, y_grid, target_grid) -> _Prepared:
    batch, _, dim = h.shape
    n_tokens = target_grid[0] * target_grid[1]
    z = torch.empty(batch, n_tokens, 2 * dim, dtype=_compute_dtype(h, y), device=h.device)
    stats = torch.empty(batch, 3, n_tokens, dtype=torch.float32, device=h.device)
    cfg = _Config.current()
    grid = (triton.cdiv(n_tokens, cfg.vec_block_t), batch)
    _prepass_kernel[grid](
        h, y, z, stats, n_tokens, dim, target_grid[1], *h.stride(), *y.stride(), z.stride(0), z.stride(1),
        h_grid[0], h_grid[1], interp.axis_scale(h_grid[0], target_grid[0]),
        interp.axis_scale(h_grid[1], target_grid[1]),
        y_grid[0], y_grid[1], interp.axis_scale(y_grid[0], target_grid[0]),
        interp.axis_scale(y_grid[1], target_grid[1]),
        H_IDENTITY=tuple(h_grid) == tuple(target_grid), Y_IDENTITY=tuple(y_grid) == tuple(target_grid),
        BLOCK_T=cfg.vec_block_t, BLOCK_D=cfg.vec_block_d, num_warps=cfg.vec_warps)
    return _Prepared(z, stats)


def _tiled_loss(prep: _Prepared, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) manifold loss by the tiled kernel, into ``out`` when given."""
    batch, n_tokens, dim = prep.shape
    cfg = _Config.current(prep.z.element_size())
    tiles = triton.cdiv(n_tokens, cfg.fwd_block)
    pairs = tiles * (tiles + 1) // 2
    # (B, pairs) with pairs ≈ N²/(2·BLOCK²): a few KB, summed in a fixed order (deterministic).
    partial = torch.empty(batch, pairs, dtype=torch.float32, device=prep.z.device)
    _tiled_forward_kernel[(pairs, batch)](
        prep.z, partial, n_tokens, dim, pairs, 1.0 / n_tokens**2, prep.z.stride(0), prep.z.stride(1),
        BLOCK=cfg.fwd_block, BLOCK_K=cfg.fwd_block_k, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        **prep.dot_args())
    return torch.sum(partial, 1, out=out)


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (fp32 accumulation; cuBLAS writes 16-bit inputs straight to fp32)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _gram_loss(prep: _Prepared) -> Optional[torch.Tensor]:
    """The loss from ZᵀZ = [[ĤᵀĤ, ĤᵀŶ], [ŶᵀĤ, ŶᵀŶ]] (fp32), or None when it cancels too much."""
    batch, n_tokens, dim = prep.shape
    gram = _bmm_f32(prep.z.mT, prep.z)

    def frob2(block):
        return torch.linalg.vector_norm(block, dim=(1, 2)).double().square()

    same = frob2(gram[:, :dim, :dim]) + frob2(gram[:, dim:, dim:])
    total = same - 2.0 * frob2(gram[:, :dim, dim:])
    if bool((same > GRAM_MAX_CANCELLATION * total).any()):
        return None
    return (total / n_tokens**2).float()


def manifold_values(prep: _Prepared, out: torch.Tensor) -> torch.Tensor:
    """``out`` (B,) = the per-image manifold loss from the pre-pass, by the algorithm of the cost model."""
    _, n_tokens, dim = prep.shape
    if choose_algorithm(n_tokens, dim) == "gram":
        loss = _gram_loss(prep)
        if loss is not None:
            return out.copy_(loss)
    return _tiled_loss(prep, out)


def _grad_args(grad: torch.Tensor, n_tokens: int) -> dict:
    """Kernel arguments for the op's upstream gradient (T, B) fp32: the manifold row is the last, the
    cosine row (urepa) the first; the kernels read both per image, so no coefficient tensor is built."""
    return {"grad_ptr": grad, "man_off": (grad.shape[0] - 1) * grad.shape[1],
            "man_scale": 4.0 / n_tokens**2, "cos_scale": 1.0 / n_tokens, "HAS_COS": grad.shape[0] == 2}


def _tiled_backward(prep: _Prepared, grad, out_h, out_y) -> None:
    """Row panels of S_h − S_y (BLOCK_M × N each) for as many (image, row block) items as the workspace
    holds, then their products with Ĥ (and Ŷ); repeated until every row is done."""
    batch, n_tokens, dim = prep.shape
    z = prep.z
    cfg = _Config.current(z.element_size())
    block_m = cfg.panel_block_m
    row_tiles = triton.cdiv(n_tokens, block_m)
    col_tiles = triton.cdiv(n_tokens, cfg.panel_block_n)
    width = col_tiles * cfg.panel_block_n
    items = batch * row_tiles
    rounds = triton.cdiv(items, max(1, cfg.workspace_bytes // (block_m * width * z.element_size())))
    group = triton.cdiv(items, rounds)
    panel = torch.empty(group, block_m, width, dtype=z.dtype, device=z.device)
    radial = torch.empty(group, 2, col_tiles, block_m, dtype=torch.float32, device=z.device)
    dot_args = prep.dot_args()
    grad_args = _grad_args(grad, n_tokens)
    for item0 in range(0, items, group):
        count = min(group, items - item0)
        _panel_kernel[(col_tiles, count)](
            z, panel, radial, n_tokens, dim, row_tiles, item0, z.stride(0), z.stride(1),
            BLOCK_M=block_m, BLOCK_N=cfg.panel_block_n, BLOCK_K=cfg.panel_block_k,
            num_warps=cfg.panel_warps, num_stages=cfg.panel_stages, **dot_args)
        for out, own, sign in ((out_h, 0, 1.0), (out_y, 1, -1.0)):
            if out is None:
                continue
            _panel_product_kernel[(triton.cdiv(dim, cfg.prod_block_d), count)](
                panel, radial, z, prep.stats, out_ptr=out, n_tokens=n_tokens, dim=dim, row_tiles=row_tiles,
                col_tiles=col_tiles, width=width, item0=item0, own=own, sign=sign, stride_zb=z.stride(0),
                stride_zn=z.stride(1), stride_ob=out.stride(0), stride_on=out.stride(1), BLOCK_M=block_m,
                BLOCK_K=cfg.prod_block_k, BLOCK_D=cfg.prod_block_d, num_warps=cfg.prod_warps,
                num_stages=cfg.prod_stages, **grad_args, **dot_args)


def _gram_backward(prep: _Prepared, grad, out_h, out_y) -> None:
    """G_x = ±(S_h − S_y)X̂ = ±Z·[ĤᵀX̂; −ŶᵀX̂], the D×D products in fp32 and multiplied back as a bf16
    hi + lo pair (one bf16 rounding of them would be amplified by the cancellation)."""
    batch, n_tokens, dim = prep.shape
    cfg = _Config.current()
    z = prep.z
    for out, own, sign in ((out_h, 0, 1.0), (out_y, 1, -1.0)):
        if out is None:
            continue
        products = _bmm_f32(z.mT, z[:, :, own * dim:(own + 1) * dim])
        products[:, dim:].neg_()
        if z.dtype == torch.float32:
            g, g_lo = torch.bmm(z, products), None
        else:
            hi = products.to(z.dtype)
            g = _bmm_f32(z, hi)
            g_lo = torch.bmm(z, products.sub_(hi).to(z.dtype))
            del hi
        del products
        _unit_backward_kernel[(triton.cdiv(n_tokens, cfg.vec_block_t), batch)](
            g, g_lo if g_lo is not None else g, z, prep.stats, out_ptr=out, n_tokens=n_tokens, dim=dim,
            own=own, sign=sign, stride_zb=z.stride(0), stride_zn=z.stride(1), stride_ob=out.stride(0),
            stride_on=out.stride(1), HAS_LO=g_lo is not None, BLOCK_T=cfg.vec_block_t,
            BLOCK_D=cfg.vec_block_d, num_warps=cfg.vec_warps, **_grad_args(grad, n_tokens))


def _adjoint(grad_t: torch.Tensor, like: torch.Tensor, grid, target_grid) -> torch.Tensor:
    """The transposed resampling of a target-grid gradient back to ``like``'s grid (a gather)."""
    batch, n_src, dim = like.shape
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    start_r, k_rows = interp.adjoint_start_table(grid[0], target_grid[0], like.device)
    start_c, k_cols = interp.adjoint_start_table(grid[1], target_grid[1], like.device)
    cfg = _Config.current()
    _adjoint_kernel[(triton.cdiv(n_src, cfg.vec_block_t), batch)](
        grad_t, out, start_r, start_c, n_src, dim, target_grid[0], target_grid[1], grid[0], grid[1],
        interp.axis_scale(grid[0], target_grid[0]), interp.axis_scale(grid[1], target_grid[1]),
        k_rows, k_cols, grad_t.stride(0), grad_t.stride(1), out.stride(0), out.stride(1),
        BLOCK_S=cfg.vec_block_t, BLOCK_D=cfg.vec_block_d, num_warps=cfg.vec_warps)
    return out


def _target_buffer(x: torch.Tensor, grid, target_grid) -> torch.Tensor:
    """Where the kernels write x's gradient: x's own gradient when no resampling follows."""
    if tuple(grid) == tuple(target_grid):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty(x.shape[0], target_grid[0] * target_grid[1], x.shape[2], dtype=x.dtype,
                       device=x.device)


def _backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y):
    """grad: the op's (T, B) upstream gradient (urepa: cosine row, then manifold row)."""
    prep = _prepare(h, y, h_grid, y_grid, target_grid)
    _, n_tokens, dim = prep.shape
    grad = grad.float().contiguous()
    out_h = _target_buffer(h, h_grid, target_grid) if needs_h else None
    out_y = _target_buffer(y, y_grid, target_grid) if needs_y else None
    if choose_algorithm(n_tokens, dim, backward=True) == "gram":
        _gram_backward(prep, grad, out_h, out_y)
    else:
        _tiled_backward(prep, grad, out_h, out_y)
    del prep  # Z and the scratch go before the resampled gradients are allocated (peak memory)
    if needs_h and tuple(h_grid) != tuple(target_grid):
        out_h = _adjoint(out_h, h, h_grid, target_grid)
    if needs_y and tuple(y_grid) != tuple(target_grid):
        out_y = _adjoint(out_y, y, y_grid, target_grid)
    return out_h, out_y


# --------------------------------------------------------------------------------------------------
# The op implementations (ops._triton_implementations). float64 has no tensor-core dot: it is refused
# here, as by the cosine kernel; backend="auto" sends float64 to the reference.


def _check_dtypes(h, y) -> None:
    for name, x in (("h", h), ("y", y)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"the triton backend takes {name} as float32, bfloat16 or float16, got {x.dtype}; "
                            f"use backend='reference' for float64")


def manifold_forward(h, y, h_grid, y_grid, target_grid) -> torch.Tensor:
    """(1, B) fp32: (1/N²) Σ_ij (ĥ_i·ĥ_j − ŷ_i·ŷ_j)² per image. h: (B, N_h, D), y: (B, N_y, D)."""
    _check_dtypes(h, y)
    out = torch.empty(1, h.shape[0], dtype=torch.float32, device=h.device)
    manifold_values(_prepare(h, y, h_grid, y_grid, target_grid), out[0])
    return out


def manifold_backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y):
    """(∂/∂h | None, ∂/∂y | None) of Σ_b grad[0, b]·L_man[b], in the inputs' dtypes and shapes."""
    return _backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y)


def urepa_forward(h, y, h_grid, y_grid, target_grid) -> torch.Tensor:
    """(2, B) fp32: row 0 −(1/N) Σ_n ĥ_n·ŷ_n, row 1 the manifold loss, from one pre-pass."""
    _check_dtypes(h, y)
    prep = _prepare(h, y, h_grid, y_grid, target_grid)
    out = torch.empty(2, h.shape[0], dtype=torch.float32, device=h.device)
    torch.sum(prep.stats[:, 2], 1, out=out[0]).mul_(-1.0 / prep.shape[1])
    manifold_values(prep, out[1])
    return out


def urepa_backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y):
    """(∂/∂h | None, ∂/∂y | None) of Σ_b grad[0, b]·L_cos[b] + grad[1, b]·L_man[b]."""
    return _backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y)

"""Fused REPA cosine alignment: bilinear token resampling + normalisation + cosine, forward and backward.

Math (docs/design.md). Per sample b and target token t of the (H_t, W_t) grid, h_t and y_t are the bilinear
resamples of h and y (see interp.py; the identity grid is a plain load), and with
n_h = ‖h_t‖, n_y = ‖y_t‖, r_h = 1/max(n_h, ε), r_y = 1/max(n_y, ε), c_t = (h_t·y_t)·r_h·r_y:

    loss_b = −(1/N) Σ_t c_t

Gradient. With g_b the upstream gradient of loss_b, ∂loss/∂ĥ_t = −(g_b/N)·ŷ_t, and through the normaliser
(∂/∂h_t = (G − (G·ĥ)ĥ)/max(n_h, ε), no projection when n_h ≤ ε, as F.normalize's backward):

    ∂/∂h_t = −(g_b/N)·(s0_t·y_t − s1_t·h_t),   s0 = r_h·r_y,   s1 = [n_h > ε]·c_t·r_h²
    ∂/∂y_t = −(g_b/N)·(s0_t·h_t − s2_t·y_t),   s2 = [n_y > ε]·c_t·r_y²

and ∂/∂h is the adjoint resampling of ∂/∂h_t (interp.py).

Data movement. The forward reads h and y once (the taps' re-reads hit L2) and writes only O(B·N) values:
the three per-token scalars (s0, s1, s2) and per-program partial sums of the loss, which the last program
of each sample adds up in a fixed order (one launch, deterministic); for reduction="mean" the last sample
then takes the batch mean the same way, and the backward reads the mean's gradient directly. Tokens whose
squares overflow fp32 (elements around 1e20) send their program through two more, rescaled passes (the norms
taken with each token's max-abs out first), so the loss is scale-invariant for any norm below fp32's largest
number (~3e38); their gradients are ~1/‖x‖ and exact while s0 = r_h·r_y and s1, s2 ~ r² stay in fp32's
normal range (norms below ~1e19; subnormal beyond). The backward reads those scalars instead of reducing
over D again, so it is one streaming pass: read h, y (and an extra term's gradient), write the gradient. The
scalars travel from forward to backward as the op's saved tensor (ops.define_loss_op).

Backward kernels. An input already on the target grid takes a flat kernel (one load of each operand per
output element). A resampled input takes the band kernel: each program owns a band of source rows and
sweeps down the target rows that read it, building each target row's gradient once and taking it back
with the separable adjoint (columns: a small matrix product; rows: the 2 row weights). Its row loop is
pipelined by Triton where rows are downsampled and by hand elsewhere (measured: docs/cosine.md). Every output
element is written by one program, once: deterministic, no atomics. Both walk samples (and bands) in the
reverse order of the forward, so they start on the data the forward read last (still in L2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._runtime import EPS, KERNEL_DTYPES, check_kernel_dtype, triton_interpreter

from .interp import (adjoint_blocks, axis_scale, axis_taps, band_store_bound, combine_row_taps, combine_taps,
                     device_table, load_resampled, load_row_taps, load_taps, tap_weight)

NORM_EPS = tl.constexpr(EPS)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)  # the smallest normal


@triton.jit
def _rescaled_sums(h_base, y_base, t, t_mask, dim, width_t, h_rows, h_cols, h_scale_r, h_scale_c, h_sn, h_sd,
                   y_rows, y_cols, y_scale_r, y_scale_c, y_sn, y_sd, H_IDENTITY: tl.constexpr,
                   Y_IDENTITY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """(m_h, m_y, Σ(h/m_h)², Σ(y/m_y)², Σ(h/m_h)(y/m_y)) per token, m the token's max-abs (at least fp32's
    smallest normal, the scale the sums are taken at): the forward's sums for tokens whose squares overflow
    fp32. Two passes over D."""
    m_h = tl.zeros((BLOCK_T,), tl.float32)
    m_y = tl.zeros((BLOCK_T,), tl.float32)
    inv_h = tl.zeros((BLOCK_T,), tl.float32)
    inv_y = tl.zeros((BLOCK_T,), tl.float32)
    sq_h = tl.zeros((BLOCK_T,), tl.float32)
    sq_y = tl.zeros((BLOCK_T,), tl.float32)
    dot = tl.zeros((BLOCK_T,), tl.float32)
    for pass_ in tl.static_range(2):  # 0: the max-abs; 1: the sums, scaled by it
        for d0 in range(0, dim, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            m = t_mask[:, None] & (offs < dim)[None, :]
            b_h = load_resampled(h_base, t, h_sn, offs * h_sd, m, width_t, h_rows, h_cols, h_scale_r, h_scale_c,
                                 H_IDENTITY)
            b_y = load_resampled(y_base, t, y_sn, offs * y_sd, m, width_t, y_rows, y_cols, y_scale_r, y_scale_c,
                                 Y_IDENTITY)
            if pass_ == 0:
                m_h = tl.maximum(m_h, tl.max(tl.abs(b_h), 1))
                m_y = tl.maximum(m_y, tl.max(tl.abs(b_y), 1))
            else:
                u_h = b_h * inv_h[:, None]
                u_y = b_y * inv_y[:, None]
                sq_h += tl.sum(u_h * u_h, 1)
                sq_y += tl.sum(u_y * u_y, 1)
                dot += tl.sum(u_h * u_y, 1)
        # A max-abs below fp32's smallest normal is taken as that normal: 1/m would overflow (0·inf is NaN).
        inv_h = 1.0 / tl.maximum(m_h, FLOAT32_TINY)
        inv_y = 1.0 / tl.maximum(m_y, FLOAT32_TINY)
    return tl.maximum(m_h, FLOAT32_TINY), tl.maximum(m_y, FLOAT32_TINY), sq_h, sq_y, dot


@triton.jit
def store_token_scalars(p_scal, plane, mask, m_h, m_y, sq_h, sq_y, dot):
    """From tokens' sums taken at scales m_h, m_y (Σ(h/m_h)², Σ(y/m_y)², Σ(h/m_h)(y/m_y)): stores the saved
    scalars s0, s1, s2 (the module notes) at p_scal + k·plane and returns (r_h, r_y, c). Shared with the
    U-REPA pre-pass (kernels/manifold.py), whose stats begin with these planes."""
    norm_h = m_h * tl.sqrt(sq_h)
    norm_y = m_y * tl.sqrt(sq_y)
    r_h = 1.0 / tl.maximum(norm_h, NORM_EPS)
    r_y = 1.0 / tl.maximum(norm_y, NORM_EPS)
    cos = dot * (m_h * r_h) * (m_y * r_y)
    tl.store(p_scal, r_h * r_y, mask=mask)
    tl.store(p_scal + plane, tl.where(norm_h > NORM_EPS, cos * r_h * r_h, 0.0), mask=mask)
    tl.store(p_scal + 2 * plane, tl.where(norm_y > NORM_EPS, cos * r_y * r_y, 0.0), mask=mask)
    return r_h, r_y, cos


@triton.jit
def cosine_fwd_kernel(
    h_ptr, y_ptr, out_ptr, mean_ptr, scal_ptr, count_ptr,
    n_tokens, dim, width_t, plane, batch,
    h_rows, h_cols, h_scale_r, h_scale_c, h_sb, h_sn, h_sd,
    y_rows, y_cols, y_scale_r, y_scale_c, y_sb, y_sn, y_sd,
    neg_inv_n,
    H_IDENTITY: tl.constexpr, Y_IDENTITY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, MEAN: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program: BLOCK_T target tokens of sample b, looping over D in BLOCK_D chunks. The last
    program of sample b to finish sums the sample's partial losses (plane 3 of the scalars) in a fixed
    order: deterministic, and the loss costs no second launch. With MEAN, the last sample to finish
    then takes the batch mean the same way (no reduction launch in the forward, nor in the backward)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < n_tokens
    h_base = h_ptr + b.to(tl.int64) * h_sb
    y_base = y_ptr + b.to(tl.int64) * y_sb
    b_hh = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    b_yy = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    b_hy = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    # Software pipelining by hand: the raw tap tiles of chunk d + 1 are loaded before chunk d is combined.
    # (Triton's pipeliner, tl.range(num_stages=3 or 4), measured 0.5–1.7 µs slower on Flux: docs/cosine.md.)
    offs = tl.arange(0, BLOCK_D)
    m = t_mask[:, None] & (offs < dim)[None, :]
    h00, h01, h10, h11 = load_taps(h_base, t, h_sn, offs * h_sd, m, width_t, h_rows, h_cols, h_scale_r, h_scale_c,
                                   H_IDENTITY)
    y00, y01, y10, y11 = load_taps(y_base, t, y_sn, offs * y_sd, m, width_t, y_rows, y_cols, y_scale_r, y_scale_c,
                                   Y_IDENTITY)
    for d0 in range(0, dim, BLOCK_D):
        b_h = combine_taps(h00, h01, h10, h11, t, width_t, h_rows, h_cols, h_scale_r, h_scale_c, H_IDENTITY)
        b_y = combine_taps(y00, y01, y10, y11, t, width_t, y_rows, y_cols, y_scale_r, y_scale_c, Y_IDENTITY)
        offs = d0 + BLOCK_D + tl.arange(0, BLOCK_D)
        m = t_mask[:, None] & (offs < dim)[None, :]
        h00, h01, h10, h11 = load_taps(h_base, t, h_sn, offs * h_sd, m, width_t, h_rows, h_cols, h_scale_r,
                                       h_scale_c, H_IDENTITY)
        y00, y01, y10, y11 = load_taps(y_base, t, y_sn, offs * y_sd, m, width_t, y_rows, y_cols, y_scale_r,
                                       y_scale_c, Y_IDENTITY)
        b_hh += b_h * b_h
        b_yy += b_y * b_y
        b_hy += b_h * b_y
    sq_h = tl.sum(b_hh, 1)
    sq_y = tl.sum(b_yy, 1)
    dot = tl.sum(b_hy, 1)
    # Tokens whose squares left fp32's range (inf, or NaN from inf − inf): the program takes them again with
    # each token's max-abs taken out (m_h, m_y; 1 otherwise). Rare, and two more reads when it happens.
    m_h = tl.full((BLOCK_T,), 1.0, tl.float32)
    m_y = tl.full((BLOCK_T,), 1.0, tl.float32)
    overflow = t_mask & ~((sq_h <= FLOAT32_MAX) & (sq_y <= FLOAT32_MAX) & (tl.abs(dot) <= FLOAT32_MAX))
    if tl.max(overflow.to(tl.int32), 0) > 0:
        m_h, m_y, sq_h, sq_y, dot = _rescaled_sums(
            h_base, y_base, t, t_mask, dim, width_t, h_rows, h_cols, h_scale_r, h_scale_c, h_sn, h_sd, y_rows,
            y_cols, y_scale_r, y_scale_c, y_sn, y_sd, H_IDENTITY, Y_IDENTITY, BLOCK_T, BLOCK_D)
    _, _, cos = store_token_scalars(scal_ptr + b * n_tokens + t, plane, t_mask, m_h, m_y, sq_h, sq_y, dot)
    programs = tl.num_programs(0)
    p_part = scal_ptr + 3 * plane + b * programs
    tl.store(p_part + pid, tl.sum(tl.where(t_mask, cos, 0.0), 0) * neg_inv_n)
    # Every thread's stores precede the (acq_rel, gpu-scope) ticket; the last ticket reads them all.
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr + b, 1)
    if ticket == programs - 1:
        tl.store(out_ptr + b, ordered_sum(p_part, programs, BLOCK_P))
        tl.atomic_xchg(count_ptr + b, 0)  # ready for the next launch
        if MEAN:
            tl.debug_barrier()  # this sample's loss is stored before its ticket
            finished = tl.atomic_add(count_ptr + batch, 1)
            if finished == batch - 1:
                tl.store(mean_ptr, ordered_sum(out_ptr, batch, BLOCK_B) / batch)
                tl.atomic_xchg(count_ptr + batch, 0)


@triton.jit
def ordered_sum(ptr, count, BLOCK: tl.constexpr):
    """Σ ptr[0:count] in a fixed order (deterministic), read past L1: other programs wrote the values."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for i0 in range(0, count, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(ptr + i, mask=i < count, other=0.0, cache_modifier=".cg")
    return tl.sum(acc, 0)


@triton.jit
def cosine_bwd_identity_kernel(
    x_ptr, z_ptr, out_ptr, scal_ptr, grad_ptr, extra_ptr, extra_grad_ptr,
    n_tokens, dim, width_t, own_offset, batch, d_blocks,
    x_sb, x_sn, x_sd,
    z_rows, z_cols, z_scale_r, z_scale_c, z_sb, z_sn, z_sd,
    neg_inv_n, grad_stride,
    Z_IDENTITY: tl.constexpr, EXTRA: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """x already on the target grid (no adjoint): one program, BLOCK_J tokens × BLOCK_D features.
    EXTRA: plus extra_grad[b]·extra[b] (another term's target-grid gradient, contiguous (B, N, D))."""
    pid = tl.program_id(0)
    jb = pid // d_blocks
    db = pid % d_blocks
    # Reverse order of the forward: the first samples here are the last ones the forward read.
    b = batch - 1 - tl.program_id(1)
    t = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    t_mask = t < n_tokens
    offs = db * BLOCK_D + tl.arange(0, BLOCK_D)
    m = t_mask[:, None] & (offs < dim)[None, :]
    x_base = x_ptr + b.to(tl.int64) * x_sb
    z_base = z_ptr + b.to(tl.int64) * z_sb
    s_base = scal_ptr + b * n_tokens
    coef = tl.load(grad_ptr + b * grad_stride) * neg_inv_n
    b_x = tl.load(x_base + t[:, None] * x_sn + (offs * x_sd)[None, :], mask=m, other=0.0).to(tl.float32)
    b_z = load_resampled(z_base, t, z_sn, offs * z_sd, m, width_t, z_rows, z_cols, z_scale_r, z_scale_c, Z_IDENTITY)
    s0 = tl.load(s_base + t, mask=t_mask, other=0.0)
    s_own = tl.load(s_base + own_offset + t, mask=t_mask, other=0.0)
    p_out = out_ptr + b.to(tl.int64) * n_tokens * dim + t[:, None] * dim + offs[None, :]
    g = coef * (s0[:, None] * b_z - s_own[:, None] * b_x)
    if EXTRA:
        extra = tl.load(extra_ptr + b.to(tl.int64) * n_tokens * dim + t[:, None] * dim + offs[None, :], mask=m,
                        other=0.0)
        g += tl.load(extra_grad_ptr + b) * extra.to(tl.float32)
    tl.store(p_out, g.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _store_and_shift(out_base, row, j, x_cols, dim, offs, mask, acc_a, acc_b):
    """Store the finished source row ``row`` (acc_a) and move on: (acc_b, zeros, row + 1)."""
    p_out = out_base + (row * x_cols + j)[:, None] * dim + offs[None, :]
    tl.store(p_out, acc_a.to(out_base.dtype.element_ty), mask=mask)
    return acc_b, tl.zeros_like(acc_b), row + 1


@triton.jit
def _add_target_row(g, r, cur, i1, w_cols, acc_a, acc_b, out_base, j, x_cols, dim, offs, m_j,
                    height_t, x_scale_r, x_rows, PRECISION: tl.constexpr, MAX_STORES: tl.constexpr):
    """Take target row r's gradient g back to the band: store the source rows it is past (at most
    MAX_STORES: interp.band_store_bound), then add W·g with the row weights to source rows cur and
    cur + 1. Returns (acc_a, acc_b, cur). Both loop forms use it. (A bounded, unrolled store step rather
    than a while loop, because Triton's pipeliner takes a loop body with branches, not one with an inner
    loop.)"""
    r0, _, _ = axis_taps(r, x_scale_r, x_rows)
    for _k in tl.static_range(MAX_STORES):  # rows above r0 get nothing more: store them
        if (cur < r0) & (cur < i1):
            acc_a, acc_b, cur = _store_and_shift(out_base, cur, j, x_cols, dim, offs, m_j, acc_a, acc_b)
    w_a = tl.where(cur < i1, tap_weight(cur, r, height_t, x_scale_r, x_rows), 0.0)
    w_b = tl.where(cur + 1 < i1, tap_weight(cur + 1, r, height_t, x_scale_r, x_rows), 0.0)
    u = tl.dot(w_cols, g, input_precision=PRECISION)
    return acc_a + w_a * u, acc_b + w_b * u, cur


@triton.jit
def _target_row_loads(x_base, z_base, s_base, e_base, r, r_hi, c, c_mask, d_mask, width_t, own_offset, dim, offs,
                      x_sn, offs_x, x_rows, x_cols, x_scale_r, x_c0, x_c1,
                      z_sn, offs_z, z_rows, z_cols, z_scale_r, z_c0, z_c1, Z_IDENTITY: tl.constexpr,
                      EXTRA: tl.constexpr):
    """Everything target row r's gradient reads, raw (combined later): x's 4 tap tiles, z's tap tiles,
    s0, s_own and (EXTRA) the extra term's row; nothing is read when r ≥ r_hi. (x_c0, x_c1), (z_c0, z_c1):
    the column taps."""
    t = r * width_t + c
    # (a [BLOCK_C] comparison, not a scalar one: the interpreter rejects scalar & tensor masks)
    c_in = c_mask & (c * 0 + r < r_hi)
    m = c_in[:, None] & d_mask[None, :]
    x00, x01, x10, x11 = load_row_taps(x_base, r, c, x_c0, x_c1, x_sn, offs_x, m, x_rows, x_cols, x_scale_r,
                                       False)
    z00, z01, z10, z11 = load_row_taps(z_base, r, c, z_c0, z_c1, z_sn, offs_z, m, z_rows, z_cols, z_scale_r,
                                       Z_IDENTITY)
    s0 = tl.load(s_base + t, mask=c_in, other=0.0)
    s_own = tl.load(s_base + own_offset + t, mask=c_in, other=0.0)
    if EXTRA:
        extra = tl.load(e_base + t[:, None] * dim + offs[None, :], mask=m, other=0.0)
    else:
        extra = s0
    return x00, x01, x10, x11, z00, z01, z10, z11, s0, s_own, extra


@triton.jit
def _target_row_gradient(x00, x01, x10, x11, z00, z01, z10, z11, s0, s_own, extra, r, x_lc, x_rows, x_scale_r,
                         z_lc, z_rows, z_scale_r, coef, extra_coef, Z_IDENTITY: tl.constexpr,
                         EXTRA: tl.constexpr):
    """Target row r's gradient from its loads: coef·(s0·ẑ − s_own·x̃) (+ extra_coef·extra)."""
    b_x = combine_row_taps(x00, x01, x10, x11, r, x_lc, x_rows, x_scale_r, False)
    b_z = combine_row_taps(z00, z01, z10, z11, r, z_lc, z_rows, z_scale_r, Z_IDENTITY)
    g = coef * (s0[:, None] * b_z - s_own[:, None] * b_x)
    if EXTRA:
        g += extra_coef * extra.to(tl.float32)
    return g


@triton.jit
def cosine_bwd_band_kernel(
    x_ptr, z_ptr, out_ptr, scal_ptr, grad_ptr, table_ptr, extra_ptr, extra_grad_ptr,
    n_tokens, dim, height_t, width_t, own_offset, batch, d_blocks, col_tiles,
    x_rows, x_cols, x_scale_r, x_scale_c, x_sb, x_sn, x_sd,
    z_rows, z_cols, z_scale_r, z_scale_c, z_sb, z_sn, z_sd,
    neg_inv_n, grad_stride,
    Z_IDENTITY: tl.constexpr, EXTRA: tl.constexpr, BAND_ROWS: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
    MAX_STORES: tl.constexpr,
):
    """One program: a band of BAND_ROWS source rows of x, BLOCK_J source columns, BLOCK_D features.
    It sweeps down the target rows that read the band, building each target row's gradient once
    (BLOCK_C target columns), takes it to the source columns with the column adjoint and adds it, with
    the row weights, to the one or two source rows it reads. Target rows only move forward in source
    rows (r0 is non-decreasing), so a source row is complete, and stored, as soon as a target row
    starts past it.

    The column adjoint is a small matrix product U = W·G with W[j, c] the weight with which target
    column c reads source column j (the same for every row, built once): the tensor cores do it, at
    PRECISION (tf32 where the gradient is stored in 16 bits, tf32x3 ≈ fp32 otherwise).

    EXTRA: each target row's gradient gets extra_grad[b]·extra[b, row] too (another term's target-grid
    gradient, contiguous (B, N, D)), so that term shares this adjoint.

    table: int32 [first target column of each column tile (col_tiles) | per band, the [lo, hi) run of
    target rows that read it]."""
    pid = tl.program_id(0)
    jt = pid // d_blocks
    db = pid % d_blocks
    # Reverse order of the forward: the first rows here are the last ones the forward read.
    band = tl.num_programs(1) - 1 - tl.program_id(1)
    b = batch - 1 - tl.program_id(2)
    i0 = band * BAND_ROWS
    i1 = tl.minimum(i0 + BAND_ROWS, x_rows)
    r_lo = tl.load(table_ptr + col_tiles + 2 * band)
    r_hi = tl.load(table_ptr + col_tiles + 2 * band + 1)
    c_lo = tl.load(table_ptr + jt)
    c = c_lo + tl.arange(0, BLOCK_C)
    c_mask = c < width_t
    j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < x_cols
    offs = db * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs < dim
    m_j = j_mask[:, None] & d_mask[None, :]
    w_cols = tl.where(j_mask[:, None], tap_weight(j[:, None], c[None, :], width_t, x_scale_c, x_cols), 0.0)
    x_base = x_ptr + b.to(tl.int64) * x_sb
    z_base = z_ptr + b.to(tl.int64) * z_sb
    out_base = out_ptr + b.to(tl.int64) * x_rows * x_cols * dim
    s_base = scal_ptr + b * n_tokens
    coef = tl.load(grad_ptr + b * grad_stride) * neg_inv_n
    extra_coef = 0.0
    if EXTRA:
        extra_coef = tl.load(extra_grad_ptr + b)
    e_base = extra_ptr + b.to(tl.int64) * n_tokens * dim
    acc_a = tl.zeros((BLOCK_J, BLOCK_D), tl.float32)  # source row `cur`
    acc_b = tl.zeros((BLOCK_J, BLOCK_D), tl.float32)  # source row `cur + 1`
    cur = i0
    offs_x = offs * x_sd
    offs_z = offs * z_sd
    # The target columns are the same on every row: their taps are computed once, here (per row, a
    # division and the column arithmetic were a fifth of the loop's instructions: sm_90 SASS).
    x_c0, x_c1, x_lc = axis_taps(c, x_scale_c, x_cols)
    z_c0, z_c1, z_lc = axis_taps(c, z_scale_c, z_cols)
    if STAGES > 1:  # Triton's pipeliner: each row's loads go through shared memory, STAGES - 1 rows ahead
        for k_r in tl.range(0, r_hi - r_lo, num_stages=STAGES):
            r = r_lo + k_r
            x00, x01, x10, x11, z00, z01, z10, z11, s0, s_own, extra = _target_row_loads(
                x_base, z_base, s_base, e_base, r, r_hi, c, c_mask, d_mask, width_t, own_offset, dim, offs, x_sn,
                offs_x, x_rows, x_cols, x_scale_r, x_c0, x_c1, z_sn, offs_z, z_rows, z_cols, z_scale_r, z_c0, z_c1,
                Z_IDENTITY, EXTRA)
            g = _target_row_gradient(x00, x01, x10, x11, z00, z01, z10, z11, s0, s_own, extra, r, x_lc, x_rows,
                                     x_scale_r, z_lc, z_rows, z_scale_r, coef, extra_coef, Z_IDENTITY, EXTRA)
            acc_a, acc_b, cur = _add_target_row(g, r, cur, i1, w_cols, acc_a, acc_b, out_base, j, x_cols, dim, offs,
                                                m_j, height_t, x_scale_r, x_rows, PRECISION, MAX_STORES)
    else:
        # Software pipelining by hand: the loads of target row r + 1 are issued before row r's arithmetic.
        x00, x01, x10, x11, z00, z01, z10, z11, s0, s_own, extra = _target_row_loads(
            x_base, z_base, s_base, e_base, r_lo, r_hi, c, c_mask, d_mask, width_t, own_offset, dim, offs, x_sn,
            offs_x, x_rows, x_cols, x_scale_r, x_c0, x_c1, z_sn, offs_z, z_rows, z_cols, z_scale_r, z_c0, z_c1,
            Z_IDENTITY, EXTRA)
        for k_r in range(r_hi - r_lo):
            r = r_lo + k_r
            g = _target_row_gradient(x00, x01, x10, x11, z00, z01, z10, z11, s0, s_own, extra, r, x_lc, x_rows,
                                     x_scale_r, z_lc, z_rows, z_scale_r, coef, extra_coef, Z_IDENTITY, EXTRA)
            x00, x01, x10, x11, z00, z01, z10, z11, s0, s_own, extra = _target_row_loads(
                x_base, z_base, s_base, e_base, r + 1, r_hi, c, c_mask, d_mask, width_t, own_offset, dim, offs,
                x_sn, offs_x, x_rows, x_cols, x_scale_r, x_c0, x_c1, z_sn, offs_z, z_rows, z_cols, z_scale_r, z_c0,
                z_c1, Z_IDENTITY, EXTRA)
            acc_a, acc_b, cur = _add_target_row(g, r, cur, i1, w_cols, acc_a, acc_b, out_base, j, x_cols, dim, offs,
                                                m_j, height_t, x_scale_r, x_rows, PRECISION, MAX_STORES)
    while cur < i1:
        acc_a, acc_b, cur = _store_and_shift(out_base, cur, j, x_cols, dim, offs, m_j, acc_a, acc_b)


# --------------------------------------------------------------------------------------------------
# Host side. Everything that depends only on shapes is computed once per shape (the eager per-call
# overhead is measurable on small inputs: see docs/cosine.md).

# Under the interpreter a program costs far more than its size: larger tiles, fewer programs.
_TILE = 8192 if triton_interpreter() else 2048


def _forward_blocks(dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): 1024-element tiles (126 registers, 4 programs per multiprocessor),
    D chunks of up to 128 (measured: docs/cosine.md)."""
    block_d = min(triton.next_power_of_2(dim), 128)
    return max(_TILE // 2 // block_d, 1), block_d, 4


def _identity_blocks(dim: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_D, num_warps) of the identity backward: 2048-element tiles, D chunks of up to 256
    (measured: docs/cosine.md)."""
    block_d = min(triton.next_power_of_2(dim), 256)
    return max(_TILE // block_d, 1), block_d, 4


@dataclass(frozen=True)
class CosineTiles:
    """Tile configs of the three cosine kernels, for tuning (bench/tune/cosine.py): a field left None takes
    the default choice for the shape (``_forward_blocks``, ``_identity_blocks``, ``_band_blocks``). The band
    plan still lowers BLOCK_D and STAGES of a given config where the tiles would not fit (upsampled columns,
    the shared-memory budget), as it does the defaults'."""

    forward: tuple[int, int, int] | None = None              # (BLOCK_T, BLOCK_D, num_warps)
    identity: tuple[int, int, int] | None = None             # (BLOCK_J, BLOCK_D, num_warps)
    band: tuple[int, int, int, int, int] | None = None       # (BAND_ROWS, BLOCK_J, BLOCK_D, num_warps, STAGES)


def _axis(grid, target) -> tuple[int, int, float, float, bool]:
    """(rows, cols, row scale, col scale, identity) of an input grid resampled to ``target``."""
    return (grid[0], grid[1], axis_scale(grid[0], target[0]), axis_scale(grid[1], target[1]),
            tuple(grid) == tuple(target))


@functools.lru_cache(maxsize=512)
def _forward_plan(batch: int, dim: int, h_grid, y_grid, target_grid, mean: bool, tiles: CosineTiles | None = None):
    """(launch grid, scalars shape, runtime args after the pointers, constexprs). The scalars tensor
    has 4 planes of B·N: s0, s1, s2, then the programs' partial losses."""
    n_tokens = target_grid[0] * target_grid[1]
    block_t, block_d, warps = tiles.forward if tiles and tiles.forward else _forward_blocks(dim)
    programs = triton.cdiv(n_tokens, block_t)
    hr, hc, hsr, hsc, h_id = _axis(h_grid, target_grid)
    yr, yc, ysr, ysc, y_id = _axis(y_grid, target_grid)
    args = dict(n_tokens=n_tokens, dim=dim, width_t=target_grid[1], plane=batch * n_tokens, batch=batch,
                h_rows=hr, h_cols=hc, h_scale_r=hsr, h_scale_c=hsc, y_rows=yr, y_cols=yc, y_scale_r=ysr,
                y_scale_c=ysc, neg_inv_n=-1.0 / n_tokens)
    meta = dict(H_IDENTITY=h_id, Y_IDENTITY=y_id, BLOCK_T=block_t, BLOCK_D=block_d,
                BLOCK_P=min(triton.next_power_of_2(programs), 1024),
                MEAN=mean, BLOCK_B=min(triton.next_power_of_2(batch), 1024), num_warps=warps)
    return (programs, batch), (4, batch, n_tokens), args, meta


@functools.lru_cache(maxsize=512)
def _identity_plan(batch: int, dim: int, z_grid, target_grid, own_row: int, tiles: CosineTiles | None = None):
    """(launch grid, runtime args after the pointers, constexprs) of the identity backward."""
    n_tokens = target_grid[0] * target_grid[1]
    zr, zc, zsr, zsc, z_id = _axis(z_grid, target_grid)
    block_j, block_d, warps = tiles.identity if tiles and tiles.identity else _identity_blocks(dim)
    d_blocks = triton.cdiv(dim, block_d)
    args = dict(n_tokens=n_tokens, dim=dim, width_t=target_grid[1], own_offset=own_row * batch * n_tokens,
                batch=batch, d_blocks=d_blocks, z_rows=zr, z_cols=zc, z_scale_r=zsr, z_scale_c=zsc,
                neg_inv_n=-1.0 / n_tokens)
    meta = dict(Z_IDENTITY=z_id, BLOCK_J=block_j, BLOCK_D=block_d, num_warps=warps)
    return (triton.cdiv(n_tokens, block_j) * d_blocks, batch), args, meta


def _band_blocks(dim: int, rows_down: bool) -> tuple[int, int, int, int, int]:
    """(BAND_ROWS, BLOCK_J, BLOCK_D, num_warps, STAGES) of the band backward: 16 source columns per tile
    (the smallest a matrix product takes). Where the rows are downsampled, Triton's pipeliner with 3
    stages and 128 features (Flux 51.1 → 47.7 µs, 64² → 32² 32.3 → 30.5 µs); otherwise the hand-pipelined
    loop (STAGES 1) and 64 features, faster there (32² → 37²: 14.2 µs against 17.2). H100 sweep:
    bench/results/h100_stages_sweep.log. The plan lowers BLOCK_D where many target columns read a tile
    (upsampling), so the tiles stay in registers."""
    if rows_down:
        return 8, 16, max(min(triton.next_power_of_2(dim), 128), 16), 4, 3
    return 8, 16, max(min(triton.next_power_of_2(dim), 64), 16), 4, 1


# Shared memory the pipelined band loop may take per program (its stages of raw tap tiles): 3 programs
# fit a multiprocessor.
_STAGE_BUDGET = 64 * 1024


@functools.lru_cache(maxsize=512)
def _band_plan(batch: int, dim: int, x_grid, z_grid, target_grid, own_row: int, dtype: torch.dtype,
               z_dtype: torch.dtype, tiles: CosineTiles | None = None, extra_size: int = 0):
    """(launch grid, table (list of int32), runtime args after the pointers, constexprs) of the band backward
    (x: the input whose gradient it writes, z: the other; extra_size: the element size of an EXTRA term's
    rows, 0 without one)."""
    n_tokens = target_grid[0] * target_grid[1]
    xr, xc, xsr, xsc, _ = _axis(x_grid, target_grid)
    zr, zc, zsr, zsc, z_id = _axis(z_grid, target_grid)
    band = tiles.band if tiles and tiles.band else _band_blocks(dim, xr > target_grid[0])
    band_rows, block_j, block_d, warps, stages = band
    col_ranges = adjoint_blocks(xc, target_grid[1], block_j)
    row_ranges = adjoint_blocks(xr, target_grid[0], band_rows)
    block_c = max(triton.next_power_of_2(max(hi - lo for lo, hi in col_ranges)), 16)
    if block_c > 32:  # upsampled columns: keep the target-row tile [BLOCK_C, BLOCK_D] in registers
        block_d, warps = min(block_d, max(2048 // block_c, 16)), 8
    # The pipelined loop keeps STAGES rows of raw tiles (4 taps of x, 1 or 4 of z, the EXTRA row) in shared
    # memory: where they would not fit the budget, fewer features (down to the hand loop's 64), then the
    # hand loop.
    row_bytes = (4 * dtype.itemsize + (1 if z_id else 4) * z_dtype.itemsize + extra_size) * block_c
    while stages > 1 and stages * row_bytes * block_d > _STAGE_BUDGET:
        if block_d > 64:
            block_d //= 2
        else:
            stages = 1
    table = [lo for lo, _ in col_ranges] + [v for rng in row_ranges for v in rng]
    d_blocks = triton.cdiv(dim, block_d)
    args = dict(n_tokens=n_tokens, dim=dim, height_t=target_grid[0], width_t=target_grid[1],
                own_offset=own_row * batch * n_tokens, batch=batch, d_blocks=d_blocks, col_tiles=len(col_ranges),
                x_rows=xr, x_cols=xc, x_scale_r=xsr, x_scale_c=xsc, z_rows=zr, z_cols=zc, z_scale_r=zsr,
                z_scale_c=zsc, neg_inv_n=-1.0 / n_tokens)
    meta = dict(Z_IDENTITY=z_id, BAND_ROWS=band_rows, BLOCK_J=block_j, BLOCK_C=block_c, BLOCK_D=block_d,
                PRECISION="tf32" if dtype.itemsize == 2 else "tf32x3", STAGES=stages,
                MAX_STORES=band_store_bound(xr, target_grid[0], band_rows), num_warps=warps)
    return (len(col_ranges) * d_blocks, len(row_ranges), batch), tuple(table), args, meta


# Per-sample ticket counters of the forward's last-program reduction, one buffer per (device, stream);
# every launch leaves them at 0. Launches on one stream run one after the other, so they can share a
# buffer; launches on two streams of one device may overlap, so each stream has its own.
_COUNTERS: dict = {}


def _counters(device: torch.device, batch: int) -> torch.Tensor:
    """B per-sample counters, then the batch's, for the current stream of ``device``."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    counters = _COUNTERS.get((device, stream))
    if counters is None or counters.numel() < batch + 1:
        counters = torch.zeros(max(batch + 1, 256), dtype=torch.int32, device=device)
        _COUNTERS[(device, stream)] = counters
    return counters


def _strides(prefix: str, x: torch.Tensor) -> dict:
    """The (B, N, D) strides of ``x`` as the kernels' ``<prefix>_sb``, ``_sn``, ``_sd`` arguments."""
    return dict(zip((f"{prefix}_sb", f"{prefix}_sn", f"{prefix}_sd"), x.stride()))


def _grad_scale(args: dict, batch: int, mean: bool) -> dict:
    """The plan's arguments with the backward's gradient scale: per sample b the kernels scale by
    grad[b·grad_stride]·neg_inv_n; the mean's gradient reaches every sample alike (stride 0), with its 1/B."""
    if mean:
        return {**args, "neg_inv_n": args["neg_inv_n"] / batch, "grad_stride": 0}
    return {**args, "grad_stride": 1}


def _launch_forward(h, y, h_grid, y_grid, target_grid, mean, tiles=None):
    """Run the forward kernel: (losses (1, B) fp32, or their mean (1, 1) with ``mean``; per-token scalars
    (3, B, N) fp32). The scalars are the first 3 planes of a 4-plane buffer whose last plane is the
    programs' scratch (partly unwritten: it is not handed on, so every element of the op's outputs is
    defined)."""
    if h.dtype not in KERNEL_DTYPES or y.dtype not in KERNEL_DTYPES:
        check_kernel_dtype("h", h)
        check_kernel_dtype("y", y)
    batch = h.shape[0]
    grid, scal_shape, args, meta = _forward_plan(batch, h.shape[2], h_grid, y_grid, target_grid, mean, tiles)
    scal = torch.empty(scal_shape, device=h.device, dtype=torch.float32)
    out = torch.empty((1, batch), device=h.device, dtype=torch.float32)
    batch_mean = torch.empty((1, 1), device=h.device, dtype=torch.float32) if mean else out
    cosine_fwd_kernel[grid](h_ptr=h, y_ptr=y, out_ptr=out, mean_ptr=batch_mean, scal_ptr=scal,
                            count_ptr=_counters(h.device, batch), **args, **_strides("h", h), **_strides("y", y),
                            **meta)
    return batch_mean, scal[:3]


def saved_shape(h, y, h_grid, y_grid, target_grid) -> tuple[int, int, int]:
    """Shape of the scalars the forward hands to the backward: 3 planes of (B, N) (s0, s1, s2)."""
    return (3, h.shape[0], target_grid[0] * target_grid[1])


def forward(h: torch.Tensor, y: torch.Tensor, h_grid, y_grid, target_grid, mean: bool = False, *,
            tiles: CosineTiles | None = None):
    """(per-sample losses (1, B) float32, −(1/N) Σ_t ĥ_bt·ŷ_bt, or with ``mean`` their batch mean (1, 1);
    per-token scalars (3, B, N) for the backward) for h (B, N_h, D) on ``h_grid`` and y (B, N_y, D) on
    ``y_grid`` resampled to ``target_grid``. ``tiles``: a tile config to try (tuning); None, the defaults."""
    return _launch_forward(h, y, h_grid, y_grid, target_grid, mean, tiles)


def _adjoint(grad, mean, x, z, x_grid, z_grid, target_grid, scal, own_row, tiles, extra=None, extra_grad=None):
    """∂/∂x (x's dtype, contiguous (B, N_x, D)) given the per-token scalars; z is the other input.
    ``extra``: another term's gradient on the target grid (B, N_t, D), added with the weights
    ``extra_grad`` (B,) before the adjoint, which it then shares (both as _check_extra leaves them)."""
    batch, n_x, dim = x.shape
    out = torch.empty((batch, n_x, dim), device=x.device, dtype=x.dtype)
    extra_args = dict(extra_ptr=grad, extra_grad_ptr=grad, EXTRA=False)
    if extra is not None:  # checked by backward
        extra_args = dict(extra_ptr=extra, extra_grad_ptr=extra_grad, EXTRA=True)
    if tuple(x_grid) == tuple(target_grid):
        grid, args, meta = _identity_plan(batch, dim, z_grid, target_grid, own_row, tiles)
        cosine_bwd_identity_kernel[grid](x_ptr=x, z_ptr=z, out_ptr=out, scal_ptr=scal, grad_ptr=grad,
                                         **extra_args, **_grad_scale(args, batch, mean), **_strides("x", x),
                                         **_strides("z", z), **meta)
    else:
        grid, table, args, meta = _band_plan(batch, dim, x_grid, z_grid, target_grid, own_row, x.dtype, z.dtype,
                                             tiles, 0 if extra is None else extra.element_size())
        cosine_bwd_band_kernel[grid](x_ptr=x, z_ptr=z, out_ptr=out, scal_ptr=scal, grad_ptr=grad,
                                     table_ptr=device_table(table, x.device), **extra_args,
                                     **_grad_scale(args, batch, mean), **_strides("x", x), **_strides("z", z),
                                     **meta)
    return out


def _check_extra(extra, extra_grad, h, target_grid, needs_h, needs_y, mean):
    """backward's extra= and extra_grad=, checked once: a pair of (B, N_target, D) contiguous gradients or
    None, each only for an input whose gradient is taken, with (B,) weights on the same device. Returns
    extra_grad as contiguous float32 (or None)."""
    if not isinstance(extra, (tuple, list)) or len(extra) != 2:
        raise ValueError(f"extra must be a pair (for h, for y) of tensors or None, got {type(extra).__name__}")
    if all(e is None for e in extra):
        if extra_grad is not None:
            raise ValueError("extra_grad was given without an extra term to weigh")
        return None
    if mean:
        raise ValueError("extra must be None with mean=True: it is for per-sample losses")
    batch, _, dim = h.shape
    shape = (batch, target_grid[0] * target_grid[1], dim)
    for name, e, needs in (("extra[0]", extra[0], needs_h), ("extra[1]", extra[1], needs_y)):
        if e is None:
            continue
        if not needs:
            raise ValueError(f"{name} was given for an input whose gradient is not taken")
        if tuple(e.shape) != shape or not e.is_contiguous() or e.device != h.device:
            raise ValueError(f"extra must be contiguous {shape} gradients on {h.device}; {name} is "
                             f"{tuple(e.shape)} on {e.device}{'' if e.is_contiguous() else ', not contiguous'}")
    if extra_grad is None or tuple(extra_grad.shape) != (batch,) or extra_grad.device != h.device:
        raise ValueError(f"extra_grad must be the ({batch},) weights of extra on {h.device}, got "
                         f"{None if extra_grad is None else (tuple(extra_grad.shape), str(extra_grad.device))}")
    return extra_grad.to(torch.float32).contiguous()


def backward(grad: torch.Tensor, h: torch.Tensor, y: torch.Tensor, h_grid, y_grid, target_grid,
             needs_h: bool, needs_y: bool, *, saved: torch.Tensor, mean: bool = False,
             tiles: CosineTiles | None = None, extra=(None, None), extra_grad: torch.Tensor | None = None):
    """(∂/∂h, ∂/∂y) of Σ_b grad[0, b]·loss_b, or with ``mean`` of grad[0, 0]·mean_b loss_b, in h's and
    y's dtypes (None where not needed). grad: (1, B) or (1, 1) float32; saved: the forward's scalars;
    ``tiles``: a tile config to try (tuning); None, the defaults. ``extra`` (per-sample losses only): another
    term's gradients on the target grid, (B, N_t, D) or None for h and y, added with the per-sample weights
    ``extra_grad`` (B,) float32 before the transposed resampling (U-REPA's manifold term shares it)."""
    if grad.dtype != torch.float32 or not grad.is_contiguous():
        grad = grad.to(torch.float32).contiguous()
    extra_grad = _check_extra(extra, extra_grad, h, target_grid, needs_h, needs_y, mean)
    grad_h = _adjoint(grad, mean, h, y, h_grid, y_grid, target_grid, saved, 1, tiles, extra[0],
                      extra_grad) if needs_h else None
    grad_y = _adjoint(grad, mean, y, h, y_grid, h_grid, target_grid, saved, 2, tiles, extra[1],
                      extra_grad) if needs_y else None
    return grad_h, grad_y

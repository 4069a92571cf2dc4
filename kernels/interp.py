"""Bilinear resampling of token grids with PyTorch's ``align_corners=False`` semantics, as Triton helpers.

Math, one axis (the 2-D weights are the products of the row and column weights). Target index r on an
axis of T cells reads the source axis of S cells at

    src = max((r + 0.5)·scale − 0.5, 0),   scale = fp32(S) / fp32(T)   (PyTorch's float32 scale)
    r0 = floor(src),   r1 = min(r0 + 1, S − 1),   λ = src − r0
    x_t[r] = (1 − λ)·x[r0] + λ·x[r1]                (at the far border r0 = r1: the weights still sum to 1)

A token n of a (H, W) grid sits at row n // W, column n % W, so a target token reads 4 source tokens.

The adjoint (the backward of the resampling) sends a target gradient back along the same taps. The
kernels compute it as a GATHER, so that each source element is written once (deterministic, no atomics):

    g_src[i] = Σ_r w(r, i)·g[r],   w(r, i) = (1 − λ_r)·[r0(r) = i] + λ_r·[r1(r) = i].

Since r0 is non-decreasing in r, the targets that read source i form one run r = start[i] … start[i]+K−1
(K = the longest run on the axis; the weight masks the rest). :func:`adjoint_span` gives start[] and K
on the host; the kernels evaluate w(r, i) with :func:`tap_weight`, which calls the same :func:`axis_taps`
as the forward, so forward and adjoint weights are bit-identical.

Identity axes (S = T) cost nothing: callers pass an ``IDENTITY`` constexpr and skip the taps.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl


def axis_scale(src: int, dst: int) -> float:
    """PyTorch's float32 ``src / dst`` (exactly representable, so a Triton fp32 argument keeps it)."""
    return float(np.float32(src) / np.float32(dst))


@triton.jit
def axis_taps(dst, scale, src_size):
    """(r0, r1, λ) of target indices ``dst`` (int, any shape) on one axis: x_t = (1−λ)·x[r0] + λ·x[r1]."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    r0 = src.to(tl.int32)  # truncation is floor here: src ≥ 0
    r1 = tl.minimum(r0 + 1, src_size - 1)
    return r0, r1, src - r0.to(tl.float32)


@triton.jit
def tap_weight(src, dst, dst_size, scale, src_size):
    """w(dst, src): the weight with which target ``dst`` reads source ``src`` (0 when it does not, or
    when ``dst`` ≥ ``dst_size``). Both taps may hit the same source at the border: their weights add."""
    r0, r1, lam = axis_taps(dst, scale, src_size)
    w = tl.where(r0 == src, 1.0 - lam, 0.0) + tl.where(r1 == src, lam, 0.0)
    return tl.where(dst < dst_size, w, 0.0)


@triton.jit
def lerp_weights(lr, lc):
    """(w00, w01, w10, w11) of row and column fractions: w_ab = w_row_a·w_col_b."""
    return (1.0 - lr) * (1.0 - lc), (1.0 - lr) * lc, lr * (1.0 - lc), lr * lc


@triton.jit
def token_taps(t, width_t, height_s, width_s, scale_h, scale_w):
    """The 4 source tokens and weights of target tokens ``t`` (flat indices on a grid of width ``width_t``):
    returns (n00, n01, n10, n11, w00, w01, w10, w11), n_ab = row_a·width_s + col_b, w_ab = w_row_a·w_col_b."""
    r0, r1, lr = axis_taps(t // width_t, scale_h, height_s)
    c0, c1, lc = axis_taps(t % width_t, scale_w, width_s)
    w00, w01, w10, w11 = lerp_weights(lr, lc)
    return r0 * width_s + c0, r0 * width_s + c1, r1 * width_s + c0, r1 * width_s + c1, w00, w01, w10, w11


@triton.jit
def load_lerp(base, n00, n01, n10, n11, w00, w01, w10, w11, stride_n, offs_d, mask):
    """fp32 tile [BLOCK_T, BLOCK_D] Σ_ab w_ab·x[n_ab, d] for per-token taps ([BLOCK_T] each, from
    :func:`token_taps`) and feature offsets ``offs_d`` ([BLOCK_D], already times the feature stride).
    Each tap is converted to fp32 on load (bf16 arithmetic is wrong under the interpreter)."""
    d = offs_d[None, :]
    return blend(tl.load(base + n00[:, None] * stride_n + d, mask=mask, other=0.0),
                 tl.load(base + n01[:, None] * stride_n + d, mask=mask, other=0.0),
                 tl.load(base + n10[:, None] * stride_n + d, mask=mask, other=0.0),
                 tl.load(base + n11[:, None] * stride_n + d, mask=mask, other=0.0), w00, w01, w10, w11)


@triton.jit
def blend(v00, v01, v10, v11, w00, w01, w10, w11):
    """fp32 Σ_ab w_ab·v_ab of 4 tap tiles [BLOCK_T, BLOCK_D] with per-token weights [BLOCK_T]."""
    acc = w00[:, None] * v00.to(tl.float32)
    acc += w01[:, None] * v01.to(tl.float32)
    acc += w10[:, None] * v10.to(tl.float32)
    acc += w11[:, None] * v11.to(tl.float32)
    return acc


@triton.jit
def load_resampled(base, t, stride_n, offs_d, mask, width_t, height_s, width_s, scale_h, scale_w,
                   IDENTITY: tl.constexpr):
    """fp32 tile [BLOCK_T, BLOCK_D] of x (source grid (height_s, width_s), token stride ``stride_n``)
    resampled at target tokens ``t``; with ``IDENTITY`` a plain load of token t (no tap arithmetic)."""
    if IDENTITY:
        return tl.load(base + t[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        n00, n01, n10, n11, w00, w01, w10, w11 = token_taps(t, width_t, height_s, width_s, scale_h, scale_w)
        return load_lerp(base, n00, n01, n10, n11, w00, w01, w10, w11, stride_n, offs_d, mask)


@triton.jit
def load_taps(base, t, stride_n, offs_d, mask, width_t, height_s, width_s, scale_h, scale_w,
              IDENTITY: tl.constexpr):
    """The raw tiles (input dtype, no arithmetic) of the 4 taps of target tokens ``t``, for a caller that
    issues loads early and combines them later with :func:`combine_taps`; with ``IDENTITY`` the token
    itself, once (returned 4 times)."""
    if IDENTITY:
        v = tl.load(base + t[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)
        return v, v, v, v
    else:
        n00, n01, n10, n11, w00, w01, w10, w11 = token_taps(t, width_t, height_s, width_s, scale_h, scale_w)
        d = offs_d[None, :]
        return (tl.load(base + n00[:, None] * stride_n + d, mask=mask, other=0.0),
                tl.load(base + n01[:, None] * stride_n + d, mask=mask, other=0.0),
                tl.load(base + n10[:, None] * stride_n + d, mask=mask, other=0.0),
                tl.load(base + n11[:, None] * stride_n + d, mask=mask, other=0.0))


@triton.jit
def combine_taps(v00, v01, v10, v11, t, width_t, height_s, width_s, scale_h, scale_w, IDENTITY: tl.constexpr):
    """fp32 tile of the resampled values from :func:`load_taps`' tiles (the same weights as
    :func:`load_lerp`)."""
    if IDENTITY:
        return v00.to(tl.float32)
    else:
        n00, n01, n10, n11, w00, w01, w10, w11 = token_taps(t, width_t, height_s, width_s, scale_h, scale_w)
        return blend(v00, v01, v10, v11, w00, w01, w10, w11)


@triton.jit
def load_row_taps(base, r, c, c0, c1, stride_n, offs_d, mask, height_s, width_s, scale_h, IDENTITY: tl.constexpr):
    """:func:`load_taps` for the target tokens (r, c) of one target row r, with the column taps (c0, c1)
    of columns c computed once by the caller (:func:`axis_taps`): a kernel that walks target rows pays
    for no division or column arithmetic per row. With ``IDENTITY`` the token r·width_s + c, once."""
    if IDENTITY:
        v = tl.load(base + (r * width_s + c)[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)
        return v, v, v, v
    else:
        r0, r1, _ = axis_taps(r, scale_h, height_s)
        d = offs_d[None, :]
        return (tl.load(base + (r0 * width_s + c0)[:, None] * stride_n + d, mask=mask, other=0.0),
                tl.load(base + (r0 * width_s + c1)[:, None] * stride_n + d, mask=mask, other=0.0),
                tl.load(base + (r1 * width_s + c0)[:, None] * stride_n + d, mask=mask, other=0.0),
                tl.load(base + (r1 * width_s + c1)[:, None] * stride_n + d, mask=mask, other=0.0))


@triton.jit
def combine_row_taps(v00, v01, v10, v11, r, lc, height_s, scale_h, IDENTITY: tl.constexpr):
    """fp32 tile of the resampled values from :func:`load_row_taps`' tiles; ``lc``: the columns' λ."""
    if IDENTITY:
        return v00.to(tl.float32)
    else:
        _, _, lr = axis_taps(r, scale_h, height_s)
        w00, w01, w10, w11 = lerp_weights(lr, lc)
        return blend(v00, v01, v10, v11, w00, w01, w10, w11)


# --------------------------------------------------------------------------------------------------
# Host side: the run of targets that read each source index, for the adjoint gather.


def _taps_fp32(src: int, dst: int, fused: bool) -> tuple[np.ndarray, np.ndarray]:
    """(r0, r1) of every target as the kernel computes them, with or without a fused multiply-add
    (the compiler may contract ``(r + 0.5)·scale − 0.5``; the host takes the union of both)."""
    r = np.arange(dst, dtype=np.float32) + np.float32(0.5)
    scale = np.float32(src) / np.float32(dst)
    if fused:
        pos = (r.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32)
    else:
        pos = r * scale - np.float32(0.5)
    r0 = np.maximum(pos, np.float32(0)).astype(np.int64)
    return r0, np.minimum(r0 + 1, src - 1)


def _reader_bounds(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) target index that reads each source index, over both roundings of the taps
    (a superset of the kernel's own); a source that no target reads gets last = −1."""
    first = np.full(src, dst, dtype=np.int64)
    last = np.full(src, -1, dtype=np.int64)
    targets = np.arange(dst)
    for fused in (False, True):
        for taps in _taps_fp32(src, dst, fused):
            np.minimum.at(first, taps, targets)
            np.maximum.at(last, taps, targets)
    return first, last


@functools.lru_cache(maxsize=256)
def adjoint_span(src: int, dst: int) -> tuple[tuple[int, ...], int]:
    """(start, K) for the adjoint gather along one axis of ``src`` source and ``dst`` target cells:
    every target that reads source i lies in start[i] … start[i] + K − 1 (a superset; the kernel's
    :func:`tap_weight` is 0 outside the true set). Identity axes give start[i] = i, K = 1."""
    if src == dst:
        return tuple(range(src)), 1
    first, last = _reader_bounds(src, dst)
    # A source that no target reads (downsampling by > 2) gets an empty run at 0: zero gradient.
    unread = last < 0
    first[unread], last[unread] = 0, 0
    return tuple(int(v) for v in first), int((last - first).max()) + 1


@functools.lru_cache(maxsize=256)
def adjoint_blocks(src: int, dst: int, block: int) -> tuple[tuple[int, int], ...]:
    """For each run of ``block`` consecutive source indices, the range [lo, hi) of the targets that read
    any of them (a superset, as :func:`adjoint_span`; (0, 0) when none does)."""
    first, last = _reader_bounds(src, dst)
    ranges = []
    for i0 in range(0, src, block):
        read = last[i0:i0 + block] >= 0
        if read.any():
            ranges.append((int(first[i0:i0 + block][read].min()), int(last[i0:i0 + block][read].max()) + 1))
        else:
            ranges.append((0, 0))
    return tuple(ranges)


@functools.lru_cache(maxsize=256)
def band_store_bound(src: int, dst: int, block: int) -> int:
    """The most source rows that a sweep of :func:`adjoint_blocks`' bands (``block`` source rows each)
    finishes before one target row: before target row r the sweep stores every row of its band above
    r0(r). Over both roundings of the taps, plus one for a row whose rounding differs from the previous
    row's: the bound of the kernels' unrolled store step."""
    most = 0
    for fused in (False, True):
        r0 = _taps_fp32(src, dst, fused)[0]
        for band, (lo, hi) in enumerate(adjoint_blocks(src, dst, block)):
            i0 = band * block
            cur, i1 = i0, min(i0 + block, src)
            for r in range(lo, hi):
                step = max(0, min(int(r0[r]), i1) - cur)
                most, cur = max(most, step), cur + step
    return most + 1


_DEVICE_TABLES: dict = {}


def device_table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``values`` as an int32 tensor on ``device``, made once per (values, device): the kernels' index tables
    cost no copy per call."""
    key = (values, str(device))
    table = _DEVICE_TABLES.get(key)
    if table is None:
        table = _DEVICE_TABLES[key] = torch.tensor(values, dtype=torch.int32, device=device)
    return table


def adjoint_start_table(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """:func:`adjoint_span` as an int32 tensor on ``device`` (cached: built once per axis and device)."""
    start, k = adjoint_span(src, dst)
    return device_table(start, device), k

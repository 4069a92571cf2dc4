"""Prototype (notes/cosine.md, session 4): the gradient produced in the forward by ONE persistent kernel
that interleaves the forward tiles of sample b + 1 with the band-backward tiles of sample b, so that the
backward's second look at h and y hits L2 (the forward of b read them just before) and the GPU stays full.
Work items come from a queue (an atomic counter), in the order F0 | F1·B0 interleaved | ... | B(B−1); a
backward tile of sample b waits on a flag that the forward's last tile of sample b raises (every item it
waits on was taken from the queue before it: no deadlock). The upstream gradient is a device scalar (the
prediction of the backward's grad_output); here 1.0, mean reduction.

python3 bench/try_fused_gradient.py          (GPU: time against the two kernels; CPU: TRITON_INTERPRET=1 check)
"""
import os

import torch
import triton
import triton.language as tl

from repa_fused.kernels import cosine
from repa_fused.kernels.cosine import (NORM_EPS, _add_target_row, _ordered_sum, _store_and_shift,
                                       _target_row_loads)
from repa_fused.kernels.interp import (axis_taps, combine_row_taps, combine_taps, load_taps, tap_weight,
                                       device_table)


@triton.jit
def _fwd_tile(pid, b, programs, h_ptr, y_ptr, out_ptr, scal_ptr, count_ptr, done_ptr,
              n_tokens, dim, width_t, plane,
              h_rows, h_cols, h_scale_r, h_scale_c, h_sb, h_sn, h_sd,
              y_rows, y_cols, y_scale_r, y_scale_c, y_sb, y_sn, y_sd, neg_inv_n,
              H_IDENTITY: tl.constexpr, Y_IDENTITY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_P: tl.constexpr):
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < n_tokens
    h_base = h_ptr + b.to(tl.int64) * h_sb
    y_base = y_ptr + b.to(tl.int64) * y_sb
    b_hh = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    b_yy = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    b_hy = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
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
    norm_h = tl.sqrt(tl.sum(b_hh, 1))
    norm_y = tl.sqrt(tl.sum(b_yy, 1))
    r_h = 1.0 / tl.maximum(norm_h, NORM_EPS)
    r_y = 1.0 / tl.maximum(norm_y, NORM_EPS)
    cos = tl.sum(b_hy, 1) * r_h * r_y
    p_scal = scal_ptr + b * n_tokens + t
    tl.store(p_scal, r_h * r_y, mask=t_mask)
    tl.store(p_scal + plane, tl.where(norm_h > NORM_EPS, cos * r_h * r_h, 0.0), mask=t_mask)
    tl.store(p_scal + 2 * plane, tl.where(norm_y > NORM_EPS, cos * r_y * r_y, 0.0), mask=t_mask)
    p_part = scal_ptr + 3 * plane + b * programs
    tl.store(p_part + pid, tl.sum(tl.where(t_mask, cos, 0.0), 0) * neg_inv_n)
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr + b, 1)
    if ticket == programs - 1:
        tl.store(out_ptr + b, _ordered_sum(p_part, programs, BLOCK_P))
        tl.atomic_xchg(count_ptr + b, 0)
        tl.debug_barrier()
        tl.atomic_xchg(done_ptr + b, 1)  # release: every scalar of sample b is stored


@triton.jit
def _band_tile(pid, band, b, x_ptr, z_ptr, out_ptr, scal_ptr, grad_ptr, table_ptr, done_ptr,
               n_tokens, dim, height_t, width_t, own_offset, d_blocks, col_tiles,
               x_rows, x_cols, x_scale_r, x_scale_c, x_sb, x_sn, x_sd,
               z_rows, z_cols, z_scale_r, z_scale_c, z_sb, z_sn, z_sd, neg_inv_n,
               Z_IDENTITY: tl.constexpr, BAND_ROWS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr, MAX_STORES: tl.constexpr):
    jt = pid // d_blocks
    db = pid % d_blocks
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
    coef = tl.load(grad_ptr) * neg_inv_n
    acc_a = tl.zeros((BLOCK_J, BLOCK_D), tl.float32)
    acc_b = tl.zeros((BLOCK_J, BLOCK_D), tl.float32)
    cur = i0
    offs_x = offs * x_sd
    offs_z = offs * z_sd
    x_c0, x_c1, x_lc = axis_taps(c, x_scale_c, x_cols)
    z_c0, z_c1, z_lc = axis_taps(c, z_scale_c, z_cols)
    # acquire: sample b's scalars are all stored (spin; the forward tiles it waits on are already running)
    flag = tl.atomic_add(done_ptr + b, 0)
    while flag == 0:
        flag = tl.atomic_add(done_ptr + b, 0)
    for k_r in tl.range(0, r_hi - r_lo, num_stages=STAGES):
        r = r_lo + k_r
        x00, x01, x10, x11, z00, z01, z10, z11, s0, s_own = _target_row_loads(
            x_base, z_base, s_base, r, r_hi, c, c_mask, d_mask, width_t, own_offset, x_sn, offs_x, x_rows,
            x_cols, x_scale_r, x_c0, x_c1, z_sn, offs_z, z_rows, z_cols, z_scale_r, z_c0, z_c1, Z_IDENTITY)
        b_x = combine_row_taps(x00, x01, x10, x11, r, x_lc, x_rows, x_scale_r, False)
        b_z = combine_row_taps(z00, z01, z10, z11, r, z_lc, z_rows, z_scale_r, Z_IDENTITY)
        g = s0[:, None] * b_z - s_own[:, None] * b_x
        acc_a, acc_b, cur = _add_target_row(g, r, cur, i1, w_cols, acc_a, acc_b, out_base, j, x_cols, dim, offs,
                                            m_j, coef, height_t, x_scale_r, x_rows, PRECISION, MAX_STORES)
    while cur < i1:
        acc_a, acc_b, cur = _store_and_shift(out_base, cur, j, x_cols, dim, offs, m_j, acc_a, acc_b, coef)


@triton.jit
def _fused_kernel(h_ptr, y_ptr, out_ptr, grad_out_ptr, scal_ptr, count_ptr, done_ptr, queue_ptr, pred_ptr, table_ptr,
                  n_tokens, dim, height_t, width_t, plane, batch, f_tiles, k_tiles, cd_tiles, n_bands, workers,
                  d_blocks, col_tiles,
                  h_rows, h_cols, h_scale_r, h_scale_c, h_sb, h_sn, h_sd,
                  y_rows, y_cols, y_scale_r, y_scale_c, y_sb, y_sn, y_sd, neg_inv_n, bwd_scale,
                  H_IDENTITY: tl.constexpr, Y_IDENTITY: tl.constexpr, BLOCK_T: tl.constexpr, FBLOCK_D: tl.constexpr,
                  BLOCK_P: tl.constexpr, BAND_ROWS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr, MAX_STORES: tl.constexpr):
    seg = f_tiles + k_tiles
    total = batch * seg
    item = tl.atomic_add(queue_ptr, 1)
    while item < total:
        # decode: [F0] then per sample s: F(s+1) and B(s) alternating, then the rest of B(s); last: B(B−1)
        is_fwd = item < f_tiles
        b = item * 0
        tile = item
        if item >= f_tiles:
            rest = item - f_tiles
            s = rest // seg
            off = rest % seg
            b = s
            tile = off
            if s < batch - 1:
                if off < 2 * f_tiles:
                    is_fwd = off % 2 == 0
                    tile = off // 2
                    if is_fwd:
                        b = s + 1
                else:
                    tile = off - f_tiles
        if is_fwd:
            _fwd_tile(tile, b, f_tiles, h_ptr, y_ptr, out_ptr, scal_ptr, count_ptr, done_ptr, n_tokens, dim, width_t,
                      plane, h_rows, h_cols, h_scale_r, h_scale_c, h_sb, h_sn, h_sd, y_rows, y_cols, y_scale_r,
                      y_scale_c, y_sb, y_sn, y_sd, neg_inv_n, H_IDENTITY, Y_IDENTITY, BLOCK_T, FBLOCK_D, BLOCK_P)
        else:
            band = n_bands - 1 - tile // cd_tiles
            _band_tile(tile % cd_tiles, band, b, h_ptr, y_ptr, grad_out_ptr, scal_ptr, pred_ptr, table_ptr,
                       done_ptr, n_tokens, dim, height_t, width_t, plane, d_blocks, col_tiles,
                       h_rows, h_cols, h_scale_r, h_scale_c, h_sb, h_sn, h_sd,
                       y_rows, y_cols, y_scale_r, y_scale_c, y_sb, y_sn, y_sd, bwd_scale,
                       Y_IDENTITY, BAND_ROWS, BLOCK_J, BLOCK_C, BLOCK_D, PRECISION, STAGES, MAX_STORES)
        item = tl.atomic_add(queue_ptr, 1)
    exits = tl.atomic_add(queue_ptr + 1, 1)
    if exits == workers - 1:  # the last worker out resets the queue and the flags for the next launch
        tl.atomic_xchg(queue_ptr, 0)
        tl.atomic_xchg(queue_ptr + 1, 0)
        for i in range(0, batch):
            tl.atomic_xchg(done_ptr + i, 0)


def fused(h, y, h_grid, y_grid, target_grid, pred, workers, state):
    """(per-sample losses (1, B), gradient of pred·mean_b loss_b w.r.t. h)."""
    batch, _, dim = h.shape
    grid_f, scal_shape, fargs, fmeta = cosine._forward_plan(batch, dim, h_grid, y_grid, target_grid, False)
    grid_b, table, bargs, bmeta = cosine._band_plan(batch, dim, h_grid, y_grid, target_grid, 1, h.dtype, y.dtype)
    scal = torch.empty(scal_shape, device=h.device, dtype=torch.float32)
    out = torch.empty((1, batch), device=h.device, dtype=torch.float32)
    grad = torch.empty_like(h)
    counters, done, queue = state
    n_tokens = fargs[0]
    f_tiles = grid_f[0]
    cd = grid_b[0]
    n_bands = grid_b[1]
    bm = {k: v for k, v in bmeta.items() if k not in ("num_warps", "Z_IDENTITY")}
    _fused_kernel[(workers,)](
        h, y, out, grad, scal, counters, done, queue, pred, device_table(table, h.device),
        n_tokens, dim, target_grid[0], target_grid[1], batch * n_tokens, batch, f_tiles, cd * n_bands, cd, n_bands,
        workers, bargs[6], bargs[7],
        *fargs[5:9], *h.stride(), *fargs[9:13], *y.stride(), fargs[13], bargs[16] / batch,
        H_IDENTITY=fmeta["H_IDENTITY"], Y_IDENTITY=fmeta["Y_IDENTITY"], BLOCK_T=fmeta["BLOCK_T"],
        FBLOCK_D=fmeta["BLOCK_D"], BLOCK_P=fmeta["BLOCK_P"], num_warps=4, **bm)
    return out, grad


def main():
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dev = "cpu" if interp else "cuda"
    cases = {"tiny": (2, (9, 11), (5, 6), 40, (5, 6)), "flux": (4, (64, 64), (37, 37), 1536, (37, 37)),
             "down48": (8, (48, 48), (37, 37), 1024, (37, 37))}
    names = ["tiny"] if interp else ["tiny", "flux", "down48"]
    for name in names:
        b, hg, yg, d, tg = cases[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        dt = torch.float32 if interp else torch.bfloat16
        h = torch.randn(b, hg[0] * hg[1], d, device=dev, generator=gen).to(dt)
        y = torch.randn(b, yg[0] * yg[1], d, device=dev, generator=gen).to(dt)
        pred = torch.ones(1, device=dev)
        state = (torch.zeros(b + 1, dtype=torch.int32, device=dev), torch.zeros(b, dtype=torch.int32, device=dev),
                 torch.zeros(2, dtype=torch.int32, device=dev))
        grids = (hg, yg, tg)
        with torch.no_grad():
            ref_loss, saved = cosine.forward(h, y, *grids)
            ref_grad = cosine.backward(pred.view(1, 1), h, y, *grids, True, False, saved=saved, mean=True)[0]
            for workers in ([2, 3] if interp else [132 * 2, 132 * 3, 132 * 4]):
                loss, grad = fused(h, y, *grids, pred, workers, state)
                ok = torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
                err = ((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()).item()
                line = f"{name} workers {workers}: loss agrees {ok}, grad rel err {err:.2e}"
                if not interp:
                    from tune_cosine import graph_ms
                    two = graph_ms(lambda: cosine.backward(pred.view(1, 1), h, y, *grids, True, False,
                                                           saved=cosine.forward(h, y, *grids)[1], mean=True))
                    one = graph_ms(lambda: fused(h, y, *grids, pred, workers, state))
                    nbytes = 2 * h.numel() * h.element_size() + y.numel() * y.element_size()
                    line += (f"; forward + backward kernels {two * 1e3:.1f} us, fused {one * 1e3:.1f} us "
                             f"({nbytes / one / 1e6:.0f} GB/s of minimum bytes)")
                print(line, flush=True)


if __name__ == "__main__":
    main()

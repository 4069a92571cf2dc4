"""Scratch sweep (notes/cosine.md, session 4): the band backward's column adjoint as a stencil in registers
against the matrix product (tf32 tensor cores through shared memory), kernel time by graph replay, the
compiler's registers and spills, and the gradient's error against fp64.

python3 bench/sweep_stencil.py
"""
import torch

from repa_fused import reference
from repa_fused.kernels import cosine
from tune_cosine import graph_ms

CASES = {  # name: (B, h_grid, y_grid, D, target)
    "flux": (4, (64, 64), (37, 37), 1536, (37, 37)),
    "down2": (4, (64, 64), (32, 32), 1024, (32, 32)),
    "down48": (8, (48, 48), (37, 37), 1024, (37, 37)),
}
# (BAND_ROWS, BLOCK_J, BLOCK_D, warps, STAGES); the stage budget is lifted so that each runs as named.
PRODUCT_CONFIGS = [(8, 16, 128, 4, 3), (8, 16, 64, 4, 1)]  # the product's measured best, and its hand loop
STENCIL_CONFIGS = [(8, 16, 128, 4, 3), (8, 16, 128, 4, 2), (8, 16, 64, 4, 3), (8, 16, 128, 4, 1), (8, 16, 64, 4, 1),
                   (8, 32, 64, 4, 1), (8, 32, 128, 8, 1), (8, 32, 64, 4, 2), (16, 16, 128, 4, 1)]


def launch(g, h, y, grids):
    """The backward's band launch for h (as cosine._adjoint), returning (gradient, compiled kernel)."""
    batch, n_x, dim = h.shape
    saved = cosine.forward(h, y, *grids)[1]
    kernel, grid, table, args, meta = cosine._band_plan(batch, dim, grids[0], grids[1], grids[2], 1, h.dtype,
                                                        y.dtype)
    out = torch.empty_like(h)
    tab = cosine.device_table(table, h.device)

    def run():
        return kernel[grid](h, y, out, saved, g, tab, *args[:12], *h.stride(), *args[12:16], *y.stride(),
                            args[16], 1, **meta)
    compiled = run()
    return out, compiled, run, meta


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    default_blocks, default_span, default_budget = cosine._band_blocks, cosine._STENCIL_SPAN, cosine._STAGE_BUDGET
    cosine._STAGE_BUDGET = 1 << 20
    for case, (b, hg, yg, d, tg) in CASES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(b, hg[0] * hg[1], d, device="cuda", generator=gen).bfloat16()
        y = torch.randn(b, yg[0] * yg[1], d, device="cuda", generator=gen).bfloat16()
        grids = (hg, yg, tg)
        g = torch.full((1, b), 1.0 / b, device="cuda")
        # fp64 reference gradient of Σ_b g_b·loss_b from the same bf16 inputs
        h64 = h.double().requires_grad_(True)
        (reference.cosine_alignment(h64, y.double(), *grids) * g.double()).sum().backward()
        ref = h64.grad
        with torch.no_grad():
            for span, label, configs in ((0, "product", PRODUCT_CONFIGS), (2, "stencil", STENCIL_CONFIGS)):
                cosine._STENCIL_SPAN = span
                for cfg in configs:
                    cosine._band_blocks = lambda dim, rows_down, stencil, c=cfg: c
                    cosine._band_plan.cache_clear()
                    try:
                        out, compiled, run, meta = launch(g, h, y, grids)
                        err = ((out.double() - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
                        ms = graph_ms(run)
                        print(f"{case:7} {label:8} {cfg}: {ms * 1e3:7.1f} us  regs {getattr(compiled, 'n_regs', -1):3d} "
                              f"spills {getattr(compiled, 'n_spills', -1):4d}  rel_rmse {err:.2e}  BLOCK_D {meta['BLOCK_D']} "
                              f"STAGES {meta['STAGES']}", flush=True)
                    except Exception as error:  # a config the compiler refuses
                        print(f"{case:7} {label:8} {cfg}: failed {type(error).__name__}: {str(error)[:200]}")
    cosine._band_blocks, cosine._STENCIL_SPAN, cosine._STAGE_BUDGET = default_blocks, default_span, default_budget
    cosine._band_plan.cache_clear()


if __name__ == "__main__":
    main()

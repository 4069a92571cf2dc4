"""Experiment (device): Triton's software pipeliner (STAGES > 1: loads through shared memory, STAGES − 1
steps ahead) against the hand-pipelined loops, over tile shapes; each variant checked against the default."""
import torch
from triton.testing import do_bench_cudagraph

from repa_fused.kernels import cosine

CASES = {"flux": (4, (64, 64), (37, 37), 1536, (37, 37)), "half": (4, (64, 64), (32, 32), 1024, (32, 32)),
         "up": (2, (32, 32), (37, 37), 1152, (37, 37)), "sit": (32, (16, 16), (16, 16), 768, (16, 16))}
FWD_TILES = [(8, 128, 4), (16, 128, 4), (8, 256, 4), (16, 64, 4), (32, 64, 4)]
BAND_TILES = [(8, 16, 64, 4), (12, 16, 64, 4), (16, 16, 64, 4), (8, 16, 128, 4), (8, 32, 64, 4)]


def ms(fn):
    return do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def set_plan(fwd=None, band=None, fstages=1, bstages=1):
    cosine._forward_blocks = (lambda dim, c=fwd: c) if fwd else FWD
    cosine._band_blocks = (lambda dim, c=band: c) if band else BAND
    cosine._FORWARD_STAGES, cosine._BAND_STAGES = fstages, bstages
    cosine._forward_plan.cache_clear()
    cosine._band_plan.cache_clear()


FWD, BAND = cosine._forward_blocks, cosine._band_blocks


def main():
    best = {}
    for case, (b, hg, yg, d, tg) in CASES.items():
        torch.manual_seed(0)
        h = torch.randn(b, hg[0] * hg[1], d, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(b, yg[0] * yg[1], d, device="cuda", dtype=torch.bfloat16)
        g = torch.full((1, b), 1.0 / b, device="cuda")
        grids = (hg, yg, tg)
        set_plan()
        ref_loss, ref_saved = cosine.forward(h, y, *grids)
        ref_grad = cosine.backward(g, h, y, *grids, True, False, saved=ref_saved)[0]
        rows = []
        for st in (1, 3, 4):
            for tile in FWD_TILES:
                set_plan(fwd=tile, fstages=st)
                loss, saved = cosine.forward(h, y, *grids)
                err = max(rel(loss, ref_loss), rel(saved, ref_saved))
                t = ms(lambda: cosine.forward(h, y, *grids))
                rows.append((t, f"{case} forward stages={st} tile={tile}: {t:.1f} us (err {err:.1e})"))
        if hg != tg:
            for st in (1, 2, 3, 4):
                for tile in BAND_TILES:
                    set_plan(band=tile, bstages=st)
                    grad = cosine.backward(g, h, y, *grids, True, False, saved=ref_saved)[0]
                    err = rel(grad, ref_grad)
                    t = ms(lambda: cosine.backward(g, h, y, *grids, True, False, saved=ref_saved))
                    rows.append((t + 1e6, f"{case} band stages={st} tile={tile}: {t:.1f} us (err {err:.1e})"))
        set_plan()
        for _, line in rows:
            print(line, flush=True)
        fw = min(r for r in rows if r[0] < 1e6)
        best[case] = [fw[1]]
        bw = [r for r in rows if r[0] >= 1e6]
        if bw:
            best[case].append(min(bw)[1])
    print("== best per case")
    for case, lines in best.items():
        for line in lines:
            print(line)


if __name__ == "__main__":
    main()

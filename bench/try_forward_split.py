"""Experiment (device): the forward with D split across programs (whole token rows read together) against
the D loop in one program; each variant checked against the loop kernel's output."""
import torch
from triton.testing import do_bench_cudagraph

from repa_fused.kernels import cosine

CASES = {"flux": (4, (64, 64), (37, 37), 1536, (37, 37)), "half": (4, (64, 64), (32, 32), 1024, (32, 32)),
         "up": (2, (32, 32), (37, 37), 1152, (37, 37)), "sit": (32, (16, 16), (16, 16), 768, (16, 16)),
         "wide": (2, (24, 24), (37, 37), 3072, (24, 24))}
TILES = [(8, 128, 4), (16, 128, 4), (4, 128, 4), (8, 64, 4), (16, 64, 4), (32, 64, 4), (8, 256, 4), (4, 256, 4),
         (16, 128, 8)]
BLOCKS = cosine._forward_blocks


def plan(split, tile):
    cosine._FORWARD_SPLIT = split
    cosine._forward_blocks = lambda dim, c=tile: c
    cosine._forward_plan.cache_clear()


def main():
    for case, (b, hg, yg, d, tg) in CASES.items():
        torch.manual_seed(0)
        h = torch.randn(b, hg[0] * hg[1], d, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(b, yg[0] * yg[1], d, device="cuda", dtype=torch.bfloat16)
        plan(False, (8, 128, 4))
        ref_mean, ref_saved = cosine.forward(h, y, hg, yg, tg, mean=True)
        rows = []
        for split in (False, True):
            for tile in TILES if split else TILES[:1]:
                plan(split, tile)
                mean, saved = cosine.forward(h, y, hg, yg, tg, mean=True)
                mean2, _ = cosine.forward(h, y, hg, yg, tg, mean=True)
                err = max(((saved - ref_saved).norm() / ref_saved.norm()).item(),
                          abs((mean - ref_mean).item() / ref_mean.item()))
                same = torch.equal(mean, mean2)
                t = do_bench_cudagraph(lambda: cosine.forward(h, y, hg, yg, tg, mean=True), rep=60,
                                       return_mode="median") * 1e3
                rows.append(t)
                print(f"{case} forward split={split} tile={tile}: {t:.1f} us (err {err:.1e}, repeatable {same})",
                      flush=True)
    cosine._FORWARD_SPLIT = True
    cosine._forward_blocks = BLOCKS
    cosine._forward_plan.cache_clear()


if __name__ == "__main__":
    main()

"""Experiment (device): does producing the gradient in the forward, sample chunk by sample chunk, let the
backward kernel's reads hit L2? Kernel-level graph-replay times of the existing launchers on views.
Rejected (notes/cosine.md, bench/results/h100_try_gradient_in_forward.log)."""
import torch

from repa_fused.kernels import cosine
from tune_cosine import CASES, graph_ms as ms, inputs, min_bytes


def main():
    src = torch.randn(1 << 28, device="cuda"); dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / ms(lambda: dst.copy_(src)) / 1e6
    read = src.numel() * 4 / ms(lambda: src.sum()) / 1e6
    write = src.numel() * 4 / ms(lambda: dst.fill_(1.0)) / 1e6
    print(f"{torch.cuda.get_device_name()} copy {copy:.0f} GB/s read(sum) {read:.0f} write(fill) {write:.0f}")
    del src, dst
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for case, (b, hg, yg, d, tg) in CASES.items():
        h, y = inputs(case)
        h = h.detach()
        g = torch.full((1, b), 1.0 / b, device="cuda")
        grids = (hg, yg, tg)
        mb = min_bytes(h, y) / 1e6
        saved = cosine.forward(h, y, *grids)[1]
        fw = ms(lambda: cosine.forward(h, y, *grids))
        bw = ms(lambda: cosine.backward(g, h, y, *grids, True, False, saved=saved))
        bw_cold = ms(lambda: (flush.zero_(), cosine.backward(g, h, y, *grids, True, False, saved=saved))) - ms(flush.zero_)
        both = ms(lambda: cosine.backward(g, h, y, *grids, True, False, saved=cosine.forward(h, y, *grids)[1]))
        print(f"{case}: fwd {fw*1e3:.1f} us, bwd {bw*1e3:.1f} (cold L2 {bw_cold*1e3:.1f}), fwd+bwd {both*1e3:.1f} "
              f"= {mb / both / copy * 100:.1f}% copy (min bytes {mb:.1f} MB)")
        for cs in (1, 2, 4, 8, 16):
            if cs >= b:
                continue
            for blocks in (None, (8, 128, 4), (4, 256, 4), (2, 512, 4), (2, 256, 2), (1, 512, 4)):
                if blocks is not None:
                    cosine._forward_blocks = lambda dim, c=blocks: c
                    cosine._forward_plan.cache_clear()

                def chunked():
                    for b0 in range(0, b, cs):
                        hc, yc = h[b0:b0 + cs], y[b0:b0 + cs]
                        sv = cosine.forward(hc, yc, *grids)[1]
                        cosine.backward(g[:, b0:b0 + cs], hc, yc, *grids, True, False, saved=sv)
                try:
                    t = ms(chunked)
                    print(f"  chunk {cs} fwd blocks {blocks}: {t*1e3:.1f} us = {mb / t / copy * 100:.1f}% copy")
                except Exception as e:
                    print("  failed", cs, blocks, type(e).__name__, str(e)[:200])
            cosine._forward_blocks = FWD
            cosine._forward_plan.cache_clear()


FWD = cosine._forward_blocks
if __name__ == "__main__":
    main()

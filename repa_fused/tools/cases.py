"""One case type for ``repa-fused check``, ``repa-fused bench``, ``bench/`` and the tests.

A :class:`Case` is a loss on one geometry: batch B, h's grid, y's grid, width D and the alignment mode.
It unpacks and indexes as ``(B, h_grid, y_grid, D, align)``, the order the tests parametrise by.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch

from ..ops.grids import Grid, resolve_grids

LOSSES = ("cosine", "manifold", "urepa")


@dataclass(frozen=True)
class Case:
    batch: int
    h_grid: Grid
    y_grid: Grid
    dim: int
    align: Union[str, Grid] = "min"
    name: str = ""
    loss: str = "urepa"          # "cosine" | "manifold" | "urepa": what a benchmark times
    description: str = ""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Case.loss must be one of {LOSSES}, got {self.loss!r}")

    def __iter__(self):
        return iter((self.batch, self.h_grid, self.y_grid, self.dim, self.align))

    def __getitem__(self, index):
        return tuple(self)[index]

    def __str__(self) -> str:
        return self.name or f"B{self.batch}-h{self.h_grid}-y{self.y_grid}-D{self.dim}-{self.align}"

    @property
    def n_h(self) -> int:
        return self.h_grid[0] * self.h_grid[1]

    @property
    def n_y(self) -> int:
        return self.y_grid[0] * self.y_grid[1]

    @property
    def target_grid(self) -> Grid:
        return resolve_grids(self.n_h, self.n_y, self.h_grid, self.y_grid, self.align)[2]

    def grids(self) -> tuple[Grid, Grid, Grid]:
        """(h_grid, y_grid, target_grid), the grids the ops take."""
        return self.h_grid, self.y_grid, self.target_grid

    def inputs(self, device="cpu", dtype=torch.float32, seed: int = 0, y_dtype=None):
        """Standard-normal (h, y) of this geometry, drawn in fp64 on the CPU (the same values on every
        device and in every dtype), then moved and cast."""
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(self.batch, self.n_h, self.dim, generator=g, dtype=torch.float64)
        y = torch.randn(self.batch, self.n_y, self.dim, generator=g, dtype=torch.float64)
        return h.to(device=device, dtype=dtype), y.to(device=device, dtype=y_dtype or dtype)

    def scaled_for_cpu(self) -> "Case":
        """The same grids with B/8 and D/8 (at least 1 and 64): a CPU run of a GPU-sized case."""
        return dataclasses.replace(self, batch=max(1, self.batch // 8), dim=max(64, self.dim // 8))

    def min_bytes(self, element_size: int) -> int:
        """Counted minimum traffic of fwd+bwd: read h and y once, write grad h once."""
        return element_size * self.batch * self.dim * (2 * self.n_h + self.n_y)

    def min_flops(self) -> int:
        """Counted minimum FLOPs of the manifold term: the cheaper of tiled, 4·B·N²·D (two similarity
        matrices halved by symmetry, then (ĤĤᵀ − ŶŶᵀ)Ĥ), and Gram, 8·B·N·D²; 0 for the cosine loss."""
        if self.loss == "cosine":
            return 0
        n = self.target_grid[0] * self.target_grid[1]
        return min(4 * self.batch * n * n * self.dim, 8 * self.batch * n * self.dim * self.dim)


# Odd shapes every backend is checked on: B=1, N=1, D prime, non-square grids, up- and down-sampling,
# every align mode.
ODD_CASES = [
    Case(1, (1, 1), (1, 1), 5, "min"),
    Case(2, (3, 5), (3, 5), 7, "min"),          # identity, non-square
    Case(3, (4, 4), (5, 5), 11, "min"),         # y downsampled to h's grid
    Case(2, (6, 5), (3, 4), 13, "min"),         # h downsampled
    Case(2, (2, 3), (5, 7), 17, "y"),           # h upsampled to y's grid
    Case(1, (7, 3), (4, 4), 3, "h"),
    Case(2, (5, 5), (3, 7), 19, (4, 6)),        # explicit target grid
    Case(1, (1, 4), (2, 2), 2, "y"),
    Case(2, (1, 1), (3, 3), 23, "y"),           # a single token spread over a grid
]
# What `repa-fused check` validates: the odd shapes that resample (and N = 1), and two wider ones (D past
# one tile).
CHECK_CASES = [ODD_CASES[i] for i in (0, 2, 3, 4, 5, 6)] + [Case(2, (9, 9), (7, 7), 77, "y"),
                                                          Case(2, (16, 16), (11, 13), 130, "min")]
GRADCHECK_CASES = [Case(2, (3, 3), (2, 4), 5, "y"), Case(1, (2, 3), (3, 3), 3, (2, 2))]

# The model shapes `repa-fused bench` times.
BENCH_CASES = [
    Case(32, (16, 16), (16, 16), 768, "min", "sit_xl2_256", "cosine",
         "SiT-XL/2 at 256 px, DINOv2-B at 224 px (REPA)"),
    Case(4, (64, 64), (37, 37), 1536, "min", "flux_1024", "cosine",
         "Flux at 1024 px, DINOv2-g at 518 px (REPA, hidden 64×64 -> encoder 37×37)"),
    Case(16, (32, 32), (37, 37), 1536, "min", "sdxl_min", "urepa",
         "SDXL mid-block 32×32 vs DINOv2-g 37×37, encoder downsampled (U-REPA, SimpleTuner)"),
    Case(16, (32, 32), (37, 37), 1536, "y", "sdxl_y", "urepa",
         "SDXL mid-block 32×32 upsampled to DINOv2-g 37×37 (U-REPA paper)"),
    Case(16, (8, 8), (37, 37), 1536, "min", "sd15_min", "urepa",
         "SD1.5 mid-block 8×8 vs DINOv2-g 37×37 (U-REPA)"),
    Case(8, (64, 64), (64, 64), 1024, "min", "hires_manifold", "manifold",
         "High-resolution manifold loss, 64×64 tokens"),
]
BENCH_CASES_BY_NAME = {case.name: case for case in BENCH_CASES}

"""Token grids: the checks and the choice of the target grid both inputs are resampled to.

Tokens are row-major on their grid (H, W): token n sits at row n // W, column n % W.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

Grid = tuple[int, int]
GridArg = Optional[Sequence[int]]
AlignArg = Union[str, Sequence[int]]

ALIGN_MODES = ("min", "y", "h")


def check_grid(name: str, grid) -> Grid:
    """``grid`` as (H, W) of positive ints, or ValueError naming the argument ``name``."""
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {grid!r}")
    return int(grid[0]), int(grid[1])


def _known_grid(name: str, grid: GridArg, tokens: int) -> Optional[Grid]:
    """The given grid (checked against the token count), a square grid for a square count, else None."""
    if grid is not None:
        grid = check_grid(name, grid)
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"{name}={grid} has {grid[0] * grid[1]} cells but the tokens number {tokens}")
        return grid
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


def resolve_grids(n_h: int, n_y: int, h_grid: GridArg = None, y_grid: GridArg = None,
                  align: AlignArg = "min") -> tuple[Grid, Grid, Grid]:
    """(h_grid, y_grid, target_grid) for token counts ``n_h``, ``n_y``.

    ``align="min"``: the grid with fewer tokens (ties to h's); ``"y"``/``"h"``: that input's grid;
    ``(H, W)``: that grid. Inputs of one token count share a layout when only one side's is known, and
    are compared token by token when neither is; any other case that needs a grid it cannot know raises
    ValueError naming the grid to pass.
    """
    if isinstance(align, str):
        if align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES} or a grid (H, W), got {align!r}")
        explicit = None
    else:
        explicit = check_grid("align", align)
    g_h = _known_grid("h_grid", h_grid, n_h)
    g_y = _known_grid("y_grid", y_grid, n_y)
    if n_h == n_y and (g_h is None) != (g_y is None):
        g_h = g_y = g_h or g_y  # one token count, one known layout: the other side shares it
    if g_h is None and g_y is None and n_h == n_y and explicit is None:
        same = (n_h, 1)  # one unknown layout on both sides: compared token by token, nothing to resample
        return same, same, same
    for name, grid, tokens in (("h_grid", g_h, n_h), ("y_grid", g_y, n_y)):
        if grid is None:
            raise ValueError(
                f"{name} is needed: {tokens} tokens are not a square grid and the tokens must be "
                f"resampled; pass {name}=(H, W) with H·W = {tokens}")
    if explicit is not None:
        target = explicit
    elif align == "h" or (align == "min" and n_h <= n_y):
        target = g_h
    else:
        target = g_y
    return g_h, g_y, target

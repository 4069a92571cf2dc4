"""Finds the compiled C++ extension (``repa_fused._C``, built by setup.py from csrc/ when a compiler is
there) and adapts its two entry points to the forward/backward layout of :func:`.dispatch.define_loss_op`.

``_C.forward(op, h, y, h_grid, y_grid, target_grid, method="auto", block=256)`` returns the (T, B)
per-sample losses; ``_C.backward(op, grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y, method,
block)`` returns ``(grad_h | None, grad_y | None)``. ``method`` picks the manifold path ("tiled" by
(i, j) tiles, "gram" by D×D Gram matrices, "auto" by cost); tests and benchmarks force it here.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Callable, Optional

OPS = ("cosine", "manifold", "urepa")


@functools.lru_cache(maxsize=None)
def extension() -> Optional[object]:
    """The extension module, or None when it was not built (the install says so once).

    A module that was built but does not load (typically: torch changed since the build) is said once
    here, since the fallback to the reference backend would otherwise be silent.
    """
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError as error:
        if importlib.util.find_spec("repa_fused._C") is not None:
            warnings.warn(f"repa_fused._C was built but does not load ({error}); the 'cpp' backend is "
                          "unavailable until it is rebuilt: pip install --no-build-isolation -e .",
                          RuntimeWarning, stacklevel=2)
        return None
    return _C


def implementations(method: str = "auto") -> dict[str, tuple[Callable, Callable]]:
    """op -> (forward, backward) of the extension, in the layout of dispatch.define_loss_op."""
    ext = extension()
    if ext is None:
        raise RuntimeError("the C++ extension repa_fused._C is not built; reinstall with a C++ compiler: "
                           "pip install --no-build-isolation -e .")

    def make(op: str):
        def forward(h, y, h_grid, y_grid, target_grid):
            return ext.forward(op, h, y, list(h_grid), list(y_grid), list(target_grid), method)

        def backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y):
            return ext.backward(op, grad, h, y, list(h_grid), list(y_grid), list(target_grid),
                                bool(needs_h), bool(needs_y), method)

        return forward, backward

    return {op: make(op) for op in OPS}

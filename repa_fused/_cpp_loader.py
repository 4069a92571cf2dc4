"""Finds the compiled C++ extension (``repa_fused._C``), built by setup.py when a compiler is there."""

from __future__ import annotations

import functools
from typing import Callable, Optional


@functools.lru_cache(maxsize=None)
def extension() -> Optional[object]:
    """The extension module, or None when it was not built (the install says so once)."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def implementations() -> dict[str, tuple[Callable, Callable]]:
    """op -> (forward, backward) of the extension, in the layout of ops.define_loss_op."""
    if extension() is None:
        raise RuntimeError("the C++ extension repa_fused._C is not built; reinstall with a C++ compiler")
    raise NotImplementedError("the C++ ops are not written yet")

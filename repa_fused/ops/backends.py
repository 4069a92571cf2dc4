"""The backends behind the ops, registered with :mod:`.dispatch`: ``reference`` (eager PyTorch, any
device), ``triton`` (the fused kernels of ``repa_fused.kernels``: CUDA, or CPU under TRITON_INTERPRET=1)
and ``cpp`` (the C++ extension, CPU; adapter in :mod:`.cpp`).

Each adapter returns op -> OpImpl (or the tuple of its fields) in the layout of
:func:`.dispatch.define_loss_op`; it runs on first use, so importing this module compiles nothing.
"""

from __future__ import annotations

import importlib.util
from typing import Union

import torch

from ..kernels._runtime import triton_interpreter
from . import cpp, pairs, reference
from .dispatch import OP_NAMES, PAIR_OP_NAMES, OpImpl, register_backend


def _reference_implementations() -> dict[str, tuple]:
    """Eager PyTorch through the same custom-op machinery as the fused backends."""
    def make(op):
        def forward(h, y, h_grid, y_grid, target_grid):
            with torch.no_grad():
                return reference.LOSSES[op](h, y, h_grid, y_grid, target_grid)

        def backward(grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y):
            with torch.no_grad():
                return reference.loss_gradients(op, grad, h, y, h_grid, y_grid, target_grid, needs_h, needs_y)

        return forward, backward

    return {op: make(op) for op in OP_NAMES + PAIR_OP_NAMES}


def _triton_implementations() -> dict[str, Union[OpImpl, tuple]]:
    from ..kernels import cosine, manifold

    tokens = OpImpl(manifold.manifold_forward, manifold.manifold_backward, grad_in_forward=True,
                    backward_reads_inputs=False)
    return {"cosine": OpImpl(cosine.forward, cosine.backward, cosine.saved_shape, fused_mean=True),
            "manifold": tokens,
            "urepa": OpImpl(manifold.urepa_forward, manifold.urepa_backward, manifold.urepa_saved_shape,
                            grad_in_forward=True),
            **pairs.implementations(tokens)}


def _cpp_implementations() -> dict[str, Union[OpImpl, tuple]]:
    implementations = cpp.implementations()
    return {**implementations, **pairs.implementations(implementations["manifold"])}


def _triton_available(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and triton_interpreter()


# Availability is read once, at import (tests set TRITON_INTERPRET before importing): under
# torch.compile the choice of backend is then a constant lookup.
register_backend("reference", None, _reference_implementations)
register_backend("triton", tuple(d for d in ("cpu", "cuda") if _triton_available(torch.device(d))),
                 _triton_implementations)
register_backend("cpp", ("cpu",) if cpp.extension() is not None else (), _cpp_implementations)

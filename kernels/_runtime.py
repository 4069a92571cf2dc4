"""What every kernel file shares, importing only torch and triton (the kernels sit beneath the package).

``triton_interpreter()``: kernels run under Triton's CPU interpreter (CI), which wants other tiles and fp32
arithmetic. ``EPS``: the normaliser's floor, ``x / max(‖x‖, EPS)``, as ``F.normalize`` and the reference.
``part_like``: the buffer of a gradient made in the forward (ops.dispatch's grad_in_forward protocol).
"""

from __future__ import annotations

import os

import torch

EPS = 1e-12

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_interpreter() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on CPU tensors and pick interpreter-friendly tiles."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_dtype(name: str, x: torch.Tensor) -> None:
    """The kernels compute in fp32 from fp32/bf16/fp16 inputs; float64 goes to the reference."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes {name} as float32, bfloat16 or float16, got {x.dtype}; "
                        "use backend='reference' for float64")


def part_like(x: torch.Tensor, target_grid) -> torch.Tensor:
    """An empty part of x: its gradient on the target grid, made in the forward and kept until the backward
    scales it, (B, N_target, D) in x's dtype, but float32 for float16. The upstream gradient arrives only
    then, and under a GradScaler it is large (2^16): unscaled, the gradient's small entries sit below
    float16's range and would round to zero."""
    dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
    return x.new_empty((x.shape[0], target_grid[0] * target_grid[1], x.shape[2]), dtype=dtype)

"""What every kernel file shares, importing only torch and triton (the kernels sit beneath the package).

``triton_interpreter()``: kernels run under Triton's CPU interpreter (CI), which wants other tiles and fp32
arithmetic. ``EPS``: the normaliser's floor, ``x / max(‖x‖, EPS)``, as ``F.normalize`` and the reference.
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

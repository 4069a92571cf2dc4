"""What every kernel file shares, with no import from the package above (kernels import torch and triton
only): the interpreter flag and the normaliser's eps."""

from __future__ import annotations

import os

# As F.normalize and the reference: ‖x‖ below EPS divides by EPS instead (zero vectors give zero).
EPS = 1e-12


def triton_interpreter() -> bool:
    """Triton kernels run under the CPU interpreter (CI): the kernels pick interpreter-friendly tiles."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

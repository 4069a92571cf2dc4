"""The losses: argument checks and backend choice (:mod:`.api`), token grids (:mod:`.grids`), the eager
reference (:mod:`.reference`), the custom ops and the backend registry (:mod:`.dispatch`) and the backends
behind them (:mod:`.backends`, :mod:`.cpp`). Imports ``repa_fused.kernels`` beneath it, nothing above."""

from . import backends  # noqa: F401 - registers the backends with dispatch
from .api import available_backends, cosine_alignment_loss, manifold_loss, urepa_loss

__all__ = ["available_backends", "cosine_alignment_loss", "manifold_loss", "urepa_loss"]

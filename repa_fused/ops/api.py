"""The public losses: check the arguments, resolve grids and alignment, choose a backend, reduce.

Shapes: ``h`` (B, N_h, D) projected hidden tokens, ``y`` (B, N_y, D) encoder patch tokens, both row-major
on their grids. Losses come back float32 (float64 for float64 inputs); gradients reach ``h``, and ``y``
when it requires grad, in their own dtypes.
"""

from __future__ import annotations

import math

import torch

from . import dispatch
from .dispatch import ALIGNMENT_ROW, MANIFOLD_ROW
from .grids import AlignArg, GridArg, resolve_grids

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "none")
PAIRS = ("tokens", "samples", "batch")
BACKEND_CHOICES = ("auto", "reference", "triton", "cpp")


def _check_tokens(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, D), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D (B, N, D), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} must have B, N, D ≥ 1, got shape {tuple(x.shape)}")


def _select_backend(backend: str, device: torch.device, op: str, float64: bool = False):
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        # float64 (gradcheck, analysis) has no fused kernel: the reference is its backend.
        backend = "reference" if float64 else dispatch.default_backend(device)
    elif not dispatch.BACKENDS[backend].available(device):
        raise ValueError(f"backend={backend!r} is not available on device {device}; available: "
                         f"{dispatch.available_backends(device)}")
    return dispatch.BACKENDS[backend].ops[op]


def _check_pairs(pairs) -> str:
    if not isinstance(pairs, str) or pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    return pairs


def _terms(op: str, h, y, h_grid, y_grid, align, reduction, backend, pairs: str = "tokens") -> torch.Tensor:
    """The op's (T, B) per-sample terms, or for ``reduction="mean"`` their (T, 1) batch means (taken
    inside the kernels where the backend can: no reduction launch, and none for its backward).

    ``pairs`` other than "tokens" takes the manifold term from the op ``manifold_<pairs>``; U-REPA then
    stacks the cosine op's term on it (two passes over the inputs instead of the fused one)."""
    _check_tokens("h", h)
    _check_tokens("y", y)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"h and y must have the same batch size B, got {h.shape[0]} and {y.shape[0]}")
    if h.shape[2] != y.shape[2]:
        raise ValueError(f"h and y must have the same width D (project h first), got {h.shape[2]} and "
                         f"{y.shape[2]}")
    if h.device != y.device:
        raise ValueError(f"h and y must be on the same device, got {h.device} and {y.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
    float64 = torch.float64 in (h.dtype, y.dtype)
    mean = reduction == "mean"
    if _check_pairs(pairs) != "tokens" and op != "cosine":
        manifold = _select_backend(backend, h.device, f"manifold_{pairs}", float64)(h, y, *grids, mean=mean)
        if op == "manifold":
            return manifold
        cosine = _select_backend(backend, h.device, "cosine", float64)(h, y, *grids, mean=mean)
        return torch.cat((cosine, manifold))
    impl = _select_backend(backend, h.device, op, float64)
    return impl(h, y, *grids, mean=mean)


def _single_term(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    """A scalar (mean) or (B,) from a (1, 1) or (1, B) op output: a view, whose backward launches
    nothing (indexing's backward allocates and copies)."""
    return terms.view(()) if reduction == "mean" else terms.squeeze(0)


def cosine_alignment_loss(h: torch.Tensor, y: torch.Tensor, *, h_grid: GridArg = None,
                          y_grid: GridArg = None, align: AlignArg = "min", reduction: str = "mean",
                          backend: str = "auto") -> torch.Tensor:
    """REPA's loss: −(1/(B·N)) Σ_b Σ_n ĥ_bn·ŷ_bn on the aligned grid (N target tokens).

    h: (B, N_h, D), y: (B, N_y, D). Returns a scalar (``reduction="mean"``) or (B,) (``"none"``).
    """
    return _single_term(_terms("cosine", h, y, h_grid, y_grid, align, reduction, backend), reduction)


def manifold_loss(h: torch.Tensor, y: torch.Tensor, *, h_grid: GridArg = None, y_grid: GridArg = None,
                  align: AlignArg = "min", pairs: str = "tokens", reduction: str = "mean",
                  backend: str = "auto") -> torch.Tensor:
    """U-REPA's manifold loss over ``pairs`` of unit tokens ĥ, ŷ on the aligned grid (N target tokens):

    * ``"tokens"``: (1/(B·N²)) Σ_b Σ_ij (ĥ_bi·ĥ_bj − ŷ_bi·ŷ_bj)², token pairs within each image;
    * ``"samples"``: (1/B²) Σ_ab (p_a·p_b − q_a·q_b)², p_b = normalize(mean_n ĥ_bn), q_b likewise;
    * ``"batch"``: (1/(B·N)²) Σ_(a,i) Σ_(b,j) (ĥ_ai·ĥ_bj − ŷ_ai·ŷ_bj)², all tokens of the batch.

    No N×N (or (B·N)²) tensor in the fused backends. h: (B, N_h, D), y: (B, N_y, D). Returns a scalar
    (``reduction="mean"``) or (B,) (``"none"``: each sample's share, the sum over its own rows of the
    pair matrix, scaled so that the mean of the shares is the loss).
    """
    return _single_term(_terms("manifold", h, y, h_grid, y_grid, align, reduction, backend, pairs), reduction)


def urepa_loss(h: torch.Tensor, y: torch.Tensor, *, manifold_weight: float = 3.0, h_grid: GridArg = None,
               y_grid: GridArg = None, align: AlignArg = "min", pairs: str = "tokens", reduction: str = "mean",
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U-REPA: ``(total, alignment, manifold)`` with total = alignment + manifold_weight · manifold.

    ``pairs`` chooses the manifold term's pairs (see :func:`manifold_loss`). With "tokens" both terms come
    from one pass over the inputs. Each is a scalar or (B,) per ``reduction``.
    """
    if isinstance(manifold_weight, bool) or not isinstance(manifold_weight, (int, float)):
        raise TypeError(f"manifold_weight must be a real number, got {type(manifold_weight).__name__}")
    if not math.isfinite(manifold_weight):
        raise ValueError(f"manifold_weight must be finite, got {manifold_weight}")
    terms = _terms("urepa", h, y, h_grid, y_grid, align, reduction, backend, pairs)
    rows = (terms.squeeze(1) if reduction == "mean" else terms).unbind(0)
    alignment, manifold = rows[ALIGNMENT_ROW], rows[MANIFOLD_ROW]
    return alignment + manifold_weight * manifold, alignment, manifold


def available_backends(device) -> list[str]:
    """The backends that can run on ``device``: a subset of ["reference", "triton", "cpp"]."""
    return dispatch.available_backends(device)

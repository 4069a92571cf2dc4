"""``repa-fused check``: every available backend against the reference, on this device.

For each backend, op and dtype, over a list of odd shapes (B=1, N=1, prime D, non-square grids, up- and
down-sampling, every align mode, zero vectors), the per-sample losses and the gradients of h and y are
compared with the reference evaluated in float64 on the same inputs, by relative RMSE
(rms(ref − out) / rms(ref)). Backends that take float64 are also put through ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ops import api as functional
from ..ops import dispatch
from .cases import CHECK_CASES, GRADCHECK_CASES

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_rmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(ref − out) / rms(ref), robust in low precision (flash-linear-attention's measure)."""
    out, ref = out.double(), ref.double()
    return ((ref - out).square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-30)).item()


@dataclass
class CheckResult:
    backend: str
    op: str
    dtype: str
    loss_error: float
    grad_h_error: float
    grad_y_error: float
    tolerance: float
    passed: bool
    note: str = ""


def _inputs(case, device, dtype, seed):
    return case.inputs(device, dtype, seed)


def _terms(op: str, backend: str, h, y, case, reduction: str = "none"):
    """The op's terms through the public API: (T, B) with reduction "none", (T,) with "mean"."""
    _, h_grid, y_grid, _, align = case
    kwargs = dict(h_grid=h_grid, y_grid=y_grid, align=align, reduction=reduction, backend=backend)
    if op == "cosine":
        return functional.cosine_alignment_loss(h, y, **kwargs).unsqueeze(0)
    if op in dispatch.PAIRS_OF_OP:
        return functional.manifold_loss(h, y, pairs=dispatch.PAIRS_OF_OP[op], **kwargs).unsqueeze(0)
    return torch.stack(functional.urepa_loss(h, y, **kwargs)[1:])


def check_values(backend: str, op: str, dtype: torch.dtype, device) -> CheckResult:
    """Losses and both gradients over all CHECK_CASES, per sample and as the batch mean (training's path,
    separate code in the fused backends), pooled per quantity before the relative RMSE: a case whose exact
    value is 0 (the manifold loss of a single token) cannot set the scale alone."""
    pooled = [([], []), ([], []), ([], [])]
    finite = True
    for seed, (case, reduction) in enumerate((c, r) for c in CHECK_CASES for r in ("none", "mean")):
        h, y = _inputs(case, device, dtype, seed)
        h.requires_grad_(True)
        y.requires_grad_(True)
        out = _terms(op, backend, h, y, case, reduction)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        grad_h, grad_y = torch.autograd.grad((out.double() * weights.to(device)).sum(), (h, y))
        h64 = h.detach().double().requires_grad_(True)
        y64 = y.detach().double().requires_grad_(True)
        ref = _terms(op, "reference", h64, y64, case, reduction)
        ref_h, ref_y = torch.autograd.grad((ref * weights.to(device)).sum(), (h64, y64))
        finite &= bool(torch.isfinite(out).all() and torch.isfinite(grad_h).all() and torch.isfinite(grad_y).all())
        for (outs, refs), a, r in zip(pooled, (out, grad_h, grad_y), (ref, ref_h, ref_y)):
            outs.append(a.detach().double().flatten())
            refs.append(r.detach().flatten())
    errors = [rel_rmse(torch.cat(outs), torch.cat(refs)) for outs, refs in pooled]
    tol = TOLERANCE[dtype]
    passed = finite and max(errors) <= tol
    return CheckResult(backend, op, str(dtype).replace("torch.", ""), *errors, tol, passed,
                       "" if finite else "non-finite values")


def check_zero_vectors(backend: str, op: str, device) -> CheckResult:
    """Zero tokens in h and y: finite losses and gradients (the normaliser divides by max(‖x‖, eps)).

    float32 only: the exact gradient at a zero token is G/eps, which overflows float16 by design.
    """
    case = CHECK_CASES[2]
    h, y = _inputs(case, device, torch.float32, seed=5)
    h[0, :2] = 0
    y[-1, 1] = 0
    h.requires_grad_(True)
    y.requires_grad_(True)
    out = _terms(op, backend, h, y, case)
    grads = torch.autograd.grad(out.sum(), (h, y))
    finite = bool(torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads))
    return CheckResult(backend, op, "float32", 0.0, 0.0, 0.0, 0.0, finite,
                       "zero vectors finite" if finite else "zero vectors NOT finite")


def check_gradcheck(backend: str, op: str, device) -> CheckResult:
    """fp64 gradcheck of the backend's op through the public API (h and y)."""
    ok = True
    for case in GRADCHECK_CASES:
        h, y = _inputs(case, device, torch.float64, seed=7)
        h.requires_grad_(True)
        y.requires_grad_(True)
        try:
            ok &= torch.autograd.gradcheck(lambda a, b: _terms(op, backend, a, b, case), (h, y),
                                           raise_exception=False)
        except (TypeError, NotImplementedError):  # the backend does not take float64
            return CheckResult(backend, op, "float64", 0.0, 0.0, 0.0, 0.0, True, "gradcheck n/a: no float64")
    return CheckResult(backend, op, "float64", 0.0, 0.0, 0.0, 0.0, ok, "gradcheck" + ("" if ok else " FAILED"))


def run_checks(device=None, backends=None, log: Callable[[str], None] = lambda m: None) -> list[CheckResult]:
    """Check ``backends`` (default: every one available on ``device``); asking for one that is unknown
    or not available there is a ValueError."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    available = dispatch.available_backends(device)
    for name in backends or ():
        if name not in dispatch.BACKENDS:
            raise ValueError(f"unknown backend {name!r}; backends: {list(dispatch.BACKENDS)}")
        if name not in available:
            raise ValueError(f"backend {name!r} is not available on {device}; available: {available}")
    names = [b for b in available if backends is None or b in backends]
    results = []
    for backend in names:
        for op in dispatch.OP_NAMES + dispatch.PAIR_OP_NAMES:
            results.append(check_gradcheck(backend, op, device))
            log(f"{backend} {op} gradcheck: {'ok' if results[-1].passed else 'FAILED'}")
            results.append(check_zero_vectors(backend, op, device))
            if backend == "reference":
                continue  # the reference is the truth of the value checks
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                results.append(check_values(backend, op, dtype, device))
                log(f"{backend} {op} {dtype}: {'ok' if results[-1].passed else 'FAILED'}")
    return results


def format_results(results: list[CheckResult], device) -> str:
    header = ["backend", "op", "dtype", "loss err", "grad h err", "grad y err", "tol", "result"]
    rows = []
    for r in results:
        if r.note and r.loss_error == r.grad_h_error == r.grad_y_error == r.tolerance:
            errs = ["-", "-", "-", "-"]
            verdict = ("ok" if r.passed else "FAIL") + f" ({r.note})"
        else:
            errs = [f"{r.loss_error:.1e}", f"{r.grad_h_error:.1e}", f"{r.grad_y_error:.1e}", f"{r.tolerance:.0e}"]
            verdict = "ok" if r.passed else "FAIL" + (f" ({r.note})" if r.note else "")
        rows.append([r.backend, r.op, r.dtype, *errs, verdict])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    failed = sum(not r.passed for r in results)
    summary = f"{len(results) - failed} passed, {failed} failed"
    return "\n".join([f"repa-fused check on {device}: backends {dispatch.available_backends(device)}",
                      line(header), line(["-" * w for w in widths]), *map(line, rows), summary])

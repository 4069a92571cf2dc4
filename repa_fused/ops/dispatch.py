"""torch.library custom ops for the losses, and the backend registry.

Every backend implements the same three ops, each a function of ``(h, y, h_grid, y_grid, target_grid)``
returning per-sample losses of shape (T, B) (T = 1 for ``cosine`` and ``manifold``, 2 for ``urepa``:
alignment then manifold), float32 (float64 for float64 inputs), or with ``mean=True`` their batch means,
(T, 1). A backend supplies a forward and a backward implementation; :func:`define_loss_op` turns them into

* a ``torch.library`` custom op ``repa_fused::<op>_<backend>`` with a fake (meta) implementation and
  autograd, whose backward is itself a custom op, so ``torch.compile(fullgraph=True)`` traces both;
* an eager fast path (a plain ``torch.autograd.Function`` calling the same implementations) that skips
  the dispatcher, whose overhead is measurable on small shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from ..kernels._runtime import part_like
from . import reference

OP_NAMES = ("cosine", "manifold", "urepa")
# The manifold term over sample pairs and whole-batch pairs (``pairs=``); U-REPA in those modes is the
# cosine op plus one of these. Kept apart from OP_NAMES, whose ops `repa-fused check` runs by name.
PAIR_OP_NAMES = ("manifold_samples", "manifold_batch")
# The manifold ops by the `pairs=` of the public API they serve.
PAIRS_OF_OP = {"manifold": "tokens", "manifold_samples": "samples", "manifold_batch": "batch"}
TERMS = {"cosine": 1, "manifold": 1, "urepa": 2, "manifold_samples": 1, "manifold_batch": 1}
# The rows of an op's (T, B) output: "urepa" stacks both terms, the others have one row.
ALIGNMENT_ROW = 0  # the cosine alignment term (the only row of "cosine")
MANIFOLD_ROW = -1  # the manifold term (the only row of "manifold", the last of "urepa")

# forward(h, y, h_grid, y_grid, target_grid[, mean=True]) -> (T, B) losses, or ((T, B) losses, saved) where
# ``saved`` is one float32 tensor of O(B·N) values the backward reuses (per-token norms, say) instead of
# recomputing; ``mean=True`` (only to an OpImpl with fused_mean) asks for the (T, 1) batch means instead.
ForwardImpl = Callable[..., Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]
# backward(grad (T, B), h, y, h_grid, y_grid, target_grid, needs_h, needs_y[, saved=saved][, mean=True])
#     -> (grad_h | None, grad_y | None); ``saved=`` is passed only to a backend whose forward returns it,
#     ``mean=True`` (with a (T, 1) grad) only to an OpImpl with fused_mean.
BackwardImpl = Callable[..., tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]
# grad_in_forward (loss kernels that make the gradient with the loss, as fused loss kernels do):
#   forward(h, y, h_grid, y_grid, target_grid, needs_h=, needs_y=) -> (losses, saved | None, part_h | None,
#       part_y | None), part_x = ∂(Σ_b loss[T−1, b])/∂x̃ when needs_x, x̃ being x resampled to the target grid
#       (part_like: (B, N_target, D), x's dtype but float32 for float16, whose range is too short for a
#       gradient that is scaled only later; image b's rows are image b's own gradient); the backward then
#       gets ``parts=(part_h, part_y)``, scales them by the upstream gradient, adds what the other terms
#       need and takes the sum back through the transposed resampling.
# saved_shape(h, y, h_grid, y_grid, target_grid) -> shape of ``saved`` (for the fake implementation);
# None for a backend that saves nothing.

NOTHING_SAVED = (0,)


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op (see the signatures above). ``fused_mean``: forward and
    backward also take ``mean=True`` and reduce over the batch inside their kernels (forward: (T, 1)
    means; backward: a (T, 1) gradient); otherwise :func:`define_loss_op` takes the mean around them."""

    forward: ForwardImpl
    backward: BackwardImpl
    saved_shape: Optional[Callable[..., tuple[int, ...]]] = None
    fused_mean: bool = False
    grad_in_forward: bool = False
    # With grad_in_forward: whether the backward still reads h and y (False: only the parts).
    backward_reads_inputs: bool = True


def _stash(ctx, *tensors) -> None:
    """Save tensors for backward. Inference tensors (an encoder run under torch.inference_mode) cannot
    be saved and have no version counter, yet another inference_mode block may change them in place
    before the backward: a copy keeps the backward on the forward's values."""
    ctx.inference = [t.clone() if t is not None and t.is_inference() else None for t in tensors]
    ctx.save_for_backward(*[None if kept is not None else t for t, kept in zip(tensors, ctx.inference)])


def _unstash(ctx) -> list:
    return [kept if kept is not None else t for t, kept in zip(ctx.saved_tensors, ctx.inference)]


def _refuse_double_backward(name: str) -> None:
    """The backward kernels build no graph: under create_graph=True a gradient penalty would silently
    add 0, so say so instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name}: double backward (create_graph=True) is not supported: every backend "
                           f"computes its gradient outside autograd. For a gradient penalty, write the loss with "
                           f"plain PyTorch ops (repa_fused.ops.reference.LOSSES has each, differentiable by "
                           f"autograd)")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """A custom op returns tensors only: an empty one stands for "none"."""
    return like.new_empty(0)


def define_loss_op(op: str, backend: str, implementation: Callable[[], OpImpl]) -> Callable:
    """Register the op ``op`` of ``backend``, implemented by ``implementation()`` (called on first use);
    return the differentiable callable ``(h, y, h_grid, y_grid, target_grid, mean=False)``.

    The backward must return gradients in the dtype of the matching input, or None where not needed.
    """
    terms = TERMS[op]
    name = f"repa_fused::{op}_{backend}"

    def saved_shape(h, y, *grids):
        shape_of = implementation().saved_shape
        return shape_of(h, y, *grids) if shape_of is not None else None

    def run_forward(h, y, h_grid, y_grid, target_grid, mean, needs_h=False, needs_y=False):
        """(losses, saved or None, (part_h, part_y)) whatever the backend's forward returns."""
        impl = implementation()
        parts = (None, None)
        if impl.grad_in_forward:
            losses, saved, *parts = impl.forward(h, y, h_grid, y_grid, target_grid, needs_h=needs_h,
                                                 needs_y=needs_y)
        else:
            if mean and impl.fused_mean:
                result = impl.forward(h, y, h_grid, y_grid, target_grid, mean=True)
            else:
                result = impl.forward(h, y, h_grid, y_grid, target_grid)
            losses, saved = result if isinstance(result, tuple) else (result, None)
        if mean and not impl.fused_mean:
            losses = losses.mean(1, keepdim=True)
        return losses, saved, tuple(parts)

    def run_backward(grad, h, y, grids, needs_h, needs_y, saved, mean, parts=(None, None)):
        impl = implementation()
        kwargs = {} if saved is None else {"saved": saved}
        if impl.grad_in_forward:
            kwargs["parts"] = parts
        if mean and impl.fused_mean:
            kwargs["mean"] = True
        elif mean:  # the backward of the mean, as autograd takes it: (T, 1) -> (T, B) / B
            grad = grad.expand(terms, h.shape[0]) / h.shape[0]
        return impl.backward(grad, h, y, *grids, needs_h, needs_y, **kwargs)

    @torch.library.custom_op(name, mutates_args=())
    def forward_op(h: torch.Tensor, y: torch.Tensor, h_grid: list[int], y_grid: list[int],
                   target_grid: list[int], mean: bool = False, needs_h: bool = False,
                   needs_y: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        losses, saved, (part_h, part_y) = run_forward(h, y, tuple(h_grid), tuple(y_grid), tuple(target_grid),
                                                      mean, needs_h, needs_y)
        # A custom op returns tensors only: an empty one stands for "nothing saved" / "no part".
        return (losses, (saved if saved is not None else h.new_empty(NOTHING_SAVED, dtype=torch.float32)),
                part_h if part_h is not None else _empty(h), part_y if part_y is not None else _empty(y))

    @forward_op.register_fake
    def _(h, y, h_grid, y_grid, target_grid, mean=False, needs_h=False, needs_y=False):
        shape = saved_shape(h, y, tuple(h_grid), tuple(y_grid), tuple(target_grid))
        in_forward = implementation().grad_in_forward
        return (h.new_empty((terms, 1 if mean else h.shape[0]), dtype=reference.compute_dtype(h, y)),
                h.new_empty(shape if shape is not None else NOTHING_SAVED, dtype=torch.float32),
                part_like(h, target_grid) if in_forward and needs_h else _empty(h),
                part_like(y, target_grid) if in_forward and needs_y else _empty(y))

    @torch.library.custom_op(name + "_backward", mutates_args=())
    def backward_op(grad: torch.Tensor, h: torch.Tensor, y: torch.Tensor, saved: torch.Tensor,
                    part_h: torch.Tensor, part_y: torch.Tensor, h_grid: list[int], y_grid: list[int],
                    target_grid: list[int], needs_h: bool, needs_y: bool, mean: bool = False) -> list[torch.Tensor]:
        grids = (tuple(h_grid), tuple(y_grid), tuple(target_grid))
        has_saved = saved_shape(h, y, *grids) is not None
        parts = (part_h if needs_h else None, part_y if needs_y else None)
        grad_h, grad_y = run_backward(grad, h, y, grids, needs_h, needs_y, saved if has_saved else None, mean,
                                      parts)
        # A custom op cannot return None: an empty tensor stands for "no gradient". Contiguous, as the
        # fake implementation declares (compiled graphs rely on the strides).
        return [grad_h.contiguous() if needs_h else h.new_empty(0),
                grad_y.contiguous() if needs_y else y.new_empty(0)]

    @backward_op.register_fake
    def _(grad, h, y, saved, part_h, part_y, h_grid, y_grid, target_grid, needs_h, needs_y, mean=False):
        return [torch.empty_like(h, memory_format=torch.contiguous_format) if needs_h else h.new_empty(0),
                torch.empty_like(y, memory_format=torch.contiguous_format) if needs_y else y.new_empty(0)]

    def stash_inputs(ctx, h, y, saved, parts) -> None:
        """A backward that reads only the parts keeps neither input alive: it needs their shapes, dtypes and
        devices only, so a one-element stand-in of that shape takes each one's place (an inference input,
        which never needs a gradient itself, an empty one)."""
        impl = implementation()
        if impl.grad_in_forward and not impl.backward_reads_inputs:
            h, y = (_empty(x) if x.is_inference() else x.new_empty(1).expand(x.shape) for x in (h, y))
        _stash(ctx, h, y, saved, *parts)

    def setup_context(ctx, inputs, output):
        h, y, h_grid, y_grid, target_grid, mean, _needs_h, _needs_y = inputs
        stash_inputs(ctx, h, y, output[1], output[2:])
        ctx.grids = (h_grid, y_grid, target_grid)
        ctx.mean = mean

    def backward_rule(ctx, grad, *_grad_rest):
        _refuse_double_backward(name)
        h, y, saved, part_h, part_y = _unstash(ctx)
        needs_h, needs_y = ctx.needs_input_grad[:2]
        missing = (needs_h and not part_h.numel()) or (needs_y and not part_y.numel())
        if implementation().grad_in_forward and missing:
            raise RuntimeError(f"{name}: the forward ran with needs_h={bool(part_h.numel())}, "
                               f"needs_y={bool(part_y.numel())}, so it made no gradient for an input that now "
                               "needs one: call the op with needs_h / needs_y set for every input requiring grad")
        grad_h, grad_y = backward_op(grad.contiguous(), h, y, saved, part_h, part_y, *ctx.grids, needs_h,
                                     needs_y, ctx.mean)
        return (grad_h if needs_h else None, grad_y if needs_y else None, None, None, None, None, None, None)

    forward_op.register_autograd(backward_rule, setup_context=setup_context)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, y, h_grid, y_grid, target_grid, mean, grad_on):
            # grad_on: the caller's grad mode (forward always runs without grad); under no_grad no gradient
            # is made in the forward, whatever the inputs' requires_grad.
            needs_h, needs_y = (grad_on and needs for needs in ctx.needs_input_grad[:2])
            losses, saved, parts = run_forward(h, y, h_grid, y_grid, target_grid, mean, needs_h, needs_y)
            stash_inputs(ctx, h, y, saved, parts)
            ctx.grids = (h_grid, y_grid, target_grid)
            ctx.mean = mean
            return losses

        @staticmethod
        def backward(ctx, grad):
            # The check comes before no_grad (once_differentiable would hide create_graph from it).
            _refuse_double_backward(name)
            with torch.no_grad():
                h, y, saved, part_h, part_y = _unstash(ctx)
                needs_h, needs_y = ctx.needs_input_grad[:2]
                grad_h, grad_y = run_backward(grad.contiguous(), h, y, ctx.grids, needs_h, needs_y, saved,
                                              ctx.mean, (part_h, part_y))
            return grad_h, grad_y, None, None, None, None, None

    def call(h: torch.Tensor, y: torch.Tensor, h_grid, y_grid, target_grid, mean: bool = False) -> torch.Tensor:
        h_grid, y_grid, target_grid = tuple(h_grid), tuple(y_grid), tuple(target_grid)
        if torch.compiler.is_compiling():
            grad_on = torch.is_grad_enabled()
            return forward_op(h, y, list(h_grid), list(y_grid), list(target_grid), mean,
                              grad_on and h.requires_grad, grad_on and y.requires_grad)[0]
        return EagerFunction.apply(h, y, h_grid, y_grid, target_grid, mean, torch.is_grad_enabled())

    call.custom_op = forward_op
    call.backward_op = backward_op
    call.__name__ = f"{op}_{backend}"
    return call


@dataclass
class Backend:
    """A named implementation of the ops. ``ops[op]`` is the differentiable callable
    ``(h, y, h_grid, y_grid, target_grid, mean=False) -> (T, B)``, or (T, 1) batch means with ``mean=True``;
    ``devices`` lists the device types it runs on (None: any device PyTorch runs on)."""

    name: str
    devices: Optional[tuple[str, ...]]
    # op -> OpImpl, or a tuple of its fields (forward, backward[, saved_shape]): see define_loss_op
    load: Callable[[], dict[str, Union[OpImpl, tuple]]] = field(repr=False)
    ops: dict[str, Callable] = field(default_factory=dict, repr=False)
    _implementations: Optional[dict] = field(default=None, repr=False)

    def implementations(self) -> dict[str, OpImpl]:
        if self._implementations is None:
            self._implementations = {op: impl if isinstance(impl, OpImpl) else OpImpl(*impl)
                                     for op, impl in self.load().items()}
        return self._implementations

    def available(self, device) -> bool:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            return False
        return self.devices is None or device.type in self.devices


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, devices: Optional[tuple[str, ...]], load) -> Backend:
    backend = Backend(name, devices, load)
    for op in OP_NAMES + PAIR_OP_NAMES:
        backend.ops[op] = define_loss_op(op, name, lambda _op=op: backend.implementations()[_op])
    BACKENDS[name] = backend
    return backend


def available_backends(device) -> list[str]:
    """Backends that can run on ``device`` (a str or torch.device), in the order of BACKENDS."""
    return [name for name, backend in BACKENDS.items() if backend.available(device)]


def default_backend(device: torch.device) -> str:
    """``"auto"``: Triton on CUDA; on CPU the C++ extension when built, else the reference."""
    preferred = "triton" if device.type == "cuda" else "cpp"
    return preferred if BACKENDS[preferred].available(device) else "reference"

"""The contract every backend keeps, for every op, in one place (backend × op).

Each backend runs on the CPU here (triton under the interpreter, cpp when built): zero vectors give finite
values equal to the reference's; strided inputs give what contiguous ones give; two runs are bit-identical;
an encoder output made under inference mode is a valid y; the custom ops pass torch.library.opcheck; and
torch.compile(fullgraph=True) gives the eager values and gradients. Backend-specific behaviour (tiles,
algorithms, GPU shapes) stays in each backend's own test file.
"""

import pytest
import torch

import repa_fused as rf
from repa_fused.ops import dispatch
from repa_fused.tools.cases import Case

from helpers import rel_rmse

BACKENDS = rf.available_backends("cpu")
OPS = dispatch.OP_NAMES + dispatch.PAIR_OP_NAMES
CASE = Case(2, (4, 4), (3, 3), 5, "y")   # resampled, small enough for the interpreter


def public(op, h, y, backend, reduction="none"):
    """The op through the public API as (T, B) rows (one per term) or (T,) means."""
    kwargs = dict(h_grid=CASE.h_grid, y_grid=CASE.y_grid, align=CASE.align, reduction=reduction, backend=backend)
    if op == "cosine":
        return rf.cosine_alignment_loss(h, y, **kwargs).unsqueeze(0)
    if op in dispatch.PAIRS_OF_OP:
        return rf.manifold_loss(h, y, pairs=dispatch.PAIRS_OF_OP[op], **kwargs).unsqueeze(0)
    return torch.stack(rf.urepa_loss(h, y, **kwargs)[1:])


def values_and_grads(op, h, y, backend):
    """(losses, grad h, grad y) of a weighted sum of the per-sample losses (weights reach every sample)."""
    h, y = h.detach().requires_grad_(True), y.detach().requires_grad_(True)
    losses = public(op, h, y, backend)
    weights = torch.linspace(-1.0, 2.0, losses.numel()).view_as(losses)
    grad_h, grad_y = torch.autograd.grad((losses * weights).sum(), (h, y))
    return losses.detach(), grad_h, grad_y


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vectors_are_finite_and_match_the_reference(backend, op):
    h, y = CASE.inputs(seed=1)
    h[0, :3] = 0   # zero source tokens: some interpolated targets are zero too
    y[1] = 0       # a whole zero encoder image
    out = values_and_grads(op, h, y, backend)
    ref = values_and_grads(op, h.double(), y.double(), "reference")
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all()
        assert rel_rmse(o, r) < 1e-5


# The Triton cosine backward's saved scalars s0 = r_h·r_y, s1, s2 ~ r² are subnormal for norms past ~1e19 (kept so, for its
# speed: docs/cosine.md), so its gradients there carry ~13 bits; its loss is exact.
HUGE_TOKEN_GRADIENT_TOLERANCE = {("triton", "cosine"): 1e-3}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_tokens_give_scale_invariant_values(backend, op):
    """Tokens around 1e20, whose squared norms overflow fp32: the losses do not change, the gradients scale
    as 1/s."""
    h, y = CASE.inputs(seed=7)
    losses, grad_h, grad_y = values_and_grads(op, h, y, backend)
    huge_losses, huge_grad_h, huge_grad_y = values_and_grads(op, h * 1e20, y * 3e19, backend)
    tol = HUGE_TOKEN_GRADIENT_TOLERANCE.get((backend, op), 1e-5)
    assert rel_rmse(huge_losses, losses) < 1e-5
    assert rel_rmse(huge_grad_h * 1e20, grad_h) < tol
    assert rel_rmse(huge_grad_y * 3e19, grad_y) < tol


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_below_the_normal_range_are_finite(backend, op):
    """A token whose largest element is below fp32's smallest normal (~1e-38; its norm far below eps, so it
    acts as a zero vector): finite values equal to the reference's, next to ordinary tokens, a zero token,
    and a token around 1e20 (which sends its neighbours through the overflow-safe norms too)."""
    h, y = CASE.inputs(seed=8)
    h[0, 1] *= 1e-40
    y[1, 2] *= 1e-40
    y[1, 0] *= 1e20
    y[0, 0] = 0.0
    out = values_and_grads(op, h, y, backend)
    ref = values_and_grads(op, h.double(), y.double(), "reference")
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all()
        assert rel_rmse(o, r) < 1e-5


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_give_the_contiguous_result(backend, op):
    h, y = CASE.inputs(seed=2)
    h_strided = h.transpose(1, 2).contiguous().transpose(1, 2)   # D-major storage
    y_strided = torch.stack([y, -y], dim=3)[..., 0]               # feature stride 2
    assert not h_strided.is_contiguous() and not y_strided.is_contiguous()
    for a, b in zip(values_and_grads(op, h_strided, y_strided, backend), values_and_grads(op, h, y, backend)):
        assert rel_rmse(a, b) < 1e-6


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, op):
    h, y = CASE.inputs(seed=3)
    first, second = values_and_grads(op, h, y, backend), values_and_grads(op, h, y, backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_output_from_inference_mode(backend):
    """A frozen encoder run under torch.inference_mode gives inference tensors: still a valid y."""
    h, y = CASE.inputs(seed=4)
    with torch.inference_mode():
        y_inference = y.clone()
    h.requires_grad_(True)
    total = rf.urepa_loss(h, y_inference, h_grid=CASE.h_grid, y_grid=CASE.y_grid, align="y", backend=backend)[0]
    (grad,) = torch.autograd.grad(total, h)
    h_ref = h.detach().double().requires_grad_(True)
    ref = rf.urepa_loss(h_ref, y.double(), h_grid=CASE.h_grid, y_grid=CASE.y_grid, align="y",
                        backend="reference")[0]
    (grad_ref,) = torch.autograd.grad(ref, h_ref)
    assert rel_rmse(grad, grad_ref) < 1e-5


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, op):
    h, y = CASE.inputs(seed=5)
    grids = [list(g) for g in CASE.grids()]
    custom = dispatch.BACKENDS[backend].ops[op].custom_op
    for mean in (False, True):  # per sample (T, B), and the batch means (T, 1); both inputs need a gradient
        torch.library.opcheck(custom, (h.requires_grad_(True), y.requires_grad_(True), *grids, mean, True, True))


def compiled_step_matches_eager(backend: str, compile_backend: str) -> None:
    h, y = CASE.inputs(seed=6)
    h.requires_grad_(True)
    y.requires_grad_(True)

    def step(h, y):
        kwargs = dict(h_grid=CASE.h_grid, y_grid=CASE.y_grid, backend=backend)
        total, _, _ = rf.urepa_loss(h, y, align="y", **kwargs)
        per_sample = rf.cosine_alignment_loss(h, y, reduction="none", **kwargs)
        return total + (per_sample * torch.tensor([1.0, -2.0])).sum() + rf.manifold_loss(h, y, **kwargs)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    out = compiled(h, y)
    grads = torch.autograd.grad(out, (h, y))
    ref = step(h, y)
    ref_grads = torch.autograd.grad(ref, (h, y))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    compiled_step_matches_eager(backend, "aot_eager")


@pytest.mark.slow
@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_compile_fullgraph_inductor_cpp():
    """Inductor checks the backward's strides against the fake implementation (aot_eager does not)."""
    compiled_step_matches_eager("cpp", "inductor")

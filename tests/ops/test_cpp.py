"""The C++ backend (repa_fused._C) against the reference: values and gradients on odd shapes, both manifold
paths (tiled, Gram), dtypes, zero vectors, non-contiguous inputs, gradcheck, opcheck, torch.compile,
determinism, and the "auto" choice on CPU."""

import pytest
import torch

import repa_fused as rf
from repa_fused.ops import cpp, dispatch, reference
from repa_fused.ops.grids import resolve_grids

from helpers import ODD_CASES, independent_losses, rel_rmse

ext = cpp.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ extension repa_fused._C is not built "
                                                    "(no compiler at install time)")

OPS = ("cosine", "manifold", "urepa")
METHODS = ("tiled", "gram")
PUBLIC = {"cosine": rf.cosine_alignment_loss, "manifold": rf.manifold_loss,
          "urepa": lambda h, y, **kw: rf.urepa_loss(h, y, manifold_weight=2.5, **kw)[0]}


def random_case(b, h_grid, y_grid, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, h_grid[0] * h_grid[1], d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(b, y_grid[0] * y_grid[1], d, generator=g, dtype=torch.float64).to(dtype)
    return h, y


def case_grids(h, y, case):
    _, h_grid, y_grid, _, align = case
    return [list(g) for g in resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)]


def run_ext(op, h, y, grids, method="auto", block=ext.default_block if ext else 0, needs_y=True, seed=1):
    """(losses, grad_h, grad_y, upstream grad) straight from the extension."""
    out = ext.forward(op, h, y, *grids, method, block)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grad_h, grad_y = ext.backward(op, grad, h, y, *grids, True, needs_y, method, block)
    return out, grad_h, grad_y, grad


@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block", [256, 3])
def test_fp64_matches_reference(case, op, method, block):
    """fp64 in, fp64 accumulation: every path agrees with the reference to rounding (block 3: many tiles,
    ragged last tile)."""
    h, y = random_case(case[0], case[1], case[2], case[3], seed=7)
    grids = case_grids(h, y, case)
    out, grad_h, grad_y, grad = run_ext(op, h, y, grids, method, block)
    ref_h, ref_y = reference.loss_gradients(op, grad, h, y, *grids, True, True)
    assert out.dtype == torch.float64 and grad_h.dtype == torch.float64
    torch.testing.assert_close(out, reference.LOSSES[op](h, y, *grids), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(grad_y, ref_y, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_public_api_fp32_matches_reference(case, op):
    """Through the custom op and autograd, reduction="none", gradients to h and y."""
    b, h_grid, y_grid, d, align = case
    h, y = random_case(b, h_grid, y_grid, d, dtype=torch.float32, seed=11)
    results = {}
    for backend in ("reference", "cpp"):
        hb, yb = h.clone().requires_grad_(True), y.clone().requires_grad_(True)
        kw = dict(h_grid=h_grid, y_grid=y_grid, align=align, backend=backend)
        if op == "urepa":
            total, alignment, manifold = rf.urepa_loss(hb, yb, reduction="none", **kw)
            values = torch.stack((alignment, manifold))
            loss = total
        else:
            values = PUBLIC[op](hb, yb, reduction="none", **kw)
            loss = values
        weights = torch.linspace(0.5, 1.5, b)
        (loss * weights).sum().backward()
        results[backend] = (values, hb.grad, yb.grad)
    for got, want in zip(results["cpp"], results["reference"]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_against_independent_formula():
    h, y = random_case(2, (5, 6), (7, 4), 13, seed=2)
    grids = resolve_grids(30, 28, (5, 6), (7, 4), (6, 5))
    cosine, manifold = independent_losses(h, y, *grids)
    for method in METHODS:
        out = ext.forward("urepa", h, y, *[list(g) for g in grids], method, 4)
        torch.testing.assert_close(out, torch.stack((cosine, manifold)), rtol=1e-10, atol=0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("method", METHODS)
def test_zero_vectors(op, method):
    """Zero tokens normalise to zero (no NaN) and their gradients follow the reference's rule."""
    h, y = random_case(2, (4, 4), (4, 4), 6, seed=4)
    h[0, 3] = 0
    h[1, :5] = 0
    y[0, 7] = 0
    grids = [[4, 4]] * 3
    out, grad_h, grad_y, grad = run_ext(op, h, y, grids, method)
    ref_h, ref_y = reference.loss_gradients(op, grad, h, y, *grids, True, True)
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_y).all()
    torch.testing.assert_close(out, reference.LOSSES[op](h, y, *grids), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(grad_y, ref_y, rtol=1e-9, atol=1e-13)


class ForcedMethod(torch.autograd.Function):
    """The extension with a forced manifold path, for gradcheck of each path (one block: many small blocks
    are covered by test_fp64_matches_reference, and would make gradcheck's many calls slow)."""

    @staticmethod
    def forward(ctx, h, y, op, grids, method):
        ctx.save_for_backward(h, y)
        ctx.args = (op, grids, method)
        return ext.forward(op, h, y, *grids, method)

    @staticmethod
    def backward(ctx, grad):
        h, y = ctx.saved_tensors
        op, grids, method = ctx.args
        grad_h, grad_y = ext.backward(op, grad.contiguous(), h, y, *grids, True, True, method)
        return grad_h, grad_y, None, None, None


@pytest.mark.parametrize("case", [ODD_CASES[2], ODD_CASES[4], ODD_CASES[6]], ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_fp64(case, op, method):
    h, y = random_case(case[0], case[1], case[2], case[3], seed=3)
    grids = case_grids(h, y, case)
    h.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c: ForcedMethod.apply(a, c, op, grids, method), (h, y))


def test_gradcheck_public_api_fp64():
    h, y = random_case(2, (3, 4), (4, 4), 5, seed=8)
    h.requires_grad_(True)
    y.requires_grad_(True)
    fn = lambda a, c: torch.stack(rf.urepa_loss(a, c, h_grid=(3, 4), align="y", reduction="none",  # noqa: E731
                                                backend="cpp"))
    assert torch.autograd.gradcheck(fn, (h, y))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("method", METHODS)
def test_low_precision(dtype, tol, op, method):
    """bf16/fp16 in, fp32 accumulation: losses fp32, gradients in the input dtype, close to fp64."""
    h64, y64 = random_case(2, (6, 6), (8, 8), 48, seed=9)
    h, y = h64.to(dtype), y64.to(dtype)
    grids = [[6, 6], [8, 8], [6, 6]]
    out, grad_h, grad_y, grad = run_ext(op, h, y, grids, method)
    assert out.dtype == torch.float32 and grad_h.dtype == dtype and grad_y.dtype == dtype
    # Truth: fp64 math on the same (rounded) inputs.
    want = reference.LOSSES[op](h.double(), y.double(), *grids)
    want_h, want_y = reference.loss_gradients(op, grad.double(), h.double(), y.double(), *grids, True, True)
    assert rel_rmse(out, want) < 1e-5
    assert rel_rmse(grad_h, want_h) < tol and rel_rmse(grad_y, want_y) < tol


def test_gram_and_tiled_agree_at_scale():
    """A size where both paths run many blocks (N = 1369, D = 24: Gram is the automatic choice)."""
    h, y = random_case(1, (37, 37), (37, 37), 24, dtype=torch.float32, seed=6)
    y = (h + 0.3 * y).contiguous()  # partly aligned, as trained features are
    grids = [[37, 37]] * 3
    tiled = run_ext("urepa", h, y, grids, "tiled")
    gram = run_ext("urepa", h, y, grids, "gram")
    truth = reference.LOSSES["urepa"](h.double(), y.double(), *grids)
    truth_h, _ = reference.loss_gradients("urepa", tiled[3].double(), h.double(), y.double(), *grids, True, False)
    for out, grad_h, _, _ in (tiled, gram):
        assert rel_rmse(out, truth) < 1e-5
        assert rel_rmse(grad_h, truth_h) < 1e-5


def test_no_gradient_to_frozen_y():
    h, y = random_case(2, (4, 4), (5, 5), 7, dtype=torch.float32)
    grad_h, grad_y = ext.backward("urepa", torch.ones(2, 2), h, y, [4, 4], [5, 5], [4, 4], True, False)
    assert grad_y is None and grad_h.shape == h.shape
    h.requires_grad_(True)
    rf.urepa_loss(h, y, backend="cpp")[0].backward()
    assert h.grad is not None and y.grad is None


@pytest.mark.parametrize("op", OPS)
def test_deterministic(op):
    """Bit-identical runs, whatever the number of threads: the block partition and every reduction order are
    fixed, and the backward gathers instead of using atomics."""
    h, y = random_case(2, (30, 30), (37, 37), 40, dtype=torch.float32, seed=12)
    grids = [[30, 30], [37, 37], [37, 37]]
    threads = torch.get_num_threads()
    for method in METHODS:
        first = run_ext(op, h, y, grids, method)
        second = run_ext(op, h, y, grids, method)
        try:
            torch.set_num_threads(1)
            single = run_ext(op, h, y, grids, method)
        finally:
            torch.set_num_threads(threads)
        for a, b, c in zip(first, second, single):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_clear_errors():
    h, y = random_case(2, (4, 4), (4, 4), 5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="op must be"):
        ext.forward("cos", h, y, [4, 4], [4, 4], [4, 4])
    with pytest.raises(RuntimeError, match="method must be"):
        ext.forward("cosine", h, y, [4, 4], [4, 4], [4, 4], "fast")
    with pytest.raises(RuntimeError, match="h_grid"):
        ext.forward("cosine", h, y, [3, 4], [4, 4], [4, 4])
    with pytest.raises(RuntimeError, match="same width D"):
        ext.forward("cosine", h, y[..., :4], [4, 4], [4, 4], [4, 4])
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ext.backward("urepa", torch.ones(1, 2), h, y, [4, 4], [4, 4], [4, 4], True, False)


def test_auto_picks_cpp_on_cpu():
    assert "cpp" in rf.available_backends("cpu")
    assert dispatch.default_backend(torch.device("cpu")) == "cpp"
    h, y = random_case(2, (4, 4), (5, 5), 7, dtype=torch.float32)
    auto = rf.urepa_loss(h, y, reduction="none")
    cpp = rf.urepa_loss(h, y, reduction="none", backend="cpp")
    for a, b in zip(auto, cpp):
        assert torch.equal(a, b)

"""The public API: names, keywords, grid/align resolution, dtypes, backends, errors, torch.compile."""

import pytest
import torch

import repa_fused as rf
from repa_fused.ops.grids import resolve_grids

from helpers import independent_losses, rel_rmse


def make(b=2, n_h=16, n_y=25, d=7, dtype=torch.float32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n_h, d, generator=g).to(dtype).requires_grad_(grad)
    y = torch.randn(b, n_y, d, generator=g).to(dtype)
    return h, y


@pytest.mark.parametrize(
    "n_h,n_y,h_grid,y_grid,align,expected",
    [
        (16, 25, None, None, "min", ((4, 4), (5, 5), (4, 4))),
        (25, 16, None, None, "min", ((5, 5), (4, 4), (4, 4))),
        (16, 16, (2, 8), None, "min", ((2, 8), (4, 4), (2, 8))),   # tie goes to h
        (16, 25, None, None, "y", ((4, 4), (5, 5), (5, 5))),
        (25, 16, None, None, "h", ((5, 5), (4, 4), (5, 5))),
        (16, 25, None, None, (3, 7), ((4, 4), (5, 5), (3, 7))),
        (12, 12, None, None, "min", ((12, 1), (12, 1), (12, 1))),  # same unknown layout: identity
        (12, 20, (3, 4), (4, 5), "y", ((3, 4), (4, 5), (4, 5))),
        (12, 12, (3, 4), None, "min", ((3, 4), (3, 4), (3, 4))),    # one count, one known layout
        (12, 12, None, (2, 6), "y", ((2, 6), (2, 6), (2, 6))),
    ],
)
def test_resolve_grids(n_h, n_y, h_grid, y_grid, align, expected):
    assert resolve_grids(n_h, n_y, h_grid, y_grid, align) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_losses_match_independent_formula(dtype):
    h, y = make(dtype=dtype)
    cosine, manifold = independent_losses(h.detach(), y, (4, 4), (5, 5), (4, 4))
    out = rf.cosine_alignment_loss(h, y, reduction="none", backend="reference")
    assert out.dtype == torch.float32 and out.shape == (2,)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_rmse(out, cosine) < tol
    assert rel_rmse(rf.manifold_loss(h, y, reduction="none", backend="reference"), manifold) < tol
    total, alignment, man = rf.urepa_loss(h, y, manifold_weight=2.5, backend="reference")
    assert all(t.dtype == torch.float32 and t.dim() == 0 for t in (total, alignment, man))
    torch.testing.assert_close(total, alignment + 2.5 * man)
    assert rel_rmse(alignment, cosine.mean()) < tol and rel_rmse(man, manifold.mean()) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_in_input_dtype_and_to_y_when_required(dtype):
    h, y = make(dtype=dtype)
    y.requires_grad_(True)
    total, _, _ = rf.urepa_loss(h, y, backend="reference")
    total.backward()
    assert h.grad.dtype == dtype and y.grad.dtype == dtype
    assert h.grad.shape == h.shape and y.grad.shape == y.shape
    # The gradient equals autograd straight through the eager math.
    h2 = h.detach().double().requires_grad_(True)
    y2 = y.detach().double().requires_grad_(True)
    cos, man = independent_losses(h2, y2, (4, 4), (5, 5), (4, 4))
    (cos.mean() + 3.0 * man.mean()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_rmse(h.grad, h2.grad) < tol and rel_rmse(y.grad, y2.grad) < tol


def test_no_grad_to_frozen_y():
    h, y = make()
    rf.cosine_alignment_loss(h, y).backward()
    assert y.grad is None and h.grad is not None


@pytest.mark.parametrize("loss", ["cosine", "manifold", "urepa"])
def test_mean_is_the_mean_of_none_on_every_backend(loss):
    """reduction="mean" takes the batch mean inside the op (fused where a backend can): the same value and
    gradients as reduction="none" followed by .mean()."""
    fn = {"cosine": rf.cosine_alignment_loss, "manifold": rf.manifold_loss,
          "urepa": lambda h, y, **kw: rf.urepa_loss(h, y, **kw)[0]}[loss]
    h0, y0 = make()
    for backend in rf.available_backends("cpu"):
        if backend == "triton":
            continue  # covered by the kernel tests; the interpreter is slow
        grads = []
        for reduction in ("mean", "none"):
            h, y = h0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
            out = fn(h, y, reduction=reduction, backend=backend)
            out = out if reduction == "mean" else out.mean()
            assert out.shape == ()
            (2.5 * out).backward()
            grads.append((out.detach(), h.grad, y.grad))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_float64_auto_runs_the_reference(monkeypatch):
    """float64 has no fused kernel: "auto" must not hand it to the device's fused backend."""
    from repa_fused.ops import dispatch

    def fused_only(*args):
        raise AssertionError("the fused backend was called")

    monkeypatch.setattr(dispatch, "default_backend", lambda device: "cpp")
    monkeypatch.setitem(dispatch.BACKENDS["cpp"].ops, "cosine", fused_only)
    h, y = make(dtype=torch.float64)
    out = rf.cosine_alignment_loss(h, y, reduction="none")
    assert out.dtype == torch.float64
    monkeypatch.undo()
    torch.testing.assert_close(out, rf.cosine_alignment_loss(h, y, reduction="none", backend="reference"))


def test_available_backends():
    backends = rf.available_backends("cpu")
    assert backends[0] == "reference" and set(backends) <= {"reference", "triton", "cpp"}
    assert rf.available_backends(torch.device("cpu")) == backends


BAD_INPUTS = [
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(3, 16, 7)), ValueError, "batch size"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 8)), ValueError, "width D"),
    (dict(h=torch.randn(16, 7), y=torch.randn(2, 16, 7)), ValueError, "h must be 3-D"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7, 1)), ValueError, "y must be 3-D"),
    (dict(h=torch.randint(0, 5, (2, 16, 7)), y=torch.randn(2, 16, 7)), TypeError, "h must be float"),
    (dict(h=torch.randn(2, 16, 7), y=torch.ones(2, 16, 7, dtype=torch.bool)), TypeError, "y must be float"),
    (dict(h=[1.0], y=torch.randn(2, 16, 7)), TypeError, "h must be a torch.Tensor"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7), h_grid=(3, 5)), ValueError, "h_grid=(3, 5)"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7), y_grid=(4, 0)), ValueError, "y_grid"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7), y_grid="4x4"), ValueError, "y_grid"),
    (dict(h=torch.randn(2, 12, 7), y=torch.randn(2, 16, 7)), ValueError, "h_grid is needed"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 10, 7)), ValueError, "y_grid is needed"),
    (dict(h=torch.randn(2, 12, 7), y=torch.randn(2, 12, 7), align=(3, 4)), ValueError, "h_grid is needed"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7), align="max"), ValueError, "align"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7), align=(2, -1)), ValueError, "align"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7), reduction="sum"), ValueError, "reduction"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7), backend="cuda"), ValueError, "backend"),
    (dict(h=torch.randn(2, 16, 7), y=torch.randn(2, 16, 7, device="meta")), ValueError, "same device"),
    (dict(h=torch.randn(2, 0, 7), y=torch.randn(2, 16, 7)), ValueError, "B, N, D"),
]


@pytest.mark.parametrize("loss", [rf.cosine_alignment_loss, rf.manifold_loss, rf.urepa_loss])
@pytest.mark.parametrize("kwargs,error,message", BAD_INPUTS)
def test_bad_input_errors(loss, kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        loss(**kwargs)


def test_backend_not_available_on_device(monkeypatch):
    from repa_fused.ops import dispatch

    h, y = make()
    monkeypatch.setattr(dispatch.BACKENDS["cpp"], "devices", ())
    with pytest.raises(ValueError, match="backend='cpp' is not available on device cpu"):
        rf.cosine_alignment_loss(h, y, backend="cpp")


def test_available_backends_per_device():
    assert rf.available_backends("meta") == ["reference"]
    if not torch.cuda.is_available():
        assert rf.available_backends("cuda") == []


@pytest.mark.parametrize("weight,error", [("3", TypeError), (float("nan"), ValueError), (True, TypeError)])
def test_bad_manifold_weight(weight, error):
    h, y = make()
    with pytest.raises(error, match="manifold_weight"):
        rf.urepa_loss(h, y, manifold_weight=weight)


@pytest.mark.slow
def test_compile_default_backend_resampled_backward():
    """Inductor checks the backward's strides against the fake: the reference backward must match."""
    h, y = make(n_h=16, n_y=9, d=5)

    def step(h, y):
        return rf.manifold_loss(h, y, backend="reference", align="y")

    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(h, y)
    (grad,) = torch.autograd.grad(out, h)
    ref = step(h, y)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, h)[0])



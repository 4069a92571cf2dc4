"""The Triton manifold / U-REPA kernels (kernels/manifold.py) against the reference.

On CPU they run under TRITON_INTERPRET=1 (conftest) with 16-wide tiles, so the shapes below cross tile
edges (N = 35 > 2·16, D prime) and the persistent backward takes several items per program. Both
algorithms (tiled, gram) are forced in turn through ``manifold.ALGORITHM``.
"""

import pytest
import torch

import repa_fused as rf
from repa_fused.ops import dispatch, reference
from repa_fused.ops.grids import resolve_grids

from helpers import ODD_CASES, independent_losses, rel_rmse

manifold = pytest.importorskip("repa_fused.kernels.manifold")

pytestmark = pytest.mark.skipif("triton" not in rf.available_backends("cuda" if torch.cuda.is_available()
                                                                         else "cpu"),
                                reason="triton backend unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter converts fp32 to bf16/fp16 by truncation (a 2^-9 bias in every stored Ĥ): looser on CPU.
HALF_TOL = 1e-2 if DEVICE == "cuda" else 2e-2
ALGORITHMS = ["tiled", "gram"]


@pytest.fixture(params=ALGORITHMS)
def algorithm(request, monkeypatch):
    monkeypatch.setattr(manifold, "ALGORITHM", request.param)
    return request.param


def tokens(b, grid, d, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, grid[0] * grid[1], d, generator=g).to(device=device, dtype=dtype)


def check_op(op, h, y, grids, tol, grad_y=True):
    """Values and both gradients of backend "triton"'s ``op`` against the reference, weighted by a random
    upstream gradient (each row of the (T, B) output gets its own)."""
    h = h.detach().requires_grad_(True)
    y = y.detach().requires_grad_(grad_y)
    out = dispatch.BACKENDS["triton"].ops[op](h, y, *grids)
    ref = reference.LOSSES[op](h.detach(), y.detach(), *grids)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_rmse(out, ref) < tol, (out, ref)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * weight).sum().backward()
    ref_h, ref_y = reference.loss_gradients(op, weight, h.detach(), y.detach(), *grids, True, grad_y)
    assert h.grad.dtype == h.dtype and h.grad.shape == h.shape
    assert rel_rmse(h.grad, ref_h) < tol
    if grad_y:
        assert y.grad.dtype == y.dtype and y.grad.shape == y.shape
        assert rel_rmse(y.grad, ref_y) < tol


@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_urepa_odd_shapes_fp32(case, algorithm):
    b, h_grid, y_grid, d, align = case
    h, y = tokens(b, h_grid, d, seed=2), tokens(b, y_grid, d, seed=3)
    grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
    check_op("urepa", h, y, grids, 1e-5)


@pytest.mark.parametrize("algorithm", ALGORITHMS, indirect=True)
def test_manifold_tile_edges_fp32(algorithm):
    # N = 35 target tokens (3 row tiles of 16, the last partial), D = 29: the persistent backward
    # takes 6 items on 3 programs; y is downsampled (4 taps per target token, wide adjoint runs).
    h, y = tokens(2, (5, 7), 29, seed=4), tokens(2, (9, 11), 29, seed=5)
    check_op("manifold", h, y, ((5, 7), (9, 11), (5, 7)), 1e-5)


@pytest.mark.parametrize("op,dtype", [("manifold", torch.bfloat16), ("urepa", torch.bfloat16),
                                      ("urepa", torch.float16)])
def test_half_precision(op, dtype, algorithm):
    h, y = tokens(2, (4, 5), 23, dtype, seed=6), tokens(2, (6, 6), 23, dtype, seed=7)
    check_op(op, h, y, ((4, 5), (6, 6), (6, 6)), HALF_TOL)


def test_mixed_dtypes_compute_in_the_wider_one():
    h, y = tokens(2, (4, 4), 17, torch.bfloat16, seed=8), tokens(2, (4, 4), 17, torch.float32, seed=9)
    check_op("urepa", h, y, ((4, 4), (4, 4), (4, 4)), HALF_TOL)


def test_zero_vectors(algorithm):
    # Zero tokens normalise to zero and take the normaliser's x/eps branch in backward (huge but finite
    # gradients, as the reference); the interpolated grid mixes them with their neighbours.
    h, y = tokens(2, (4, 4), 11, seed=10), tokens(2, (5, 5), 11, seed=11)
    h[0, 3] = 0.0
    h[1, :5] = 0.0
    y[1, 7] = 0.0
    for grids in (((4, 4), (5, 5), (4, 4)), ((4, 4), (5, 5), (5, 5))):
        check_op("urepa", h, y, grids, 1e-5)


def test_public_api_reduction_none_matches_independent_formula():
    h, y = tokens(3, (3, 4), 13, seed=12), tokens(3, (4, 5), 13, seed=13)
    cos, man = independent_losses(h, y, (3, 4), (4, 5), (4, 5))
    total, alignment, manifold_ = rf.urepa_loss(h, y, h_grid=(3, 4), y_grid=(4, 5), align="y",
                                                reduction="none", backend="triton")
    assert alignment.shape == (3,) and rel_rmse(alignment, cos) < 1e-5 and rel_rmse(manifold_, man) < 1e-5
    torch.testing.assert_close(total, alignment + 3.0 * manifold_)
    single = rf.manifold_loss(h, y, h_grid=(3, 4), y_grid=(4, 5), align="y", backend="triton")
    assert rel_rmse(single, man.mean()) < 1e-5


def test_gram_falls_back_when_it_would_cancel(monkeypatch):
    # h = y: every term of the Gram identity is large and the loss is 0: the forward must not report
    # the rounding residue of the subtraction.
    monkeypatch.setattr(manifold, "ALGORITHM", "gram")
    h = tokens(2, (4, 4), 16, seed=14)
    out = manifold.manifold_forward(h, h.clone(), (4, 4), (4, 4), (4, 4))
    assert out.abs().max().item() < 1e-12


def test_cost_model_and_setting(monkeypatch):
    monkeypatch.setattr(manifold, "ALGORITHM", "auto")
    assert manifold.choose_algorithm(37 * 37, 1536) == "tiled"              # SDXL on DINOv2's grid
    assert manifold.choose_algorithm(64 * 64, 1024, backward=True) == "gram"  # high resolution
    assert manifold.choose_algorithm(16, 1024) == "tiled"
    monkeypatch.setattr(manifold, "ALGORITHM", "fastest")
    with pytest.raises(ValueError, match="REPA_FUSED_MANIFOLD_ALGO"):
        manifold.choose_algorithm(16, 16)


def test_deterministic():
    h, y = tokens(2, (5, 5), 19, seed=15), tokens(2, (6, 6), 19, seed=16)
    grad = torch.randn(2, 2, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    first = manifold.urepa_backward(grad, h, y, (5, 5), (6, 6), (6, 6), True, True)
    second = manifold.urepa_backward(grad, h, y, (5, 5), (6, 6), (6, 6), True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("op", ["manifold", "urepa"])
def test_opcheck(op):
    h = tokens(2, (3, 3), 7, seed=17).requires_grad_(True)
    y = tokens(2, (4, 4), 7, seed=18).requires_grad_(True)
    torch.library.opcheck(dispatch.BACKENDS["triton"].ops[op].custom_op, (h, y, [3, 3], [4, 4], [4, 4]))


def test_compile_fullgraph():
    h = tokens(2, (3, 3), 7, seed=19).requires_grad_(True)
    y = tokens(2, (4, 4), 7, seed=20)

    def loss(h, y):
        total, _, _ = rf.urepa_loss(h, y, align="y", backend="triton")
        return total

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = compiled(h, y)
    out.backward()
    grad = h.grad.clone()
    h.grad = None
    ref = rf.urepa_loss(h, y, align="y", backend="reference")[0]
    ref.backward()
    assert rel_rmse(out, ref) < 1e-5 and rel_rmse(grad, h.grad) < 1e-5


# --------------------------------------------------------------------------------------------------
# GPU, realistic sizes.


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, (32, 32), (37, 37), 1536, "y"), (1, (64, 64), (64, 64), 1024, "y"),
                                   (2, (16, 16), (37, 37), 768, "min")], ids=["sdxl", "n4096", "down"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_realistic(shape, dtype, algorithm):
    b, h_grid, y_grid, d, align = shape
    h, y = tokens(b, h_grid, d, dtype, seed=21), tokens(b, y_grid, d, dtype, seed=22)
    # Correlated features (a shared component, as real encoder tokens have) make the Gram path cancel.
    h = h + 2.0 * h.mean(1, keepdim=True)
    y = y + 2.0 * y.mean(1, keepdim=True)
    grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
    check_op("urepa", h, y, grids, 1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.cuda
def test_cuda_fp32_ieee_when_tf32_is_off(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(manifold, "ALGORITHM", "tiled")
    h, y = tokens(2, (24, 24), 384, seed=23), tokens(2, (24, 24), 384, seed=24)
    check_op("urepa", h, y, ((24, 24), (24, 24), (24, 24)), 1e-5)


@pytest.mark.cuda
def test_cuda_peak_memory_sdxl():
    # No N² term: the fused forward+backward stays within 1.5× the bytes of h + y + grad h.
    h = tokens(16, (32, 32), 1536, torch.bfloat16, seed=25).requires_grad_(True)
    y = tokens(16, (37, 37), 1536, torch.bfloat16, seed=26)
    budget = 1.5 * (2 * h.numel() + y.numel()) * h.element_size()
    rf.urepa_loss(h, y, align="y", backend="triton")[0].backward()  # compile outside the measurement
    h.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rf.urepa_loss(h, y, align="y", backend="triton")[0].backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= budget

"""The Triton manifold / U-REPA kernels (kernels/manifold.py) against the reference.

On CPU they run under TRITON_INTERPRET=1 (conftest) with 16-wide tiles and a workspace of a few KB, so
the shapes below cross tile edges (N = 35 > 2·16, D prime) and the panels and Gram chunks take several
rounds. Each algorithm is forced through the entry points' ``algorithm`` argument.
"""

import dataclasses
import random

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
HALF_TOL = 1e-2
ALGORITHMS = ["tiled-symmetric", "tiled-rows", "gram"]


def tokens(b, grid, d, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, grid[0] * grid[1], d, generator=g).to(device=device, dtype=dtype)


def fused(op, h, y, grids, weight, algorithm, grad_y=True):
    """(losses (T, B), ∂/∂h, ∂/∂y | None) of Σ weight·losses by the kernels' entry points (the op's own
    forward and backward, as ops.define_loss_op calls them)."""
    forward = manifold.urepa_forward if op == "urepa" else manifold.manifold_forward
    out, saved, part_h, part_y = forward(h, y, *grids, needs_h=True, needs_y=grad_y, algorithm=algorithm)
    if op == "urepa":
        grads = manifold.urepa_backward(weight, h, y, *grids, True, grad_y, saved=saved, parts=(part_h, part_y))
    else:
        grads = manifold.manifold_backward(weight, h, y, *grids, True, grad_y, parts=(part_h, part_y))
    return out, *grads


def errors(op, h, y, grids, algorithm, grad_y=True, seed=1):
    """Relative RMSE of the losses and both gradients against the reference in fp64 (from the same
    inputs), weighted by a random upstream gradient."""
    ref = reference.LOSSES[op](h.double(), y.double(), *grids)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(h.device)
    out, grad_h, grad_y_ = fused(op, h, y, grids, weight, algorithm, grad_y)
    assert out.shape == ref.shape and out.dtype == torch.float32
    ref_h, ref_y = reference.loss_gradients(op, weight.double(), h.double(), y.double(), *grids, True, grad_y)
    assert grad_h.dtype == h.dtype and grad_h.shape == h.shape
    errs = [rel_rmse(out, ref), rel_rmse(grad_h, ref_h)]
    if grad_y:
        assert grad_y_.dtype == y.dtype and grad_y_.shape == y.shape
        errs.append(rel_rmse(grad_y_, ref_y))
    return errs


def check_op(op, h, y, grids, tol, algorithm="auto", grad_y=True):
    errs = errors(op, h, y, grids, algorithm, grad_y)
    assert max(errs) < tol, errs


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_urepa_odd_shapes_fp32(case, algorithm):
    b, h_grid, y_grid, d, align = case
    h, y = tokens(b, h_grid, d, seed=2), tokens(b, y_grid, d, seed=3)
    grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
    check_op("urepa", h, y, grids, 1e-5, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_manifold_tile_edges_fp32(algorithm):
    # N = 35 target tokens (3 row tiles of 16, the last partial), D = 29: the panels take several rounds,
    # the Gram path several chunks; y is downsampled (4 taps per target token, wide adjoint runs).
    h, y = tokens(3, (5, 7), 29, seed=4), tokens(3, (9, 11), 29, seed=5)
    check_op("manifold", h, y, ((5, 7), (9, 11), (5, 7)), 1e-5, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op,dtype", [("manifold", torch.bfloat16), ("urepa", torch.float16)])
def test_half_precision(op, dtype, algorithm):
    h, y = tokens(2, (4, 5), 23, dtype, seed=6), tokens(2, (6, 6), 23, dtype, seed=7)
    check_op(op, h, y, ((4, 5), (6, 6), (6, 6)), HALF_TOL, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fuzz_bf16_against_fp64(algorithm):
    # Random small shapes, every align mode: loss and both gradients within 1e-2 of fp64.
    rng = random.Random(f"fuzz-{algorithm}")
    for trial in range(6):
        b, d = rng.randint(1, 3), rng.choice([1, 2, rng.randint(3, 70)])
        h_grid = (rng.randint(1, 12), rng.randint(1, 12))
        y_grid = (rng.randint(1, 12), rng.randint(1, 12))
        align = rng.choice(["min", "y", "h", (rng.randint(1, 12), rng.randint(1, 12))])
        h = tokens(b, h_grid, d, torch.bfloat16, seed=100 + trial)
        y = tokens(b, y_grid, d, torch.bfloat16, seed=200 + trial)
        grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
        errs = errors("urepa", h, y, grids, algorithm)
        if d == 1:  # the normaliser's gradient of a 1-D token is exactly 0: compare absolutely
            assert errs[0] < 1e-2
            continue
        assert max(errs) < 1e-2, (trial, b, h_grid, y_grid, d, align, errs)


def test_mixed_dtypes_compute_in_the_wider_one():
    h, y = tokens(2, (4, 4), 17, torch.bfloat16, seed=8), tokens(2, (4, 4), 17, torch.float32, seed=9)
    check_op("urepa", h, y, ((4, 4), (4, 4), (4, 4)), HALF_TOL)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_vectors(algorithm):
    # Zero tokens normalise to zero and take the normaliser's x/eps branch (huge but finite gradients, as
    # the reference); the interpolated grid mixes them with their neighbours.
    h, y = tokens(2, (4, 4), 11, seed=10), tokens(2, (5, 5), 11, seed=11)
    h[0, 3] = 0.0
    h[1, :5] = 0.0
    y[1, 7] = 0.0
    for grids in (((4, 4), (5, 5), (4, 4)), ((4, 4), (5, 5), (5, 5))):
        check_op("urepa", h, y, grids, 1e-5, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_huge_inputs_scale_invariant(algorithm):
    # Elements ~1e19: the squared norm overflows fp32, the normalised tokens do not.
    h, y = tokens(2, (3, 4), 9, seed=12), tokens(2, (4, 4), 9, seed=13)
    grids = ((3, 4), (4, 4), (4, 4))
    small, _, _, _ = manifold.urepa_forward(h, y, *grids, algorithm=algorithm)
    huge, _, _, _ = manifold.urepa_forward(h * 1e19, y * 3e18, *grids, algorithm=algorithm)
    assert torch.isfinite(huge).all() and rel_rmse(huge, small) < 1e-5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fp16_tiny_h_has_no_inf_gradient(algorithm):
    h = (tokens(2, (4, 4), 19, seed=14) * 1e-6).half()
    y = tokens(2, (5, 5), 19, torch.float16, seed=15)
    grids = ((4, 4), (5, 5), (5, 5))
    weight = torch.ones(2, 2, device=DEVICE)
    _, grad_h, grad_y = fused("urepa", h, y, grids, weight, algorithm)
    ref_h, _ = reference.loss_gradients("urepa", weight.double(), h.double(), y.double(), *grids, True, False)
    finite = torch.isfinite(ref_h.half())
    assert torch.isfinite(grad_h[finite]).all() and torch.isfinite(grad_y).all()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gram_and_tiled_exact_when_h_equals_y(algorithm):
    # h = y: the loss is 0. The Gram identity ‖ĤᵀĤ‖² + ‖ŶᵀŶ‖² − 2‖ĤᵀŶ‖² would report its rounding
    # residue; the form with Δ = Ĥ − Ŷ = 0 gives 0 and a zero gradient.
    h = tokens(2, (4, 4), 16, seed=16)
    out, grad_h, _ = fused("manifold", h, h.clone(), ((4, 4),) * 3, torch.ones(1, 2, device=DEVICE), algorithm,
                           grad_y=False)
    assert out.abs().max().item() < 1e-12 and grad_h.abs().max().item() < 1e-9


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", ["manifold", "urepa"])
def test_gradient_to_y_alone(op, algorithm):
    """Only y needs a gradient (an encoder trained with the loss): the y part alone, on a resampled y."""
    h, y = tokens(2, (5, 4), 11, seed=40), tokens(2, (3, 3), 11, seed=41)
    grids = (h_grid, y_grid, target) = ((5, 4), (3, 3), (5, 4))
    ref = reference.LOSSES[op](h.double(), y.double(), *grids)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(42)).to(h.device)
    forward = manifold.urepa_forward if op == "urepa" else manifold.manifold_forward
    out, saved, part_h, part_y = forward(h, y, *grids, needs_y=True, algorithm=algorithm)
    assert part_h is None and part_y.shape == (2, 20, 11)
    if op == "urepa":
        grad_h, grad_y = manifold.urepa_backward(weight, h, y, *grids, False, True, saved=saved, parts=(None, part_y))
    else:
        grad_h, grad_y = manifold.manifold_backward(weight, h, y, *grids, False, True, parts=(None, part_y))
    _, ref_y = reference.loss_gradients(op, weight.double(), h.double(), y.double(), *grids, False, True)
    assert grad_h is None and grad_y.shape == y.shape
    assert rel_rmse(out, ref) < 1e-5 and rel_rmse(grad_y, ref_y) < 1e-5


@pytest.mark.parametrize("dim", [13, 16])  # pointer loads, TMA
def test_symmetric_product_with_k_steps_below_the_tile(monkeypatch, dim):
    """The GPU's ratio, 128-wide panel tiles read in 64-wide K steps (here 32 and 16): the symmetric product's
    transposed walk stops at its row tile; a K step that does not divide the tile is refused."""
    interpreter_tiles = manifold.Tiles.current()
    h, y = tokens(2, (7, 9), dim, seed=43), tokens(2, (7, 9), dim, seed=44)
    grids = ((7, 9),) * 3
    monkeypatch.setattr(manifold.Tiles, "current", classmethod(
        lambda cls, element_size=2: dataclasses.replace(interpreter_tiles, panel_block=32, prod_block_k=16,
                                                        workspace_bytes=2**20)))
    assert max(errors("manifold", h, y, grids, "tiled-symmetric")) < 1e-5
    monkeypatch.setattr(manifold.Tiles, "current", classmethod(
        lambda cls, element_size=2: dataclasses.replace(interpreter_tiles, prod_block_k=32)))
    with pytest.raises(ValueError, match="prod_block_k"):
        errors("manifold", h, y, grids, "tiled-symmetric")


def _with_tma(monkeypatch, tma: bool):
    cfg = manifold.Tiles.current()
    monkeypatch.setattr(manifold.Tiles, "current", classmethod(
        lambda cls, element_size=2: dataclasses.replace(cfg, tma=tma)))


def test_tma_only_where_rows_are_16_byte_aligned():
    cfg = manifold.Tiles.current()
    z = torch.empty(1, 1, 2 * 16, device=DEVICE)
    assert manifold._tma(cfg, z) == (DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9)
    assert not manifold._tma(cfg, torch.empty(1, 1, 2 * 13, device=DEVICE))
    assert not manifold._tma(cfg, torch.empty(1, 1, 2 * 12, dtype=torch.bfloat16, device=DEVICE))  # 24 bytes
    assert not manifold._tma(dataclasses.replace(cfg, tma=False), z)


@pytest.mark.parametrize("dtype,dim", [(torch.float32, 16), (torch.float32, 40), (torch.bfloat16, 24)])
@pytest.mark.parametrize("algorithm", ["tiled-symmetric", "tiled-rows", "loss-only"])
def test_tma_and_pointer_loads_agree(algorithm, dtype, dim, monkeypatch):
    """The tl.dot kernels' two ways to load (TMA descriptors over all images' rows, which read the next
    image's tokens past N; masked pointer loads) give the same loss and gradients, on 3 images whose N (63)
    is no multiple of the tile, with D over several K steps and D chunks (40) and in bf16."""
    h, y = tokens(3, (7, 9), dim, dtype, seed=45), tokens(3, (7, 9), dim, dtype, seed=46)
    h[1, 5] = 0.0  # a zero token among them
    grids = ((7, 9),) * 3
    assert manifold._tma(manifold.Tiles.current(), torch.empty(1, 1, 2 * dim, dtype=dtype, device=DEVICE))
    runs = []
    for tma in (True, False):
        _with_tma(monkeypatch, tma)
        if algorithm == "loss-only":
            runs.append(manifold.manifold_forward(h, y, *grids, algorithm="tiled")[:1])
        else:
            out, _, part_h, part_y = manifold.manifold_forward(h, y, *grids, needs_h=True, needs_y=True,
                                                               algorithm=algorithm)
            runs.append((out, part_h, part_y))
    for by_tma, by_pointer in zip(*runs):
        torch.testing.assert_close(by_tma, by_pointer, rtol=1e-6, atol=1e-9)
    ref = reference.LOSSES["manifold"](h.double(), y.double(), *grids)
    assert rel_rmse(runs[0][0], ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("algorithm", ["tiled-symmetric", "tiled-rows"])
def test_a_non_finite_image_leaves_its_neighbours_finite(algorithm, monkeypatch):
    """An inf in image 1's first token (the rows image 0's last tiles read past its N by TMA): images 0 and 2
    keep their finite losses and gradients, the same by either load."""
    h, y = tokens(3, (7, 9), 16, seed=47), tokens(3, (7, 9), 16, seed=48)
    h[1, 0, 3] = float("inf")
    grids = ((7, 9),) * 3
    runs = []
    for tma in (True, False):
        _with_tma(monkeypatch, tma)
        out, _, part_h, part_y = manifold.manifold_forward(h, y, *grids, needs_h=True, needs_y=True,
                                                           algorithm=algorithm)
        runs.append([x[..., [0, 2], :, :] if x.dim() == 3 else x[:, [0, 2]] for x in (out, part_h, part_y)])
    for by_tma, by_pointer in zip(*runs):
        assert torch.isfinite(by_tma).all()
        torch.testing.assert_close(by_tma, by_pointer, rtol=1e-6, atol=1e-9)


def test_small_panel_tiles_where_large_ones_leave_multiprocessors_idle():
    """The GPU tile choice (for_panels; the interpreter always takes its own 16-wide tiles): 64-wide panel
    tiles below one program per multiprocessor with 128-wide ones, as measured on the H200 (132 of them)."""
    gpu = manifold.Tiles()
    assert gpu.sized_for(4, 16 * 16, 132).panel_block == 64     # 4·2² = 16 programs of 128-wide tiles
    assert gpu.sized_for(16, 8 * 8, 132).panel_block == 64      # sd15_min: 16
    assert gpu.sized_for(4, 32 * 32, 132).panel_block == 128    # 4·8² = 256
    assert gpu.sized_for(16, 37 * 37, 132).panel_block == 128   # sdxl_y
    small = gpu.sized_for(1, 16, 132)
    assert small.panel_block % small.prod_block_k == 0 and small.prod_block_d == gpu.small_prod_block_d


def test_gram_factor_stays_in_float16_range():
    """The Gram factor's entries are sums over N tokens: scaled by 1/N they stay finite in float16 (rows of 8
    here: blocks of 64·N = 65536 at N = 1024, past float16's 65504)."""
    batch, n_tokens, dim = 1, 1024, 136
    runs = []
    for dtype in (torch.float16, torch.float32):
        z = torch.full((batch, n_tokens, 2 * dim), 8.0, dtype=dtype, device=DEVICE)
        prep = manifold._Prepared(z, torch.ones(manifold.N_STATS, batch, n_tokens, device=DEVICE))
        buf = torch.empty(batch, n_tokens, dim, device=DEVICE)
        partial = manifold._gram_loss_and_grads(prep, [(0, buf)])
        runs.append((buf, partial))
    (half, half_partial), (full, full_partial) = runs
    assert torch.isfinite(half).all() and torch.isfinite(half_partial).all()
    # X = Δ = 8: every block entry is 64·N, so Σ partials = (1/2N²)·D²·2·(64N)² = 4096·D²
    assert half_partial.sum().item() == pytest.approx(4096 * dim**2, rel=1e-5)
    assert full.abs().max() > 0 and rel_rmse(half, full) < 1e-2


def test_cost_model_and_argument(monkeypatch):
    assert manifold.choose_algorithm(37 * 37, 1536, grads=1) == "tiled"      # SDXL on DINOv2's grid
    assert manifold.choose_algorithm(64 * 64, 1024, grads=1, batch=8) == "gram"       # high resolution
    assert manifold.choose_algorithm(64 * 64, 1024, grads=0, batch=8) == "gram"       # 6·N·D² < 2·N²·D
    assert manifold.choose_algorithm(32 * 32, 1024, grads=0, batch=8) == "tiled"      # symmetric tiles
    assert manifold.choose_algorithm(32 * 32, 64, grads=1, batch=1) == "tiled"        # Gram's launches
    assert manifold.choose_algorithm(16, 1024) == "tiled"
    assert manifold.choose_algorithm(16, 1024, algorithm="gram") == "gram"
    with pytest.raises(ValueError, match="algorithm"):
        manifold.choose_algorithm(16, 16, algorithm="fastest")
    with pytest.raises(ValueError, match="grads must be 0, 1 or 2"):
        manifold.choose_algorithm(16, 16, grads=3)
    with pytest.raises(ValueError, match="batch must be ≥ 1"):
        manifold.choose_algorithm(16, 16, batch=0)
    with pytest.raises(ValueError, match="element_size 2 or 4"):
        manifold.choose_algorithm(16, 16, element_size=8)


@pytest.mark.parametrize("target", [(256, 256), (1, 1)])  # Z's offsets, then h's own
def test_offsets_past_int32_are_refused(target):
    """Token × feature offsets within an image are int32 in the kernels: an image past them is refused, by
    the target grid's Z (N·2D) or an input's own (N_h·D), before any memory is taken (stride-0 inputs)."""
    big = torch.zeros(1, 1, 1, device=DEVICE).expand(1, 256 * 256, 2**15)
    small = torch.zeros(1, 1, 1, device=DEVICE).expand(1, 1, 2**15)
    y, y_grid = (big, (256, 256)) if target == (256, 256) else (small, (1, 1))
    with pytest.raises(ValueError, match="int32.*backend='reference'"):
        manifold.manifold_forward(big, y, (256, 256), y_grid, target)


def test_public_api_reduction_none_matches_independent_formula():
    h, y = tokens(3, (3, 4), 13, seed=17), tokens(3, (4, 5), 13, seed=18)
    cos, man = independent_losses(h, y, (3, 4), (4, 5), (4, 5))
    total, alignment, manifold_ = rf.urepa_loss(h, y, h_grid=(3, 4), y_grid=(4, 5), align="y",
                                                reduction="none", backend="triton")
    assert alignment.shape == (3,) and rel_rmse(alignment, cos) < 1e-5 and rel_rmse(manifold_, man) < 1e-5
    torch.testing.assert_close(total, alignment + 3.0 * manifold_)
    single = rf.manifold_loss(h, y, h_grid=(3, 4), y_grid=(4, 5), align="y", backend="triton")
    assert rel_rmse(single, man.mean()) < 1e-5


@pytest.mark.parametrize("op", ["manifold", "urepa"])
def test_public_api_gradients_through_autograd(op):
    # The op's autograd glue: the gradient made in the forward, scaled by the upstream gradient.
    h = tokens(2, (3, 3), 7, seed=19).requires_grad_(True)
    y = tokens(2, (4, 4), 7, seed=20).requires_grad_(True)
    grads = {}
    for backend in ("triton", "reference"):
        h.grad = y.grad = None
        if op == "urepa":
            out = rf.urepa_loss(h, y, align="y", reduction="none", backend=backend)
            (out[1] * torch.tensor([0.3, -2.0]) + 5.0 * out[2]).sum().backward()
        else:
            (rf.manifold_loss(h, y, align="y", backend=backend) * 7.0).backward()
        grads[backend] = (h.grad.clone(), y.grad.clone())
    assert all(rel_rmse(a, b) < 1e-5 for a, b in zip(grads["triton"], grads["reference"]))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_gradient_work_only_where_a_gradient_is_taken(mode, monkeypatch):
    """Through the public API: a forward under no_grad / inference_mode (an evaluation loop) makes no gradient,
    even for an h that requires grad; with grad enabled it makes h's (y is frozen)."""
    asked = []
    terms = manifold.manifold_terms
    monkeypatch.setattr(manifold, "manifold_terms", lambda *a, **k: asked.append(a[5:7]) or terms(*a, **k))
    h = tokens(2, (3, 3), 7, seed=21).requires_grad_(True)
    y = tokens(2, (4, 4), 7, seed=22)
    with mode():
        rf.urepa_loss(h, y, backend="triton")
    assert asked == [(mode is torch.enable_grad, False)]


@pytest.mark.parametrize("op", ["manifold", "urepa"])
def test_custom_op_called_without_needs_then_backward_is_a_clear_error(op):
    h = tokens(2, (3, 3), 7, seed=23).requires_grad_(True)
    y = tokens(2, (3, 3), 7, seed=24)
    custom = dispatch.BACKENDS["triton"].ops[op].custom_op
    losses = custom(h, y, [3, 3], [3, 3], [3, 3], False, False, False)[0]
    with pytest.raises(RuntimeError, match="made no gradient for an input that now needs one"):
        losses.sum().backward()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", ["manifold", "urepa"])
def test_fp16_gradient_survives_a_grad_scaler(op, algorithm):
    """The gradient made in the forward waits for the upstream gradient; under a GradScaler (2^16) its small
    entries must not have been flushed by float16's range before the scale arrives (kept in fp32 meanwhile;
    U-REPA adds it inside the cosine term's backward)."""
    # N = 32² tokens: the gradient's entries, O(1/N²)·(S_h − S_y)Ĥ, sit near float16's subnormals unscaled.
    h = tokens(1, (32, 32), 16, seed=25).to(torch.float16)
    y = tokens(1, (23, 29), 16, seed=26).to(torch.float16)
    grids = ((32, 32), (23, 29), (32, 32))
    # U-REPA: the cosine row at a trainer's share of the scale, the manifold row at the whole of it
    scale = torch.full((1, 1), 65536.0) if op == "manifold" else torch.tensor([[2.0**-4], [1.0]]) * 65536.0
    _, grad_h, grad_y = fused(op, h, y, grids, scale, algorithm)
    ref_h, ref_y = reference.loss_gradients(op, scale.double(), h.double(), y.double(), *grids, True, True)
    assert grad_h.dtype == torch.float16 and grad_y.dtype == torch.float16
    assert rel_rmse(grad_h, ref_h) < 2e-3 and rel_rmse(grad_y, ref_y) < 2e-3


@pytest.mark.parametrize("op", ["manifold", "urepa"])
def test_double_backward_raises(op):
    # A gradient penalty through the fused op would silently add 0: create_graph=True is refused.
    h = tokens(2, (3, 3), 7, seed=23).requires_grad_(True)
    y = tokens(2, (3, 3), 7, seed=24)
    loss = rf.urepa_loss(h, y, backend="triton")[0] if op == "urepa" else rf.manifold_loss(h, y, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("op", ["manifold", "urepa"])
def test_inference_y_changed_in_place_before_backward(op):
    h = tokens(2, (3, 3), 7, seed=27).requires_grad_(True)
    with torch.inference_mode():
        y = tokens(2, (4, 4), 7, seed=28)
    original = y.clone()
    loss = (rf.urepa_loss(h, y, align="y", backend="triton")[0] if op == "urepa"
            else rf.manifold_loss(h, y, align="y", backend="triton"))
    with torch.inference_mode():
        y.mul_(-3.0).add_(1.0)
    loss.backward()
    ref_h = h.grad.clone()
    h.grad = None
    again = (rf.urepa_loss(h, original, align="y", backend="reference")[0] if op == "urepa"
             else rf.manifold_loss(h, original, align="y", backend="reference"))
    again.backward()
    assert rel_rmse(ref_h, h.grad) < 1e-5


def test_deterministic():
    h, y = tokens(2, (5, 5), 19, seed=29), tokens(2, (6, 6), 19, seed=30)
    first = manifold.urepa_forward(h, y, (5, 5), (6, 6), (6, 6), needs_h=True, needs_y=True)
    second = manifold.urepa_forward(h, y, (5, 5), (6, 6), (6, 6), needs_h=True, needs_y=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_compile_fullgraph():
    h = tokens(2, (3, 3), 7, seed=33).requires_grad_(True)
    y = tokens(2, (4, 4), 7, seed=34)

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
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("shape", [(2, (32, 32), (37, 37), 1536, "y"), (1, (64, 64), (64, 64), 1024, "y"),
                                   (2, (16, 16), (37, 37), 768, "min")], ids=["sdxl", "n4096", "down"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_realistic(shape, dtype, algorithm):
    b, h_grid, y_grid, d, align = shape
    h, y = tokens(b, h_grid, d, dtype, seed=35), tokens(b, y_grid, d, dtype, seed=36)
    # Correlated features (a shared component, as real encoder tokens have).
    h = h + 2.0 * h.mean(1, keepdim=True)
    y = y + 2.0 * y.mean(1, keepdim=True)
    grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)
    check_op("urepa", h, y, grids, 1e-2 if dtype == torch.bfloat16 else 2e-3, algorithm)


@pytest.mark.cuda
def test_cuda_fp32_ieee_when_tf32_is_off(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    h, y = tokens(2, (24, 24), 384, seed=37), tokens(2, (24, 24), 384, seed=38)
    check_op("urepa", h, y, ((24, 24), (24, 24), (24, 24)), 1e-5, "tiled")


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["sdxl_y", "sdxl_min", "hires_manifold", "sd15_min"])
def test_cuda_peak_memory(case):
    # No N² term: the fused forward+backward stays within 1.5× the bytes of h + y + grad h.
    from repa_fused.tools import bench as benchmarks

    spec = benchmarks.CASES_BY_NAME[case]
    h, y = benchmarks.make_inputs(spec, "cuda")
    loss = benchmarks.backend_loss(spec, "triton")
    budget = 1.5 * (2 * h.numel() + y.numel()) * h.element_size()
    loss(h, y).backward()  # compile outside the measurement
    h.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss(h, y).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= budget


@pytest.mark.cuda
@pytest.mark.parametrize("side", [16, 37, 64, 96, 128])
def test_cuda_graph_capture_without_host_sync(side):
    # Forward and backward of both ops captured in one CUDA graph, under sync debug mode "error": no host
    # synchronisation anywhere (the Gram path included, which auto takes for the large grids).
    h = tokens(4, (side, side), 1024, torch.bfloat16, seed=39).requires_grad_(True)
    y = tokens(4, (37, 37), 1024, torch.bfloat16, seed=40)

    def step():
        total = rf.urepa_loss(h, y, align="h", backend="triton")[0] + rf.manifold_loss(h, y, align="h",
                                                                                       backend="triton")
        total.backward()

    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side_stream)
    torch.cuda.synchronize()
    h.grad = None
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            step()
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    captured = h.grad.clone()
    h.grad = None
    step()
    assert rel_rmse(captured, h.grad) < 1e-3

"""The fused Triton cosine-alignment kernels against the reference (CPU: under TRITON_INTERPRET=1)."""

import pytest
import torch

import repa_fused as rf
from repa_fused.ops import dispatch, reference
from repa_fused.ops.grids import resolve_grids

from helpers import ODD_CASES, rel_rmse

pytestmark = pytest.mark.skipif("triton" not in dispatch.available_backends("cuda" if torch.cuda.is_available()
                                                                        else "cpu"),
                                reason="triton backend unavailable")

# Beyond the odd cases: D = 77 with resampling on both sides, and D = 300, more than one feature block of
# every kernel, so that all of them tile over D.
WIDE_CASES = [(2, (5, 4), (3, 3), 77, "y"), (2, (3, 3), (4, 2), 300, "min")]
# Grids that take the band backward through several bands of source rows and several column tiles,
# sources that no target reads (downsampling by more than 2), 3 columns read by 40 (the wide-tile plan), and
# both inputs resampled to a third grid (x's band with z's taps).
BAND_CASES = [(1, (19, 70), (7, 37), 5, "y"), (2, (10, 3), (23, 5), 4, "y"), (1, (20, 9), (6, 2), 3, "y"),
              (1, (2, 3), (3, 40), 5, "y"), (2, (9, 20), (12, 7), 6, (9, 7))]
CASES = ODD_CASES + WIDE_CASES + BAND_CASES
LOW_PRECISION_CASES = [ODD_CASES[2], ODD_CASES[5], WIDE_CASES[0], BAND_CASES[0]]


def grids_of(case):
    """(h_grid, y_grid, target_grid) of a case (B, h_grid, y_grid, D, align)."""
    _, h_grid, y_grid, _, align = case
    return resolve_grids(h_grid[0] * h_grid[1], y_grid[0] * y_grid[1], h_grid, y_grid, align)


def make(case, dtype=torch.float32, device="cpu", seed=0, y_dtype=None):
    b, h_grid, y_grid, d, _ = case
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, h_grid[0] * h_grid[1], d, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(b, y_grid[0] * y_grid[1], d, generator=g).to(device=device, dtype=y_dtype or dtype)
    return h, y


def run(backend, h, y, case, weights):
    """Per-sample losses and both gradients of Σ_b weights_b·loss_b through the public API."""
    _, h_grid, y_grid, _, align = case
    h = h.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    losses = rf.cosine_alignment_loss(h, y, h_grid=h_grid, y_grid=y_grid, align=align, reduction="none",
                                      backend=backend)
    (losses * weights).sum().backward()
    return losses.detach(), h.grad, y.grad


def check(case, dtype, tol_loss, tol_grad, device="cpu", y_dtype=None, seed=0):
    h, y = make(case, dtype, device, seed, y_dtype)
    weights = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(seed + 1)).to(device)
    out = run("triton", h, y, case, weights)
    ref = run("reference", h, y, case, weights)
    assert out[0].dtype == torch.float32 and out[0].shape == (h.shape[0],)
    assert out[1].dtype == h.dtype and out[2].dtype == y.dtype
    assert out[1].shape == h.shape and out[2].shape == y.shape
    assert rel_rmse(out[0], ref[0]) < tol_loss
    assert rel_rmse(out[1], ref[1]) < tol_grad and rel_rmse(out[2], ref[2]) < tol_grad


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_matches_reference(case):
    check(case, torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_low_precision_matches_reference(case, dtype):
    # The loss is computed in fp32 from the same rounded inputs by both; the gradients are rounded once.
    check(case, dtype, 1e-5, 1e-2)


def test_cases_take_both_band_loops():
    """The band backward has two loop forms (Triton's pipeliner where rows are downsampled, the hand-pipelined
    loop elsewhere): the cases above take each of them."""
    from repa_fused.kernels import cosine

    stages = set()
    for b, h_grid, y_grid, d, align in CASES:
        grids = resolve_grids(h_grid[0] * h_grid[1], y_grid[0] * y_grid[1], h_grid, y_grid, align)
        for x_grid, z_grid in ((grids[0], grids[1]), (grids[1], grids[0])):
            if x_grid != grids[2]:
                stages.add(cosine._band_plan(b, d, x_grid, z_grid, grids[2], 1, torch.float32,
                                                    torch.float32)[3]["STAGES"])
    assert stages == {1, 3}


def test_mixed_dtypes():
    check(ODD_CASES[3], torch.bfloat16, 1e-5, 1e-2, y_dtype=torch.float32)


def test_saved_scalars_reach_the_backward():
    """The forward's per-token scalars are the op's saved tensor, and the backward uses them."""
    from repa_fused.kernels import cosine

    case = ODD_CASES[3]
    h, y = make(case)
    grids = grids_of(case)
    grad = torch.randn(1, h.shape[0])
    losses, saved = cosine.forward(h, y, *grids)
    assert saved.shape == cosine.saved_shape(h, y, *grids)
    got = cosine.backward(grad, h, y, *grids, True, True, saved=saved)
    ref = reference.loss_gradients("cosine", grad, h, y, *grids, True, True)
    for g, r in zip(got, ref):
        assert rel_rmse(g, r) < 1e-5
    wrong = cosine.backward(grad, h, y, *grids, True, False, saved=torch.zeros_like(saved))[0]
    assert rel_rmse(wrong, ref[0]) > 0.5  # the scalars are really read


def test_float64_is_refused():
    h, y = make(ODD_CASES[1], torch.float64)
    with pytest.raises(TypeError, match="float64"):
        rf.cosine_alignment_loss(h, y, h_grid=(3, 5), y_grid=(3, 5), backend="triton")


def run_mean(backend, h, y, case, weight):
    """The batch-mean loss and both gradients of weight·loss through the public API."""
    _, h_grid, y_grid, _, align = case
    h = h.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    loss = rf.cosine_alignment_loss(h, y, h_grid=h_grid, y_grid=y_grid, align=align, backend=backend)
    (loss * weight).backward()
    return loss.detach(), h.grad, y.grad


def check_mean(case, dtype, tol_grad, device="cpu"):
    h, y = make(case, dtype, device, seed=3)
    out = run_mean("triton", h, y, case, -1.7)
    ref = run_mean("reference", h, y, case, -1.7)
    assert out[0].shape == () and out[0].dtype == torch.float32
    assert rel_rmse(out[0], ref[0]) < 1e-5
    assert rel_rmse(out[1], ref[1]) < tol_grad and rel_rmse(out[2], ref[2]) < tol_grad


MEAN_CASES = [ODD_CASES[0], ODD_CASES[2], BAND_CASES[1], (5, (3, 3), (3, 3), 7, "min")]


@pytest.mark.parametrize("case", MEAN_CASES, ids=str)
def test_batch_mean_in_the_kernels(case):
    """reduction="mean": the forward kernel takes the batch mean and the backward its gradient (no
    reduction launch); both as the reference's mean, and the forward's per-sample values stay right."""
    check_mean(case, torch.float32, 1e-5)
    from repa_fused.kernels import cosine

    h, y = make(case)
    grids = grids_of(case)
    mean, _ = cosine.forward(h, y, *grids, mean=True)
    again, _ = cosine.forward(h, y, *grids, mean=True)  # the batch counter was left at 0
    per_sample, _ = cosine.forward(h, y, *grids)
    assert mean.shape == (1, 1) and torch.equal(mean, again)
    torch.testing.assert_close(mean[0, 0], per_sample.mean(), rtol=1e-6, atol=1e-7)


def test_batch_mean_opcheck_and_compile():
    case = ODD_CASES[3]  # B = 2: the mean's (1, 1) differs from the per-sample (1, B)
    h, y = make(case)
    grids = [list(g) for g in grids_of(case)]
    op = dispatch.BACKENDS["triton"].ops["cosine"].custom_op
    torch.library.opcheck(op, (h.clone().requires_grad_(True), y.clone().requires_grad_(True), *grids, True))

    def loss(h, y):
        _, h_grid, y_grid, _, align = case
        return 3.0 * rf.cosine_alignment_loss(h, y, h_grid=h_grid, y_grid=y_grid, align=align, backend="triton")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    hc = h.clone().requires_grad_(True)
    he = h.clone().requires_grad_(True)
    out = compiled(hc, y)
    torch.testing.assert_close(out, loss(he, y))
    out.backward()
    loss(he, y).backward()
    torch.testing.assert_close(hc.grad, he.grad)


# --------------------------------------------------------------------------------------------------
# GPU, realistic sizes (bf16, as in training).

GPU_CASES = [
    (32, (16, 16), (16, 16), 768, "min"),    # SiT-XL/2, DINOv2-B
    (4, (64, 64), (37, 37), 1536, "min"),    # Flux 1024 px, DINOv2-g: h downsampled
    (2, (32, 32), (37, 37), 1152, "y"),      # h upsampled to the encoder grid
    (2, (24, 24), (37, 37), 3072, "min"),    # y downsampled, wide D
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_realistic_sizes(case):
    check(case, torch.bfloat16, 1e-5, 1e-2, device="cuda")
    check(case, torch.float32, 1e-5, 1e-5, device="cuda")
    check_mean(case, torch.bfloat16, 1e-2, device="cuda")


@pytest.mark.cuda
def test_gpu_deterministic():
    case = GPU_CASES[1]
    h, y = make(case, torch.bfloat16, "cuda")
    weights = torch.ones(h.shape[0], device="cuda")
    first, second = run("triton", h, y, case, weights), run("triton", h, y, case, weights)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("case, stages", [(ODD_CASES[1], 1), (BAND_CASES[4], 1), (BAND_CASES[4], 3)], ids=str)
def test_tile_configs_agree(case, stages):
    """A tile config passed explicitly (bench/tune/cosine.py's sweep) changes the tiling, not the result."""
    from repa_fused.kernels import cosine

    b, _, _, d, _ = case
    grids = grids_of(case)
    h, y = make(case)
    tiles = cosine.CosineTiles(forward=(4, 16, 4), identity=(4, 16, 4), band=(4, 16, 16, 4, stages))
    assert cosine._forward_plan(b, d, *grids, False, tiles)[3]["BLOCK_T"] == 4
    grad = torch.randn(1, b, generator=torch.Generator().manual_seed(1))
    default_losses, saved = cosine.forward(h, y, *grids)
    losses, tiled_saved = cosine.forward(h, y, *grids, tiles=tiles)
    torch.testing.assert_close(losses, default_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiled_saved, saved, rtol=1e-5, atol=1e-6)
    expected = cosine.backward(grad, h, y, *grids, True, True, saved=saved)
    for out, ref in zip(cosine.backward(grad, h, y, *grids, True, True, saved=saved, tiles=tiles), expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# identity and band (rows downsampled: Triton's pipeliner; ODD_CASES[4], h upsampled: the hand-pipelined loop)
@pytest.mark.parametrize("case", [ODD_CASES[2], BAND_CASES[0], ODD_CASES[4]], ids=str)
def test_backward_extra_term_is_added_before_the_adjoint(case):
    """extra=: another term's target-grid gradient, weighted per sample, shares the adjoint; it equals that
    gradient taken back by the reference's transposed interpolation and added. Misuse is a clear error."""
    from repa_fused.kernels import cosine

    h, y = make(case, seed=7)
    grids = grids_of(case)
    n_target = grids[2][0] * grids[2][1]
    g = torch.Generator().manual_seed(8)
    extra_h = torch.randn(h.shape[0], n_target, h.shape[2], generator=g)
    extra_y = torch.randn(h.shape[0], n_target, h.shape[2], generator=g)
    grad = torch.randn(1, h.shape[0], generator=g)
    weight = torch.randn(h.shape[0], generator=g)
    _, saved = cosine.forward(h, y, *grids)
    plain = cosine.backward(grad, h, y, *grids, True, True, saved=saved)
    both = cosine.backward(grad, h, y, *grids, True, True, saved=saved, extra=(extra_h, extra_y), extra_grad=weight)
    for plain_x, both_x, extra, grid in zip(plain, both, (extra_h, extra_y), grids[:2]):
        added = reference.interpolate_tokens_backward(weight.view(-1, 1, 1) * extra, grid, grids[2])
        assert rel_rmse(both_x, plain_x + added) < 1e-5
    with pytest.raises(ValueError, match="extra must be"):
        cosine.backward(grad, h, y, *grids, True, False, saved=saved, extra=(extra_h[:, 1:], None), extra_grad=weight)
    with pytest.raises(ValueError, match="extra must be"):
        cosine.backward(grad[:, :1], h, y, *grids, True, False, saved=saved, mean=True, extra=(extra_h, None),
                        extra_grad=weight)
    with pytest.raises(ValueError, match="extra_grad must be"):
        cosine.backward(grad, h, y, *grids, True, False, saved=saved, extra=(extra_h, None))
    with pytest.raises(ValueError, match="extra_grad must be"):
        cosine.backward(grad, h, y, *grids, True, False, saved=saved, extra=(extra_h, None), extra_grad=weight[:0])
    with pytest.raises(ValueError, match="extra must be a pair"):
        cosine.backward(grad, h, y, *grids, True, False, saved=saved, extra=extra_h, extra_grad=weight)
    with pytest.raises(ValueError, match=r"extra\[1\] was given for an input whose gradient is not taken"):
        cosine.backward(grad, h, y, *grids, True, False, saved=saved, extra=(extra_h, extra_y), extra_grad=weight)
    with pytest.raises(ValueError, match="extra_grad was given without an extra term"):
        cosine.backward(grad, h, y, *grids, True, False, saved=saved, extra_grad=weight)


# Huge tokens on every side: h resampled (band) and y on the target grid (identity), then the other way round
# (BAND_CASES[4]: both resampled; align "h": y's band backward, h's identity backward).
OVERFLOW_CASES = [WIDE_CASES[0], WIDE_CASES[1], BAND_CASES[1], BAND_CASES[4], (2, (4, 5), (7, 3), 40, "h")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", OVERFLOW_CASES, ids=str)
def test_tokens_whose_squares_overflow(case, dtype):
    """A few tokens around 1e20 among ordinary ones (their squares overflow fp32), and one whose elements are
    below fp32's normal range next to them: the program that holds them takes its rescaled passes, for all
    its tokens; losses and gradients match the fp64 reference, per sample and as the batch mean, and the
    saved scalars (s0, s1, s2) stay finite."""
    from repa_fused.kernels import cosine

    h, y = make(case, seed=9)
    h[0, :2] *= 1e20
    h[0, 2] *= 1e-40
    y[-1, -1] *= 3e19
    h, y = h.to(dtype), y.to(dtype)
    weights = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(10))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradients, in the inputs' dtype; the losses are fp32
    out = run("triton", h, y, case, weights)
    ref = run("reference", h.double(), y.double(), case, weights.double())
    for o, r, t in zip(out, ref, (1e-5, tol, tol)):
        assert torch.isfinite(o).all()
        assert rel_rmse(o, r) < t
    _, saved = cosine.forward(h, y, *grids_of(case))
    assert torch.isfinite(saved).all() and saved.abs().max() < 1e13
    _, h_grid, y_grid, _, align = case
    mean = rf.cosine_alignment_loss(h, y, h_grid=h_grid, y_grid=y_grid, align=align, backend="triton")
    mean_ref = rf.cosine_alignment_loss(h.double(), y.double(), h_grid=h_grid, y_grid=y_grid, align=align,
                                        backend="reference")
    assert rel_rmse(mean, mean_ref) < 1e-5


@pytest.mark.parametrize("case", [ODD_CASES[2], BAND_CASES[0]], ids=str)
def test_tokens_below_eps_are_scaled_not_projected(case):
    """Non-zero tokens with norms below eps: the normaliser is x/eps there, a plain scaling, so their gradient
    has no projection (F.normalize's backward): s1, s2 are 0 there."""
    h, y = make(case, seed=11)
    h[:, ::3] *= 1e-13
    y[:, 1::4] *= 1e-13
    weights = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(12))
    out = run("triton", h, y, case, weights)
    ref = run("reference", h.double(), y.double(), case, weights.double())
    for o, r in zip(out, ref):
        assert rel_rmse(o, r) < 1e-5

"""iREPA: the teacher's spatial z-score against an fp64 loop formula (gradients included), the conv
projector against an explicit sum, SimpleTuner's irepa_* keys, and both regularizers wired with them."""

import pytest
import torch
from models import TINY_DIT, TINY_UNET

import repa_fused as rf
from repa_fused.training import irepa
from repa_fused.training.config import known_keys, load_config
from repa_fused.training.regularizers import build_regularizer


def zscore_loops(y, alpha):
    """fp64, one (image, channel) at a time: (y − α·mean) / (std + 1e-6), Bessel's std; std = 0 for N = 1."""
    out = torch.empty_like(y, dtype=torch.float64)
    b, n, d = y.shape
    for i in range(b):
        for c in range(d):
            v = y[i, :, c].double()
            mean = v.sum() / n
            std = ((v - mean).square().sum() / (n - 1)).sqrt() if n > 1 else torch.zeros((), dtype=torch.float64)
            out[i, :, c] = (v - alpha * mean) / (std + 1e-6)
    return out


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 7, 5), (3, 13, 1), (1, 2, 4)])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_zscore_against_loops(shape, alpha):
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(irepa.spatial_normalize(y, alpha), zscore_loops(y, alpha), rtol=1e-10, atol=1e-6)


def test_zscore_gradcheck_and_dtypes():
    y = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: irepa.spatial_normalize(t, 0.6), (y,))
    one = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: irepa.spatial_normalize(t, 0.6), (one,))
    y16 = torch.randn(2, 9, 4).bfloat16()
    out = irepa.spatial_normalize(y16, 0.6)
    assert out.dtype == torch.float32  # not cast back: a constant channel overflows float16 (next test)
    torch.testing.assert_close(out.double(), zscore_loops(y16, 0.6), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="alpha"):
        irepa.spatial_normalize(y16, float("nan"))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        irepa.spatial_normalize(y16[0], 0.6)


def test_one_token_keeps_the_cosine_loss():
    """N = 1 (documented): std is 0, the token is scaled, so a normalising loss sees y itself."""
    h, y = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    plain = rf.cosine_alignment_loss(h, y, backend="reference")
    torch.testing.assert_close(rf.cosine_alignment_loss(h, irepa.spatial_normalize(y, 0.6), backend="reference"),
                               plain)


def test_conv_projector_is_a_conv_over_the_grid():
    torch.manual_seed(0)
    proj = irepa.ConvProjector(4, 6, 3).double()
    grid = (3, 5)
    tokens = torch.randn(2, 15, 4, dtype=torch.float64)
    out = proj(tokens, grid)
    conv = proj[0]
    image = torch.nn.functional.pad(tokens.transpose(1, 2).reshape(2, 4, *grid), (1, 1, 1, 1))
    want = torch.zeros(2, 6, *grid, dtype=torch.float64)
    for r in range(grid[0]):
        for c in range(grid[1]):
            patch = image[:, :, r:r + 3, c:c + 3]
            want[:, :, r, c] = torch.einsum("bcij,ocij->bo", patch, conv.weight) + conv.bias
    torch.testing.assert_close(out, want.flatten(2).transpose(1, 2))
    assert proj[-1].out_features == 6 and out.shape == (2, 15, 6)
    for bad in (2, 0, -1, True, 3.0):
        with pytest.raises(ValueError, match="odd positive int"):
            irepa.ConvProjector(4, 6, bad)
    with pytest.raises(ValueError, match="cells"):
        proj(tokens, (4, 4))


def test_simpletuner_keys_and_defaults():
    repa, urepa = load_config({"crepa_enabled": True})
    for cfg in (repa, urepa):
        assert (cfg.irepa_enabled, cfg.irepa_spatial_norm_alpha, cfg.irepa_projector_kernel_size) == (False, 0.6, 3)
    assert urepa.manifold_pairs == "tokens"
    repa, urepa = load_config({"irepa_enabled": True, "--irepa_spatial_norm_alpha": 1, "irepa_projector_kernel_size": 5,
                               "urepa_manifold_pairs": "batch"})
    for cfg in (repa, urepa):
        assert (cfg.irepa_enabled, cfg.irepa_spatial_norm_alpha, cfg.irepa_projector_kernel_size) == (True, 1.0, 5)
    assert urepa.manifold_pairs == "batch"
    assert {"irepa_enabled", "irepa_spatial_norm_alpha", "irepa_projector_kernel_size",
            "urepa_manifold_pairs"} <= set(known_keys())
    assert load_config(urepa.to_dict()).urepa == urepa
    with pytest.raises(ValueError, match="irepa_projector_kernel_size must be an odd int"):
        load_config({"irepa_projector_kernel_size": 4})
    with pytest.raises(ValueError, match="irepa_spatial_norm_alpha must be in"):
        load_config({"irepa_spatial_norm_alpha": 1.5})
    with pytest.raises(ValueError, match="urepa_manifold_pairs must be one of"):
        load_config({"urepa_manifold_pairs": "images"})
    with pytest.raises(ValueError, match="did you mean 'irepa_enabled'"):
        load_config({"irepa_enable": True})


def test_argparse_has_one_flag_per_shared_key():
    import argparse

    from repa_fused.training.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--irepa_enabled", "--irepa_projector_kernel_size", "7"]))
    assert cfg.urepa.irepa_enabled and cfg.repa.irepa_projector_kernel_size == 7


class NoEncoder:
    """Width 16 for the projector; features come from the test, so the encoder never runs."""

    hidden_size = 16


def _pop_and_loss(tiny, reg, y, y_grid):
    tiny.model(**tiny.inputs(batch=2))
    tokens, grid = reg.capture.pop()
    tiny.model(**tiny.inputs(batch=2))
    loss, logs = reg.loss(step=0, features=y, features_grid=y_grid)
    return tokens, grid, loss, logs


def test_repa_with_irepa_is_the_public_loss_on_zscored_features():
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer({"crepa_enabled": True, "crepa_block_index": 1, "irepa_enabled": True,
                             "irepa_spatial_norm_alpha": 0.8}, tiny.model, encoder=NoEncoder())
    assert isinstance(reg.projector, irepa.ConvProjector)
    y = torch.randn(2, 10, 16, requires_grad=False)
    tokens, grid, loss, logs = _pop_and_loss(tiny, reg, y, (2, 5))
    want = rf.cosine_alignment_loss(reg.projector(tokens, grid), irepa.spatial_normalize(y, 0.8), h_grid=grid,
                                    y_grid=(2, 5))
    torch.testing.assert_close(loss, 0.5 * want)
    loss.backward()
    assert reg.projector[0].weight.grad is not None


def test_urepa_with_irepa_and_manifold_pairs():
    tiny = TINY_UNET["sd15"]()
    reg = build_regularizer({"urepa_enabled": True, "irepa_enabled": True, "irepa_projector_kernel_size": 1,
                             "urepa_manifold_pairs": "samples"}, tiny.model, encoder=NoEncoder())
    y = torch.randn(2, 16, 16)
    tokens, grid, loss, logs = _pop_and_loss(tiny, reg, y, None)
    total, _, manifold = rf.urepa_loss(reg.projector(tokens, grid), irepa.spatial_normalize(y, 0.6), h_grid=grid,
                                       pairs="samples")
    torch.testing.assert_close(loss, 0.5 * total)
    torch.testing.assert_close(logs["urepa_manifold_loss"], manifold.detach())


def test_fp16_features_with_a_constant_channel_give_a_finite_loss():
    """A constant channel becomes (1 − α)·y / 1e-6 (about 4e5): past float16's range, so the z-score stays fp32."""
    tiny = TINY_UNET["sd15"]()
    reg = build_regularizer({"urepa_enabled": True, "irepa_enabled": True}, tiny.model, encoder=NoEncoder())
    y = torch.randn(2, 16, 16)
    y[:, :, 0] = 1.0
    _, _, loss, logs = _pop_and_loss(tiny, reg, y.half(), None)
    assert torch.isfinite(loss) and torch.isfinite(logs["urepa_manifold_loss"])


@pytest.mark.parametrize("keys, message", [
    ({"crepa_projector": "mlp"}, "crepa_projector='mlp' cannot apply"),
    ({"crepa_spatial_align": False}, "crepa_spatial_align=false"),
])
def test_keys_that_contradict_irepa_are_errors(keys, message):
    tiny = TINY_DIT["dit"]()
    with pytest.raises(ValueError, match=message):
        build_regularizer({"crepa_enabled": True, "crepa_block_index": 1, "irepa_enabled": True, **keys}, tiny.model,
                          encoder=NoEncoder())


def test_irepa_without_a_regularizer_warns():
    tiny = TINY_DIT["dit"]()
    with pytest.warns(UserWarning, match="neither crepa_enabled nor urepa_enabled"):
        reg = build_regularizer({"irepa_enabled": True}, tiny.model)
    assert not list(reg.parameters())


def test_describe_and_state_name_the_conv_projector():
    tiny = TINY_DIT["dit"]()
    config = {"crepa_enabled": True, "crepa_block_index": 1, "irepa_enabled": True, "irepa_projector_kernel_size": 5}
    reg = build_regularizer(config, tiny.model, encoder=NoEncoder())
    assert "iREPA conv k=5" in reg.describe() and "iREPA conv k=5" in repr(reg)
    plain = build_regularizer({"crepa_enabled": True, "crepa_block_index": 1}, TINY_DIT["dit"]().model,
                              encoder=NoEncoder())
    with pytest.raises(RuntimeError, match="irepa_enabled"):
        plain.load_state_dict(reg.state_dict())

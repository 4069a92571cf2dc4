"""REPA / U-REPA regularizers on tiny random diffusers models: training signal, wiring, every input path,
the λ = 0 path, the feature cache, resume, remove, and every error build_regularizer and reg.loss raise."""

import argparse
import logging
import os
import sys
import types

import pytest
import torch
from models import TINY_DIT, TINY_UNET, tiny_autoencoder_kl, tiny_autoencoder_tiny, tiny_dinov2

import repa_fused as rf
from repa_fused.training.regularizers import DisabledRegularizer, RepaRegularizer, URepaRegularizer, build_regularizer

REPA = {"crepa_enabled": True, "crepa_block_index": 1}
UREPA = {"urepa_enabled": True}


class FakeEncoder(torch.nn.Module):
    """The VisionEncoder contract (a fixed random patchify to 4 × 4 tokens of width 16), counting calls."""

    hidden_size, patch_size, image_size, name, model_type, prefix_tokens = 16, 7, 28, "fake-encoder", "dinov2", 1
    preprocessing = {"resize": "bilinear", "aspect": "square"}

    def __init__(self, fail: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 16, 7, 7).requires_grad_(False)
        self.calls, self.fail = 0, fail

    def forward(self, pixels):
        if self.fail:
            raise AssertionError("the encoder must not run on this path")
        self.calls += 1
        x = torch.nn.functional.interpolate(pixels, size=(28, 28), mode="bilinear", align_corners=False)
        return self.conv(x).flatten(2).transpose(1, 2), (4, 4)


def pixels(batch=2, seed=0):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def forward(tiny, batch=2):
    return tiny.model(**tiny.inputs(batch=batch))


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


# -- training signal ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, config", [("dit", REPA), ("sd15", UREPA)])
def test_steps_raise_similarity_and_move_projector(family, config, dinov2_dir):
    tiny = (TINY_DIT.get(family) or TINY_UNET[family])()
    prefix = "crepa" if "crepa_enabled" in config else "urepa"
    # The encoder is named by path and loaded on first use, as a trainer would.
    cfg = {**config, f"{prefix}_model": dinov2_dir, f"{prefix}_encoder_image_size": 28}
    reg = build_regularizer(cfg, tiny.model, max_train_steps=100)
    assert reg.encoder is None
    before = [p.detach().clone() for p in reg.projector.parameters()]
    opt = torch.optim.Adam([*tiny.model.parameters(), *reg.parameters()], lr=1e-2)
    images, sims = pixels(), []
    for step in range(8):
        forward(tiny)
        loss, logs = reg.loss(step=step, pixels=images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sims.append(float(logs[f"{prefix}_similarity"]))
    assert reg.encoder is not None and reg.encoder.hidden_size == 16
    assert sims[-1] > sims[0] + 0.1, sims
    assert all(not torch.equal(a, b) for a, b in zip(before, reg.projector.parameters()))


# -- wiring ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, config, cls", [("dit", REPA, RepaRegularizer), ("sd15", UREPA, URepaRegularizer)])
def test_projector_is_the_regularizers_own_and_the_model_stays_plain(family, config, cls):
    tiny = (TINY_DIT.get(family) or TINY_UNET[family])()
    keys = set(tiny.model.state_dict())
    reg = build_regularizer(config, tiny.model, encoder=FakeEncoder())
    assert isinstance(reg, cls) and reg.enabled
    assert set(tiny.model.state_dict()) == keys  # no foreign keys: save_pretrained / strict loads unchanged
    ids = {id(p) for p in tiny.model.parameters()}
    assert not any(id(p) in ids for p in reg.parameters())
    assert [id(p) for p in reg.parameters()] == [id(p) for p in reg.projector.parameters()]
    assert reg.projector[-1].out_features == 16 and reg.projector[0].normalized_shape == (tiny.hidden_width,)
    assert all(p.dtype == torch.float32 for p in reg.projector.parameters())


def test_mlp_projector():
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer({**REPA, "crepa_projector": "mlp", "crepa_projector_dim": 24}, tiny.model,
                            encoder=FakeEncoder())
    linears = [m for m in reg.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 24), (24, 24), (24, 16)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in reg.projector) == 2
    forward(tiny)
    loss, _ = reg.loss(step=0, pixels=pixels())
    loss.backward()
    assert linears[0].weight.grad is not None


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_features_path_is_lambda_times_the_public_loss(family):
    tiny = TINY_DIT[family]()
    reg = build_regularizer({**REPA, "crepa_lambda": 0.7}, tiny.model, encoder=FakeEncoder(fail=True))
    y = torch.randn(2, 10, 16)  # a non-square encoder grid, given explicitly
    forward(tiny)
    tokens, grid = reg.capture.pop()
    forward(tiny)
    loss, logs = reg.loss(step=3, features=y, features_grid=(2, 5))
    expected = rf.cosine_alignment_loss(reg.projector(tokens), y, h_grid=grid, y_grid=(2, 5))
    torch.testing.assert_close(loss, 0.7 * expected)
    torch.testing.assert_close(logs["crepa_similarity"], -expected.detach())
    assert set(logs) == {"crepa_loss", "crepa_alignment_loss", "crepa_similarity", "crepa_weight", "crepa_cutoff",
                         "crepa_alignment_score", "crepa_similarity_self"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in logs.values())
    assert float(logs["crepa_weight"]) == pytest.approx(0.7) and not bool(logs["crepa_cutoff"])


def test_urepa_terms_and_align_key():
    tiny = TINY_UNET["sd15"]()
    reg = build_regularizer({**UREPA, "urepa_manifold_weight": 2.0, "urepa_align": "y"}, tiny.model,
                            encoder=FakeEncoder(fail=True))
    y = torch.randn(2, 16, 16)
    forward(tiny)
    tokens, grid = reg.capture.pop()
    forward(tiny)
    loss, logs = reg.loss(step=0, features=y)
    total, align, manifold = rf.urepa_loss(reg.projector(tokens), y, manifold_weight=2.0, h_grid=grid, align="y")
    torch.testing.assert_close(loss, 0.5 * total)
    torch.testing.assert_close(logs["urepa_alignment_loss"], align.detach())
    torch.testing.assert_close(logs["urepa_manifold_loss"], manifold.detach())


def test_spatial_align_false_compares_mean_tokens():
    tiny = TINY_DIT["flux"]()
    assert tiny.grid == (3, 4)  # against the encoder's 4 × 4
    reg = build_regularizer({**REPA, "crepa_spatial_align": False, "crepa_lambda": 1.0}, tiny.model,
                            encoder=FakeEncoder())
    y = torch.randn(2, 16, 16)
    forward(tiny)
    h = reg.projector(reg.capture.pop()[0])
    forward(tiny)
    loss, _ = reg.loss(step=0, features=y)
    cos = torch.nn.functional.cosine_similarity(h.mean(1), y.mean(1), dim=-1)
    torch.testing.assert_close(loss, -cos.mean())


def test_latents_and_vae_path_decodes_then_encodes():
    from repa_fused.training.decode import decode_latents

    tiny, vae, enc = TINY_DIT["dit"](), tiny_autoencoder_kl(), FakeEncoder()
    reg = build_regularizer(REPA, tiny.model, encoder=enc)
    latents = torch.randn(2, 4, 8, 8)
    forward(tiny)
    loss, logs = reg.loss(step=0, latents=latents, vae=vae)
    forward(tiny)
    with torch.no_grad():
        decoded = decode_latents(latents, vae)
    ref, _ = reg.loss(step=0, pixels=decoded)
    assert enc.calls == 2
    torch.testing.assert_close(loss, ref)
    forward(tiny)
    with pytest.raises(ValueError, match="crepa_use_tae=False but vae is a AutoencoderTiny"):
        reg.loss(step=0, latents=latents, vae=tiny_autoencoder_tiny())


def test_use_tae_takes_the_tiny_autoencoder():
    tiny = TINY_UNET["sd15"]()
    reg = build_regularizer({**UREPA, "urepa_use_tae": True}, tiny.model, encoder=FakeEncoder())
    forward(tiny)
    loss, _ = reg.loss(step=0, latents=torch.randn(2, 4, 8, 8), vae=tiny_autoencoder_tiny())
    assert torch.isfinite(loss)
    forward(tiny)
    with pytest.raises(ValueError, match="urepa_use_tae=True but vae is a AutoencoderKL"):
        reg.loss(step=0, latents=torch.randn(2, 4, 8, 8), vae=tiny_autoencoder_kl())


def test_lazy_encoder_gets_the_config(monkeypatch):
    import repa_fused.training.encoders as encoders

    seen = {}

    def fake_load(name, image_size=518, **kw):
        seen.update(name=name, image_size=image_size, **kw)
        return FakeEncoder()

    monkeypatch.setattr(encoders, "load_encoder", fake_load)
    monkeypatch.setattr("repa_fused.training.regularizers.encoder_spec", lambda name: types.SimpleNamespace(
        hidden_size=16))
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer({**REPA, "crepa_model": "dinov2_vits14", "crepa_encoder_image_size": 224,
                             "crepa_encoder_aspect": "preserve", "crepa_encoder_frames_batch_size": 3},
                            tiny.model)
    assert seen == {}  # nothing loaded at build time
    forward(tiny)
    reg.loss(step=0, pixels=pixels())
    assert seen == dict(name="dinov2_vits14", image_size=224, device=torch.device("cpu"), max_batch=3,
                        aspect="preserve")


def test_projector_width_without_weights(dinov2_dir):
    from repa_fused.training.regularizers import _target_width

    assert _target_width(types.SimpleNamespace(model=dinov2_dir), None, None) == 16
    assert _target_width(types.SimpleNamespace(model="dino_v2_g"), None, None) == 1536  # a SimpleTuner alias


def test_pixels_are_checked_by_the_live_encoder(dinov2_dir):
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer({**REPA, "crepa_model": dinov2_dir, "crepa_encoder_image_size": 28}, tiny.model)
    for bad, error, message in ((pixels() * 127.5 + 127.5, ValueError, r"expects \[-1, 1\]"),
                                (torch.rand(2, 4, 32, 32), ValueError, r"\(B, 3, H, W\)"),
                                (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating point")):
        forward(tiny)
        with pytest.raises(error, match=message):
            reg.loss(step=0, pixels=bad)


# -- λ = 0, cutoffs, resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{"crepa_lambda": 0.0}, {"crepa_warmup_steps": 5}, {"crepa_cutoff_step": 1}])
def test_zero_weight_skips_the_work_and_reaches_the_projector(config):
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer({**REPA, **config}, tiny.model, encoder=FakeEncoder(fail=True))
    forward(tiny)
    loss, logs = reg.loss(step=0 if "crepa_cutoff_step" not in config else 1, pixels=pixels())
    assert not reg.capture.captured  # the stored graph was dropped
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in reg.projector.parameters())
    assert float(logs["crepa_weight"]) == 0.0
    assert bool(logs["crepa_cutoff"]) == ("crepa_cutoff_step" in config)


def test_similarity_cutoff_permanent_then_skipped():
    tiny = TINY_DIT["dit"]()
    enc = FakeEncoder()
    reg = build_regularizer({**REPA, "crepa_similarity_threshold": -1.0, "crepa_similarity_ema_decay": 0.0},
                            tiny.model, encoder=enc)
    forward(tiny)
    loss, logs = reg.loss(step=0, pixels=pixels())  # any similarity ≥ -1: cut at once
    assert float(loss.detach()) == 0.0 and float(logs["crepa_weight"]) == 0.0 and bool(logs["crepa_cutoff"])
    assert "crepa_similarity_ema" in logs and enc.calls == 1
    forward(tiny)
    loss, logs = reg.loss(step=1, pixels=pixels())
    assert enc.calls == 1 and bool(logs["crepa_cutoff"])  # known on the host: no encoder work any more


def same_state(a, b) -> bool:
    return (a["kind"] == b["kind"] and a["schedule"] == b["schedule"] and a["projector"].keys() == b["projector"].keys()
            and all(torch.equal(a["projector"][k], b["projector"][k]) for k in a["projector"]))


def test_state_dict_resume_through_torch_save(tmp_path):
    cfg = {**REPA, "crepa_similarity_threshold": 0.99, "crepa_similarity_ema_decay": 0.5}
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer(cfg, tiny.model, encoder=FakeEncoder())
    opt = torch.optim.SGD(reg.parameters(), lr=0.5)
    for step in range(2):
        forward(tiny)
        reg.loss(step=step, pixels=pixels(seed=step))[0].backward()
        opt.step()
    torch.save(reg.state_dict(), tmp_path / "reg.pt")
    state = torch.load(tmp_path / "reg.pt")  # weights_only: plain tensors and numbers
    assert state["kind"] == "crepa" and state["schedule"]["similarity_ema"] is not None
    reg.remove()
    again = build_regularizer(cfg, tiny.model, encoder=FakeEncoder())
    assert not same_state(again.state_dict(), state)  # a fresh projector differs
    again.load_state_dict(state)
    assert same_state(again.state_dict(), state)
    other = build_regularizer(UREPA, TINY_UNET["sd15"]().model, encoder=FakeEncoder())
    with pytest.raises(ValueError, match="from a 'crepa' regularizer, not 'urepa'"):
        other.load_state_dict(state)
    with pytest.raises(KeyError, match=r"missing \['projector'\]"):
        again.load_state_dict({"kind": "crepa", "schedule": state["schedule"]})
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: a partial projector is refused
        again.load_state_dict({**state, "projector": {"0.weight": state["projector"]["0.weight"]}})


def test_remove_detaches_hooks():
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer(REPA, tiny.model, encoder=FakeEncoder())
    reg.remove()
    forward(tiny)
    assert not reg.capture.captured
    with pytest.raises(RuntimeError, match="was removed"):
        reg.loss(step=0, pixels=pixels())
    build_regularizer(REPA, tiny.model, encoder=FakeEncoder())  # attachable again


# -- feature cache -------------------------------------------------------------------------------------------


class FakeCache:
    """The FeatureCache contract over a dict of (N, D) rows; metadata set by the fixture."""

    metadata: dict = {}
    rows = {f"img{i}.png": torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)}

    def __init__(self, path):
        self.path = path

    def get(self, keys, device=None):
        return torch.stack([self.rows[k] for k in keys]).to(device), (4, 4)


@pytest.fixture
def fake_cache(monkeypatch, dinov2_dir):
    import repa_fused.training
    import repa_fused.training.encoders as encoders

    live = encoders.load_encoder(dinov2_dir, 28)  # the cache says what a live encoder would have used
    monkeypatch.setattr(FakeCache, "metadata", {**encoders.feature_record(live), "dtype": "bfloat16"})
    module = types.ModuleType("repa_fused.training.cache")
    module.FeatureCache = FakeCache
    monkeypatch.setitem(sys.modules, "repa_fused.training.cache", module)
    monkeypatch.setattr(repa_fused.training, "cache", module, raising=False)

    def no_load(*a, **k):
        raise AssertionError("the encoder must not be loaded with a feature cache")

    monkeypatch.setattr(encoders, "load_encoder", no_load)
    return FakeCache


@pytest.fixture
def cached(dinov2_dir):
    return {**REPA, "crepa_model": dinov2_dir, "crepa_encoder_image_size": 28, "crepa_feature_cache": "/c"}


def test_cache_keys_path(fake_cache, cached):
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer(cached, tiny.model)
    keys = ["img2.png", "img0.png"]
    forward(tiny)
    tokens, grid = reg.capture.pop()
    forward(tiny)
    loss, _ = reg.loss(step=0, keys=keys)
    y = torch.stack([fake_cache.rows[k] for k in keys])
    torch.testing.assert_close(loss, 0.5 * rf.cosine_alignment_loss(reg.projector(tokens), y, h_grid=grid))
    assert reg.encoder is None
    forward(tiny)
    with pytest.raises(ValueError, match="crepa_feature_cache is set: pass keys="):
        reg.loss(step=0, pixels=pixels())
    # features read from the same cache ahead of the step (in a DataLoader's workers) give the same loss
    forward(tiny)
    loss_ahead, _ = reg.loss(step=0, features=y)
    torch.testing.assert_close(loss_ahead, loss)
    assert reg.encoder is None


@pytest.mark.parametrize("change, message", [
    ({"crepa_model": "dinov2_vits14"}, "encoder '.*' \\(wanted: 'dinov2_vits14', from crepa_model\\)"),
    ({"crepa_encoder_image_size": 56}, "image size 28 \\(wanted: 56, from crepa_encoder_image_size\\)"),
    ({"crepa_encoder_aspect": "preserve"}, "preprocessing .*'aspect': 'square'.* \\(wanted: .*'aspect': 'preserve'"),
    ({"crepa_model": "dinov2_vits14_reg"}, "encoder .*; model type 'dinov2' \\(wanted: 'dinov2_with_registers'\\); "
                                          "prefix tokens 1 \\(wanted: 5\\); hidden size 16 \\(wanted: 384\\)"),
])
def test_cache_made_differently_is_refused_at_build(fake_cache, cached, change, message):
    with pytest.raises(ValueError, match=f"feature cache '/c' was made with {message}"):
        build_regularizer({**cached, **change}, TINY_DIT["dit"]().model)


def test_cache_checked_against_a_passed_encoder(fake_cache, cached):
    with pytest.raises(ValueError, match="wanted: 'fake-encoder', from the encoder passed.*preprocessing"):
        build_regularizer(cached, TINY_DIT["dit"]().model, encoder=FakeEncoder())


# -- errors --------------------------------------------------------------------------------------------------


def test_build_errors():
    dit, unet = TINY_DIT["dit"]().model, TINY_UNET["sd15"]().model
    enc = FakeEncoder()
    with pytest.raises(ValueError, match="both true"):
        build_regularizer({**REPA, **UREPA}, dit, encoder=enc)
    with pytest.raises(ValueError, match="is a UNet: use U-REPA"):
        build_regularizer(REPA, unet, encoder=enc)
    with pytest.raises(ValueError, match="diffusion transformer: use REPA"):
        build_regularizer(UREPA, dit, encoder=enc)
    with pytest.raises(IndexError, match=r"block_index 8 is out of range .* valid range is \[0, 2\)"):
        build_regularizer({"crepa_enabled": True}, dit, encoder=enc)  # SimpleTuner's default index 8
    with pytest.raises(ValueError, match="crepa_warmup_steps=5 ≥ crepa_decay_steps=3"):
        build_regularizer({**REPA, "crepa_scheduler": "linear", "crepa_warmup_steps": 5, "crepa_decay_steps": 3},
                          dit, encoder=enc)
    with pytest.raises(ValueError, match="unknown config key 'crepa_lamda'"):
        build_regularizer({**REPA, "crepa_lamda": 1}, dit, encoder=enc)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        build_regularizer(os.path.dirname(__file__), dit, encoder=enc)


def test_loss_errors():
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer(REPA, tiny.model, encoder=FakeEncoder())
    with pytest.raises(RuntimeError, match="nothing captured"):
        reg.loss(step=0, pixels=pixels())
    cases = [
        (dict(), ValueError, "exactly one of pixels=, latents= .* got none"),
        (dict(pixels=pixels(), features=torch.randn(2, 16, 16)), ValueError, r"got \['pixels', 'features'\]"),
        (dict(latents=torch.randn(2, 4, 8, 8)), ValueError, "latents= and vae= go together"),
        (dict(pixels=pixels(), vae=tiny_autoencoder_kl()), ValueError, "latents= and vae= go together"),
        (dict(features=torch.randn(2, 16, 16), features_grid=None, keys=None), None, None),
        (dict(pixels=pixels(), features_grid=(4, 4)), ValueError, "features_grid= describes features="),
        (dict(keys=["a"]), ValueError, "crepa_feature_cache is not set"),
        (dict(pixels=pixels(batch=3)), ValueError, "pixels give 3 samples but the model forward had 2"),
        (dict(features=torch.randn(2, 16, 8)), ValueError, "features have width 8 but the projector maps to 16"),
        (dict(features=torch.randn(2, 16)), ValueError, r"features must be a \(B, N, D\)"),
    ]
    for kwargs, error, message in cases:
        forward(tiny)
        if error is None:
            reg.loss(step=0, **kwargs)
            continue
        with pytest.raises(error, match=message):
            reg.loss(step=0, **kwargs)
    forward(tiny)
    with pytest.raises(ValueError, match="step must be an int ≥ 0"):
        reg.loss(step=-1, pixels=pixels())
    forward(tiny)
    reg.to("meta")
    with pytest.raises(RuntimeError, match=r"tokens are on cpu but the REPA projector is on meta: call reg.to\('cpu'\)"):
        reg.loss(step=0, pixels=pixels())


# -- trainer-facing behaviour ---------------------------------------------------------------------------------


def test_pixels_are_checked_on_every_call_without_a_host_sync():
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer(REPA, tiny.model, encoder=FakeEncoder())
    forward(tiny)
    reg.loss(step=0, pixels=pixels())
    forward(tiny)
    with pytest.raises(ValueError, match=r"pixels passed to reg.loss are in \[0.*, 255\] .* expects \[-1, 1\]"):
        reg.loss(step=1, pixels=pixels() * 127.5 + 127.5)  # a later batch in [0, 255]
    nan = pixels()
    nan[0, 0, 0, 0] = float("nan")
    tiny2 = TINY_DIT["dit"]()
    fresh = build_regularizer(REPA, tiny2.model, encoder=FakeEncoder())
    forward(tiny2)
    with pytest.raises(ValueError, match="contain NaN"):
        fresh.loss(step=0, pixels=nan)  # the very first call


def test_simpletuner_log_names_and_one_info_line(caplog):
    tiny = TINY_DIT["dit"]()
    with caplog.at_level(logging.INFO, logger="repa_fused"):
        reg = build_regularizer({**REPA, "crepa_similarity_threshold": 0.99}, tiny.model, encoder=FakeEncoder())
    lines = [r.getMessage() for r in caplog.records if r.name == "repa_fused"]
    assert len(lines) == 1 and "REPA: DiTTransformer2DModel.transformer_blocks.1" in lines[0]
    assert "linear projector 16->16" in lines[0] and "encoder fake-encoder" in lines[0] and "backend" in lines[0]
    forward(tiny)
    _, logs = reg.loss(step=0, pixels=pixels())
    assert logs["crepa_alignment_score"] is logs["crepa_similarity"] is logs["crepa_similarity_self"]
    assert logs["crepa_alignment_score_ema"] is logs["crepa_similarity_ema"]
    unet = TINY_UNET["sd15"]()
    reg = build_regularizer(UREPA, unet.model, encoder=FakeEncoder())
    forward(unet)
    assert "urepa_alignment_score" not in reg.loss(step=0, pixels=pixels())[1]


def test_disabled_config_gives_a_no_op_the_loop_calls_unchanged(caplog):
    tiny = TINY_DIT["dit"]()
    with caplog.at_level(logging.INFO, logger="repa_fused"):
        reg = build_regularizer({"crepa_enabled": False, "learning_rate": 1e-4}, tiny.model)
    assert isinstance(reg, DisabledRegularizer) and not reg.enabled
    assert "neither crepa_enabled nor urepa_enabled" in caplog.records[-1].getMessage()
    assert not tiny.model._forward_pre_hooks  # no hooks, no capture
    loss, logs = reg.loss(step=0, pixels=pixels())
    assert float(loss) == 0.0 and logs == {} and list(reg.parameters()) == []
    assert reg.to("cpu") is reg and reg.sync_gradients() is None
    reg.max_train_steps = 10
    reg.load_state_dict(reg.state_dict())
    with pytest.raises(ValueError, match="from a 'crepa' regularizer, but neither"):
        reg.load_state_dict({"kind": "crepa"})
    enabled = build_regularizer(REPA, tiny.model, encoder=FakeEncoder())
    with pytest.raises(ValueError, match="from no regularizer, not 'crepa'"):
        enabled.load_state_dict(reg.state_dict())


def test_namespace_config_and_max_train_steps_after_building():
    tiny = TINY_DIT["dit"]()
    args = argparse.Namespace(crepa_enabled=True, crepa_block_index=1, crepa_scheduler="linear", crepa_lambda=None,
                              output_dir="out")
    reg = build_regularizer(args, tiny.model, encoder=FakeEncoder())  # no horizon yet: fine at build
    reg.max_train_steps = 4  # as diffusers' scripts know it: after accelerator.prepare
    forward(tiny)
    _, logs = reg.loss(step=2, pixels=pixels())
    assert float(logs["crepa_weight"]) == pytest.approx(0.25)
    other = TINY_DIT["dit"]()
    late = build_regularizer(args, other.model, encoder=FakeEncoder())
    forward(other)
    with pytest.raises(ValueError, match="set reg.max_train_steps"):
        late.loss(step=0, features=torch.randn(2, 16, 16))


# -- DDP -----------------------------------------------------------------------------------------------------

DDP_SCRIPT = '''
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
sys.path[:0] = [{tests!r}, {here!r}]
from models import TINY_DIT
import repa_fused as rf
from test_regularizers import FakeEncoder, pixels


def run(rank):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT={port!r})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for ddp_kwargs in (dict(find_unused_parameters=False), dict(find_unused_parameters=True), dict(static_graph=True)):
        torch.manual_seed(rank)  # no common seed: the first loss must give every rank rank 0's projector
        tiny = TINY_DIT["dit"]()
        # Step 0: λ = 0 (warmup), step 1: λ > 0, step 2: cut off; the projector must sync on every step.
        reg = rf.build_regularizer({{"crepa_enabled": True, "crepa_block_index": 1, "crepa_warmup_steps": 1,
                                    "crepa_cutoff_step": 2}}, tiny.model, encoder=FakeEncoder())
        model = torch.nn.parallel.DistributedDataParallel(tiny.model, **ddp_kwargs)
        opt = torch.optim.SGD([*model.parameters(), *reg.parameters()], lr=0.1)
        for step in range(4):
            out = model(**tiny.inputs(batch=2, seed=rank))[0]
            loss, logs = reg.loss(step=step, pixels=pixels(seed=rank))
            (out.square().mean() + loss).backward()
            reg.sync_gradients()
            opt.step()
            opt.zero_grad()
        flat = torch.cat([p.detach().flatten() for p in reg.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), ddp_kwargs  # the ranks' projectors stayed in sync
        reg.remove()
    # Forgetting sync_gradients in a multi-rank run is an error at the optimizer step, not a silent drift.
    tiny = TINY_DIT["dit"]()
    reg = rf.build_regularizer({{"crepa_enabled": True, "crepa_block_index": 1}}, tiny.model, encoder=FakeEncoder())
    tiny.model(**tiny.inputs(batch=2, seed=rank))
    reg.loss(step=0, pixels=pixels(seed=rank))[0].backward()
    try:
        torch.optim.SGD(reg.parameters(), lr=0.1).step()
        raise AssertionError("no error")
    except RuntimeError as e:
        assert "before reg.sync_gradients()" in str(e), e
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, nprocs=2)
    print("DDP OK")
'''


def test_ddp_two_ranks_with_zero_weight_steps(tmp_path):
    import socket
    import subprocess
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1]), here=str(Path(__file__).parent), port=port))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and "DDP OK" in done.stdout, done.stderr[-3000:]


def test_accelerate_checkpointing_resumes_the_schedule(tmp_path):
    from accelerate import Accelerator

    cfg = {**REPA, "crepa_similarity_threshold": 0.99, "crepa_similarity_ema_decay": 0.5}
    tiny = TINY_DIT["dit"]()
    reg = build_regularizer(cfg, tiny.model, encoder=FakeEncoder())
    accelerator = Accelerator(cpu=True)
    accelerator.register_for_checkpointing(reg)
    forward(tiny)
    reg.loss(step=0, pixels=pixels())
    saved = {k: v for k, v in reg.state_dict().items()}
    saved["projector"] = {k: v.clone() for k, v in saved["projector"].items()}
    accelerator.save_state(str(tmp_path / "ckpt"))
    forward(tiny)
    reg.loss(step=1, pixels=pixels(seed=5))[0].backward()
    torch.optim.SGD(reg.parameters(), lr=1.0).step()
    assert not same_state(reg.state_dict(), saved)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert same_state(reg.state_dict(), saved)


class CacheRows(torch.utils.data.Dataset):
    """One cached image's tokens per item, read in the loader's workers (the cache pickles without its maps)."""

    def __init__(self, cache, keys):
        self.cache, self.keys = cache, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.cache.get([self.keys[i]])[0][0]


def test_real_feature_cache_gives_the_live_loss(tmp_path, dinov2_dir):
    import numpy as np
    from PIL import Image

    from repa_fused.training.cache import cache_features, load_image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / name)
    cache_features(images, tmp_path / "cache", dinov2_dir, 28, dtype="fp32", device="cpu", progress=False,
                   num_workers=0, log=lambda message: None)
    cfg = {**REPA, "crepa_model": dinov2_dir, "crepa_encoder_image_size": 28}
    tiny = TINY_DIT["dit"]()
    live = build_regularizer(cfg, tiny.model)
    batch = torch.stack([load_image(images / n) for n in ("a.png", "b.png")]).float() / 127.5 - 1
    forward(tiny)
    live_loss, _ = live.loss(step=0, pixels=batch)
    live.remove()
    cached = build_regularizer({**cfg, "crepa_feature_cache": str(tmp_path / "cache")}, tiny.model)
    cached.projector.load_state_dict(live.projector.state_dict())
    forward(tiny)
    cached_loss, _ = cached.loss(step=0, keys=["a.png", "b.png"])
    assert cached.encoder is None
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-4, atol=1e-5)
    # The README's read-ahead recipe: rows read in DataLoader worker processes, passed as features=
    loader = torch.utils.data.DataLoader(CacheRows(rf.FeatureCache(str(tmp_path / "cache")), ["a.png", "b.png"]),
                                         batch_size=2, num_workers=2)
    forward(tiny)
    ahead_loss, _ = cached.loss(step=0, features=next(iter(loader)))
    assert cached.encoder is None
    torch.testing.assert_close(ahead_loss, live_loss, rtol=1e-4, atol=1e-5)
    forward(tiny)
    with pytest.raises(KeyError, match="c.png"):
        cached.loss(step=0, keys=["a.png", "c.png"])
    with pytest.raises(ValueError, match="image size 28"):
        build_regularizer({**cfg, "crepa_encoder_image_size": 56, "crepa_feature_cache": str(tmp_path / "cache")},
                          TINY_DIT["dit"]().model)

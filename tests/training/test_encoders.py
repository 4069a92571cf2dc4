"""DINOv2 encoders: tiny random checkpoints saved to a temp dir and loaded by path; the real names when reachable."""

from __future__ import annotations

import json
import os
import pickle
import socket

import pytest
import torch
import torch.nn.functional as F
from models import tiny_dinov2

import repa_fused.training.encoders as encoders
from repa_fused.training.encoders import (ENCODER_ALIASES, IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor,
                                          VisionEncoder, encoder_spec, feature_record, load_encoder,
                                          resolve_encoder_name)

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[False, True], ids=["dinov2", "with_registers"])
def checkpoint(request, tmp_path_factory):
    return tiny_dinov2(tmp_path_factory.mktemp("dinov2"), registers=request.param), request.param


def _pixels(b=3, h=40, w=60, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_patch_tokens_drop_cls_and_registers(checkpoint):
    path, registers = checkpoint
    enc = load_encoder(path, 28)
    assert enc.num_register_tokens == (2 if registers else 0)
    assert type(enc.model).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    x = _pixels()
    tokens, grid = enc(x)
    assert grid == (4, 4) and tokens.shape == (3, 16, enc.hidden_size) == (3, 16, 16)
    full = enc.model(pixel_values=enc.preprocess(x)).last_hidden_state
    assert full.shape[1] == 1 + enc.num_register_tokens + 16
    torch.testing.assert_close(tokens, full[:, 1 + enc.num_register_tokens:], rtol=0, atol=0)
    assert enc.name == path and enc.patch_size == 7 and enc.image_size == 28


def test_preprocessing_formula(checkpoint):
    enc = load_encoder(checkpoint[0], 28)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    at_size = _pixels(2, 28, 28)  # no resize: the affine map alone
    torch.testing.assert_close(enc.preprocess(at_size), ((at_size + 1) / 2 - mean) / std)
    big = _pixels(2, 56, 84)
    want = F.interpolate((big + 1) / 2, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(enc.preprocess(big), (want - mean) / std)
    assert enc.preprocessing == {"resize": "bilinear", "antialias": True, "image_size": 28, "aspect": "square",
                                 "patch_size": 7, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                 "tokens": "patch", "layernorm": True}
    # The same images in [0, 1] with pixel_range="0,1" give the same tokens.
    zero_one = load_encoder(checkpoint[0], 28, pixel_range="0,1")
    torch.testing.assert_close(zero_one(big.add(1).div(2))[0], enc(big)[0])
    assert zero_one.preprocessing == enc.preprocessing  # the features do not depend on the input convention


def test_frozen_and_no_grad(checkpoint):
    enc = load_encoder(checkpoint[0], 28)
    assert not enc.training and not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())
    parent = torch.nn.ModuleDict({"enc": enc}).train()
    assert not parent["enc"].model.training  # a parent's .train() leaves the encoder in eval mode
    x = _pixels().requires_grad_(True)
    tokens, _ = enc(x)
    assert not tokens.requires_grad and tokens.grad_fn is None


def test_slicing_equals_one_batch(checkpoint):
    x = _pixels(5)
    whole, grid = load_encoder(checkpoint[0], 28)(x)
    calls = []
    sliced_enc = load_encoder(checkpoint[0], 28, max_batch=2)
    sliced_enc.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["pixel_values"].shape[0]),
                                               with_kwargs=True)
    sliced, grid2 = sliced_enc(x)
    assert calls == [2, 2, 1] and grid2 == grid
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)


def test_aspect_preserve_grid(checkpoint):
    enc = load_encoder(checkpoint[0], 28, aspect="preserve")
    for (h, w), grid in {(40, 60): (3, 5), (60, 40): (5, 3), (64, 64): (4, 4), (16, 80): (2, 9)}.items():
        size = enc.input_size(h, w)
        assert size[0] % 7 == 0 and size[1] % 7 == 0
        assert 0.5 * 28 ** 2 <= size[0] * size[1] <= 1.5 * 28 ** 2
        assert enc.grid(h, w) == grid
        tokens, got = enc(_pixels(1, h, w))
        assert got == grid and tokens.shape == (1, grid[0] * grid[1], 16)
    assert enc.preprocessing["aspect"] == "preserve"


def test_dtype_and_device(checkpoint):
    enc = load_encoder(checkpoint[0], 28, dtype=torch.bfloat16, device="cpu")
    assert enc.model.dtype == torch.bfloat16
    tokens, _ = enc(_pixels())
    assert tokens.dtype == torch.bfloat16 and tokens.device.type == "cpu"


def test_input_errors(checkpoint):
    enc = load_encoder(checkpoint[0], 28)
    with pytest.raises(ValueError, match=r"expects \[-1, 1\]"):
        enc(_pixels().add(1).mul(127.5))  # [0, 255]
    zero_one = load_encoder(checkpoint[0], 28, pixel_range="0,1")
    with pytest.raises(ValueError, match=r"expects \[0, 1\].*pixel_range"):
        zero_one(_pixels())  # [-1, 1] given to a [0, 1] encoder
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.zeros(2, 4, 28, 28))
    with pytest.raises(TypeError, match="floating point"):
        enc(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixel_range must be"):
        load_encoder(checkpoint[0], 28, pixel_range="0,255")
    with pytest.raises(ValueError, match="aspect must be"):
        load_encoder(checkpoint[0], 28, aspect="crop")
    with pytest.raises(ValueError, match="max_batch"):
        load_encoder(checkpoint[0], 28, max_batch=0)
    with pytest.raises(ValueError, match="image_size"):
        load_encoder(checkpoint[0], 3)
    with pytest.raises(TypeError, match="Dinov2Model"):
        VisionEncoder(torch.nn.Linear(2, 2))


def test_non_dinov2_checkpoint_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                       image_size=14, patch_size=7)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'vit' checkpoint"):
        load_encoder(str(tmp_path), 14)


def test_names_and_aliases(tmp_path):
    sizes = {"s": "small", "b": "base", "l": "large", "g": "giant"}
    for letter, size in sizes.items():
        assert resolve_encoder_name(f"dinov2_vit{letter}14") == f"facebook/dinov2-{size}"
        assert resolve_encoder_name(f"dinov2_vit{letter}14_reg") == f"facebook/dinov2-with-registers-{size}"
        assert resolve_encoder_name(f"facebook/dinov2-{size}") == f"facebook/dinov2-{size}"
    # SimpleTuner's spellings (simpletuner/helpers/training/crepa.py) and case.
    for alias, hub in {"dino_v2_g": "giant", "dinov2_g": "giant", "dinov2-vitg14": "giant", "dino_v2_s": "small",
                       "dinov2_s": "small", "dinov2-vitb14": "base", "DINOv2_ViTL14": "large"}.items():
        assert resolve_encoder_name(alias) == f"facebook/dinov2-{hub}"
    assert all(v.startswith("facebook/dinov2-") for v in ENCODER_ALIASES.values())
    assert resolve_encoder_name("someone/dinov2-finetune") == "someone/dinov2-finetune"
    assert resolve_encoder_name(tmp_path) == str(tmp_path)
    with pytest.raises(ValueError, match="did you mean dinov2_vitg14"):
        resolve_encoder_name("dinov2_vitg16")
    with pytest.raises(TypeError):
        resolve_encoder_name(14)


def _hub_reachable(repo: str) -> tuple[bool, str]:
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return True, "cached"
    except ImportError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False, "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True, "online"
    except OSError as exc:
        return False, f"huggingface.co unreachable ({exc})"


def test_real_name_dinov2_vits14():
    reachable, why = _hub_reachable("facebook/dinov2-small")
    if not reachable:
        pytest.skip(f"weights of dinov2_vits14 (facebook/dinov2-small) are not in the local Hugging Face cache "
                    f"and cannot be downloaded: {why}")
    enc = load_encoder("dinov2_vits14", 224)
    assert enc.name == "facebook/dinov2-small" and enc.hidden_size == 384 and enc.patch_size == 14
    tokens, grid = enc(_pixels(1, 224, 224))
    assert grid == (16, 16) and tokens.shape == (1, 256, 384)


# -- DINOv3 and SigLIP / SigLIP2 (issue 17) -----------------------------------------------------------------


def _tiny_new_encoder(kind: str, directory, preprocessor: dict = None) -> str:
    """A random DINOv3 ViT / SigLIP / SigLIP2 vision model (patch 8, width 16) saved by save_pretrained."""
    import transformers

    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8)
    torch.manual_seed(0)
    if kind == "dinov3":
        model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(image_size=32, num_register_tokens=4,
                                                                          **common))
    elif kind == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=32, **common))
    elif kind == "siglip_full":  # a whole SigLIP (text and vision): the vision tower is loaded
        text = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        model = transformers.SiglipModel(transformers.SiglipConfig(
            text_config=text, vision_config=dict(image_size=32, **common)))
    else:
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(num_patches=16, **common))
    path = str(directory)
    model.save_pretrained(path)
    if preprocessor is not None:
        with open(os.path.join(path, "preprocessor_config.json"), "w") as fh:
            json.dump(preprocessor, fh)
    return path


@pytest.mark.parametrize("kind, prefix", [("dinov3", 5), ("siglip", 0), ("siglip_full", 0), ("siglip2", 0)])
def test_new_encoders_give_patch_tokens(kind, prefix, tmp_path):
    path = _tiny_new_encoder(kind, tmp_path)
    enc = load_encoder(path, 32)
    x = _pixels(2, 40, 48)
    tokens, grid = enc(x)
    assert grid == (4, 4) and tokens.shape == (2, 16, 16)
    pre = enc.preprocess(x)
    if kind == "siglip2":  # the NaFlex layout, built here the way its image processor documents it
        patches = pre.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 192)
        full = enc.model(pixel_values=patches, pixel_attention_mask=torch.ones(2, 16, dtype=torch.int32),
                         spatial_shapes=torch.tensor([[4, 4], [4, 4]])).last_hidden_state
    else:
        full = enc.model(pixel_values=pre).last_hidden_state
    assert full.shape[1] == prefix + 16  # DINOv3: the CLS and 4 registers ahead of the patches
    torch.testing.assert_close(tokens, full[:, prefix:], rtol=0, atol=0)
    # the family's own normalisation without a preprocessor config
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if kind == "dinov3" else ((0.5,) * 3, (0.5,) * 3)
    assert enc.preprocessing["mean"] == list(mean) and enc.preprocessing["std"] == list(std)
    at_size = _pixels(1, 32, 32)
    want = ((at_size + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.preprocess(at_size), want)


def test_siglip_other_size_interpolates_its_positions(tmp_path):
    enc = load_encoder(_tiny_new_encoder("siglip", tmp_path), 48)
    tokens, grid = enc(_pixels(1, 48, 48))
    assert grid == (6, 6) and tokens.shape == (1, 36, 16) and torch.isfinite(tokens).all()


def test_preprocessor_config_sets_normalisation_resize_and_default_size(tmp_path):
    pre = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 3,
           "size": {"height": 24, "width": 24}}
    enc = load_encoder(_tiny_new_encoder("dinov3", tmp_path, pre), None)
    assert enc.image_size == 24 and enc.resample == "bicubic"
    assert enc.preprocessing["mean"] == [0.1, 0.2, 0.3] and enc.preprocessing["std"] == [0.4, 0.5, 0.6]
    assert enc.preprocessing["resize"] == "bicubic"
    x = _pixels(2, 40, 40)
    resized = F.interpolate((x + 1) / 2, size=(24, 24), mode="bicubic", align_corners=False, antialias=True)
    want = (resized.clamp(0, 1) - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.preprocess(x), want)


def test_preprocessor_without_normalisation_and_bad_resample(tmp_path):
    enc = load_encoder(_tiny_new_encoder("siglip2", tmp_path / "a", {"do_normalize": False}), None)
    assert enc.image_size == 32 and enc.preprocessing["mean"] == [0.0] * 3 and enc.preprocessing["std"] == [1.0] * 3
    with pytest.raises(ValueError, match="resample=0"):
        load_encoder(_tiny_new_encoder("siglip", tmp_path / "b", {"resample": 0}), 32)


def test_new_names_resolve():
    assert resolve_encoder_name("dinov3_vitl16") == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    assert resolve_encoder_name("SIGLIP2_so400m_patch16_naflex") == "google/siglip2-so400m-patch16-naflex"
    with pytest.raises(ValueError, match="did you mean dinov3_vitb16"):
        resolve_encoder_name("dinov3_vitb14")


# -- the preprocessor and the spec: what the features depend on, without the model --------------------------


def test_the_preprocessor_is_the_encoders_and_pickles(checkpoint):
    enc = load_encoder(checkpoint[0], 28, aspect="preserve", pixel_range="0,1")
    p = enc.preprocessor
    assert isinstance(p, ImagePreprocessor) and "model" not in vars(p)
    assert (enc.image_size, enc.patch_size, enc.aspect, enc.pixel_range, enc.resample, enc.image_mean, enc.image_std) \
        == (p.image_size, p.patch_size, p.aspect, p.pixel_range, p.resample, p.mean, p.std)
    assert enc.preprocessing == p.preprocessing and enc.grid(40, 60) == p.grid(40, 60) == (3, 5)
    x = _pixels(2, 40, 60).add(1).div(2)
    copy = pickle.loads(pickle.dumps(p))  # what a spawned decode worker gets
    assert torch.equal(copy.preprocess(x), enc.preprocess(x))
    enc.to(torch.bfloat16)  # the output follows the model's dtype
    assert enc.preprocess(x).dtype == torch.bfloat16 and enc(x)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_size=0), "patch_size must be a positive int, got 0"),
    (dict(image_size=5), "image_size must be an int ≥ the patch size 7, got 5"),
    (dict(aspect="crop"), "aspect must be one of"),
    (dict(resample="nearest"), "resample must be one of .*'nearest'"),
    (dict(mean=(0.5, 0.5)), "mean must be 3 finite numbers"),
    (dict(std=(0.5, 0.0, 0.5)), "std must be 3 finite positive numbers"),
    (dict(dtype=torch.int64), "dtype must be a floating torch dtype"),
    (dict(pixel_range="0,255"), "pixel_range must be"),
])
def test_preprocessor_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImagePreprocessor(**{"image_size": 28, "patch_size": 7, **kwargs})


@pytest.mark.parametrize("kind", ["dinov2", "with_registers", "dinov3", "siglip_full", "siglip2"])
def test_spec_without_weights_is_what_load_encoder_builds(kind, tmp_path, monkeypatch):
    bicubic = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 3,
               "size": {"height": 24, "width": 24}}
    if kind in ("dinov2", "with_registers"):
        path = tiny_dinov2(tmp_path, registers=kind == "with_registers")
        with open(os.path.join(path, "preprocessor_config.json"), "w") as fh:
            json.dump(bicubic, fh)
    else:
        path = _tiny_new_encoder(kind, tmp_path, bicubic)
    spec = encoder_spec(path, None, aspect="preserve")
    assert spec.preprocessing["resize"] == "bicubic" and spec.image_size == 24  # the preprocessor config's
    assert feature_record(spec) == feature_record(load_encoder(path, None, aspect="preserve"))
    assert spec.prefix_tokens == {"dinov2": 1, "with_registers": 3, "dinov3": 5}.get(kind, 0)


def test_published_dinov2_specs_need_no_download(monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("no file may be fetched for a DINOv2 name")

    monkeypatch.setattr(encoders, "read_preprocessor_config", offline)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", offline)
    giant = encoder_spec("dino_v2_g", 224)  # a SimpleTuner alias
    assert (giant.name, giant.model_type, giant.hidden_size, giant.patch_size, giant.prefix_tokens) == (
        "facebook/dinov2-giant", "dinov2", 1536, 14, 1)
    # what facebook/dinov2-*'s preprocessor_config.json says: bicubic, ImageNet statistics
    assert giant.preprocessing == {"resize": "bicubic", "antialias": True, "image_size": 224, "aspect": "square",
                                   "patch_size": 14, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                   "tokens": "patch", "layernorm": True}
    small = encoder_spec("dinov2_vits14_reg", None)
    assert (small.model_type, small.hidden_size, small.prefix_tokens, small.image_size) == (
        "dinov2_with_registers", 384, 5, 518)


def test_an_unreachable_preprocessor_config_is_an_error_not_a_guess(monkeypatch):
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", unreachable)
    with pytest.raises(OSError, match="preprocessor config of 'someone/siglip-finetune' is neither cached nor"):
        encoders.read_preprocessor_config("someone/siglip-finetune")

    def absent(*args, **kwargs):
        raise EntryNotFoundError("404")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", absent)
    assert encoders.read_preprocessor_config("someone/siglip-finetune") == {}  # none: the family's defaults

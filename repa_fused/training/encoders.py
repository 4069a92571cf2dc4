"""Frozen vision encoders (through transformers) giving the target features of REPA and U-REPA.

``load_encoder(name)`` accepts a short name (``dinov2_vitg14``, ``dinov2_vitb14_reg``, ``dinov3_vitl16``, ...),
one of SimpleTuner's aliases (``dinov2_g``, ``dino_v2_s``, ``dinov2-vitb14``, ...), a hub id
(``facebook/dinov2-giant``) or a local directory written by ``save_pretrained``. The model class comes from the
checkpoint's config (``ENCODER_FAMILIES``): ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``DINOv3ViTModel``
(patch 16; CLS and register tokens dropped), ``SiglipVisionModel`` and ``Siglip2VisionModel`` (no CLS: every
token is a patch; a full SigLIP/SigLIP2 checkpoint loads its vision tower only); no remote code is ever run.

``VisionEncoder(pixels)`` maps (B, 3, H, W) images to their patch tokens:

1. pixels in ``pixel_range`` ("-1,1", the diffusers convention, or "0,1") -> [0, 1];
2. bilinear resize with antialiasing to ``image_size`` × ``image_size`` (``aspect="square"``, as SimpleTuner)
   or, with ``aspect="preserve"``, to the H:W ratio with both sides multiples of the patch size and about
   ``image_size``² pixels;
3. the checkpoint's own normalisation: ``image_mean``/``image_std`` of its ``preprocessor_config.json`` when
   present (``do_normalize: false``: none), else its family's (ImageNet for DINO, 0.5/0.5 for SigLIP);
   the resize filter of step 2 is the preprocessor's ``resample`` (bilinear 2, bicubic 3; lanczos 1 maps to
   bicubic, the nearest filter torch has) when present, else bilinear;
4. the model's ``last_hidden_state`` (after its final LayerNorm, DINOv2's ``x_norm_patchtokens``) without the
   CLS and register tokens: (B, N, D) row-major on the patch grid (h // p, w // p).

The image size is the caller's ``image_size`` (the token grid is a training choice); ``image_size=None``
takes the preprocessor's size, else the model config's. SigLIP's learned position grid is interpolated when
the size differs from its own; SigLIP2 (NaFlex) gets its patches and spatial shapes as its processor makes them.

Steps 1-3 are an ``ImagePreprocessor`` (``enc.preprocessor``): model-free and picklable, so the feature
cache's decode workers run the encoder's own. ``encoder_spec(name, ...)`` reads from the checkpoint's config
files alone (no weights) what ``load_encoder`` would build: its preprocessor, ``model_type``, width and the
prefix tokens it drops; ``feature_record`` of either is what a feature cache records and compares.

Everything runs under ``torch.no_grad`` (not inference mode: the losses save the features for backward).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Union

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
ASPECTS = ("square", "preserve")
PIXEL_RANGES = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0)}
_RANGE_SLACK = 0.05  # resampling and VAE decoding overshoot a little; a wrong convention misses by far more

_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


def _aliases() -> dict[str, str]:
    table = {}
    for letter, size in _SIZES.items():
        plain, reg = f"facebook/dinov2-{size}", f"facebook/dinov2-with-registers-{size}"
        for key in (f"dinov2_vit{letter}14", f"dinov2-vit{letter}14", f"dinov2_{letter}", f"dino_v2_{letter}",
                    f"dinov2-{size}", plain):
            table[key] = plain
        for key in (f"dinov2_vit{letter}14_reg", f"dinov2-vit{letter}14-reg", f"dinov2_{letter}_reg",
                    f"dinov2-with-registers-{size}", reg):
            table[key] = reg
    return table


# Lower-case name -> hub id. torch.hub names (dinov2_vitg14[_reg]), SimpleTuner's spellings (dinov2_g,
# dino_v2_g, dinov2-vitg14) and the hub ids themselves, for the four sizes with and without registers.
ENCODER_ALIASES: dict[str, str] = _aliases()

# DINOv3 and SigLIP by short name -> hub id (kept apart from the DINOv2 table, whose widths are known offline).
# Any other hub id or a local directory of these families loads as well.
EXTRA_ALIASES: dict[str, str] = {
    **{f"dinov3_vit{v}16": f"facebook/dinov3-vit{v}16-pretrain-lvd1689m" for v in ("s", "b", "l", "7b")},
    "dinov3_vith16plus": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
    "siglip_so400m_patch14_384": "google/siglip-so400m-patch14-384",
    "siglip2_so400m_patch16_naflex": "google/siglip2-so400m-patch16-naflex",
}


@dataclass(frozen=True)
class EncoderFamily:
    """How one checkpoint family is loaded and read: its transformers class, its normalisation when the
    checkpoint has no preprocessor config, whether a CLS token (then the registers) precedes the patches."""

    model_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_cls: bool


_DINO = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, has_cls=True)
_SIGLIP = dict(mean=SIGLIP_MEAN, std=SIGLIP_STD, has_cls=False)
# config.model_type -> family. A full SigLIP/SigLIP2 checkpoint (model_type "siglip"/"siglip2") loads its
# vision tower, whose model_type is then the "_vision_model" one.
ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "dinov2": EncoderFamily("Dinov2Model", **_DINO),
    "dinov2_with_registers": EncoderFamily("Dinov2WithRegistersModel", **_DINO),
    "dinov3_vit": EncoderFamily("DINOv3ViTModel", **_DINO),
    **{t: EncoderFamily("SiglipVisionModel", **_SIGLIP) for t in ("siglip", "siglip_vision_model")},
    **{t: EncoderFamily("Siglip2VisionModel", **_SIGLIP) for t in ("siglip2", "siglip2_vision_model")},
}
_CLASS_NAMES = ", ".join(dict.fromkeys(f.model_class for f in ENCODER_FAMILIES.values()))
# PIL's resample codes in preprocessor configs -> torch's filter (antialiased). Lanczos has no torch
# counterpart: bicubic is the nearest smooth filter torch has.
_RESAMPLE = {1: "bicubic", 2: "bilinear", 3: "bicubic"}
_FILTERS = ("bilinear", "bicubic")
# The published config.json / preprocessor_config.json facts of the DINOv2 checkpoints ENCODER_ALIASES names
# (bicubic, ImageNet statistics, 518 px, patch 14, 4 registers), so that their spec needs no download: a run
# on a feature cache checks it offline, and a widths lookup never waits on the network.
_DINOV2_WIDTHS = {"small": 384, "base": 768, "large": 1024, "giant": 1536}
_DINOV2_PREPROCESSOR = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "resample": 3,
                        "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}


def resolve_encoder_name(name_or_path: Union[str, os.PathLike]) -> str:
    """The hub id of a known name or alias, a local directory as given, or a hub id ("org/name") as given."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"encoder must be a name, hub id or directory, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path).strip()
    if os.path.isdir(name):
        return name
    key = name.lower()
    if key in ENCODER_ALIASES:
        return ENCODER_ALIASES[key]
    if key in EXTRA_ALIASES:
        return EXTRA_ALIASES[key]
    if "/" in name and not os.path.isabs(name) and not name.startswith("."):
        return name  # another hub checkpoint, e.g. a fine-tuned DINOv2
    close = difflib.get_close_matches(key, [*ENCODER_ALIASES, *EXTRA_ALIASES], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown encoder {name!r}: not a local directory nor a known name (dinov2_vits14, "
                     f"dinov2_vitb14, dinov2_vitl14, dinov2_vitg14, their _reg variants, "
                     f"{', '.join(EXTRA_ALIASES)}, or a hub id){hint}")


def native_image_size(config) -> int:
    """The side a checkpoint was trained at: its config's image_size, or (SigLIP2 NaFlex) the side of its
    square base position grid."""
    size = getattr(config, "image_size", None)
    if size is None:
        size = math.isqrt(int(config.num_patches)) * int(config.patch_size)
    return int(size if isinstance(size, int) else size[0])


def read_preprocessor_config(resolved: str) -> dict:
    """The checkpoint's ``preprocessor_config.json`` as a dict ({} when it has none)."""
    if os.path.isdir(resolved):
        path = os.path.join(resolved, "preprocessor_config.json")
        path = path if os.path.isfile(path) else None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(resolved, "preprocessor_config.json")
        except LocalEntryNotFoundError as exc:  # offline and not cached: the defaults would be a silent guess
            raise OSError(f"the preprocessor config of {resolved!r} is neither cached nor downloadable "
                          f"({exc})") from exc
        except EntryNotFoundError:  # the checkpoint has none
            path = None
    if path is None:
        return {}
    with open(path) as fh:
        return json.load(fh)


def preprocessor_options(preprocessor: dict, family: EncoderFamily) -> dict:
    """{"image_mean", "image_std", "resample", "size"} from a preprocessor config, the family's defaults
    where it says nothing; ``size`` is its square side, or None (non-square, shortest-edge or NaFlex)."""
    if preprocessor.get("do_normalize", True):
        mean = tuple(float(v) for v in preprocessor.get("image_mean", family.mean))
        std = tuple(float(v) for v in preprocessor.get("image_std", family.std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    code = preprocessor.get("resample", 2)
    if code not in _RESAMPLE:
        raise ValueError(f"preprocessor resample={code!r} (PIL code) has no torch filter here; supported: "
                         f"{sorted(_RESAMPLE)} (lanczos, bilinear, bicubic)")
    size = preprocessor.get("size")
    if isinstance(size, dict):
        size = size.get("height") if size.get("height") == size.get("width") else None
    return {"image_mean": mean, "image_std": std, "resample": _RESAMPLE[code],
            "size": int(size) if isinstance(size, int) else None}


def _published_dinov2(resolved: str):
    """(config, preprocessor config) of a DINOv2 hub id ENCODER_ALIASES names, as published; else None."""
    if resolved not in ENCODER_ALIASES.values():
        return None
    registers = "-with-registers-" in resolved
    config = SimpleNamespace(model_type="dinov2_with_registers" if registers else "dinov2", patch_size=14,
                             hidden_size=_DINOV2_WIDTHS[resolved.rsplit("-", 1)[1]], image_size=518,
                             num_register_tokens=4 if registers else 0)
    return config, copy.deepcopy(_DINOV2_PREPROCESSOR)


def _parse_range(pixel_range) -> tuple[float, float]:
    if isinstance(pixel_range, str) and pixel_range.replace(" ", "") in PIXEL_RANGES:
        return PIXEL_RANGES[pixel_range.replace(" ", "")]
    if isinstance(pixel_range, (tuple, list)) and tuple(float(v) for v in pixel_range) in PIXEL_RANGES.values():
        return tuple(float(v) for v in pixel_range)
    raise ValueError(f"pixel_range must be '-1,1' (diffusers' convention) or '0,1', got {pixel_range!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _channels(name: str, values, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        want = "positive numbers" if positive else "numbers"
        raise ValueError(f"{name} must be 3 finite {want} (one per RGB channel), got {values!r}")
    return out


class ImagePreprocessor:
    """Pixels -> encoder input, steps 1-3 of the module docstring: the part of an encoder without the model.

    ``preprocess(pixels)``: (B, 3, H, W) in ``pixel_range`` -> (B, 3, h, w) normalised, (h, w) =
    ``input_size(H, W)``, in ``dtype``. ``grid(H, W)``: the patch grid of the tokens. ``preprocessing``: the
    JSON-ready record of what the features depend on here (feature caches record and compare it; the input
    convention ``pixel_range`` and ``dtype`` are not in it). It holds no model and pickles small, so the
    feature cache's decode workers run the encoder's own preprocessor: cached tokens equal ``encoder(pixels)``'s.
    """

    def __init__(self, image_size: int, patch_size: int, *, aspect: str = "square", pixel_range="-1,1",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, resample: str = "bilinear", dtype: torch.dtype = torch.float32):
        if not _is_int(patch_size) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if not _is_int(image_size) or image_size < patch_size:
            raise ValueError(f"image_size must be an int ≥ the patch size {patch_size}, got {image_size!r}")
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
        if resample not in _FILTERS:
            raise ValueError(f"resample must be one of {_FILTERS}, got {resample!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype (the model's), got {dtype!r}")
        self.image_size, self.patch_size, self.aspect, self.resample = image_size, patch_size, aspect, resample
        self.pixel_range = _parse_range(pixel_range)
        self.mean, self.std = _channels("mean", mean, positive=False), _channels("std", std, positive=True)
        self.dtype = dtype  # a VisionEncoder keeps it its model's dtype
        self._range_checked = False
        self._stats: dict = {}  # device -> (mean, std) as (1, 3, 1, 1) float32 tensors, copied there once

    @property
    def preprocessing(self) -> dict:
        return {"resize": self.resample, "antialias": True, "image_size": self.image_size, "aspect": self.aspect,
                "patch_size": self.patch_size, "mean": list(self.mean), "std": list(self.std), "tokens": "patch",
                "layernorm": True}

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the encoder sees for an (height, width) image."""
        s, p = self.image_size, self.patch_size
        if self.aspect == "square":
            return s, s
        ratio = height / width
        return max(p, round(s * math.sqrt(ratio) / p) * p), max(p, round(s / math.sqrt(ratio) / p) * p)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (H, W) of the tokens for an (height, width) image."""
        h, w = self.input_size(height, width)
        return h // self.patch_size, w // self.patch_size

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in ``pixel_range`` -> (B, 3, h, w) normalised at the encoder size, in ``dtype``, on the
        pixels' device."""
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"pixels must be a (B, 3, H, W) image tensor, got {shape}")
        if not pixels.is_floating_point():
            raise TypeError(f"pixels must be floating point in {self._range_text()}, got {pixels.dtype}")
        if not self._range_checked:
            self._check_range(pixels)
        lo, hi = self.pixel_range
        x = (pixels.float() - lo) / (hi - lo)
        size = self.input_size(*pixels.shape[2:])
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode=self.resample, align_corners=False, antialias=True)
            if self.resample == "bicubic":  # bicubic overshoots; the processors' 8-bit images cannot
                x = x.clamp(0.0, 1.0)
        mean, std = self._device_stats(x.device)
        return ((x - mean) / std).to(self.dtype)

    def _device_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once per device: a host-to-device copy each call would wait for the device's queue.
        if device not in self._stats:
            self._stats[device] = tuple(torch.tensor(v).view(1, 3, 1, 1).to(device) for v in (self.mean, self.std))
        return self._stats[device]

    def _range_text(self) -> str:
        lo, hi = self.pixel_range
        return f"[{lo:g}, {hi:g}]"

    def _check_range(self, pixels: torch.Tensor) -> None:
        # First call only: it costs a host sync, and a wrong convention shows on the first batch.
        lo, hi = (float(v) for v in pixels.aminmax())
        want_lo, want_hi = self.pixel_range
        slack = _RANGE_SLACK * (want_hi - want_lo) / 2
        if lo < want_lo - slack or hi > want_hi + slack:
            raise ValueError(f"pixels are in [{lo:.3g}, {hi:.3g}] but this encoder expects {self._range_text()} "
                             f"(pixel_range={','.join(f'{v:g}' for v in self.pixel_range)!r}); convert them, or pass "
                             "pixel_range='0,1' / '-1,1' to load_encoder to match your data")
        self._range_checked = True

    def __getstate__(self):
        # Device copies stay behind: a decode worker makes its own on first use.
        return {**self.__dict__, "_stats": {}}

    def __repr__(self) -> str:
        return (f"ImagePreprocessor(image_size={self.image_size}, patch_size={self.patch_size}, "
                f"aspect={self.aspect!r}, resample={self.resample!r}, mean={self.mean}, std={self.std}, "
                f"pixel_range={self.pixel_range}, dtype={self.dtype})")


def _from_preprocessor(attr: str) -> property:
    """A read-only attribute of an encoder (or spec) that is its preprocessor's ``attr``: one owner, no copy."""
    return property(lambda self: getattr(self.preprocessor, attr), doc=f"``preprocessor.{attr}``")


def _prefix_tokens(config) -> int:
    """Tokens ahead of the patches in last_hidden_state: the CLS, then the registers (none for SigLIP)."""
    family = ENCODER_FAMILIES[config.model_type]
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0) if family.has_cls else 0


@dataclass
class EncoderSpec:
    """What ``load_encoder`` would build, read from the checkpoint's config files alone (``encoder_spec``): the
    attributes a ``VisionEncoder`` has that its features depend on, without its weights."""

    name: str
    model_type: str
    hidden_size: int
    prefix_tokens: int
    preprocessor: ImagePreprocessor

    patch_size = _from_preprocessor("patch_size")
    image_size = _from_preprocessor("image_size")
    preprocessing = _from_preprocessor("preprocessing")


class VisionEncoder(torch.nn.Module):
    """A frozen encoder: ``enc(pixels) -> (patch tokens (B, N, D), grid (H, W))``; see the module docstring.

    ``preprocessor``: its ``ImagePreprocessor`` (steps 1-3); ``image_size``, ``patch_size``, ``aspect``,
    ``pixel_range``, ``resample``, ``image_mean``, ``image_std``, ``preprocessing`` (JSON-ready dict of what the
    features depend on; feature caches compare it), ``input_size``, ``grid`` and ``preprocess`` are its.
    Attributes of its own: ``name`` (hub id or directory), ``model_type``, ``hidden_size`` (D),
    ``num_register_tokens``, ``prefix_tokens`` (dropped ahead of the patches), ``max_batch``. Tokens come back
    in the model's dtype (the preprocessor's output follows ``.to(dtype)``). ``image_mean``/``image_std``: None
    takes the family's defaults (load_encoder passes the preprocessor config's).
    """

    image_size = _from_preprocessor("image_size")
    patch_size = _from_preprocessor("patch_size")
    aspect = _from_preprocessor("aspect")
    pixel_range = _from_preprocessor("pixel_range")
    resample = _from_preprocessor("resample")
    image_mean = _from_preprocessor("mean")
    image_std = _from_preprocessor("std")
    preprocessing = _from_preprocessor("preprocessing")

    def __init__(self, model: torch.nn.Module, image_size: Optional[int] = 518, *, name: Optional[str] = None,
                 max_batch: Optional[int] = None, aspect: str = "square", pixel_range="-1,1",
                 image_mean: Optional[tuple] = None, image_std: Optional[tuple] = None,
                 resample: str = "bilinear"):
        super().__init__()
        config = getattr(model, "config", None)
        family = ENCODER_FAMILIES.get(getattr(config, "model_type", None))
        if family is None or type(model).__name__ != family.model_class:
            raise TypeError(f"VisionEncoder wraps a transformers {_CLASS_NAMES}, got {type(model).__name__}")
        if max_batch is not None and (not _is_int(max_batch) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
        self.preprocessor = ImagePreprocessor(
            native_image_size(config) if image_size is None else image_size, int(config.patch_size), aspect=aspect,
            pixel_range=pixel_range, mean=family.mean if image_mean is None else image_mean,
            std=family.std if image_std is None else image_std, resample=resample, dtype=model.dtype)
        self.model = model.eval().requires_grad_(False)
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__
        self.hidden_size = int(config.hidden_size)
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        self.model_type = config.model_type
        self.prefix_tokens = _prefix_tokens(config)
        self.max_batch = max_batch
        self.train(False)

    def train(self, mode: bool = True):
        # Frozen: a parent's .train() must not switch the encoder out of eval mode.
        return super().train(False)

    def _apply(self, fn, recurse=True):
        # .to(dtype), .half(), .bfloat16() change what the model takes: the preprocessor's output follows.
        module = super()._apply(fn, recurse)
        self.preprocessor.dtype = self.model.dtype
        return module

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the encoder sees for an (height, width) image."""
        return self.preprocessor.input_size(height, width)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (H, W) of the tokens for an (height, width) image."""
        return self.preprocessor.grid(height, width)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in ``pixel_range`` -> (B, 3, h, w) normalised at the encoder size, in the model's dtype."""
        return self.preprocessor.preprocess(pixels)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) images in ``pixel_range`` -> (patch tokens (B, N, D), grid (H_p, W_p)), N = H_p·W_p."""
        x = self.preprocess(pixels.to(self.model.device) if isinstance(pixels, torch.Tensor) else pixels)
        chunks = [x] if self.max_batch is None else x.split(self.max_batch)
        tokens = torch.cat([self.patch_tokens(c) for c in chunks])
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        return tokens, grid

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, h, w) preprocessed (``preprocess``'s output) -> (b, N, D) patch tokens of the model's last hidden
        state, the ``prefix_tokens`` dropped. Autograd as the caller has it (``forward`` runs it under no_grad)."""
        if self.model_type == "siglip2_vision_model":
            # NaFlex: flattened patches (channels last within a patch, as its processor lays them out), the
            # patch grid per image, every patch valid; the model resizes its position grid to that shape.
            p, (b, c, h, w) = self.patch_size, x.shape
            gh, gw = h // p, w // p
            patches = (x[:, :, :gh * p, :gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
                       .reshape(b, gh * gw, p * p * c))
            shapes = torch.tensor([[gh, gw]] * b, device=x.device)
            mask = torch.ones(b, gh * gw, dtype=torch.int32, device=x.device)
            return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        if self.model_type == "siglip_vision_model":
            native = int(self.model.config.image_size)  # its learned position grid is for this size only
            return self.model(pixel_values=x, interpolate_pos_encoding=tuple(x.shape[2:]) != (native, native)
                              ).last_hidden_state
        return self.model(pixel_values=x).last_hidden_state[:, self.prefix_tokens:]

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, image_size={self.image_size}, aspect={self.aspect!r}, "
                f"hidden_size={self.hidden_size}, patch_size={self.patch_size}")


def feature_record(encoder) -> dict:
    """What an encoder's tokens depend on besides the image (feature caches record it; a cache is used only with
    an encoder of the same record): ``encoder`` (its name), ``image_size``, ``preprocessing``, ``model_type``,
    ``prefix_tokens`` and ``hidden_size`` of a ``VisionEncoder`` or an ``EncoderSpec``."""
    return {"encoder": encoder.name, "image_size": int(encoder.image_size), "preprocessing": encoder.preprocessing,
            "model_type": encoder.model_type, "prefix_tokens": int(encoder.prefix_tokens),
            "hidden_size": int(encoder.hidden_size)}


def encoder_identity(name) -> Optional[str]:
    """What an encoder name means, to compare two: names and aliases by hub id, folders by their real path; an
    unresolvable name as given; None stays None."""
    if name is None:
        return None
    try:
        resolved = resolve_encoder_name(str(name))
    except ValueError:
        return str(name)
    return os.path.realpath(resolved) if os.path.isdir(resolved) else resolved


def record_differences(found: dict, wanted: dict, keys=None) -> list[str]:
    """The keys of ``wanted`` (or ``keys``) on which the record ``found`` differs (a key one record lacks is
    None there: a cache from before a field was recorded differs from any value); encoders by identity."""
    def same(key):
        if key == "encoder":
            return encoder_identity(found.get(key)) == encoder_identity(wanted.get(key))
        return found.get(key) == wanted.get(key)

    return [key for key in (wanted if keys is None else keys) if not same(key)]


def encoder_spec(name_or_path: Union[str, os.PathLike] = "dinov2_vitg14", image_size: Optional[int] = 518, *,
                 aspect: str = "square", pixel_range="-1,1", dtype: torch.dtype = torch.float32) -> EncoderSpec:
    """The ``EncoderSpec`` of ``load_encoder(name_or_path, image_size, aspect=..., pixel_range=..., dtype=...)``
    from the checkpoint's ``config.json`` and ``preprocessor_config.json`` alone: no weights are read, and the
    DINOv2 names need no download (their published configs are known). Raises ValueError for an unsupported
    checkpoint or bad arguments, OSError when a hub checkpoint's files cannot be fetched."""
    resolved = resolve_encoder_name(name_or_path)
    config, preprocessor = _checkpoint_configs(resolved)
    family = ENCODER_FAMILIES[config.model_type]
    options = preprocessor_options(preprocessor, family)
    if image_size is None:
        image_size = options["size"] or native_image_size(config)
    return EncoderSpec(
        name=resolved, model_type=config.model_type, hidden_size=int(config.hidden_size),
        prefix_tokens=_prefix_tokens(config),
        preprocessor=ImagePreprocessor(image_size, int(config.patch_size), aspect=aspect, pixel_range=pixel_range,
                                       mean=options["image_mean"], std=options["image_std"],
                                       resample=options["resample"], dtype=dtype))


def _checkpoint_configs(resolved: str) -> tuple:
    """(the vision model's config, the preprocessor config dict) of a resolved checkpoint, weights unread."""
    published = _published_dinov2(resolved)
    if published is not None:
        return published
    import transformers

    config = transformers.AutoConfig.from_pretrained(resolved, trust_remote_code=False)
    if config.model_type not in ENCODER_FAMILIES:
        raise ValueError(f"{resolved!r} is a {config.model_type!r} checkpoint; load_encoder supports DINOv2, "
                         f"DINOv3 ViT, SigLIP and SigLIP2 (model_type one of {sorted(ENCODER_FAMILIES)})")
    # A full SigLIP/SigLIP2 checkpoint: the vision tower's part, as its vision model class loads it.
    return getattr(config, "vision_config", config), read_preprocessor_config(resolved)


def load_encoder(name_or_path: Union[str, os.PathLike] = "dinov2_vitg14", image_size: Optional[int] = 518, *,
                 device=None, dtype: Optional[torch.dtype] = None, max_batch: Optional[int] = None,
                 aspect: str = "square", pixel_range="-1,1") -> VisionEncoder:
    """A frozen, eval-mode ``VisionEncoder`` from a name, alias, hub id or local directory.

    ``image_size``: side of the square the images are resized to (518 = 37 patches of 14, SimpleTuner's
    default); with ``aspect="preserve"`` the area target instead; None: the preprocessor's square size, else
    the model config's. ``dtype``: the model's weights (default float32; bfloat16 halves the memory of ViT-g
    on GPU). ``max_batch``: encode at most this many images per model call, to bound activation memory.
    ``pixel_range``: "-1,1" (default) or "0,1". Normalisation and resize filter: the checkpoint's
    preprocessor config when it has one (module docstring). Its preprocessing is ``encoder_spec``'s (the same
    arguments), so what a cache or a config predicts without the weights is what this builds.
    """
    import transformers

    dtype = dtype or torch.float32
    spec = encoder_spec(name_or_path, image_size, aspect=aspect, pixel_range=pixel_range, dtype=dtype)
    # The class loads its own config: for a full SigLIP checkpoint, the vision tower's part of it.
    model = getattr(transformers, ENCODER_FAMILIES[spec.model_type].model_class).from_pretrained(
        spec.name, dtype=dtype, trust_remote_code=False)
    p = spec.preprocessor
    encoder = VisionEncoder(model, p.image_size, name=spec.name, max_batch=max_batch, aspect=p.aspect,
                            pixel_range=p.pixel_range, image_mean=p.mean, image_std=p.std, resample=p.resample)
    return encoder.to(device) if device is not None else encoder

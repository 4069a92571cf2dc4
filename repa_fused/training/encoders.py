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

Everything runs under ``torch.no_grad`` (not inference mode: the losses save the features for backward).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
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
        from transformers.utils import cached_file

        path = cached_file(resolved, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
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


def _parse_range(pixel_range) -> tuple[float, float]:
    if isinstance(pixel_range, str) and pixel_range.replace(" ", "") in PIXEL_RANGES:
        return PIXEL_RANGES[pixel_range.replace(" ", "")]
    if isinstance(pixel_range, (tuple, list)) and tuple(float(v) for v in pixel_range) in PIXEL_RANGES.values():
        return tuple(float(v) for v in pixel_range)
    raise ValueError(f"pixel_range must be '-1,1' (diffusers' convention) or '0,1', got {pixel_range!r}")


class VisionEncoder(torch.nn.Module):
    """A frozen encoder: ``enc(pixels) -> (patch tokens (B, N, D), grid (H, W))``; see the module docstring.

    Attributes: ``name`` (hub id or directory), ``model_type``, ``hidden_size`` (D), ``patch_size``,
    ``image_size``, ``num_register_tokens``, ``aspect``, ``pixel_range``, ``max_batch``, ``image_mean``,
    ``image_std``, ``resample``, ``preprocessing`` (JSON-ready dict of what the features depend on; feature
    caches compare it). Tokens come back in the model's dtype. ``image_mean``/``image_std``/``resample``:
    None takes the family's defaults (load_encoder passes the preprocessor config's).
    """

    def __init__(self, model: torch.nn.Module, image_size: Optional[int] = 518, *, name: Optional[str] = None,
                 max_batch: Optional[int] = None, aspect: str = "square", pixel_range="-1,1",
                 image_mean: Optional[tuple] = None, image_std: Optional[tuple] = None,
                 resample: str = "bilinear"):
        super().__init__()
        config = getattr(model, "config", None)
        family = ENCODER_FAMILIES.get(getattr(config, "model_type", None))
        if family is None or type(model).__name__ != family.model_class:
            raise TypeError(f"VisionEncoder wraps a transformers {_CLASS_NAMES}, got {type(model).__name__}")
        if image_size is None:
            image_size = native_image_size(config)
        if resample not in ("bilinear", "bicubic"):
            raise ValueError(f"resample must be 'bilinear' or 'bicubic', got {resample!r}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < config.patch_size:
            raise ValueError(f"image_size must be an int ≥ the patch size {config.patch_size}, got {image_size!r}")
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
        self.model = model.eval().requires_grad_(False)
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__
        self.image_size = image_size
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        self.model_type = config.model_type
        # Tokens ahead of the patches in last_hidden_state: the CLS, then the registers (none for SigLIP).
        self._prefix_tokens = 1 + self.num_register_tokens if family.has_cls else 0
        self.image_mean = tuple(image_mean or family.mean)
        self.image_std = tuple(image_std or family.std)
        self.resample = resample
        self.aspect = aspect
        self.pixel_range = _parse_range(pixel_range)
        self.max_batch = max_batch
        self._range_checked = False
        self.register_buffer("_mean", torch.tensor(self.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.image_std).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    @property
    def preprocessing(self) -> dict:
        # getattr: the regularizers predict a DINOv2 record from (image_size, aspect, patch_size) alone.
        return {"resize": getattr(self, "resample", "bilinear"), "antialias": True, "image_size": self.image_size,
                "aspect": self.aspect, "patch_size": self.patch_size,
                "mean": list(getattr(self, "image_mean", IMAGENET_MEAN)),
                "std": list(getattr(self, "image_std", IMAGENET_STD)), "tokens": "patch", "layernorm": True}

    def train(self, mode: bool = True):
        # Frozen: a parent's .train() must not switch the encoder out of eval mode.
        return super().train(False)

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
        """(B, 3, H, W) in ``pixel_range`` -> (B, 3, h, w) normalised at the encoder size, in the model's dtype."""
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
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x.to(self.model.dtype)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) images in ``pixel_range`` -> (patch tokens (B, N, D), grid (H_p, W_p)), N = H_p·W_p."""
        x = self.preprocess(pixels.to(self._mean.device))
        chunks = [x] if self.max_batch is None else x.split(self.max_batch)
        tokens = torch.cat([self._patch_tokens(c) for c in chunks])
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        return tokens, grid

    def _patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, h, w) preprocessed -> (b, N, D) patch tokens of the model's last hidden state."""
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
        return self.model(pixel_values=x).last_hidden_state[:, self._prefix_tokens:]

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

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, image_size={self.image_size}, aspect={self.aspect!r}, "
                f"hidden_size={self.hidden_size}, patch_size={self.patch_size}")


def load_encoder(name_or_path: Union[str, os.PathLike] = "dinov2_vitg14", image_size: Optional[int] = 518, *,
                 device=None, dtype: Optional[torch.dtype] = None, max_batch: Optional[int] = None,
                 aspect: str = "square", pixel_range="-1,1") -> VisionEncoder:
    """A frozen, eval-mode ``VisionEncoder`` from a name, alias, hub id or local directory.

    ``image_size``: side of the square the images are resized to (518 = 37 patches of 14, SimpleTuner's
    default); with ``aspect="preserve"`` the area target instead; None: the preprocessor's square size, else
    the model config's. ``dtype``: the model's weights (default float32; bfloat16 halves the memory of ViT-g
    on GPU). ``max_batch``: encode at most this many images per model call, to bound activation memory.
    ``pixel_range``: "-1,1" (default) or "0,1". Normalisation and resize filter: the checkpoint's
    preprocessor config when it has one (module docstring).
    """
    import transformers

    resolved = resolve_encoder_name(name_or_path)
    config = transformers.AutoConfig.from_pretrained(resolved, trust_remote_code=False)
    family = ENCODER_FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"{resolved!r} is a {config.model_type!r} checkpoint; load_encoder supports DINOv2, "
                         f"DINOv3 ViT, SigLIP and SigLIP2 (model_type one of {sorted(ENCODER_FAMILIES)})")
    # The class loads its own config: for a full SigLIP checkpoint, the vision tower's part of it.
    model = getattr(transformers, family.model_class).from_pretrained(resolved, dtype=dtype or torch.float32,
                                                                      trust_remote_code=False)
    options = preprocessor_options(read_preprocessor_config(resolved), family)
    if image_size is None:
        image_size = options["size"] or native_image_size(model.config)
    encoder = VisionEncoder(model, image_size, name=resolved, max_batch=max_batch, aspect=aspect,
                            pixel_range=pixel_range, image_mean=options["image_mean"],
                            image_std=options["image_std"], resample=options["resample"])
    return encoder.to(device) if device is not None else encoder

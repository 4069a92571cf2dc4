"""Frozen DINOv2 encoders (through transformers) giving the target features of REPA and U-REPA.

``load_encoder(name)`` accepts a short name (``dinov2_vitg14``, ``dinov2_vitb14_reg``, ...), one of SimpleTuner's
aliases (``dinov2_g``, ``dino_v2_s``, ``dinov2-vitb14``, ...), a hub id (``facebook/dinov2-giant``) or a local
directory written by ``save_pretrained``. The model class comes from the checkpoint's config:
``Dinov2Model`` or ``Dinov2WithRegistersModel``; no remote code is ever run.

``VisionEncoder(pixels)`` maps (B, 3, H, W) images to their patch tokens:

1. pixels in ``pixel_range`` ("-1,1", the diffusers convention, or "0,1") -> [0, 1];
2. bilinear resize with antialiasing to ``image_size`` × ``image_size`` (``aspect="square"``, as SimpleTuner)
   or, with ``aspect="preserve"``, to the H:W ratio with both sides multiples of the patch size and about
   ``image_size``² pixels;
3. ImageNet normalisation (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225);
4. the model's ``last_hidden_state`` (after its final LayerNorm, DINOv2's ``x_norm_patchtokens``) without the
   CLS and register tokens: (B, N, D) row-major on the patch grid (h // p, w // p).

Everything runs under ``torch.no_grad`` (not inference mode: the losses save the features for backward).
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
    if "/" in name and not os.path.isabs(name) and not name.startswith("."):
        return name  # another hub checkpoint, e.g. a fine-tuned DINOv2
    close = difflib.get_close_matches(key, list(ENCODER_ALIASES), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown encoder {name!r}: not a local directory nor a known name (dinov2_vits14, "
                     f"dinov2_vitb14, dinov2_vitl14, dinov2_vitg14, their _reg variants, or a hub id){hint}")


def _parse_range(pixel_range) -> tuple[float, float]:
    if isinstance(pixel_range, str) and pixel_range.replace(" ", "") in PIXEL_RANGES:
        return PIXEL_RANGES[pixel_range.replace(" ", "")]
    if isinstance(pixel_range, (tuple, list)) and tuple(float(v) for v in pixel_range) in PIXEL_RANGES.values():
        return tuple(float(v) for v in pixel_range)
    raise ValueError(f"pixel_range must be '-1,1' (diffusers' convention) or '0,1', got {pixel_range!r}")


class VisionEncoder(torch.nn.Module):
    """A frozen DINOv2: ``enc(pixels) -> (patch tokens (B, N, D), grid (H, W))``; see the module docstring.

    Attributes: ``name`` (hub id or directory), ``hidden_size`` (D), ``patch_size``, ``image_size``,
    ``num_register_tokens``, ``aspect``, ``pixel_range``, ``max_batch``, ``preprocessing`` (JSON-ready dict of
    what the features depend on; feature caches compare it). Tokens come back in the model's dtype.
    """

    def __init__(self, model: torch.nn.Module, image_size: int = 518, *, name: Optional[str] = None,
                 max_batch: Optional[int] = None, aspect: str = "square", pixel_range="-1,1"):
        super().__init__()
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in ("dinov2", "dinov2_with_registers"):
            raise TypeError(f"VisionEncoder wraps a transformers Dinov2Model or Dinov2WithRegistersModel, got "
                            f"{type(model).__name__}")
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
        self.aspect = aspect
        self.pixel_range = _parse_range(pixel_range)
        self.max_batch = max_batch
        self._range_checked = False
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    @property
    def preprocessing(self) -> dict:
        return {"resize": "bilinear", "antialias": True, "image_size": self.image_size, "aspect": self.aspect,
                "patch_size": self.patch_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "tokens": "patch", "layernorm": True}

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
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x.to(self.model.dtype)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) images in ``pixel_range`` -> (patch tokens (B, N, D), grid (H_p, W_p)), N = H_p·W_p."""
        x = self.preprocess(pixels.to(self._mean.device))
        chunks = [x] if self.max_batch is None else x.split(self.max_batch)
        skip = 1 + self.num_register_tokens  # CLS, then the registers, then the patches
        tokens = torch.cat([self.model(pixel_values=c).last_hidden_state[:, skip:] for c in chunks])
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        return tokens, grid

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


def load_encoder(name_or_path: Union[str, os.PathLike] = "dinov2_vitg14", image_size: int = 518, *,
                 device=None, dtype: Optional[torch.dtype] = None, max_batch: Optional[int] = None,
                 aspect: str = "square", pixel_range="-1,1") -> VisionEncoder:
    """A frozen, eval-mode ``VisionEncoder`` from a name, alias, hub id or local directory.

    ``image_size``: side of the square the images are resized to (518 = 37 patches of 14, SimpleTuner's
    default); with ``aspect="preserve"`` the area target instead. ``dtype``: the model's weights (default
    float32; bfloat16 halves the memory of ViT-g on GPU). ``max_batch``: encode at most this many images per
    model call, to bound activation memory. ``pixel_range``: "-1,1" (default) or "0,1".
    """
    from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

    resolved = resolve_encoder_name(name_or_path)
    config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)
    classes = {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel}
    if config.model_type not in classes:
        raise ValueError(f"{resolved!r} is a {config.model_type!r} checkpoint; load_encoder supports DINOv2 "
                         "(model_type 'dinov2' or 'dinov2_with_registers')")
    model = classes[config.model_type].from_pretrained(resolved, config=config, dtype=dtype or torch.float32,
                                                       trust_remote_code=False)
    encoder = VisionEncoder(model, image_size, name=resolved, max_batch=max_batch, aspect=aspect,
                            pixel_range=pixel_range)
    return encoder.to(device) if device is not None else encoder

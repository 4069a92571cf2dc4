"""iREPA (SimpleTuner's ``irepa_*`` keys) for both regularizers: the teacher's spatial z-score and the
convolutional projector.

* ``spatial_normalize(y, alpha)``: per image and channel, over the tokens,
  ``(y − α·mean_n y) / (std_n y + 1e-6)`` with Bessel's correction (N − 1) when N > 1. One token has no
  spatial spread: its std is defined as 0, so the token becomes ``(1 − α)·y / 1e-6``, the same direction
  as y (α < 1) or zero (α = 1); the losses normalise every token, so that is y's own loss (α < 1) or a
  zero target (α = 1), never NaN. Applied on the encoder's grid, before any grid alignment. Plain
  differentiable torch ops, so exact when y requires grad.
* ``ConvProjector``: ``Conv2d(C, D, k, padding=k // 2)`` over the hidden token grid, k odd (the output
  grid is the input grid), mapping (B, N, C) tokens on (H, W) to (B, N, D).

The z-score is one elementwise pass over y (B·N·D values, e.g. 67 MB in bf16 at SDXL's shape: tens of
microseconds on a GPU), negligible against the loss; folding its per-(image, channel) affine map into the
kernels' loads would change every kernel's signature for that, so it is not done.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ZSCORE_EPS = 1e-6


def spatial_normalize(y: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """(B, N, D) -> (B, N, D) float32 (float64 for float64 input): iREPA's per-channel z-score over the tokens
    (see the module doc). Not cast back to y's dtype: a constant channel (or a single token) becomes
    (1 − α)·y / 1e-6, which overflows float16 and would turn the loss into NaN.
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 3:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a (B, N, D) tensor of encoder tokens, got {shape}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"irepa_spatial_norm_alpha must be a finite number, got {alpha!r}")
    x = y.to(torch.promote_types(y.dtype, torch.float32))
    mean = x.mean(1, keepdim=True)
    if x.shape[1] > 1:
        std = x.std(1, keepdim=True, correction=1)
    else:
        std = torch.zeros_like(mean)  # one token: no spread (module doc)
    return (x - alpha * mean) / (std + ZSCORE_EPS)


def check_kernel_size(kernel_size) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"irepa_projector_kernel_size must be an odd positive int (the output grid is the "
                         f"input grid only with padding k // 2 on an odd k), got {kernel_size!r}")
    return kernel_size


class TokenConv2d(nn.Conv2d):
    """A Conv2d that names its output width as a Linear does (``out_features``), for the projector's users."""

    @property
    def out_features(self) -> int:
        return self.out_channels


class ConvProjector(nn.Sequential):
    """iREPA's projector: ``(tokens (B, N, C), grid (H, W)) -> (B, N, D)`` by Conv2d(C, D, k, padding=k // 2).

    A Sequential of one conv so that ``projector[-1]`` is the output layer, as for the other projectors.
    """

    def __init__(self, in_width: int, out_width: int, kernel_size: int = 3):
        k = check_kernel_size(kernel_size)
        super().__init__(TokenConv2d(in_width, out_width, k, padding=k // 2))

    def forward(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, N, C), got shape {tuple(tokens.shape)}")
        height, width = (int(v) for v in grid)
        batch, n, channels = tokens.shape
        if height * width != n:
            raise ValueError(f"grid {tuple(grid)} has {height * width} cells but the tokens number {n}")
        image = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self[0](image).flatten(2).transpose(1, 2)

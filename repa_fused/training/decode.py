"""Latents -> pixels, for encoders that need the clean image when the trainer only holds its latents.

The diffusion latents are the VAE's raw latents z normalised as diffusers' pipelines expect; decoding undoes
that exactly as the pipelines do before ``vae.decode``:

- with ``latents_mean`` and ``latents_std`` in the config (e.g. some SDXL fine-tunes):
  ``z = latents · std / scaling_factor + mean`` (per channel);
- otherwise ``z = latents / scaling_factor + shift_factor`` (``shift_factor`` 0 when absent: SD1.5, SDXL;
  0.0609 for SD3, 0.1159 for Flux).

``AutoencoderTiny`` (TAESD, TAESDXL, TAESD3, TAEF1) follows the same rule with its own config, which is how
its decoder expects its input. Both decoders already return images in [-1, 1]; the small overshoot is
clamped away.
"""

from __future__ import annotations

import warnings

import torch

SUPPORTED_VAES = ("AutoencoderKL", "AutoencoderTiny")


def _vae_class(vae) -> str:
    for cls in type(vae).__mro__:
        if cls.__name__ in SUPPORTED_VAES:
            return cls.__name__
    raise TypeError(f"vae must be a diffusers {' or '.join(SUPPORTED_VAES)}, got {type(vae).__name__}")


def _channel_stat(values, latents: torch.Tensor, name: str) -> torch.Tensor:
    stat = torch.as_tensor(values, dtype=torch.float32, device=latents.device).flatten()
    if stat.numel() != latents.shape[1]:
        raise ValueError(f"vae.config.{name} has {stat.numel()} values but the latents have {latents.shape[1]} "
                         "channels")
    return stat.view(1, -1, 1, 1)


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """(B, C, h, w) diffusion latents -> (B, 3, H, W) images in [-1, 1], in the VAE's dtype, on its device.

    ``vae``: a diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` (anything else: TypeError). Runs under
    ``no_grad``. Packed latents (Flux's (B, N, 64) tokens) must be unpacked to (B, 16, h, w) first.
    """
    kind = _vae_class(vae)
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a (B, C, h, w) tensor, got {shape} (unpack packed latents first)")
    config = vae.config
    channels = config.latent_channels
    if latents.shape[1] != channels:
        raise ValueError(f"latents have {latents.shape[1]} channels but the {kind} expects {channels}")
    param = next(vae.parameters())
    if param.dtype == torch.float16 and getattr(config, "force_upcast", False):
        warnings.warn(f"decoding with a float16 {kind} whose config asks for float32 (force_upcast): it may give "
                      "NaN images; use vae.to(torch.float32), bfloat16, or an fp16-safe VAE", stacklevel=2)
    z = latents.to(param.device, torch.float32)
    scale = float(config.scaling_factor)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        z = z * _channel_stat(std, z, "latents_std") / scale + _channel_stat(mean, z, "latents_mean")
    else:
        z = z / scale + float(getattr(config, "shift_factor", None) or 0.0)
    images = vae.decode(z.to(param.dtype), return_dict=False)[0]
    return images.clamp(-1.0, 1.0)

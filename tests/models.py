"""Tiny random models shared by the capture, encoder, decode and regularizer tests.

Every builder is seeded and small enough to run a forward and a backward on CPU in well under a second.
DiT builders return a `Tiny`: the model, a function making one forward's keyword arguments, the image
token grid those inputs give, the number of hookable blocks and the hidden width. The grid is deliberately
non-square (3 × 4 tokens; DiTTransformer2DModel, which only unpatchifies squares, gets 4 × 4) so a transposed
or squared grid cannot pass a test by accident.

    from models import TINY_DIT, TINY_UNET, tiny_dinov2
    t = TINY_DIT["flux"]()
    out = t.model(**t.inputs(batch=2))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

GRID = (3, 4)  # image tokens (rows, columns) of the DiT cases


@dataclass
class Tiny:
    name: str
    model: torch.nn.Module
    inputs: Callable[..., dict]   # inputs(batch=2, seed=0) -> forward kwargs
    grid: tuple[int, int]         # image token grid of those inputs
    num_blocks: int               # hookable blocks (DiT) — Flux-like: double + single
    hidden_width: int             # channels of the captured tokens
    kind: str = "dit"


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _packed_ids(h, w, axes):
    """Flux-style position ids: (h·w, axes) with column 1 = row, column 2 = column."""
    ids = torch.zeros(h, w, axes)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, axes)


def _flux_like(name, cls, axes, **config):
    """Flux, Flux2 and Chroma take packed (B, N, C) latents plus img_ids / txt_ids."""
    torch.manual_seed(0)
    model = cls(**config).eval()
    h, w = GRID
    n_txt = 5

    def inputs(batch=2, seed=0):
        kw = dict(
            hidden_states=_rand(batch, h * w, config["in_channels"], seed=seed),
            encoder_hidden_states=_rand(batch, n_txt, config["joint_attention_dim"], seed=seed + 1),
            timestep=torch.full((batch,), 0.5),
            img_ids=_packed_ids(h, w, axes),
            txt_ids=torch.zeros(n_txt, axes),
            return_dict=False,
        )
        if name == "flux":
            kw["pooled_projections"] = _rand(batch, config["pooled_projection_dim"], seed=seed + 2)
        if name == "flux2":
            kw["guidance"] = torch.full((batch,), 3.5)
        return kw

    width = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    return Tiny(name, model, inputs, GRID, blocks, width)


def build_flux():
    from diffusers import FluxTransformer2DModel

    return _flux_like(
        "flux", FluxTransformer2DModel, 3, patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


def build_flux2():
    from diffusers import Flux2Transformer2DModel

    return _flux_like(
        "flux2", Flux2Transformer2DModel, 4, patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True,
    )


def build_chroma():
    from diffusers import ChromaTransformer2DModel

    return _flux_like(
        "chroma", ChromaTransformer2DModel, 3, patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
    )


def _spatial(name, model, channels, patch, width, blocks, extra, grid=GRID):
    """Families that take (B, C, H, W) latents and patchify inside the model."""
    h, w = grid

    def inputs(batch=2, seed=0):
        kw = dict(hidden_states=_rand(batch, channels, h * patch, w * patch, seed=seed), return_dict=False)
        kw.update(extra(batch, seed))
        return kw

    return Tiny(name, model.eval(), inputs, grid, blocks, width)


def build_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16,
    )
    return _spatial("sd3", model, 4, 2, 16, 3, lambda b, s: dict(
        encoder_hidden_states=_rand(b, 5, 16, seed=s + 1), pooled_projections=_rand(b, 8, seed=s + 2),
        timestep=torch.full((b,), 500)))


def build_auraflow():
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    model = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    )
    return _spatial("auraflow", model, 4, 2, 16, 4, lambda b, s: dict(
        encoder_hidden_states=_rand(b, 5, 16, seed=s + 1), timestep=torch.full((b,), 500)))


def build_sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1,
    )
    return _spatial("sana", model, 4, 1, 16, 2, lambda b, s: dict(
        encoder_hidden_states=_rand(b, 5, 16, seed=s + 1), timestep=torch.full((b,), 500)))


def build_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        norm_num_groups=4, cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=2,
        use_additional_conditions=False,
    )
    return _spatial("pixart", model, 4, 2, 16, 2, lambda b, s: dict(
        encoder_hidden_states=_rand(b, 5, 16, seed=s + 1), timestep=torch.full((b,), 500),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}))


def build_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        norm_num_groups=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )
    # DiTTransformer2DModel unpatchifies square grids only.
    return _spatial("dit", model, 4, 2, 16, 2, lambda b, s: dict(
        timestep=torch.full((b,), 5), class_labels=torch.arange(b) % 10), grid=(4, 4))


def build_hidream():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[8, 8], text_emb_dim=8, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1, 2, 3),
    )
    return _spatial("hidream", model, 4, 2, 16, 4, lambda b, s: dict(
        timesteps=torch.full((b,), 500), encoder_hidden_states_t5=_rand(b, 5, 8, seed=s + 1),
        encoder_hidden_states_llama3=_rand(4, b, 3, 8, seed=s + 2), pooled_embeds=_rand(b, 8, seed=s + 3)))


def build_lumina2():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    model = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(2, 2, 4), axes_lens=(64, 16, 16),
        cap_feat_dim=8,
    )

    def extra(b, s):
        # Ragged captions (5 and 3 valid tokens) so the image tokens start at a different place per sample.
        mask = torch.zeros(b, 5, dtype=torch.bool)
        for i in range(b):
            mask[i, : 5 - 2 * (i % 2)] = True
        return dict(timestep=torch.full((b,), 0.5), encoder_hidden_states=_rand(b, 5, 8, seed=s + 1),
                    encoder_attention_mask=mask)

    return _spatial("lumina2", model, 4, 2, 16, 2, extra)


TINY_DIT: dict[str, Callable[[], Tiny]] = {
    "flux": build_flux, "flux2": build_flux2, "chroma": build_chroma, "sd3": build_sd3,
    "auraflow": build_auraflow, "sana": build_sana, "pixart": build_pixart, "dit": build_dit,
    "hidream": build_hidream, "lumina2": build_lumina2,
}


def _unet(name, **extra_config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    config.update(extra_config)
    model = UNet2DConditionModel(**config).eval()
    sdxl = extra_config.get("addition_embed_type") == "text_time"

    def inputs(batch=2, seed=0, size=(12, 16)):
        kw = dict(sample=_rand(batch, 4, *size, seed=seed), timestep=torch.full((batch,), 500),
                  encoder_hidden_states=_rand(batch, 5, 16, seed=seed + 1), return_dict=False)
        if sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": _rand(batch, 8, seed=seed + 2),
                                       "time_ids": torch.tensor([[12.0, 16, 0, 0, 12, 16]]).repeat(batch, 1)}
        return kw

    # Two resolution levels: the mid block sees the latent downsampled once (12 × 16 -> 6 × 8).
    return Tiny(name, model, inputs, (6, 8), 0, config["block_out_channels"][-1], kind="unet")


def build_unet_sd15():
    return _unet("sd15")


def build_unet_sdxl():
    # SDXL's micro-conditioning: pooled text embeds (8) + 6 time ids × addition_time_embed_dim (4) = 32.
    return _unet("sdxl", addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4, transformer_layers_per_block=(1, 2))


TINY_UNET: dict[str, Callable[[], Tiny]] = {"sd15": build_unet_sd15, "sdxl": build_unet_sdxl}


def tiny_dinov2(directory, registers: bool = False, image_size: int = 28, patch_size: int = 7) -> str:
    """A random Dinov2 (or Dinov2WithRegisters, 2 register tokens) saved with save_pretrained; returns the path."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    common = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  image_size=image_size, patch_size=patch_size)
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    path = str(directory)
    model.save_pretrained(path)
    return path


def tiny_autoencoder_kl(**config):
    """A 2-level AutoencoderKL (latents are 1/2 the image size), 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    base = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
    base.update(config)
    return AutoencoderKL(**base).eval()


def tiny_autoencoder_tiny():
    """An AutoencoderTiny with one upsampling stage (latents are 1/2 the image size)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4).eval()

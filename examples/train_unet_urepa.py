"""A minimal UNet training loop with U-REPA (SimpleTuner's urepa_* keys), using accelerate.

Runs on CPU in seconds with tiny random models (a UNet, a VAE, a DINOv2 saved to a temp dir). The clean
latents are decoded by the VAE for the encoder, as SimpleTuner does (or cache the features: see the
README's feature cache section):

    python examples/train_unet_urepa.py
    python examples/train_unet_urepa.py --steps 50 --urepa_manifold_weight 3 --urepa_align y
    accelerate launch examples/train_unet_urepa.py --urepa_lambda 1.0

For real training, replace the `tiny_*` builders with `from_pretrained(...)` (SD1.5, SDXL, Kolors) and the
random batch with your data loader; every line that touches U-REPA stays as it is.
"""

import argparse
import json
import tempfile

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import Dinov2Config, Dinov2Model

import repa_fused as rf
from repa_fused.training.config import add_config_arguments, config_from_args


def tiny_models(encoder_dir):
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(encoder_dir)
    return unet, vae.requires_grad_(False).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    add_config_arguments(parser)  # every crepa_*/urepa_* key as a --flag
    args = parser.parse_args()

    torch.manual_seed(0)
    accelerator = Accelerator()
    encoder_dir = tempfile.mkdtemp()
    unet, vae = tiny_models(encoder_dir)

    # The urepa_* flags given on the command line over the demo's config (the tiny encoder).
    demo = {"urepa_enabled": True, "urepa_model": encoder_dir, "urepa_encoder_image_size": 32}
    config = config_from_args(args, base=demo)

    # Build U-REPA before the optimizer and before prepare(): the projector joins the model's parameters.
    reg = rf.build_regularizer(config, unet, max_train_steps=args.steps)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(reg)  # save_state/load_state then resume U-REPA's schedule too
    vae.to(accelerator.device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    images = torch.rand(args.batch_size, 3, 32, 32, device=accelerator.device) * 2 - 1
    text = torch.randn(args.batch_size, 5, 16, device=accelerator.device)  # stands in for text embeddings
    with torch.no_grad():  # a trainer usually has these cached
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
    for step in range(args.steps):
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample  # hook: mid_block
        diffusion_loss = F.mse_loss(pred, noise)
        urepa_loss, logs = reg.loss(step=step, latents=latents, vae=vae)  # decoded under no_grad, then encoded
        accelerator.backward(diffusion_loss + urepa_loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            line = {"step": step, "loss": diffusion_loss.item(), **{k: round(float(v), 4) for k, v in logs.items()}}
            accelerator.print(json.dumps(line))
    reg.remove()  # hooks off, projector off the model (e.g. before save_pretrained)


if __name__ == "__main__":
    main()

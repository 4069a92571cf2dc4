"""A minimal DiT training loop with REPA (SimpleTuner's crepa_* keys), using accelerate.

Runs on CPU in seconds with tiny random models (a DiT, a VAE, a DINOv2 saved to a temp dir):

    python examples/train_dit_repa.py
    python examples/train_dit_repa.py --steps 50 --crepa_scheduler cosine --crepa_warmup_steps 5
    accelerate launch examples/train_dit_repa.py --crepa_lambda 1.0

For real training, replace the `tiny_*` builders with `from_pretrained(...)` and the random batch with
your data loader; every line that touches REPA stays as it is.
"""

import argparse
import json
import tempfile

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DiTTransformer2DModel
from transformers import Dinov2Config, Dinov2Model

import repa_fused as rf
from repa_fused.training.config import add_config_arguments, config_from_args


def tiny_models(encoder_dir):
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                num_layers=4, norm_num_groups=4, sample_size=8, patch_size=2,
                                num_embeds_ada_norm=10)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(encoder_dir)
    return dit, vae.requires_grad_(False).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    add_config_arguments(parser)  # every crepa_*/urepa_* key as a --flag
    args = parser.parse_args()

    torch.manual_seed(0)
    accelerator = Accelerator()
    encoder_dir = tempfile.mkdtemp()
    dit, vae = tiny_models(encoder_dir)

    # The crepa_* flags given on the command line over the demo's config (tiny encoder; block 1 of 4).
    demo = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_model": encoder_dir, "crepa_encoder_image_size": 32}
    config = config_from_args(args, base=demo)

    # Build REPA before the optimizer and before prepare(): the projector joins the model's parameters.
    reg = rf.build_regularizer(config, dit, max_train_steps=args.steps)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-3)
    dit, optimizer = accelerator.prepare(dit, optimizer)
    accelerator.register_for_checkpointing(reg)  # save_state/load_state then resume REPA's schedule too
    vae.to(accelerator.device)

    images = torch.rand(args.batch_size, 3, 32, 32, device=accelerator.device) * 2 - 1  # in [-1, 1]
    labels = torch.arange(args.batch_size, device=accelerator.device) % 10
    for step in range(args.steps):
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.rand(latents.shape[0], device=latents.device)
        noisy = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise  # rectified flow
        pred = dit(noisy, timestep=t * 1000, class_labels=labels).sample  # the hook captures block 1
        diffusion_loss = F.mse_loss(pred, noise - latents)
        repa_loss, logs = reg.loss(step=step, pixels=images)
        accelerator.backward(diffusion_loss + repa_loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            line = {"step": step, "loss": diffusion_loss.item(), **{k: round(float(v), 4) for k, v in logs.items()}}
            accelerator.print(json.dumps(line))
    reg.remove()  # hooks off, projector off the model (e.g. before save_pretrained)


if __name__ == "__main__":
    main()

"""REPA / U-REPA added to a diffusers-style training script: accelerate, checkpoint hooks, resume, gradient
accumulation, DDP, the global step. The loop between the `[recipe]` markers is the README's recipe, verbatim.

Runs on CPU in seconds with tiny random models (a UNet2DConditionModel or an SD3 transformer, and a DINOv2
saved to a temporary folder); every REPA / U-REPA key is a flag:

    python examples/train_repa.py --model unet --urepa_enabled
    python examples/train_repa.py --model dit --crepa_enabled --crepa_block_index 1 --gradient_accumulation_steps 2
    torchrun --nproc-per-node 2 examples/train_repa.py --model dit --crepa_enabled --crepa_block_index 1 \
        --find_unused_parameters --cpu
    python examples/train_repa.py --model unet --urepa_enabled --resume_from_checkpoint latest

The models and data come from `build_models` and `TinyData`: a benchmark or a real run replaces those two
(from_pretrained, a real dataset); nothing in the loop changes. Each sample carries its own noise and
timestep, so a run's numbers depend on neither the batch layout (accumulation, ranks) nor a resume.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, SD3Transformer2DModel, UNet2DConditionModel

import repa_fused as rf
from repa_fused.training.config import add_config_arguments

SUBFOLDER = {"unet": "unet", "dit": "transformer"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("unet", "dit"), default="unet",
                        help="unet: UNet2DConditionModel + U-REPA (urepa_*); dit: SD3 transformer + REPA (crepa_*)")
    parser.add_argument("--output_dir", default="repa-run")
    parser.add_argument("--max_train_steps", type=int, default=6)
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--num_samples", type=int, default=8, help="size of the tiny data set")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--checkpointing_steps", type=int, default=0, help="save_state every N steps (0: never)")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    parser.add_argument("--find_unused_parameters", action="store_true", help="DDP's flag, as many diffusers scripts")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even with a GPU (gloo between processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every_rank", action="store_true",
                        help="every process prints its log lines, with a digest of its projector")
    add_config_arguments(parser)  # every crepa_* / urepa_* key as a --flag; build_regularizer reads them
    parser.set_defaults(crepa_encoder_image_size=32, urepa_encoder_image_size=32)
    return parser.parse_args(argv)


def build_models(args):
    """(trained model, its class): tiny random ones here; `from_pretrained` in a real run."""
    if args.model == "unet":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4), UNet2DConditionModel
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16), SD3Transformer2DModel


def tiny_encoder_dir(seed: int) -> str:
    """A tiny random DINOv2 saved to a fresh folder (the same weights for the same seed)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    path = tempfile.mkdtemp(prefix="tiny-dinov2-")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(path)
    return path


class TinyData(torch.utils.data.Dataset):
    """Per sample: clean pixels in [-1, 1], cached latents, text embeddings, and its own noise and timestep."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        return {"pixel_values": torch.rand(3, 32, 32, generator=g) * 2 - 1, "latents": torch.randn(4, 8, 8, generator=g),
                "noise": torch.randn(4, 8, 8, generator=g), "text": torch.randn(5, 16, generator=g),
                "pooled": torch.randn(8, generator=g), "u": torch.rand((), generator=g)}


def model_pred(model, kind, scheduler, batch):
    """(prediction, target): DDPM epsilon for the UNet (train_text_to_image), rectified flow for SD3."""
    latents, noise = batch["latents"], batch["noise"]
    if kind == "unet":
        t = (batch["u"] * scheduler.config.num_train_timesteps).long().clamp_max(scheduler.config.num_train_timesteps - 1)
        return model(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=batch["text"]).sample, noise
    sigma = batch["u"].view(-1, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    pred = model(noisy, encoder_hidden_states=batch["text"], pooled_projections=batch["pooled"],
                 timestep=batch["u"] * 1000, return_dict=False)[0]
    return pred, noise - latents


def projector_digest(reg) -> str:
    params = [p.detach().cpu().contiguous() for p in reg.parameters()]
    return hashlib.sha1(b"".join(p.numpy().tobytes() for p in params)).hexdigest()[:16]


def launch(argv, nproc: int = 1, env=None, timeout: float = 300) -> list[dict]:
    """Run this script in fresh processes (``torchrun`` for nproc > 1, gloo on CPU with ``--cpu``); return the
    JSON log lines every process printed. For tests and benchmarks that need whole runs, resumes included."""
    import socket
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                    "--master-port", str(port)]
    done = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv=None):
    args = parse_args(argv)
    # Before the process group exists (transformers then saves on every rank): one folder per process.
    encoder_dir = tiny_encoder_dir(args.seed)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=args.cpu,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)])
    set_seed(args.seed)
    for prefix in ("crepa", "urepa"):
        if getattr(args, f"{prefix}_model") is None:
            setattr(args, f"{prefix}_model", encoder_dir)
    model, model_cls = build_models(args)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    sub = SUBFOLDER[args.model]

    def unwrap(m):
        return accelerator.unwrap_model(m)

    # [recipe]
    reg = rf.build_regularizer(args, model)  # --crepa_* / --urepa_* flags; neither enabled: a no-op reg
    reg.to(accelerator.device)               # the projector lives beside the model, not inside it

    # The model's checkpoint stays a plain model checkpoint: these hooks are the diffusers scripts' own.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                if not isinstance(unwrap(m), model_cls):
                    raise ValueError(f"unexpected save model: {m.__class__}")
                unwrap(m).save_pretrained(os.path.join(output_dir, sub))
                weights.pop()

    def load_model_hook(models, input_dir):
        for _ in range(len(models)):
            m = models.pop()
            loaded = model_cls.from_pretrained(input_dir, subfolder=sub)
            unwrap(m).register_to_config(**loaded.config)
            unwrap(m).load_state_dict(loaded.state_dict())  # strict
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    accelerator.register_for_checkpointing(reg)  # projector weights + λ schedule in save_state/load_state

    params = [*model.parameters(), *reg.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    loader = torch.utils.data.DataLoader(TinyData(args.num_samples, args.seed), batch_size=args.train_batch_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    reg.max_train_steps = args.max_train_steps  # known only now; needed by a decay with *_decay_steps = 0

    global_step = 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            done = [d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")]
            path = os.path.join(args.output_dir, max(done, key=lambda d: int(d.split("-")[1])))
        accelerator.load_state(path)  # model (hooks), optimizer, RNG, and reg
        global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])

    first_epoch = global_step // steps_per_epoch
    skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps  # batches done in that epoch
    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch)):
        model.train()
        for batch in accelerator.skip_first_batches(loader, skip) if epoch == first_epoch and skip else loader:
            with accelerator.accumulate(model):
                pred, target = model_pred(model, args.model, scheduler, batch)
                loss = F.mse_loss(pred.float(), target.float())
                reg_loss, logs = reg.loss(step=global_step, pixels=batch["pixel_values"])  # the global step
                accelerator.backward(loss + reg_loss)
                if accelerator.sync_gradients:  # once per optimizer step, accumulation or not
                    reg.sync_gradients()        # average the projector's gradients over the ranks
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                # [/recipe]
                line = {"step": global_step, "loss": round(float(loss.detach()), 6), **{k: float(v) for k, v in logs.items()}}
                if args.log_every_rank:
                    line.update(rank=accelerator.process_index, projector=projector_digest(reg))
                    sys.stdout.write(json.dumps(line) + "\n")  # one write: ranks' lines never interleave
                    sys.stdout.flush()
                else:
                    accelerator.print(json.dumps(line))
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
                if global_step >= args.max_train_steps:
                    break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrap(model).save_pretrained(os.path.join(args.output_dir, sub))
        torch.save(reg.state_dict(), os.path.join(args.output_dir, "regularizer.pt"))
    reg.remove()
    accelerator.end_training()


if __name__ == "__main__":
    main()

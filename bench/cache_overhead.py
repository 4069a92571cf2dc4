"""Per-step cost of U-REPA's target features: feature cache vs live VAE decode + encode vs TAE decode + encode.

    python bench/cache_overhead.py                       # GPU: SDXL-sized random models, batch 4 at 1024 px
    python bench/cache_overhead.py --tiny                # CPU smoke run of the same code on tiny models

Random weights (cost is what matters) in bf16: UNet2DConditionModel with SDXL's config, AutoencoderKL with
SDXL's VAE config, AutoencoderTiny (TAESDXL's config), Dinov2 with dinov2-giant's config at 518 px. The
encoder is saved to a temporary folder and a folder of random 1024 px JPEGs is cached with the real
``cache_features`` (its throughput is reported too), so the cached path is the one a user runs.

Timed (CUDA events; median of --reps after --warmup):
- steps: the UNet's forward + MSE + backward alone ("unet step"), then with a U-REPA regularizer attached whose
  ``reg.loss`` reads the cache in the step (keys=), takes features read ahead from the cache and pinned, as
  a DataLoader's workers and pin thread give them (features=; the read is not timed), or decodes the clean
  latents with the VAE or the TAE and runs the encoder (latents=, vae=). Overhead = step − unet step, in ms
  and % of the unet step; peak memory per step. The unet step is timed again last: its "overhead" is the
  drift of the measurement over the run.
- components, one at a time: the VAE / TAE decode, the encoder forward, ``cache.get`` with a warm page cache
  and with the shards evicted from it (posix_fadvise DONTNEED), the projector + U-REPA loss forward+backward
  (and on a GPU its GPU time alone, by CUDA-graph replay).
- queued: the same steps with the host running ahead (``--queue`` steps back to back, no synchronisation
  between them, as in a training loop; the sources made beforehand), per step, median over --reps rounds
  that each time every variant once (a drift of the machine reaches all of them alike).

Writes ``<out-dir>/cache_overhead_<gpu>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import tempfile

import torch
import torch.nn.functional as F

import repa_fused as rf
from repa_fused.tools import bench as benchmarks
from repa_fused.training.cache import FeatureCache, cache_features
from repa_fused.training.decode import decode_latents
from repa_fused.training.encoders import load_encoder
from repa_fused.training.regularizers import build_projector

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache_build import DINOV2_GIANT, gpu_slug, write_images  # noqa: E402  (the build benchmark's, shared)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True)
TAESDXL = dict()  # AutoencoderTiny's defaults are TAESD/TAESDXL's architecture
TEXT = dict(tokens=77, width=2048, pooled=1280)

# The same code path on models small enough for a CPU.
TINY = dict(
    unet=dict(sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), transformer_layers_per_block=(1, 1),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, cross_attention_dim=16,
              addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
              in_channels=4, out_channels=4),
    vae=dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32),
    tae=dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
             num_decoder_blocks=(1, 1), latent_channels=4),
    dinov2=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, patch_size=7,
                image_size=28),
    text=dict(tokens=5, width=16, pooled=8), resolution=32, encoder_size=28, vae_factor=2)


class Timer:
    """Median / min / max milliseconds of ``fn()`` over ``reps`` after ``warmup`` calls; ``before()`` runs
    untimed ahead of each call. CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn, before=lambda: None, reps=None) -> dict:
        times = benchmarks.time_ms(fn, self.device, reps or self.reps, warmup=self.warmup, before=before)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times)}

    def queued(self, fn, make_source, between, steps: int) -> float:
        """Per-step ms with the host running ahead, as in a training loop: ``steps`` calls ``fn(source)`` queued
        back to back (no synchronisation between them; ``between()`` ahead of each), timed as one. The sources
        are made before the timing (what a DataLoader has ready)."""
        sources = [make_source() for _ in range(steps)]
        benchmarks._synchronize(self.device)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for source in sources:
            between()
            fn(source)
        if self.device.type == "cuda":
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / steps
        return (time.perf_counter() - t0) * 1e3 / steps


def evict(cache_dir: str) -> None:
    """Drop the shards from the page cache (clean pages; no root needed) so the next read comes from disk."""
    for name in os.listdir(cache_dir):
        if name.endswith(".safetensors"):
            fd = os.open(os.path.join(cache_dir, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke run of this script")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=1024, help="image side (latents: /8)")
    parser.add_argument("--encoder-size", type=int, default=518)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--queue", type=int, default=8, help="steps queued back to back in the queued timing")
    parser.add_argument("--no-tf32", action="store_true",
                        help="keep fp32 matmuls (the projector, the U-REPA loss on its fp32 output) in IEEE fp32; by "
                             "default TF32 is allowed, as SimpleTuner and most SDXL trainers do")
    parser.add_argument("--cache-images", type=int, default=64, help="images cached for the throughput figure")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32

    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import Dinov2Config, Dinov2Model

    tiny = TINY if args.tiny else None
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    resolution = tiny["resolution"] if tiny else args.resolution
    enc_size = tiny["encoder_size"] if tiny else args.encoder_size
    vae_factor = tiny["vae_factor"] if tiny else 8
    text = tiny["text"] if tiny else TEXT
    batch = args.batch
    timer = Timer(device, args.reps, args.warmup)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = tempfile.mkdtemp(prefix="cache_overhead_")
    torch.manual_seed(0)

    log("building random models")
    with torch.device(device):
        unet = UNet2DConditionModel(**(tiny["unet"] if tiny else SDXL_UNET)).to(dtype).train()
        vae = AutoencoderKL(**(tiny["vae"] if tiny else SDXL_VAE)).to(dtype).eval().requires_grad_(False)
        tae = AutoencoderTiny(**(tiny["tae"] if tiny else TAESDXL)).to(dtype).eval().requires_grad_(False)
        dinov2 = Dinov2Model(Dinov2Config(**(tiny["dinov2"] if tiny else DINOV2_GIANT))).to(dtype)
    enc_dir = os.path.join(work, "dinov2")
    dinov2.save_pretrained(enc_dir)
    del dinov2
    encoder = load_encoder(enc_dir, enc_size, device=device, dtype=dtype)

    log("caching random images with repa-fused cache-features")
    images = os.path.join(work, "images")
    write_images(images, max(args.cache_images, batch), resolution)
    build = dict(batch_size=32, dtype="bf16" if dtype == torch.bfloat16 else "fp32", device=device,
                 progress=False, log=log, num_workers=0 if args.tiny else 8)
    try:
        summary = cache_features(images, os.path.join(work, "cache"), enc_dir, enc_size, **build)
    except RuntimeError as exc:  # a DataLoader worker killed, e.g. by a small /dev/shm in a container
        log(f"cache build with {build['num_workers']} workers failed ({exc}); again without workers")
        build["num_workers"] = 0
        summary = cache_features(images, os.path.join(work, "cache0"), enc_dir, enc_size, **build)
    cache_dir = summary.path
    cache = FeatureCache(cache_dir)
    keys = cache.keys()[:batch]
    shard_bytes = sum(os.path.getsize(os.path.join(cache_dir, n)) for n in os.listdir(cache_dir)
                      if n.endswith(".safetensors"))

    latent = resolution // vae_factor
    g = torch.Generator(device).manual_seed(1)
    latents = torch.randn(batch, 4, latent, latent, device=device, generator=g, dtype=dtype)
    noise = torch.randn(latents.shape, device=device, generator=g, dtype=dtype)
    cond = dict(timestep=torch.full((batch,), 500, device=device),
                encoder_hidden_states=torch.randn(batch, text["tokens"], text["width"], device=device, generator=g,
                                                  dtype=dtype),
                added_cond_kwargs={"text_embeds": torch.randn(batch, text["pooled"], device=device, generator=g,
                                                              dtype=dtype),
                                   "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                                            device=device, dtype=dtype).repeat(batch, 1)},
                return_dict=False)
    noisy = latents + noise

    live = []  # the regularizer being timed: its projector lives beside the unet, not in it

    def zero_grad():
        unet.zero_grad(set_to_none=True)
        for reg in live:
            for p in reg.parameters():
                p.grad = None

    def build_reg(cfg, enc):
        live[:] = [rf.build_regularizer(cfg, unet, encoder=enc)] if cfg is not None else []
        return live[0] if live else None

    def step(reg=None, **source):
        pred = unet(noisy, **cond)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        if reg is not None:
            loss = loss + reg.loss(step=0, **source)[0]
        loss.backward()

    def peak_gib(fn) -> float:
        if device.type != "cuda":
            return float("nan")
        zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30

    config = {"urepa_enabled": True, "urepa_model": enc_dir, "urepa_encoder_image_size": enc_size}
    cached = {**config, "urepa_feature_cache": cache_dir}

    def read_ahead():  # what a DataLoader's worker (cache.get) and pin thread have ready before the step
        tokens = cache.get(keys)[0]
        return {"features": tokens.pin_memory() if device.type == "cuda" else tokens}

    # (name, config, encoder, the reg.loss source of one step (made untimed), timed queued too)
    variants = [
        ("unet step", None, None, dict, True),
        ("+ U-REPA, cached features read in the step (keys=)", cached, None, lambda: {"keys": keys}, True),
        ("+ U-REPA, cached features read ahead (features=, pinned)", cached, None, read_ahead, True),
        ("+ U-REPA, TAE decode + encode", {**config, "urepa_use_tae": True}, encoder,
         lambda: {"latents": latents, "vae": tae}, True),
        ("+ U-REPA, VAE decode + encode", config, encoder, lambda: {"latents": latents, "vae": vae}, False),
        ("unet step, again last (drift)", None, None, dict, False),
    ]
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}",
           "torch": torch.__version__, "repa_fused": rf.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import diffusers
        import transformers

        env.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    steps, parts = [], []
    report = {
        "environment": env,
        "setup": {"batch": batch, "resolution": resolution, "latent": latent, "encoder_size": enc_size,
                  "dtype": str(dtype).replace("torch.", ""), "tiny": bool(args.tiny), "tf32": not args.no_tf32,
                  "queue": args.queue, "reps": args.reps},
        "cache_build": {"images": summary.encoded, "seconds": summary.seconds, "workers": build["num_workers"],
                        "encode_seconds": summary.encode_seconds,
                        "images_per_second": summary.encoded / summary.encode_seconds,
                        "bytes_per_image": shard_bytes / max(summary.encoded, 1)},
        "steps": steps,
        "components": parts,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"cache_overhead_{gpu_slug(env['device'])}.json")

    def save():  # after each phase: a run cut short still leaves what it measured
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)

    for name, cfg, enc, make_source, queue in variants:
        log(f"timing {name}")
        reg = build_reg(cfg, enc)
        source = {}
        before = lambda make_source=make_source: (source.update(make_source()), zero_grad())  # noqa: E731
        try:
            row = {"variant": name, **timer(lambda: step(reg, **source), before=before)}
            source.clear()
            source.update(make_source())
            row["peak_gib"] = peak_gib(lambda: step(reg, **source))
            if cfg is not None and "urepa_feature_cache" in cfg:
                assert reg.encoder is None, "the cached path must not load the encoder"
        except torch.OutOfMemoryError as exc:
            row = {"variant": name, "error": f"out of memory: {exc}".splitlines()[0]}
        finally:
            if reg is not None:
                reg.remove()
            zero_grad()
        steps.append(row)
    # Queued, in rounds: every round times each variant once, so that a drift of the machine over the run (the
    # synchronised unet step, timed first and last, shows it) reaches every variant alike.
    failed = {row["variant"] for row in steps if "error" in row}  # out of memory above: not again here
    queued = [(name, cfg, enc, make_source) for name, cfg, enc, make_source, queue in variants
              if queue and name not in failed]
    times = {name: [] for name, *_ in queued}
    for rnd in range(args.reps + 1):  # round 0 warms up
        log(f"queued round {rnd}")
        for name, cfg, enc, make_source in queued:
            reg = build_reg(cfg, enc)
            try:
                ms = timer.queued(lambda src: step(reg, **src), make_source, zero_grad, args.queue)
            finally:
                if reg is not None:
                    reg.remove()
                zero_grad()
            if rnd:
                times[name].append(ms)
    for row in steps:
        if row["variant"] in times:
            t = times[row["variant"]]
            row.update(queued_ms=statistics.median(t), queued_min_ms=min(t), queued_max_ms=max(t), queued_reps=len(t),
                       queued_steps=args.queue)
    base, base_queued = steps[0]["median_ms"], steps[0].get("queued_ms")
    for row in steps[1:]:
        if "median_ms" in row:
            row["overhead_ms"] = row["median_ms"] - base
            row["overhead_pct"] = 100 * row["overhead_ms"] / base
        if "queued_ms" in row and base_queued:
            row["queued_overhead_ms"] = row["queued_ms"] - base_queued
            row["queued_overhead_pct"] = 100 * row["queued_overhead_ms"] / base_queued
    save()

    log("timing components")
    pixels = decode_latents(latents, vae)
    y, y_grid = encoder(pixels)
    mid = unet.config.block_out_channels[-1]
    side = latent // 2 ** (len(unet.config.block_out_channels) - 1)  # the mid block's grid
    h_grid = (side, side)
    projector = build_projector("linear", mid, y.shape[-1]).to(device)
    h_in = torch.randn(batch, h_grid[0] * h_grid[1], mid, device=device, dtype=dtype, requires_grad=True)

    def loss_fwd_bwd():
        total = rf.urepa_loss(projector(h_in.float()), y, h_grid=h_grid, y_grid=y_grid)[0]
        total.backward()

    cold_state = {}

    def cold_before():
        cache.close()  # mapped pages are not evicted: unmap the shards first
        cold_state.pop("cache", None)
        evict(cache_dir)
        cold_state["cache"] = FeatureCache(cache_dir)

    components = [
        ("VAE decode (AutoencoderKL)", lambda: decode_latents(latents, vae), None),
        ("TAE decode (AutoencoderTiny)", lambda: decode_latents(latents, tae), None),
        ("encoder forward (DINOv2-g)", lambda: encoder(pixels), None),
        ("cache.get, warm page cache", lambda: cache.get(keys, device=device), None),
        ("cache.get, shards evicted", lambda: cold_state["cache"].get(keys, device=device), cold_before),
        ("projector + U-REPA loss fwd+bwd", loss_fwd_bwd, None),
    ]
    for name, fn, before in components:
        log(f"timing {name}")
        parts.append({"component": name, **timer(fn, before=before or (lambda: None),
                                                 reps=None if "cache" not in name else 4 * args.reps)})

    if device.type == "cuda":  # the same without the host: what it costs a step whose host runs ahead
        log("timing projector + U-REPA loss fwd+bwd by graph replay")
        for tf32 in (not args.no_tf32, args.no_tf32):  # this run's setting, then the other
            torch.backends.cuda.matmul.allow_tf32 = tf32
            gpu_ms = benchmarks.graph_time_ms(loss_fwd_bwd, device, args.reps)
            if gpu_ms is not None:
                parts.append({"component": "projector + U-REPA loss fwd+bwd, GPU time (graph replay), fp32 matmuls in "
                                           + ("TF32" if tf32 else "IEEE fp32"), "median_ms": gpu_ms, "reps": args.reps})
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    report["setup"].update(unet_mid_grid=list(h_grid), encoder_grid=list(y_grid), encoder_width=y.shape[-1])
    save()
    log(f"wrote {path}")
    print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    env, setup = report["environment"], report["setup"]
    lines = [f"{env['device']} | torch {env['torch']} | {setup['dtype']} | batch {setup['batch']} at "
             f"{setup['resolution']} px, encoder at {setup['encoder_size']} px | TF32 "
             f"{'allowed' if setup.get('tf32') else 'off'} | {env['date']}", "",
             "| step | ms, synchronised | overhead | ms, queued | overhead | peak GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in report["steps"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['error']} | | | | |")
            continue
        over = (f"{row['overhead_ms']:.1f} ({row['overhead_pct']:.1f}%)" if "overhead_ms" in row else "")
        queued = f"{row['queued_ms']:.1f}" if "queued_ms" in row else ""
        q_over = (f"{row['queued_overhead_ms']:.1f} ({row['queued_overhead_pct']:.1f}%)"
                  if "queued_overhead_ms" in row else "")
        lines.append(f"| {row['variant']} | {row['median_ms']:.1f} | {over} | {queued} | {q_over} | "
                     f"{row['peak_gib']:.1f} |")
    base = report["steps"][0].get("median_ms")
    lines += ["", "| component | ms | % of UNet step |", "|---|---:|---:|"]
    for row in report["components"]:
        pct = f"{100 * row['median_ms'] / base:.2f}%" if base else ""
        lines.append(f"| {row['component']} | {row['median_ms']:.2f} | {pct} |")
    build = report["cache_build"]
    lines += ["", f"cache build (repa-fused cache-features, random JPEGs at {setup['resolution']} px): "
                  f"{build['images']} images, {build['images_per_second']:.1f} img/s while encoding "
                  f"({build['seconds']:.1f} s with the encoder's load), {build['bytes_per_image'] / 2**20:.2f} "
                  "MiB per image"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

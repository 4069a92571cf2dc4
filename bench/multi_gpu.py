"""Many GPUs: U-REPA training steps under DDP and FSDP2, and the torchrun-sharded feature-cache build (issue 18).

    torchrun --nproc-per-node 2 bench/multi_gpu.py                  # GPUs: SDXL UNet, DINOv2-g features, nccl
    torchrun --nproc-per-node 2 bench/multi_gpu.py --tiny           # CPU smoke run of the same code, gloo

Every rank runs this script; rank 0 writes one JSON (``--out``; default
``bench/results/multi_gpu_<gpu>.json``, ``multi_gpu_cpu.json`` on a CPU) with the device, world size, versions
and date, after each phase (a run cut short keeps what it measured). Each training figure is set against the
same run without the regularizer (``build_regularizer`` with U-REPA off: the no-op regularizer, so the loop is
the same). The phases, in this order:

1. ``cache_build``: rank 0 writes ``--images`` JPEGs and runs the real command
   ``python -m torch.distributed.run --nproc-per-node K -m repa_fused.tools.cli cache-features ...`` for K = 1
   and K = world size, into two empty folders, while the other ranks wait. Reported: img/s of each build (the
   encoding phase, as the command prints it, and the whole command: start, imports and encoder load
   included), scaling efficiency (rate_K / (K · rate_1)), and checks of the K-rank cache: its index holds
   every image found, no key sits in two shards or two rows, and every key's stored tokens are bit-identical
   to the 1-rank build's. The encoder is a random-weight Dinov2 with facebook/dinov2-giant's configuration
   (``--tiny``: a tiny one) saved to a folder and named by path. The 1-rank cache then feeds the training runs.
2. ``ddp``: UNet2DConditionModel with SDXL's configuration (random weights; fp32 master weights under bf16
   autocast; batch ``--batch`` per rank at ``--resolution`` px, i.e. resolution/8 latents; gradient
   checkpointing; ``--tiny``: a tiny UNet in fp32) wrapped in DDP with ``find_unused_parameters=False``, then
   ``True``. U-REPA reads its target features from the cache ahead of the step: DataLoader workers call
   ``FeatureCache.get`` and the batch reaches ``reg.loss(features=...)`` pinned (the README's read-ahead
   path). The loop is the README recipe's: loss, ``reg.sync_gradients()``, clipping over model and projector,
   AdamW over both. Reported: steps/s (the steps after ``--warmup``, each step synchronised; the data wait is
   part of the step), the regularizer's share of the regularized step, the largest difference between any
   rank's projector and rank 0's after ``--steps`` steps (all-gathered), and whether λ is identical on every
   rank at every step with a similarity threshold set (``--threshold``, recoverable mode, no EMA smoothing,
   so λ follows each step's similarity: with a threshold near the similarities the ranks' own values fall on
   both sides of it at some steps, and the JSON counts those steps).
3. ``fsdp2``: the same UNet under FSDP2 (``fully_shard`` on each down/mid/up block and the root; on CUDA
   ``MixedPrecisionPolicy(bf16, reduce fp32)``). The projector stays the regularizer's own replicated module,
   synchronised by ``reg.sync_gradients()``; the model's gradients are clipped over its DTensors and the
   projector's apart (one norm over both would mix DTensors and tensors). Reported: steps/s with and without
   U-REPA, the projector difference across ranks, and a checkpoint: the model through DCP
   (``get_model_state_dict`` + ``dcp.save``, sharded) and ``reg.state_dict()`` (``torch.save``, rank 0), loaded
   into a fresh FSDP2 model and a fresh regularizer: every shard and projector tensor equal, the schedule
   equal, and the next step's diffusion and U-REPA losses on a fixed batch identical between the trained pair
   and the resumed one. When FSDP2 cannot run, ``"fsdp2": {"skipped": "<reason>"}``.

On GPUs, ``NCCL_NVLS_ENABLE=0`` and ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are set when unset (NVLink
multicast stays off). Backend: nccl on CUDA, gloo on CPU; the cache command always meets over gloo.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_key, _value)  # before torch and NCCL read them

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import repa_fused as rf  # noqa: E402
from repa_fused.training import cache as cache_module  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache_build import DINOV2_GIANT, copy_images, gpu_slug, write_images  # noqa: E402  (the cache benchmarks' own)
from cache_overhead import SDXL_UNET, TEXT, TINY  # noqa: E402

FULL_SETUP = dict(unet=SDXL_UNET, dinov2=DINOV2_GIANT, text=TEXT, encoder_size=518, image_px=1024, resolution=1024,
                  batch=4, images=2048, cache_batch=64, lr=1e-5, steps=10, warmup=3, workers=4)
TINY_SETUP = dict(unet=TINY["unet"], dinov2=TINY["dinov2"], text=TINY["text"], encoder_size=TINY["encoder_size"],
                  image_px=64, resolution=128, batch=2, images=16, cache_batch=4, lr=1e-3, steps=10, warmup=2,
                  workers=1)
# The variables a torchrun worker inherits that must not reach the cache command's own torchrun.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                  "TORCH_NCCL_ASYNC_ERROR_HANDLING")
_RATE = re.compile(r"\(([\d.]+) img/s encoding")


def log(message: str) -> None:
    print(f"[rank {dist.get_rank() if dist.is_initialized() else 0}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. the cache build ---------------------------------------------------------------------------------------


def run_cache_build(images: str, out: str, enc_dir: str, setup: dict, ranks: int, device: torch.device,
                    workers) -> dict:
    """One ``cache-features`` run under torchrun on ``ranks`` processes, into ``out`` (empty): timings."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "repa_fused.tools.cli", "cache-features", images,
           "--encoder", enc_dir, "--image-size", str(setup["encoder_size"]), "--out", out, "--batch-size",
           str(setup["cache_batch"]), "--dtype", "bfloat16", "--device", device.type, "--no-progress"]
    if workers is not None:
        cmd += ["--num-workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    if device.type == "cpu":  # the cores shared fairly: each rank of K gets 1/K of them
        env["OMP_NUM_THREADS"] = str(max(1, cache_module._cpu_count() // ranks))
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    summary = next(line for line in done.stdout.splitlines() if line.startswith("repa-fused cache-features:"))
    found = int(re.search(r"(\d+) images found", summary).group(1))
    encoded = int(re.search(r"(\d+) encoded", summary).group(1))
    return {"ranks": ranks, "images": found, "encoded": encoded, "img_per_s": float(_RATE.search(summary).group(1)),
            "command_seconds": seconds, "img_per_s_whole_command": found / seconds,
            "env_OMP_NUM_THREADS": env.get("OMP_NUM_THREADS"), "summary": summary, "command": " ".join(cmd[1:])}


def check_cache(cache_dir: str, reference_dir: str, images: str) -> dict:
    """The index holds every image once, no key is stored twice, and the tokens equal the reference cache's."""
    from safetensors import safe_open

    found = cache_module.find_images(images)
    index = json.load(open(os.path.join(cache_dir, cache_module.INDEX_FILE)))
    entries = index["entries"]
    stored = []  # every (key) a shard header lists: a key in two shards (or twice in one) shows up twice
    for info in index["shards"]:
        with safe_open(os.path.join(cache_dir, info["file"]), framework="pt") as handle:
            header = json.loads(handle.metadata()[cache_module._HEADER_KEY])
        stored += [key for keys in header["rows"].values() for key in keys]
    places = [tuple(e) for e in entries.values()]
    cache, reference = cache_module.FeatureCache(cache_dir), cache_module.FeatureCache(reference_dir)
    differing, max_abs = [], 0.0
    keys = sorted(set(found) & set(entries) & set(reference.keys()))
    for i in range(0, len(keys), 32):
        chunk = keys[i:i + 32]
        a, b = cache.get(chunk)[0], reference.get(chunk)[0]
        same = (a.view(torch.int16) == b.view(torch.int16)).flatten(1).all(1) if a.dtype == torch.bfloat16 else \
            (a == b).flatten(1).all(1)
        differing += [k for k, s in zip(chunk, same.tolist()) if not s]
        max_abs = max(max_abs, float((a.float() - b.float()).abs().max()))
    return {"images_found": len(found), "index_entries": len(entries), "shards": len(index["shards"]),
            "index_complete": set(entries) == set(found), "reference_complete": set(reference.keys()) == set(found),
            "no_duplicates": len(stored) == len(set(stored)) == len(entries) and len(set(places)) == len(places),
            "keys_compared": len(keys), "keys_differing": len(differing), "first_differing": differing[:5],
            "max_abs_difference": max_abs, "bit_identical_to_1_rank": not differing and len(keys) == len(found)}


def cache_phase(args, setup: dict, device: torch.device, work: str, world: int, sharded: bool) -> dict:
    """Rank 0 only: the encoder folder, the images, the 1-rank build (the training runs read it) and, when
    ``sharded``, the world-rank build and its checks against it."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**setup["dinov2"])).to(torch.bfloat16)
    enc_dir = os.path.join(work, "dinov2")
    model.save_pretrained(enc_dir)
    del model
    # Distinct JPEGs, then copies of them (decoding a copy costs what decoding the original does).
    unique, images = os.path.join(work, "unique"), os.path.join(work, "images")
    write_images(unique, min(setup["images"], 48), setup["image_px"])
    copy_images(unique, images, setup["images"])
    builds = {}
    for ranks in sorted({1, world} if sharded else {1}):
        log(f"cache-features on {ranks} rank(s), {setup['images']} images")
        builds[ranks] = run_cache_build(images, os.path.join(work, f"cache_{ranks}"), enc_dir, setup, ranks, device,
                                        args.cache_workers)
    rate1 = builds[1]["img_per_s"]
    report = {"enc_dir": enc_dir, "cache_dir": os.path.join(work, "cache_1"),
              "setup": {"images": setup["images"], "image_px": setup["image_px"], "encoder_size": setup["encoder_size"],
                        "batch_size": setup["cache_batch"], "dtype": "bfloat16",
                        "encoder": "random Dinov2, " + ("tiny" if args.tiny else "facebook/dinov2-giant's config")},
              "builds": {str(k): v for k, v in builds.items()}}
    if world > 1 and sharded:
        top = builds[world]
        report["scaling_efficiency"] = top["img_per_s"] / (world * rate1)
        report["scaling_efficiency_whole_command"] = top["img_per_s_whole_command"] / (
            world * builds[1]["img_per_s_whole_command"])
        report["check"] = check_cache(os.path.join(work, f"cache_{world}"), os.path.join(work, "cache_1"), images)
    else:
        report["check"] = {"skipped": "no sharded build to compare (one rank, or --skip cache)"}
    return report


# -- 2./3. the training runs ----------------------------------------------------------------------------------


class CachedSamples(torch.utils.data.Dataset):
    """Per sample: its cached encoder tokens (read here, in a DataLoader worker: ahead of the step), and its own
    latents, noise, timestep and text conditioning (random, fixed by the sample's index)."""

    def __init__(self, cache_dir: str, keys: list, count: int, latent: int, text: dict, seed: int):
        self.cache = cache_module.FeatureCache(cache_dir)
        self.keys, self.count, self.latent, self.text, self.seed = keys, count, latent, text, seed

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed + i)
        tokens = self.cache.get([self.keys[i % len(self.keys)]])[0][0]
        shape, text = (4, self.latent, self.latent), self.text
        return {"features": tokens, "latents": torch.randn(shape, generator=g),
                "noise": torch.randn(shape, generator=g),
                "u": torch.rand((), generator=g), "text": torch.randn(text["tokens"], text["width"], generator=g),
                "pooled": torch.randn(text["pooled"], generator=g)}


def unet_forward(model, scheduler, batch, device, dtype, resolution: int, autocast: bool):
    """(prediction, target) of SDXL's epsilon objective on one batch (the text_time conditioning included)."""
    latents, noise = batch["latents"].to(device, dtype), batch["noise"].to(device, dtype)
    steps = scheduler.config.num_train_timesteps
    t = (batch["u"].to(device) * steps).long().clamp_max(steps - 1)
    noisy = scheduler.add_noise(latents, noise, t)
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device,
                            dtype=dtype).repeat(len(t), 1)
    cond = {"text_embeds": batch["pooled"].to(device, dtype), "time_ids": time_ids}
    with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        pred = model(noisy, t, encoder_hidden_states=batch["text"].to(device, dtype), added_cond_kwargs=cond).sample
    return pred, noise


def gather_objects(obj, group) -> list:
    boxes = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, obj, group=group)
    return boxes


def projector_difference(reg, device: torch.device) -> float:
    """Largest |p_r − p_0| over every projector element and rank r (all-gathered over the training backend)."""
    flat = torch.cat([p.detach().reshape(-1) for p in reg.parameters()]).to(device)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def build_unet(setup: dict, seed: int, device: torch.device):
    """The UNet, initialised on ``device`` (SDXL's 2.6 B parameters take a minute on a CPU, seconds on a GPU)
    from ``seed``: the same weights on every rank (FSDP2 does not broadcast them)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = UNet2DConditionModel(**setup["unet"]).train()
    model.enable_gradient_checkpointing()
    return model


def reg_config(with_reg: bool, context: dict, args) -> dict:
    if not with_reg:
        return {"urepa_enabled": False}
    return {"urepa_enabled": True, "urepa_model": context["enc_dir"],
            "urepa_encoder_image_size": context["encoder_size"], "urepa_feature_cache": context["cache_dir"],
            "urepa_similarity_threshold": args.threshold, "urepa_similarity_ema_decay": 0.0,
            "urepa_threshold_mode": "recoverable"}


def shard_unet(model, mesh, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = {"mesh": mesh, **({"mp_policy": mp} if mp is not None else {})}
    for block in [*model.down_blocks, model.mid_block, *model.up_blocks]:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def train_run(args, setup: dict, context: dict, device: torch.device, meta_group, *, wrapper: str, with_reg: bool,
              find_unused: bool = False) -> dict:
    """One run of ``--steps`` steps; what rank 0 reports (every rank returns the same dict)."""
    from diffusers import DDPMScheduler
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    steps, warmup, batch = args.steps, args.warmup, setup["batch"]
    model = build_unet(setup, args.seed, device)
    reg = rf.build_regularizer(reg_config(with_reg, context, args), model)  # before wrapping, as the recipe
    reg.to(device)
    fsdp = wrapper == "fsdp2"
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        model = shard_unet(model, init_device_mesh(device.type, (world,)), device)
        # Two groups: AdamW's foreach update takes a group of DTensors or of tensors, not a mix.
        params = [{"params": list(model.parameters())}] + ([{"params": list(reg.parameters())}] if with_reg else [])
    else:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=find_unused)
        params = [{"params": [*model.parameters(), *reg.parameters()]}]
    optimizer = torch.optim.AdamW(params, lr=setup["lr"])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latent = setup["resolution"] // 8
    keys = context["keys"][rank::world]
    data = CachedSamples(context["cache_dir"], keys, steps * batch, latent, setup["text"],
                         seed=args.seed * 1_000_003 + rank * 100_003)
    workers = setup["workers"] if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    autocast = device.type == "cuda" and not fsdp  # FSDP2 casts through its MixedPrecisionPolicy
    grid = context["grid"]
    times, weights, sims = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    it = iter(loader)
    for step in range(steps):
        start = time.perf_counter()
        b = next(it)
        pred, target = unet_forward(model, scheduler, b, device, torch.float32, setup["resolution"], autocast)
        loss = F.mse_loss(pred.float(), target.float())
        reg_loss, logs = reg.loss(step=step, features=b["features"], features_grid=grid)
        (loss + reg_loss).backward()
        reg.sync_gradients()  # average the projector's gradients over the ranks (README recipe)
        if fsdp:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if with_reg:
                torch.nn.utils.clip_grad_norm_(list(reg.parameters()), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params[0]["params"], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        if logs:
            weights.append(logs["urepa_weight"])
            sims.append(logs["urepa_similarity"])
    del it
    timed = times[warmup:]
    result = {"steps": steps, "timed_steps": len(timed), "steps_per_s": len(timed) / sum(timed),
              "step_ms_median": 1e3 * sorted(timed)[len(timed) // 2],
              "step_ms_all": [round(1e3 * t, 2) for t in times],
              "final_loss": float(loss.detach())}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if with_reg:
        result["projector_max_abs_difference"] = projector_difference(reg, device)
        local = {"weights": torch.stack(weights).tolist(), "similarity": torch.stack(sims).tolist()}
        ranks = gather_objects(local, meta_group)
        thr = args.threshold
        result["lambda"] = {
            "threshold": thr, "per_step_rank0": ranks[0]["weights"],
            "identical_across_ranks": all(r["weights"] == ranks[0]["weights"] for r in ranks),
            "steps_with_lambda_0": sum(w == 0.0 for w in ranks[0]["weights"]),
            # steps where a rank-local EMA would have given the ranks different λ (the check's teeth)
            "steps_where_rank_similarities_straddle_threshold": sum(
                len({s >= thr for s in col}) > 1 for col in zip(*(r["similarity"] for r in ranks))),
            "similarity_per_rank": [r["similarity"] for r in ranks]}
        result["describe"] = reg.describe()
    if fsdp and with_reg and not args.no_checkpoint:
        result["checkpoint"] = checkpoint_check(args, setup, context, device, model, reg, scheduler, data, grid)
    reg.remove()
    del model, reg, optimizer, loader
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    return result


def checkpoint_check(args, setup, context, device, model, reg, scheduler, data, grid) -> dict:
    """Save the FSDP2 model (DCP, sharded) and reg.state_dict(), load both into a fresh model and regularizer:
    equal tensors and schedule, and the same losses on one more batch."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    folder = context["checkpoint_dir"]
    start = time.perf_counter()
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=os.path.join(folder, "model"))
    if dist.get_rank() == 0:
        torch.save(reg.state_dict(), os.path.join(folder, "regularizer.pt"))
    dist.barrier()
    save_s = time.perf_counter() - start

    fresh = build_unet(setup, args.seed + 1, device)  # other weights: the load must overwrite every one
    fresh_reg = rf.build_regularizer(reg_config(True, context, args), fresh)
    fresh_reg.to(device)
    fresh = shard_unet(fresh, init_device_mesh(device.type, (dist.get_world_size(),)), device)
    start = time.perf_counter()
    state = {"model": get_model_state_dict(fresh)}
    dcp.load(state, checkpoint_id=os.path.join(folder, "model"))
    set_model_state_dict(fresh, state["model"])
    fresh_reg.load_state_dict(torch.load(os.path.join(folder, "regularizer.pt"), weights_only=True))
    load_s = time.perf_counter() - start

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    trained, loaded = dict(model.named_parameters()), dict(fresh.named_parameters())
    model_diff = max(float((local(trained[k]).detach() - local(loaded[k]).detach()).abs().max()) for k in trained)
    model_diff = gather_max(model_diff, device)
    a, b = reg.state_dict(), fresh_reg.state_dict()
    projector_equal = a["projector"].keys() == b["projector"].keys() and all(
        torch.equal(a["projector"][k], b["projector"][k]) for k in a["projector"])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=setup["batch"])))
    losses = []
    with torch.no_grad():  # the next step's losses, trained pair against resumed pair
        for m, r in ((model, reg), (fresh, fresh_reg)):
            pred, target = unet_forward(m, scheduler, batch, device, torch.float32, setup["resolution"], False)
            reg_loss, logs = r.loss(step=args.steps, features=batch["features"], features_grid=grid)
            # the unweighted terms too: λ may be 0 at this step (the threshold's gate)
            losses.append([float(F.mse_loss(pred.float(), target.float())), float(reg_loss),
                           float(logs["urepa_alignment_loss"]), float(logs["urepa_manifold_loss"])])
    fresh_reg.remove()
    del fresh
    ok = model_diff == 0.0 and projector_equal and a["schedule"] == b["schedule"] and losses[0] == losses[1]
    return {"format": "model: DCP (sharded, get_model_state_dict); regularizer: torch.save(reg.state_dict())",
            "save_s": save_s, "load_s": load_s, "model_max_abs_difference": model_diff,
            "projector_equal": projector_equal, "schedule_equal": a["schedule"] == b["schedule"],
            "schedule": a["schedule"], "next_losses": "[diffusion, λ·U-REPA, alignment, manifold]",
            "next_losses_trained": losses[0], "next_losses_resumed": losses[1],
            "resumed": bool(ok)}


def gather_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def compare(off: dict, on: dict) -> dict:
    """The regularized run against the same run without it: the regularizer's share of the regularized step
    (mean step times; by median step times too, which a stray slow step moves less)."""
    t_off, t_on = 1 / off["steps_per_s"], 1 / on["steps_per_s"]
    m_off, m_on = off["step_ms_median"], on["step_ms_median"]
    return {"steps_per_s_without": off["steps_per_s"], "steps_per_s_with": on["steps_per_s"],
            "overhead_pct_of_step": 100 * (t_on - t_off) / t_on, "slowdown_pct": 100 * (t_on / t_off - 1),
            "overhead_pct_of_step_by_median": 100 * (m_on - m_off) / m_on}


# -- driver ---------------------------------------------------------------------------------------------------


def environment(device: torch.device, world: int, backend: str) -> dict:
    import diffusers
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"CPU {name}"
    env = {"device": name, "world_size": world, "backend": backend, "torch": torch.__version__,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__, "repa_fused": rf.__version__,
           "python": platform.python_version(), "cpus": cache_module._cpu_count(), "host": socket.gethostname(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())),
                   gpus_visible=torch.cuda.device_count())
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet and encoder on the CPU (gloo): a smoke run")
    parser.add_argument("--out", help="JSON path (default bench/results/multi_gpu_<gpu>.json)")
    parser.add_argument("--work", help="work folder (default: a new temporary one, removed at the end)")
    parser.add_argument("--steps", type=int, help="training steps per run (projector compared after them; default 10)")
    parser.add_argument("--warmup", type=int, help="first steps left out of steps/s")
    parser.add_argument("--batch", type=int, help="per rank (default 4; --tiny 2)")
    parser.add_argument("--resolution", type=int, help="pixels; latents are /8 (default 1024; --tiny 128)")
    parser.add_argument("--images", type=int, help="JPEGs in the cache build (default 2048; --tiny 16)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="U-REPA similarity threshold (recoverable, EMA decay 0) for the λ check (default 0)")
    parser.add_argument("--workers", type=int, help="DataLoader workers reading the cache ahead, per rank")
    parser.add_argument("--cache-workers", type=int, help="cache-features --num-workers (default: its own)")
    parser.add_argument("--skip", default="", help="comma-separated phases to leave out: cache,ddp,fsdp2")
    parser.add_argument("--no-checkpoint", action="store_true", help="no FSDP2 checkpoint round trip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-min", type=float,
                        help="collective timeout: how long ranks wait for each other, rank 0's cache builds included "
                             "(default 120; --tiny 5, so that a failed rank ends a CI run instead of hanging it)")
    args = parser.parse_args(argv)
    setup = dict(TINY_SETUP if args.tiny else FULL_SETUP)
    for key in ("steps", "warmup", "batch", "resolution", "images"):
        if getattr(args, key) is not None:
            setup[key] = getattr(args, key)
    args.steps, args.warmup = setup["steps"], setup["warmup"]
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"cache", "ddp", "fsdp2"}:
        parser.error(f"--skip takes cache, ddp, fsdp2; got {args.skip!r}")

    cuda = torch.cuda.is_available() and not args.tiny
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:  # plain `python bench/multi_gpu.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    timeout = timedelta(minutes=args.timeout_min or (5 if args.tiny else 120))
    dist.init_process_group(backend, timeout=timeout, device_id=device if cuda else None)
    meta_group = dist.new_group(backend="gloo", timeout=timeout)  # objects, and waiting on rank 0's builds
    rank, world = dist.get_rank(), dist.get_world_size()
    setup["workers"] = setup["workers"] if args.workers is None else args.workers

    work = args.work or (tempfile.mkdtemp(prefix="multi_gpu_") if rank == 0 else None)
    work = gather_objects(work, meta_group)[0]
    os.makedirs(work, exist_ok=True)
    env = environment(device, world, backend)
    slug = gpu_slug(env["device"]) if cuda else "cpu"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"multi_gpu_{slug}.json")
    report = {"env": env, "command": "torchrun --nproc-per-node {} bench/multi_gpu.py {}".format(
                  world, " ".join(argv if argv is not None else sys.argv[1:])),
              "setup": {"tiny": bool(args.tiny), "unet": "tiny UNet2DConditionModel (fp32)" if args.tiny else
                        "UNet2DConditionModel, SDXL config, random weights, fp32 master weights, bf16 autocast "
                        "(DDP) / MixedPrecisionPolicy bf16, reduce fp32 (FSDP2)",
                        "gradient_checkpointing": True, "batch_per_rank": setup["batch"],
                        "resolution": setup["resolution"], "latents": setup["resolution"] // 8,
                        "steps": args.steps, "warmup_steps_not_timed": args.warmup, "optimizer": "AdamW",
                        "lr": setup["lr"], "features": "FeatureCache (the 1-rank cache-features build) read ahead "
                        "by DataLoader workers, passed as reg.loss(features=...) pinned; the runs without U-REPA "
                        "read the same batches and call the no-op regularizer", "reader_workers": setup["workers"],
                        "urepa": "linear projector, manifold_weight 3, λ 0.5, similarity threshold (recoverable, "
                                 "EMA decay 0)"}}
    if args.tiny:
        report["setup"]["timing_note"] = ("tiny models on shared CPU cores: a step is tens of ms and its time "
                                          "varies by tens of %, more than U-REPA costs at this size; the "
                                          "timings check the code path, the overheads mean nothing")

    def save():
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as fh:
                json.dump(report, fh, indent=1)

    status = 0
    try:
        context = None
        if rank == 0:
            try:
                context = cache_phase(args, setup, device, work, world, sharded="cache" not in skip)
            except Exception as exc:
                context = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        context = gather_objects(context, meta_group)[0]  # the others wait here for the builds
        if "error" in context:
            report["cache_build"] = context
            save()
            raise RuntimeError(f"cache phase failed: {context['error']}")
        if "cache" not in skip:
            report["cache_build"] = {k: v for k, v in context.items() if k not in ("enc_dir", "cache_dir")}
        save()
        cache = cache_module.FeatureCache(context["cache_dir"])
        keys = sorted(cache.keys())
        context.update(keys=keys, grid=cache.grid(keys[0]), encoder_size=setup["encoder_size"],
                       checkpoint_dir=os.path.join(work, "checkpoint"))
        report["setup"]["feature_grid"] = list(context["grid"])
        report["setup"]["feature_width"] = int(cache.metadata["hidden_size"])

        if "ddp" not in skip:
            report["ddp"] = {}
            for find_unused in (False, True):
                name = f"find_unused_parameters_{find_unused}"
                runs = {}
                for with_reg in (False, True):
                    log(f"DDP find_unused_parameters={find_unused}, U-REPA {'on' if with_reg else 'off'}")
                    runs["with_urepa" if with_reg else "without"] = train_run(
                        args, setup, context, device, meta_group, wrapper="ddp", with_reg=with_reg,
                        find_unused=find_unused)
                on = runs["with_urepa"]
                report["ddp"][name] = {**compare(runs["without"], on),
                                       "projector_max_abs_difference": on["projector_max_abs_difference"],
                                       "lambda_identical_across_ranks": on["lambda"]["identical_across_ranks"],
                                       "runs": runs}
                save()

        if "fsdp2" not in skip:
            try:
                runs = {}
                for with_reg in (False, True):
                    log(f"FSDP2, U-REPA {'on' if with_reg else 'off'}")
                    runs["with_urepa" if with_reg else "without"] = train_run(
                        args, setup, context, device, meta_group, wrapper="fsdp2", with_reg=with_reg)
                on = runs["with_urepa"]
                report["fsdp2"] = {**compare(runs["without"], on),
                                   "projector_max_abs_difference": on["projector_max_abs_difference"],
                                   "lambda_identical_across_ranks": on["lambda"]["identical_across_ranks"],
                                   "checkpoint_resumed": on.get("checkpoint", {}).get("resumed"),
                                   "clipping": "model (DTensors) and projector clipped apart, max norm 1 each",
                                   "runs": runs}
            except (ImportError, NotImplementedError) as exc:  # this torch or backend lacks FSDP2 or an op of it
                report["fsdp2"] = {"skipped": f"FSDP2 cannot run here ({type(exc).__name__}: {exc})"}
            save()
    except Exception:
        status = 1
        report["error"] = traceback.format_exc()[-3000:]
        save()
        raise
    finally:
        if rank == 0:
            print(json.dumps(summary(report), indent=1))
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
        dist.destroy_process_group()
    return status


def summary(report: dict) -> dict:
    """The headline figures, printed at the end."""
    out = {"device": report["env"]["device"], "world_size": report["env"]["world_size"]}
    cb = report.get("cache_build", {})
    if "builds" in cb:
        out["cache_img_per_s"] = {k: round(v["img_per_s"], 2) for k, v in cb["builds"].items()}
        out["cache_scaling_efficiency"] = cb.get("scaling_efficiency")
        out["cache_check"] = {k: v for k, v in cb["check"].items() if k != "first_differing"}
    runs = {f"ddp_{k}": v for k, v in report.get("ddp", {}).items()}
    if "fsdp2" in report:
        runs["fsdp2"] = report["fsdp2"]
    for name, r in runs.items():
        out[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "runs"}
    return out


if __name__ == "__main__":
    sys.exit(main())

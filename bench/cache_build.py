"""Feature-cache build throughput, storage per image and float8's effect on the losses, in one run.

    python bench/cache_build.py --out-dir "$OUT"         # GPU: random-weight DINOv2-g at 518 px, 1024-px JPEGs
    python bench/cache_build.py --tiny --out-dir DIR     # CPU smoke run of the same code on a tiny encoder

The encoder is a Dinov2Model with facebook/dinov2-giant's configuration (hidden 1536, 40 layers, 24 heads,
SwiGLU MLP of ratio 4, patch 14) and random bf16 weights, saved to a temporary folder and loaded by path
through ``load_encoder``: the code a user runs, without a download. Measured, in this order:

1. ``encoder_alone``: the encoder's forward (the build's own call, on random pixels already on the GPU) at
   each batch of ``--batches``, img/s by CUDA events; the build uses the smallest batch within 3% of the best.
2. ``decode_only``: the build's decode + resize workers alone (its DataLoader, nothing on the GPU): the CPU's
   ceiling for the build.
3. ``disk_write_MBps``: one 1 GiB write + fsync in the work folder: the disk's ceiling.
4. ``builds``: the real ``cache_features`` into an empty folder for bfloat16 and float8 (``--images`` JPEGs,
   default about 15 s of the encoder-alone rate; float8 fewer when the bfloat16 build ran slower than 1/2 of
   it, to stay within 4 minutes) and float16 (256 images): img/s over the
   encoding phase (decode, encode, write, the last shard's fsync included) and the whole run (the encoder's
   load included), MiB per image on disk.
5. ``float8_error``: the float8 cache against the bfloat16 cache of the same images (so the quantisation is the
   only difference), and the same measure on smooth synthetic fields (with and without a few large channels)
   and on a small random encoder's outputs: the relative RMSE of the tokens and of each image's token
   similarity matrix, and the relative error of the cosine and manifold loss terms for a projection close to
   the features (late training: h = y + 0.5·noise, cosine about 0.9) and a poor one (early: h = y + 3·noise,
   cosine about 0.3), the noise scaled to each token's RMS.

The JPEGs are copies of ``--unique`` smooth random colour fields (decoding a copy costs what decoding the
original does). Writes ``<out-dir>/cache_build_<gpu>.json`` after each phase (a run cut short keeps what it
measured) and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import repa_fused as rf
from repa_fused.training import cache as cache_module

# facebook/dinov2-giant's architecture; random weights (throughput is what is measured).
DINOV2_GIANT = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                    use_swiglu_ffn=True, patch_size=14, image_size=518, layerscale_value=1.0)
# A small random encoder for the float8 measure (DINOv2-S's width, four layers).
DINOV2_SMALL4 = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                     image_size=518)
TINY_DINOV2 = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, patch_size=7,
                   image_size=28)
FULL = dict(dinov2=DINOV2_GIANT, resolution=1024, encoder_size=518, batches=(16, 32, 64, 128), seconds=15.0,
            min_images=512, max_images=4096, float16_images=256, error_images=64,
            synthetic=dict(batch=8, grid=(37, 37), dim=1536), small=DINOV2_SMALL4, small_batch=4)
TINY = dict(dinov2=TINY_DINOV2, resolution=64, encoder_size=28, batches=(2, 4), seconds=1.0,
            min_images=24, max_images=24, float16_images=8, error_images=8,
            synthetic=dict(batch=2, grid=(6, 7), dim=32), small=TINY_DINOV2, small_batch=2)


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; other names lower-cased with '_' for anything not alphanumeric."""
    match = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name)
    if match and name.startswith("NVIDIA"):
        return match.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_images(folder: str, count: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        # Smooth random colour fields (a coarse grid upsampled): JPEG sizes and decode times of a photo, not noise.
        coarse = rng.integers(0, 256, (max(2, size // 32), max(2, size // 32), 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(f"{folder}/{i:05d}.jpg", quality=90)


def copy_images(unique: str, folder: str, count: int) -> None:
    """``count`` JPEGs in ``folder``, copies of those in ``unique`` in turn."""
    sources = sorted(os.listdir(unique))
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        shutil.copyfile(os.path.join(unique, sources[i % len(sources)]), os.path.join(folder, f"{i:06d}.jpg"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_rate(enc, device: torch.device, batch: int, reps: int) -> float:
    """img/s of the build's encoder call on ``batch`` random normalised images already on the device."""
    size = enc.input_size(enc.image_size, enc.image_size)
    x = torch.randn(batch, 3, *size, device=device, dtype=enc.model.dtype)
    for _ in range(2):
        cache_module._patch_tokens(enc, x)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        cache_module._patch_tokens(enc, x)
    synchronize(device)
    return batch * reps / (time.perf_counter() - start)


def decode_rate(enc, folder: str, workers: int, count: int) -> float:
    """img/s of the build's decode + resize workers alone (its dataset and collate, no encoder)."""
    keys = cache_module.find_images(folder)[:count]
    loader = torch.utils.data.DataLoader(
        cache_module._ImageFiles(folder, keys, enc.preprocessor), batch_size=cache_module._DECODE_CHUNK,
        num_workers=workers, collate_fn=cache_module._collate, prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    seen = sum(len(names) for groups, _ in loader for names, _ in groups)
    return seen / (time.perf_counter() - start)


def disk_rate(folder: str, mib: int) -> float:
    """MB/s of one ``mib`` MiB write + fsync in ``folder`` (the file is removed after)."""
    path = os.path.join(folder, "disk_probe.bin")
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return mib * 1.048576 / seconds


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def float8_error(y: torch.Tensor, yq: torch.Tensor) -> dict:
    """What float8 storage (``yq``) does against the reference features ``y`` (B, N, D), on a square grid."""
    y, yq = y.float(), yq.float()
    un, qn = F.normalize(y, dim=-1), F.normalize(yq, dim=-1)
    out = {"token_rel_rmse": rel_rms(yq, y), "unit_token_rel_rmse": rel_rms(qn, un),
           "similarity_rel_rmse": rel_rms(qn @ qn.transpose(1, 2), un @ un.transpose(1, 2))}
    g = torch.Generator(y.device).manual_seed(0)
    noise = torch.randn(y.shape, generator=g, device=y.device) * y.pow(2).mean(-1, keepdim=True).sqrt()
    # A projection near the features (late training, cosine about 0.9) and a poor one (early, about 0.3).
    for regime, sigma in (("aligned", 0.5), ("unaligned", 3.0)):
        h = y + sigma * noise
        for term, loss in (("cosine", rf.cosine_alignment_loss), ("manifold", rf.manifold_loss)):
            ref, got = (float(loss(h, t, backend="reference")) for t in (y, yq))
            out[f"{term}_{regime}_loss"] = ref
            out[f"{term}_{regime}_rel_error"] = abs(got - ref) / abs(ref)
    return out


def quantized(y: torch.Tensor) -> torch.Tensor:
    """``y`` through the cache's float8 storage and back (the writer's and the reader's own functions)."""
    parts = cache_module.quantize(y, torch.float8_e4m3fn)
    return cache_module.dequantize(parts[""], parts[cache_module.SCALE_SUFFIX], torch.bfloat16)


def smooth_fields(batch: int, grid: tuple, dim: int, device, large_channels: int = 0) -> torch.Tensor:
    """(B, H·W, D) bf16 features varying smoothly over the grid around a shared direction (as ViT patch tokens
    share a large common component); ``large_channels`` channels 20× the others (ViTs' outlier channels)."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(batch, dim, 5, 5, generator=g)
    field = F.interpolate(coarse, size=grid, mode="bicubic", align_corners=False)
    field = field + 0.1 * torch.randn(field.shape, generator=g) + torch.randn(1, dim, 1, 1, generator=g)
    field[:, :large_channels] *= 20
    return field.flatten(2).transpose(1, 2).to(device, torch.bfloat16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny encoder on the CPU: a smoke run of this script")
    parser.add_argument("--images", type=int, help="JPEGs per full build (default: about 20 s of the measured rate)")
    parser.add_argument("--unique", type=int, default=48, help="distinct JPEGs the others copy")
    parser.add_argument("--workers", type=int, help="decode workers (default: the build's default)")
    parser.add_argument("--work", help="work folder (default: a new temporary one, removed at the end)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    from transformers import Dinov2Config, Dinov2Model

    cfg = TINY if args.tiny else FULL
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = args.work or tempfile.mkdtemp(prefix="cache_build_")
    os.makedirs(work, exist_ok=True)
    workers = args.workers if args.workers is not None else (1 if args.tiny else max(0, cache_module._cpu_count() - 2))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    import transformers

    report = {"env": {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                      "repa_fused": rf.__version__, "cpus": cache_module._cpu_count(), "python": platform.python_version(),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              "setup": {"tiny": bool(args.tiny), "resolution": cfg["resolution"], "encoder_size": cfg["encoder_size"],
                        "encoder": "random " + ("tiny Dinov2" if args.tiny else "Dinov2 with facebook/dinov2-giant's "
                                                "config"), "encoder_dtype": "bfloat16", "workers": workers}}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"cache_build_{gpu_slug(name)}.json")

    def save():  # after each phase: a run cut short still leaves what it measured
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)

    t0 = time.perf_counter()
    try:
        log("building the random encoder")
        torch.manual_seed(0)
        with torch.device(device):
            model = Dinov2Model(Dinov2Config(**cfg["dinov2"])).to(dtype)
        enc_dir = os.path.join(work, "dinov2")
        model.save_pretrained(enc_dir)
        del model
        enc = rf.load_encoder(enc_dir, cfg["encoder_size"], device=device, dtype=dtype)

        log("encoder alone")
        rates = {b: encoder_rate(enc, device, b, reps=3 if args.tiny else max(3, 512 // b)) for b in cfg["batches"]}
        best = max(rates.values())
        batch = min(b for b, r in rates.items() if r >= 0.97 * best)
        report["encoder_alone"] = {"img_per_s_by_batch": rates, "chosen_batch": batch, "img_per_s": rates[batch]}
        save()

        log("writing JPEGs")
        unique = os.path.join(work, "unique")
        write_images(unique, args.unique, cfg["resolution"])
        count = args.images or int(min(cfg["max_images"], max(cfg["min_images"], rates[batch] * cfg["seconds"])))
        images = os.path.join(work, "images")
        copy_images(unique, images, count)
        copied = count
        report["setup"].update(images=count, unique_images=args.unique,
                               jpeg_kib=sum(os.path.getsize(os.path.join(unique, n)) for n in os.listdir(unique))
                               / 1024 / args.unique)
        log("decode workers alone")
        try:
            rate = decode_rate(enc, images, workers, min(count, 16 * max(workers, 1) * 8))
        except RuntimeError as exc:  # a worker killed, e.g. by a small /dev/shm in a container
            log(f"decode workers failed ({exc}); going on without workers, on fewer images")
            report["setup"]["worker_error"] = str(exc).splitlines()[0]
            workers, count = 0, cfg["min_images"] // 2
            report["setup"]["images"] = count
            rate = decode_rate(enc, images, workers, count)
        report["decode_only"] = {"workers": workers, "img_per_s": rate}
        report["disk_write_MBps"] = disk_rate(work, 8 if args.tiny else 1024)
        save()
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()

        report["builds"] = {}
        caches = {}
        for storage in ("bfloat16", "float8", "float16"):
            n = {"bfloat16": count, "float16": min(count, cfg["float16_images"]),
                 "float8": min(count, max(cfg["min_images"], int(report["builds"].get("bfloat16", {}).get(
                     "img_per_s", 0) * cfg["seconds"] * 2)))}[storage]
            log(f"cache-features build, {storage}, {n} images")
            folder = images if n == copied else os.path.join(work, f"images_{n}")
            if not os.path.isdir(folder):
                copy_images(unique, folder, n)
            out = os.path.join(work, f"cache_{storage}")
            summary = cache_module.cache_features(folder, out, enc_dir, cfg["encoder_size"], batch_size=batch,
                                                  dtype=storage, device=device, num_workers=workers, progress=False,
                                                  log=log)
            shard_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                              if f.endswith(cache_module.SHARD_SUFFIX))
            report["builds"][storage] = {
                "images": summary.encoded, "skipped": len(summary.skipped), "batch_size": summary.batch_size,
                "encode_seconds": summary.encode_seconds, "img_per_s": summary.encoded / summary.encode_seconds,
                "seconds_with_load": summary.seconds, "mib_per_image": shard_bytes / summary.encoded / 2 ** 20,
                "vs_encoder_alone": summary.encoded / summary.encode_seconds / rates[batch]}
            caches[storage] = out
            save()

        log("float8 error")
        keys = sorted(cache_module.FeatureCache(caches["float8"]).keys())[:cfg["error_images"]]
        ref = cache_module.FeatureCache(caches["bfloat16"]).get(keys, device=device)[0]
        got = cache_module.FeatureCache(caches["float8"]).get(keys, device=device)[0]
        errors = {"encoder_cache": float8_error(ref, got)}
        syn = cfg["synthetic"]
        for label, large in (("smooth_fields", 0), ("smooth_fields_8_large_channels", 8)):
            y = smooth_fields(syn["batch"], syn["grid"], syn["dim"], device, large)
            errors[label] = float8_error(y, quantized(y))
        torch.manual_seed(1)
        small_dir = os.path.join(work, "small")
        Dinov2Model(Dinov2Config(**cfg["small"])).to(dtype).save_pretrained(small_dir)
        small = rf.load_encoder(small_dir, cfg["encoder_size"], device=device, dtype=dtype)
        pixels = torch.stack([cache_module.load_image(os.path.join(unique, n)) for n in
                              sorted(os.listdir(unique))[:cfg["small_batch"]]]).float().div(127.5).sub(1).to(device)
        y = small(pixels)[0]
        errors["small_random_encoder"] = float8_error(y, quantized(y))
        report["float8_error"] = errors
        report["seconds"] = time.perf_counter() - t0
        save()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(format_summary(report))
    log(f"wrote {path}")
    return 0


def format_summary(report: dict) -> str:
    env, alone = report["env"], report["encoder_alone"]
    lines = [f"{env['device']} | torch {env['torch']} | {env['cpus']} CPUs | {report['setup']['images']} JPEGs of "
             f"{report['setup']['resolution']} px | {env['date']}", "",
             "encoder alone, img/s by batch: " + ", ".join(f"{b}: {r:.1f}" for b, r in
                                                            alone["img_per_s_by_batch"].items())
             + f" (chosen {alone['chosen_batch']})",
             f"decode workers alone: {report['decode_only']['img_per_s']:.1f} img/s with "
             f"{report['decode_only']['workers']} workers; disk: {report['disk_write_MBps']:.0f} MB/s", "",
             "| storage | img/s (encoding) | of encoder alone | img/s with load | MiB/image |", "|---|---|---|---|---|"]
    for storage, b in report["builds"].items():
        lines.append(f"| {storage} | {b['img_per_s']:.1f} | {b['vs_encoder_alone']:.0%} | "
                     f"{b['images'] / b['seconds_with_load']:.1f} | {b['mib_per_image']:.3f} |")
    lines += ["", "| float8 vs bf16 features | token rel RMSE | similarity rel RMSE | cosine rel err (aligned / "
              "unaligned) | manifold rel err (aligned / unaligned) |", "|---|---|---|---|---|"]
    for label, e in report["float8_error"].items():
        lines.append(f"| {label} | {e['token_rel_rmse']:.2e} | {e['similarity_rel_rmse']:.2e} | "
                     f"{e['cosine_aligned_rel_error']:.1e} / {e['cosine_unaligned_rel_error']:.1e} | "
                     f"{e['manifold_aligned_rel_error']:.1e} / {e['manifold_unaligned_rel_error']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

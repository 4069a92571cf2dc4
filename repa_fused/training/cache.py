"""Encoder feature cache: the patch tokens of every training image computed once, read back each step.

A training sample's clean image never changes, so the VAE decode and the encoder forward that REPA/U-REPA
need each step can be paid once, ahead of training::

    repa-fused cache-features IMAGES_DIR --encoder dinov2_vitg14 --image-size 518 --out CACHE_DIR
    cache = FeatureCache(CACHE_DIR)
    tokens, grid = cache.get(["cats/001.jpg", "dogs/7.png"], device="cuda")   # (B, N, D), (H, W)

Layout of CACHE_DIR::

    index.json                          {"format", "metadata", "shards": [{"file", "bytes"}],
                                         "entries": {key: [shard, row, H, W]}}
    <run>-r<rank>-<seq>.safetensors     one tensor per patch grid, "grid{H}x{W}": (rows, H·W, D) in the cache
                                        dtype; the header's metadata lists each tensor's keys and the cache
                                        metadata, so every shard describes itself

Why it is made so:

- The key of an image is its path relative to IMAGES_DIR with "/" separators: the name the training dataset
  already has, so a trainer passes its batch's file names and needs no other bookkeeping.
- Images become pixels as a trainer would load them (PIL, EXIF orientation applied, RGB, [0, 255] -> [-1, 1])
  and then go through the live encoder's own ``VisionEncoder.preprocess``: cached tokens equal what
  ``encoder(pixels)`` gives for the same image. Images of other sizes are preprocessed one by one and batched
  by their encoder input size (several with ``aspect="preserve"``).
- Shards are written to a temporary file and renamed, so a shard exists whole or not at all. The index is
  rewritten (likewise) when a run ends; a run that dies first loses only the shard it held in memory: the next
  run indexes the shards the index lacks from their own headers, then encodes only the keys still missing.
- Under torchrun / accelerate each rank encodes a disjoint slice and writes its own shards; rank 0 plans the
  work and merges the index once every rank is done (torch.distributed, gloo when the launcher gave none).
- ``FeatureCache.get`` reads only the rows asked for, through safetensors' memory map (``safe_open`` +
  ``get_slice``). A batch must share one grid (an error says so): one tensor per batch, and a sampler can
  bucket keys with ``cache.grid(key)``.
- Truncation or a rewritten shard shows as a size unlike the index's record, or a header safetensors refuses:
  an error naming the file. Flipped bytes inside the data are not detected (that would cost reading it all).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional, Sequence, Union

import torch

INDEX_FILE = "index.json"
FORMAT = 1
SHARD_SUFFIX = ".safetensors"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# How a file becomes pixels before the encoder's preprocessing: part of what the features depend on.
IMAGE_LOADING = "PIL; EXIF orientation applied; RGB; uint8 [0, 255] -> [-1, 1]"
# Metadata two runs into one cache must agree on (the package version may differ).
_COMPARED = ("encoder", "image_size", "dtype", "preprocessing", "hidden_size", "image_loading")
_HEADER_KEY = "repa_fused"

Grid = tuple[int, int]


class CacheError(RuntimeError):
    """A cache file (index or shard) that cannot be read as it was written: missing, truncated or corrupt."""


def _grid_tensor(grid: Grid) -> str:
    return f"grid{grid[0]}x{grid[1]}"


def _grid_text(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


# -- reading --------------------------------------------------------------------------------------------------


class FeatureCache:
    """A feature cache written by ``repa-fused cache-features`` (see the module docstring).

    ``get(keys, device=None) -> (tokens (B, N, D), grid (H, W))`` in the cache's dtype; ``len(cache)``;
    ``key in cache``; ``keys()``; ``grid(key)``; ``close()``; ``metadata`` (a dict: ``encoder``, ``image_size``,
    ``dtype``, ``preprocessing``, ``hidden_size``, ``patch_size``, ``image_loading``, ``version``). At most
    ``max_open_shards`` shard files stay memory-mapped at once (least recently used closed first).
    """

    def __init__(self, path: Union[str, os.PathLike], *, max_open_shards: int = 64):
        self.path = os.fspath(path)
        index = _read_index(self.path)
        if index is None:
            raise FileNotFoundError(f"{self.path!r} is not a feature cache: it has no {INDEX_FILE} (build one with "
                                    "`repa-fused cache-features IMAGES_DIR --out DIR`)")
        if not isinstance(max_open_shards, int) or max_open_shards < 1:
            raise ValueError(f"max_open_shards must be a positive int, got {max_open_shards!r}")
        self._metadata = index["metadata"]
        self._shards = index["shards"]
        self._entries = index["entries"]
        self._dtype = getattr(torch, self._metadata["dtype"])
        self._max_open = max_open_shards
        self._open: OrderedDict = OrderedDict()

    @property
    def metadata(self) -> dict:
        return copy.deepcopy(self._metadata)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def grid(self, key: str) -> Grid:
        """Patch grid (H, W) of one key's tokens, for bucketing keys of mixed grids into batches."""
        entry = self._entry(key)
        return entry[2], entry[3]

    def get(self, keys: Sequence[str], device=None) -> tuple[torch.Tensor, Grid]:
        """Tokens of ``keys`` (B names): ((B, N, D) on ``device`` (default CPU) in the cache dtype, (H, W)).

        Reads B rows from the memory-mapped shards. Raises KeyError naming a key not in the cache, ValueError
        when the keys' grids differ, CacheError naming a shard file that is missing, truncated or corrupt.
        """
        if isinstance(keys, (str, bytes)):
            raise TypeError("keys must be a sequence of cache keys, not a single string")
        keys = list(keys)
        if not keys:
            raise ValueError("keys is empty: pass at least one cache key")
        entries = [self._entry(k) for k in keys]
        grids = {(e[2], e[3]) for e in entries}
        if len(grids) > 1:
            seen = {}
            for key, e in zip(keys, entries):
                seen.setdefault((e[2], e[3]), key)
            detail = ", ".join(f"{_grid_text(g)} ({k!r})" for g, k in seen.items())
            raise ValueError(f"the keys have different patch grids: {detail}; one batch must share one grid (a "
                             "cache made with --aspect preserve: bucket keys by cache.grid(key))")
        grid = grids.pop()
        device = torch.device(device) if device is not None else torch.device("cpu")
        # Pinned rows copy to the GPU asynchronously; the caching host allocator keeps them until the copy ends.
        out = torch.empty((len(keys), grid[0] * grid[1], int(self._metadata["hidden_size"])), dtype=self._dtype,
                          pin_memory=device.type == "cuda")
        name = _grid_tensor(grid)
        for i, e in enumerate(entries):
            handle, file = self._handle(e[0])
            try:
                out[i] = handle.get_slice(name)[e[1]:e[1] + 1][0]
            except Exception as exc:
                raise CacheError(f"feature cache shard {file} could not be read ({exc}); it is corrupt: delete it "
                                 "and rerun `repa-fused cache-features` to encode its images again") from exc
        return out.to(device, non_blocking=True), grid

    def _entry(self, key) -> list:
        try:
            return self._entries[key]
        except (KeyError, TypeError):
            raise KeyError(f"{key!r} is not in the feature cache {self.path!r} ({len(self)} keys: image paths "
                           "relative to the cached folder, with '/' separators)") from None

    def _handle(self, shard: int):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        from safetensors import safe_open

        info = self._shards[shard]
        file = os.path.join(self.path, info["file"])
        try:
            size = os.path.getsize(file)
        except OSError as exc:
            raise CacheError(f"feature cache shard {file} is missing or unreadable ({exc}): rerun "
                             "`repa-fused cache-features` to encode its images again") from exc
        if size != info["bytes"]:
            raise CacheError(f"feature cache shard {file} is truncated or corrupt: {size} bytes on disk, "
                             f"{info['bytes']} when written; delete it and rerun `repa-fused cache-features`")
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as exc:
            raise CacheError(f"feature cache shard {file} is corrupt ({exc}); delete it and rerun "
                             "`repa-fused cache-features`") from exc
        self._open[shard] = (handle, file)
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return handle, file

    def close(self) -> None:
        """Unmap every open shard (the next ``get`` reopens what it needs)."""
        self._open.clear()

    def __getstate__(self):
        # Memory maps do not pickle (DataLoader workers, spawn): a copy reopens shards on first use.
        return {**self.__dict__, "_open": OrderedDict()}

    def __repr__(self) -> str:
        m = self._metadata
        return (f"FeatureCache({self.path!r}, {len(self)} keys, encoder={m['encoder']!r}, "
                f"image_size={m['image_size']}, aspect={m['preprocessing'].get('aspect')!r}, dtype={m['dtype']})")


def _read_index(path: str) -> Optional[dict]:
    """The index of the cache at ``path``, or None when it has none; CacheError when it is unreadable."""
    file = os.path.join(path, INDEX_FILE)
    try:
        with open(file) as fh:
            index = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheError(f"feature cache index {file} is unreadable ({exc}); delete it and rerun "
                         "`repa-fused cache-features`: it rebuilds the index from the shards") from exc
    fields = {"metadata", "shards", "entries"}
    if not isinstance(index, dict) or index.get("format") != FORMAT or not fields <= set(index):
        raise CacheError(f"feature cache index {file} is not a format-{FORMAT} repa_fused index; delete it and rerun "
                         "`repa-fused cache-features`: it rebuilds the index from the shards")
    return index


# -- writing --------------------------------------------------------------------------------------------------


def load_image(path: Union[str, os.PathLike]) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file, EXIF orientation applied: how the cache loads images. Divide by
    127.5 and subtract 1 for the [-1, 1] pixels the encoder takes."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def find_images(root: Union[str, os.PathLike]) -> list[str]:
    """Sorted keys (relative paths, "/" separators) of the png/jpg/jpeg/webp files under ``root``; hidden files
    and folders (names starting with ".") are left out."""
    root = os.fspath(root)
    keys = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                keys.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return sorted(keys)


@dataclass
class CacheSummary:
    """What a ``cache_features`` run did, over all ranks."""

    path: str
    found: int                 # images under IMAGES_DIR
    already_cached: int        # of those, cached before this run
    encoded: int               # encoded by this run
    skipped: list = field(default_factory=list)  # (key, reason) of unreadable images
    entries: int = 0           # keys in the cache after the run
    seconds: float = 0.0       # the whole run, the encoder's load included
    encode_seconds: float = 0.0  # reading, encoding and writing (the slowest rank)
    rank: int = 0

    def format(self) -> str:
        busy = self.encoded and self.encode_seconds > 0
        rate = f" ({self.encoded / self.encode_seconds:.1f} img/s encoding)" if busy else ""
        lines = [f"repa-fused cache-features: {self.found} images found, {self.already_cached} already cached, "
                 f"{self.encoded} encoded, {len(self.skipped)} skipped in {self.seconds:.1f} s{rate} -> "
                 f"{self.path} ({self.entries} keys)"]
        lines += [f"  skipped {key}: {reason}" for key, reason in self.skipped]
        return "\n".join(lines)


def cache_features(images_dir: Union[str, os.PathLike], out: Union[str, os.PathLike],
                   encoder: str = "dinov2_vitg14", image_size: int = 518, *, batch_size: int = 32,
                   dtype: str = "bf16", device=None, aspect: str = "square", shard_size: int = 256,
                   num_workers: Optional[int] = None, progress: bool = True,
                   log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> CacheSummary:
    """Encode every image under ``images_dir`` not yet in the cache at ``out`` (see the module docstring).

    ``encoder``/``image_size``/``aspect``: as ``load_encoder``; ``dtype``: "bf16" or "fp32", the encoder's
    weights and the stored tokens; ``device``: default the GPU (``cuda:LOCAL_RANK`` under a launcher) when there
    is one; ``shard_size``: images per shard file; ``num_workers``: image-decoding DataLoader workers.
    Unreadable images are logged by path and skipped. Returns the summary over all ranks (on every rank).
    Raises ValueError for bad arguments or a cache made with other settings.
    """
    from .encoders import ASPECTS, load_encoder

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    images_dir, out = os.fspath(images_dir), os.fspath(out)
    if not os.path.isdir(images_dir):
        raise ValueError(f"images folder {images_dir!r} does not exist")
    start = time.perf_counter()
    group = _Group()
    try:
        device = _device(device)
        enc = load_encoder(encoder, image_size, device=device, dtype=DTYPES[dtype], aspect=aspect)
        meta = _metadata(enc)
        plan = None
        if group.rank == 0:
            try:
                plan = _plan(images_dir, out, meta, log)
            except (ValueError, CacheError) as exc:
                plan = exc  # every rank raises it, rather than waiting for a plan that never comes
        plan = group.broadcast(plan)
        if isinstance(plan, Exception):
            raise plan
        mine = plan["pending"][group.rank::group.world]
        if num_workers is None:
            num_workers = min(4, max(0, (os.cpu_count() or 1) // group.world - 1))
        encode_start = time.perf_counter()
        encoded, skipped = _encode(enc, device, images_dir, mine, out, meta, batch_size=batch_size,
                                   shard_size=shard_size, num_workers=num_workers, progress=progress,
                                   rank=group.rank, world=group.world, log=log)
        # Also the barrier: once every rank has contributed, every rank's shards are on disk.
        done = group.gather((encoded, skipped, time.perf_counter() - encode_start))
        entries = len(_sync_index(out, meta, log)["entries"]) if group.rank == 0 else None
        entries = group.broadcast(entries)
    finally:
        group.close()
    return CacheSummary(path=out, found=plan["found"], already_cached=plan["found"] - len(plan["pending"]),
                        encoded=sum(d[0] for d in done), skipped=sorted(s for d in done for s in d[1]),
                        entries=entries, seconds=time.perf_counter() - start,
                        encode_seconds=max(d[2] for d in done), rank=group.rank)


def _metadata(enc) -> dict:
    from .._version import __version__

    # A local directory is recorded absolute: the cache outlives the working directory it was made from.
    name = os.path.abspath(enc.name) if os.path.isdir(enc.name) else enc.name
    return {"encoder": name, "image_size": int(enc.image_size), "dtype": str(enc.model.dtype).split(".")[-1],
            "preprocessing": enc.preprocessing, "hidden_size": int(enc.hidden_size), "patch_size": int(enc.patch_size),
            "image_loading": IMAGE_LOADING, "version": __version__}


def _check_same(found: dict, wanted: dict, where: str) -> None:
    from .regularizers import _canonical_encoder

    diff = [f"{k} {found.get(k)!r} (this run: {wanted[k]!r})" for k in _COMPARED
            if (_canonical_encoder(found.get(k)) != _canonical_encoder(wanted[k]) if k == "encoder"
                else found.get(k) != wanted[k])]
    if diff:
        raise ValueError(f"{where} was made with {'; '.join(diff)}: write this cache to another --out folder, or "
                         "run with the settings it was made with")


def _plan(images_dir: str, out: str, meta: dict, log) -> dict:
    """Rank 0: the cache's index brought up to date, and the keys still to encode."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # temporary files of a run that died mid-write
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(out, name))
    index = _sync_index(out, meta, log)
    keys = find_images(images_dir)
    if not keys:
        raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {images_dir!r}")
    return {"found": len(keys), "pending": [k for k in keys if k not in index["entries"]]}


def _sync_index(out: str, meta: dict, log) -> dict:
    """The index of ``out`` checked against ``meta``, less shards that vanished or changed size (their images are
    encoded again), plus the shards it lacks (from their headers); rewritten when that changed anything."""
    from safetensors import safe_open

    index = _read_index(out)
    if index is None:
        index = {"format": FORMAT, "metadata": meta, "shards": [], "entries": {}}
        changed = True
    else:
        _check_same(index["metadata"], meta, f"the feature cache {out!r}")
        changed = False
    shards, entries, keep = [], {}, {}
    for i, info in enumerate(index["shards"]):
        file = os.path.join(out, info["file"])
        if os.path.isfile(file) and os.path.getsize(file) == info["bytes"]:
            keep[i] = len(shards)
            shards.append(info)
        else:
            log(f"feature cache shard {file} is missing or truncated: its images will be encoded again")
            changed = True
    for key, (shard, *rest) in index["entries"].items():
        if shard in keep:
            entries[key] = [keep[shard], *rest]
    known = {info["file"] for info in shards}
    for name in sorted(os.listdir(out)):
        if not name.endswith(SHARD_SUFFIX) or name.startswith(".") or name in known:
            continue
        file = os.path.join(out, name)
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                header = json.loads(handle.metadata()[_HEADER_KEY])
        except Exception as exc:
            log(f"ignoring feature cache shard {file}: unreadable ({exc})")
            continue
        _check_same(header["metadata"], meta, f"the feature cache shard {file}")
        for tensor, keys in header["rows"].items():
            h, w = (int(v) for v in tensor[len("grid"):].split("x"))
            for row, key in enumerate(keys):
                entries[key] = [len(shards), row, h, w]
        shards.append({"file": name, "bytes": os.path.getsize(file)})
        changed = True
    index = {"format": FORMAT, "metadata": index["metadata"], "shards": shards, "entries": entries}
    if changed:
        _atomic_write(os.path.join(out, INDEX_FILE), json.dumps(index, separators=(",", ":")).encode())
    return index


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file, then rename it onto ``path``: readers see the old file or the whole new one."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Buffers encoded rows per grid and writes a shard every ``rows_per_shard`` images."""

    def __init__(self, out: str, prefix: str, meta: dict, rows_per_shard: int):
        self.out, self.prefix, self.meta, self.rows_per_shard = out, prefix, meta, rows_per_shard
        self.rows: dict[Grid, tuple[list, list]] = {}
        self.count = self.seq = 0

    def add(self, keys: Sequence[str], tokens: torch.Tensor, grid: Grid) -> None:
        names, tensors = self.rows.setdefault(grid, ([], []))
        names.extend(keys)
        tensors.append(tokens.cpu())
        self.count += len(keys)
        if self.count >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.count:
            return
        from safetensors.torch import save

        tensors = {_grid_tensor(g): torch.cat(ts) for g, (_, ts) in self.rows.items()}
        header = {"metadata": self.meta, "rows": {_grid_tensor(g): names for g, (names, _) in self.rows.items()}}
        path = os.path.join(self.out, f"{self.prefix}-{self.seq:05d}{SHARD_SUFFIX}")
        _atomic_write(path, save(tensors, metadata={_HEADER_KEY: json.dumps(header)}))
        self.rows, self.count, self.seq = {}, 0, self.seq + 1


class _ImageFiles(torch.utils.data.Dataset):
    """(key, (3, H, W) uint8 or None, None or why the file could not be read) per key."""

    def __init__(self, root: str, keys: Sequence[str]):
        self.root, self.keys = root, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        try:
            return key, load_image(os.path.join(self.root, key)), None
        except Exception as exc:  # any decoder failure is the file's fault: report it and go on
            return key, None, f"{type(exc).__name__}: {exc}"


@torch.inference_mode()
def _patch_tokens(enc, x: torch.Tensor) -> torch.Tensor:
    """VisionEncoder.forward after its preprocess: (B, 3, h, w) normalised -> (B, N, D) patch tokens."""
    return enc.model(pixel_values=x).last_hidden_state[:, 1 + enc.num_register_tokens:]


def _encode(enc, device: torch.device, root: str, keys: Sequence[str], out: str, meta: dict, *, batch_size: int,
            shard_size: int, num_workers: int, progress: bool, rank: int, world: int, log) -> tuple[int, list]:
    """This rank's images -> shards. Returns (images encoded, [(key, reason) skipped])."""
    from tqdm.auto import tqdm

    writer = _ShardWriter(out, f"{uuid.uuid4().hex[:8]}-r{rank:03d}", meta, shard_size)
    loader = torch.utils.data.DataLoader(_ImageFiles(root, keys), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=list)
    buckets: dict[tuple[int, int], list] = {}  # encoder input size -> [(key, (1, 3, h, w))]
    encoded, skipped = 0, []
    desc = "encoding" if world == 1 else f"encoding (rank {rank} of {world})"
    bar = tqdm(total=len(keys), desc=desc, unit="img", disable=not progress or rank != 0, dynamic_ncols=True)

    def flush(size):
        nonlocal encoded
        names, xs = zip(*buckets.pop(size))
        tokens = _patch_tokens(enc, torch.cat(xs))
        writer.add(names, tokens, (size[0] // enc.patch_size, size[1] // enc.patch_size))
        encoded += len(names)
        bar.update(len(names))

    for batch in loader:
        for key, image, error in batch:
            if image is None:
                skipped.append((key, error))
                log(f"skipped {os.path.join(root, key)}: {error}")
                bar.update(1)
                bar.set_postfix(skipped=len(skipped))
                continue
            x = enc.preprocess(image.to(device).float().div_(127.5).sub_(1.0)[None])
            bucket = buckets.setdefault(tuple(x.shape[2:]), [])
            bucket.append((key, x))
            if len(bucket) >= batch_size:
                flush(tuple(x.shape[2:]))
        # Mixed sizes leave part-filled buckets; bound what waits on the device.
        while sum(len(b) for b in buckets.values()) > 2 * batch_size:
            flush(max(buckets, key=lambda s: len(buckets[s])))
    for size in list(buckets):
        flush(size)
    writer.flush()
    bar.close()
    return encoded, skipped


def _device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but no CUDA GPU is available")
        if device.index is None:  # one GPU per rank under torchrun / accelerate
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


class _Group:
    """torch.distributed when the launcher set WORLD_SIZE > 1 (initialised here with gloo unless the caller
    already did), else a group of one."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.created = dist, False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
            # Ranks meet only to plan and to merge; a slow rank may finish long after the others.
            dist.init_process_group("gloo", timeout=timedelta(hours=6))
            self.created = True
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def broadcast(self, obj):
        if not self.on:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        boxes = [None] * self.world
        self.dist.all_gather_object(boxes, obj)
        return boxes

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


# -- command line ---------------------------------------------------------------------------------------------


def add_cache_features_parser(subparsers) -> None:
    """Register ``repa-fused cache-features`` on the CLI's subparsers."""
    from .encoders import ASPECTS

    p = subparsers.add_parser(
        "cache-features", help="encode a folder of images once into a feature cache (FeatureCache)",
        description="Encode every png/jpg/jpeg/webp under IMAGES_DIR (recursively) with the vision encoder and "
                    "write the patch tokens to CACHE_DIR (safetensors shards + index.json). Resumable: images "
                    "already cached are skipped. Runs under torchrun/accelerate launch, one slice per rank. Exit "
                    "code 0: all encoded; 1: some images were unreadable and skipped; 2: an error.")
    p.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of training images (keys: paths relative to it)")
    p.add_argument("--encoder", default="dinov2_vitg14", help="name, alias, hub id or local directory "
                                                              "(default dinov2_vitg14)")
    p.add_argument("--image-size", type=int, default=518, help="encoder input side in pixels (default 518)")
    p.add_argument("--out", required=True, metavar="CACHE_DIR", help="cache folder (created or resumed)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="encoder and stored dtype (default bf16)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available; cuda:LOCAL_RANK per rank)")
    p.add_argument("--aspect", choices=ASPECTS, default="square",
                   help="square: S×S as SimpleTuner; preserve: aspect kept, about S² pixels (non-square grids)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="images per shard file (default 256: about 1 GB for DINOv2-g at 518 px in bf16)")
    p.add_argument("--num-workers", type=int, help="image-decoding workers per rank (default: min(4, CPUs - 1))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache_features)


def cmd_cache_features(args) -> int:
    try:
        summary = cache_features(args.images_dir, args.out, args.encoder, args.image_size,
                                 batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                                 aspect=args.aspect, shard_size=args.shard_size, num_workers=args.num_workers,
                                 progress=not args.no_progress)
    except (ValueError, CacheError) as exc:
        print(f"repa-fused cache-features: error: {exc}", file=sys.stderr)
        return 2
    if summary.rank == 0:
        print(summary.format())
    return 1 if summary.skipped else 0

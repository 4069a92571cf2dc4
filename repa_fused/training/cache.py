"""Encoder feature cache: the patch tokens of every training image computed once, read back each step.

A training sample's clean image never changes, so the VAE decode and the encoder forward that REPA/U-REPA
need each step can be paid once, ahead of training::

    repa-fused cache-features IMAGES_DIR --encoder dinov2_vitg14 --image-size 518 --out CACHE_DIR [--dtype float8]
    cache = FeatureCache(CACHE_DIR)
    tokens, grid = cache.get(["cats/001.jpg", "dogs/7.png"], device="cuda")   # (B, N, D) bf16, (H, W)

Layout of CACHE_DIR::

    index.json                          {"format": 2, "metadata", "shards": [{"file", "bytes"}],
                                         "entries": {key: [shard, row, H, W]}}: the shards' table of contents
    <run>-r<rank>-<seq>.safetensors     "grid{H}x{W}": (rows, H·W, D) in the stored dtype; with float8 also
                                        "grid{H}x{W}.scale": (rows, H·W) float32, each token's scale. The
                                        header's metadata lists each tensor's row keys and the cache metadata:
                                        every shard describes itself, and the index is rebuilt from them
    .repa_fused.lock                    held (flock) by the one run that may write the folder

Storage (``--dtype``): bfloat16 (default; 4.0 MiB per image at 37×37 × 1536), float16, float32, or float8:
e4m3 with one float32 scale per token (max |x| / 448), 2.0 MiB per image. ``FeatureCache.get`` returns what
the losses take: the stored dtype, and bfloat16 for float8 (dequantised on the target device, so the float8
bytes are what crosses the bus).

Why it is made so:

- The key of an image is its path relative to IMAGES_DIR with "/" separators: the name the training dataset
  already has. Symbolic links to folders are followed (a link back into a folder being walked is not: no
  loops); hidden files and folders are left out.
- Images become pixels as a trainer would load them (PIL, EXIF orientation applied, RGB, [0, 255] -> [-1, 1])
  and then go through the encoder's own ``ImagePreprocessor`` (``enc.preprocessor``: model-free, pickled to
  the DataLoader's worker processes), so cached tokens equal ``encoder(pixels)``'s. Workers, because decoding
  and resizing a 1024-px JPEG costs a CPU core tens of ms: many workers feed one GPU. The main process only
  batches (by encoder input size), runs the encoder at ``batch_size`` (halved on a CUDA out-of-memory error)
  and quantises on the device; a writer thread takes the device-to-host copies and writes the shards, so the
  disk overlaps the encoder.
- A shard holds at most ``shard_size`` images and is written to a temporary name, fsynced and renamed: it
  exists whole or not at all. A run that dies loses only the rows it had not written: the next run indexes
  every shard from its header and encodes only the keys still missing.
- One run writes a folder at a time: it holds an exclusive ``flock`` on ``.repa_fused.lock`` (the kernel drops
  it when the run ends or dies) and a second run is refused with a message naming the holder. Under that lock
  a run removes only temporary files of the names the cache itself writes; it never deletes anything else.
- Under torchrun / accelerate each rank encodes a disjoint slice and writes its own shards; rank 0 holds the
  lock, plans the work and merges the index once every rank is done (torch.distributed, gloo when the
  launcher gave none). An error on any rank is raised on every rank; the run ends by checking that every
  image found is cached or reported unreadable, so a cache is never silently partial.
- ``FeatureCache.get`` reads only the rows asked for, through safetensors' memory map. A batch must share one
  grid (an error says so): a sampler can bucket keys with ``cache.grid(key)``.
- The index names shards by file name only (no folders: the reader opens nothing outside the cache folder).
  Opening a shard checks its size against the index and its header's row keys and settings against the
  index's: a truncated, swapped or overwritten shard is an error naming the file, never another image's
  features. Flipped bytes inside the data are not detected (that would cost reading it all).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import queue
import re
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional, Sequence, Union

import torch

from .encoders import ImagePreprocessor, feature_record, record_differences

INDEX_FILE = "index.json"
LOCK_FILE = ".repa_fused.lock"
FORMAT = 2                 # 2: float16 / float8 storage, scale tensors; a format-1 cache (bf16 / fp32) reads as is
_READABLE_FORMATS = (1, 2)
SHARD_SUFFIX = ".safetensors"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# --dtype -> (stored dtype, the encoder's dtype). float8 stores a bf16 encoder's tokens, one scale per token.
STORAGE = {
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "float8": (torch.float8_e4m3fn, torch.bfloat16),
    "float32": (torch.float32, torch.float32),
}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "float8", "fp32": "float32"}
FLOAT8_MAX = 448.0         # the largest finite float8_e4m3fn
SCALE_SUFFIX = ".scale"
# What the reader returns for a stored dtype the losses do not take.
_READ_AS = {torch.float8_e4m3fn: torch.bfloat16}
# How a file becomes pixels before the encoder's preprocessing: part of what the features depend on.
IMAGE_LOADING = "PIL; EXIF orientation applied; RGB; uint8 [0, 255] -> [-1, 1]"
# Metadata two runs into one cache must agree on (the package version may differ): the encoder's feature
# record (its name, size, preprocessing, model type, the prefix tokens it drops, width), storage and loading.
_COMPARED = ("encoder", "image_size", "preprocessing", "model_type", "prefix_tokens", "hidden_size", "dtype",
             "image_loading")
_HEADER_KEY = "repa_fused"
# The only names the cache writes: shards, and the temporary files shards and the index are written to.
_SHARD_NAME = re.compile(r"[0-9a-f]{8}-r\d{3,}-\d{5,}\.safetensors")
_TMP_NAME = re.compile(r"\.(index\.json|[0-9a-f]{8}-r\d{3,}-\d{5,}\.safetensors)\.[0-9a-f]{8}\.tmp")
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float8_e4m3fn: "F8_E4M3"}
_DECODE_CHUNK = 8          # images one worker decodes per hand-over: small, so shared memory stays bounded
_WRITE_QUEUE = 3           # encoded batches waiting for the writer: bounds the host memory they pin

Grid = tuple[int, int]


class CacheError(RuntimeError):
    """A cache file (index or shard) that cannot be read as it was written: missing, truncated or corrupt."""


def _grid_tensor(grid: Grid) -> str:
    return f"grid{grid[0]}x{grid[1]}"


def _grid_text(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def _parse_grid(tensor: str) -> Grid:
    h, w = tensor[len("grid"):].split("x")
    return int(h), int(w)


def _say(text: str, stream) -> None:
    """Print whatever the stream's encoding: undecodable file-name bytes (surrogate escapes) and characters the
    encoding lacks are shown as backslash escapes, never a UnicodeEncodeError at the end of a long run."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding), file=stream, flush=True)


def _log_to_stderr(message: str) -> None:
    _say(message, sys.stderr)


def storage_name(dtype: str) -> str:
    """The ``--dtype`` name of a storage choice or alias ("bf16" -> "bfloat16"); ValueError naming the choices."""
    name = DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if name not in STORAGE:
        raise ValueError(f"dtype must be one of {list(STORAGE)} (or {', '.join(DTYPE_ALIASES)}), got {dtype!r}")
    return name


def quantize(tokens: torch.Tensor, stored: torch.dtype) -> dict[str, torch.Tensor]:
    """(..., D) tokens -> what a shard stores: {"": tokens in ``stored``}, and for float8 ``".scale"``: (...,)
    float32, each token's max |x| / 448 (so every token spans e4m3's full range; an all-zero token gets 1)."""
    if stored != torch.float8_e4m3fn:
        return {"": tokens.to(stored)}
    x = tokens.float()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax))
    # x / scale lies in [-448, 448] up to rounding; the clamp keeps a rounding past 448 from becoming NaN.
    q = (x / scale[..., None]).clamp_(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
    return {"": q, SCALE_SUFFIX: scale}


def dequantize(stored: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``quantize``: (..., D) in ``dtype`` (one rounding, from float32 for float8)."""
    if scale is None:
        return stored.to(dtype)
    return (stored.float() * scale[..., None]).to(dtype)


# -- reading --------------------------------------------------------------------------------------------------


class FeatureCache:
    """A feature cache written by ``repa-fused cache-features`` (see the module docstring).

    ``get(keys, device=None, dtype=None) -> (tokens (B, N, D), grid (H, W))``; ``len(cache)``; ``key in cache``;
    ``keys()``; ``grid(key)``; ``close()``; ``dtype`` (what ``get`` returns by default: the stored dtype,
    bfloat16 for a float8 cache); ``storage_dtype``; ``metadata`` (a dict: the encoder's ``feature_record``
    (``encoder``, ``image_size``, ``preprocessing``, ``model_type``, ``prefix_tokens``, ``hidden_size``), ``dtype``
    (stored), ``encoder_dtype``, ``patch_size``, ``image_loading``, ``version``).
    At most ``max_open_shards`` shard files stay memory-mapped at once (least recently used closed first).
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
        self._storage = _stored_dtype(self._metadata, os.path.join(self.path, INDEX_FILE))
        self._max_open = max_open_shards
        self._open: OrderedDict = OrderedDict()
        self._rows: Optional[Counter] = None  # rows the index puts in each shard, counted on first open

    @property
    def metadata(self) -> dict:
        return copy.deepcopy(self._metadata)

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._storage

    @property
    def dtype(self) -> torch.dtype:
        return _READ_AS.get(self._storage, self._storage)

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

    def get(self, keys: Sequence[str], device=None, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, Grid]:
        """Tokens of ``keys`` (B names): ((B, N, D) on ``device`` (default CPU) in ``dtype`` (default
        ``self.dtype``), (H, W)).

        Reads B rows from the memory-mapped shards; a float8 cache's rows cross to ``device`` as float8 and are
        dequantised there. Raises KeyError naming a key not in the cache, ValueError when the keys' grids
        differ, CacheError naming a shard file that is missing, truncated, corrupt or not the one indexed.
        """
        if isinstance(keys, (str, bytes)):
            raise TypeError("keys must be a sequence of cache keys, not a single string")
        keys = list(keys)
        if not keys:
            raise ValueError("keys is empty: pass at least one cache key")
        dtype = self.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be a floating torch dtype the losses take (float32, bfloat16, float16), "
                             f"got {dtype!r}")
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
        pin = device.type == "cuda"
        shape = (len(keys), grid[0] * grid[1], int(self._metadata["hidden_size"]))
        rows = torch.empty(shape, dtype=self._storage, pin_memory=pin)
        scales = torch.empty(shape[:2], dtype=torch.float32, pin_memory=pin) if self._storage in _READ_AS else None
        name = _grid_tensor(grid)
        for i, e in enumerate(entries):
            handle, file = self._handle(e[0])
            try:
                rows[i] = handle.get_slice(name)[e[1]:e[1] + 1][0]
                if scales is not None:
                    scales[i] = handle.get_slice(name + SCALE_SUFFIX)[e[1]:e[1] + 1][0]
            except Exception as exc:
                raise CacheError(f"feature cache shard {file} could not be read ({exc}); it is corrupt: delete it "
                                 "and rerun `repa-fused cache-features` to encode its images again") from exc
        rows = rows.to(device, non_blocking=True)
        scales = None if scales is None else scales.to(device, non_blocking=True)
        return dequantize(rows, scales, dtype), grid

    def _entry(self, key) -> list:
        try:
            entry = self._entries[key]
        except (KeyError, TypeError):
            raise KeyError(f"{key!r} is not in the feature cache {self.path!r} ({len(self)} keys: image paths "
                           "relative to the cached folder, with '/' separators)") from None
        if not (isinstance(entry, list) and len(entry) == 4 and all(type(v) is int for v in entry)
                and 0 <= entry[0] < len(self._shards)):
            raise CacheError(f"feature cache index {os.path.join(self.path, INDEX_FILE)} has a malformed entry for "
                             f"{key!r}: {entry!r}; rerun `repa-fused cache-features` to rebuild it from the shards")
        return entry

    def _handle(self, shard: int):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        from safetensors import safe_open

        info = self._shards[shard]
        file = os.path.join(self.path, info["file"])  # a bare shard name: _read_index checked it
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
            header = _shard_header(handle)
        except Exception as exc:
            raise CacheError(f"feature cache shard {file} is corrupt ({exc}); delete it and rerun "
                             "`repa-fused cache-features`") from exc
        self._check_rows(shard, file, header)
        self._open[shard] = (handle, file)
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return handle, file

    def _check_rows(self, shard: int, file: str, header: dict) -> None:
        """The shard on disk holds exactly the rows the index places in it, made with the index's settings:
        every row its header lists maps back to its own place, and the counts agree (so the map is one-to-one)."""
        rerun = ("it was replaced or overwritten since the index was written; rerun `repa-fused cache-features` "
                 "to re-index the folder from its shards")
        diff = record_differences(header["metadata"], self._metadata, _COMPARED)
        if diff:
            raise CacheError(f"feature cache shard {file} was made with other settings than the cache ({diff}): "
                             f"{rerun}")
        if self._rows is None:
            self._rows = Counter(e[0] for e in self._entries.values())
        listed = 0
        for tensor, keys in header["rows"].items():
            grid = _parse_grid(tensor)
            for row, key in enumerate(keys):
                if self._entries.get(key) != [shard, row, *grid]:
                    raise CacheError(f"feature cache shard {file} holds {key!r} at row {row} of {tensor}, but the "
                                     f"index puts {key!r} at {self._entries.get(key)!r}: {rerun}")
            listed += len(keys)
        if listed != self._rows[shard]:
            raise CacheError(f"feature cache shard {file} holds {listed} rows, the index places {self._rows[shard]} "
                             f"in it: {rerun}")

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


def _stored_dtype(meta: dict, where: str) -> torch.dtype:
    name = meta.get("dtype")
    stored = {str(d).split(".")[-1]: d for d, _ in STORAGE.values()}
    if name not in stored:
        raise CacheError(f"{where} records stored dtype {name!r}, which this version cannot read "
                         f"({', '.join(stored)})")
    return stored[name]


def _shard_header(handle) -> dict:
    """A shard's own description, checked against its tensors: {"metadata", "rows": {tensor: [keys]}}."""
    header = json.loads(handle.metadata()[_HEADER_KEY])
    names = set(handle.keys())
    for tensor, keys in header["rows"].items():
        _parse_grid(tensor)
        if handle.get_slice(tensor).get_shape()[0] != len(keys):
            raise ValueError(f"tensor {tensor} has {handle.get_slice(tensor).get_shape()[0]} rows, its header lists "
                             f"{len(keys)} keys")
        if header["metadata"].get("dtype") == "float8_e4m3fn" and tensor + SCALE_SUFFIX not in names:
            raise ValueError(f"float8 tensor {tensor} has no {tensor + SCALE_SUFFIX}")
    return header


def _read_index(path: str) -> Optional[dict]:
    """The index of the cache at ``path``, or None when it has none; CacheError when it is unreadable or names a
    shard outside the folder (checked before any shard is touched: nothing else is ever opened or measured)."""
    file = os.path.join(path, INDEX_FILE)
    try:
        with open(file) as fh:
            index = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheError(f"feature cache index {file} is unreadable ({exc}); rerun `repa-fused cache-features`: it "
                         "rebuilds the index from the shards") from exc
    fields = {"metadata", "shards", "entries"}
    if (not isinstance(index, dict) or index.get("format") not in _READABLE_FORMATS or not fields <= set(index)
            or not isinstance(index["shards"], list) or not isinstance(index["entries"], dict)):
        raise CacheError(f"feature cache index {file} is not a repa_fused index of format "
                         f"{' or '.join(map(str, _READABLE_FORMATS))}; rerun `repa-fused cache-features`: it rebuilds "
                         "the index from the shards")
    for info in index["shards"]:
        name = info.get("file") if isinstance(info, dict) else None
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or type(info.get("bytes")) is not int:
            raise CacheError(f"feature cache index {file} lists {info!r}, not a shard of this cache (a file "
                             "<run>-r<rank>-<seq>.safetensors inside the cache folder); rerun `repa-fused "
                             "cache-features` to rebuild the index from the shards")
    return index


# -- finding and loading images -------------------------------------------------------------------------------


def load_image(path: Union[str, os.PathLike]) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file, EXIF orientation applied: how the cache loads images. Divide by
    127.5 and subtract 1 for the [-1, 1] pixels the encoder takes."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def find_images(root: Union[str, os.PathLike], *, log: Optional[Callable[[str], None]] = None) -> list[str]:
    """Sorted keys (relative paths, "/" separators) of the png/jpg/jpeg/webp files under ``root``. Symbolic
    links to folders are followed; a link back into a folder on its own path is not (no loops). Hidden files
    and folders (names starting with ".") are left out. What is passed over (a loop, an unreadable folder) is
    told to ``log``."""
    return _scan(os.fspath(root), log or (lambda m: None))[0]


def _scan(root: str, log) -> tuple[list[str], list[tuple[str, str]]]:
    """(image keys, [(folder key, why it could not be listed)]) under ``root``."""
    keys, unreadable = [], []

    def walk(folder: str, prefix: str, ancestors: frozenset) -> None:
        try:
            with os.scandir(folder) as it:
                found = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not prefix:
                raise ValueError(f"images folder {root!r} cannot be listed ({exc})") from exc
            unreadable.append((prefix, f"folder not listable: {type(exc).__name__}: {exc}"))
            log(f"skipped the folder {folder}: {exc}")
            return
        for entry in found:
            if entry.name.startswith("."):
                continue
            key = prefix + entry.name
            if entry.is_dir():  # follows a symbolic link
                st = os.stat(entry.path)
                if (st.st_dev, st.st_ino) in ancestors:
                    log(f"not following {entry.path}: it links back to a folder above it (a loop)")
                    continue
                walk(entry.path, key + "/", ancestors | {(st.st_dev, st.st_ino)})
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                keys.append(key)  # a dangling link too: it is then reported as unreadable, not lost

    st = os.stat(root)
    walk(root, "", frozenset({(st.st_dev, st.st_ino)}))
    return sorted(keys), unreadable


class _ImageFiles(torch.utils.data.Dataset):
    """(key, (3, h, w) preprocessed in the encoder's dtype or None, None or why the file could not be read)."""

    def __init__(self, root: str, keys: Sequence[str], preprocessor: ImagePreprocessor):
        self.root, self.keys, self.preprocessor = root, keys, preprocessor

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        try:
            image = load_image(os.path.join(self.root, key))
        except Exception as exc:  # any decoder failure is the file's fault: report it and go on
            return key, None, f"{type(exc).__name__}: {exc}"
        # Contiguous first: the antialiased resize runs about twice as fast on (C, H, W) memory as on PIL's HWC.
        pixels = image.contiguous().float().div_(127.5).sub_(1.0)
        return key, self.preprocessor.preprocess(pixels[None])[0], None


def _collate(items) -> tuple[list, list]:
    """A worker's chunk -> ([(keys, (n, 3, h, w))] one stacked tensor per encoder input size, [(key, why)])."""
    sizes: dict[tuple, tuple[list, list]] = {}
    skipped = []
    for key, x, error in items:
        if x is None:
            skipped.append((key, error))
            continue
        keys, xs = sizes.setdefault(tuple(x.shape[1:]), ([], []))
        keys.append(key)
        xs.append(x)
    return [(keys, torch.stack(xs)) for keys, xs in sizes.values()], skipped


# -- writing --------------------------------------------------------------------------------------------------


@dataclass
class CacheSummary:
    """What a ``cache_features`` run did, over all ranks."""

    path: str
    found: int                 # images under IMAGES_DIR
    already_cached: int        # of those, cached before this run
    encoded: int               # encoded by this run
    skipped: list = field(default_factory=list)  # (key, reason) of unreadable images (and folders)
    entries: int = 0           # keys in the cache after the run
    seconds: float = 0.0       # the whole run, the encoder's load included
    encode_seconds: float = 0.0  # decoding, encoding and writing (the slowest rank)
    rank: int = 0
    world: int = 1
    batch_size: int = 0        # the encoder batch at the end (smaller than asked after an out-of-memory error)
    peers: list = field(default_factory=list, repr=False)  # (host, pid) of every rank, for the CLI's exit

    def format(self) -> str:
        busy = self.encoded and self.encode_seconds > 0
        per_gpu = f", {self.encoded / self.encode_seconds / self.world:.1f} per rank" if self.world > 1 else ""
        rate = f" ({self.encoded / self.encode_seconds:.1f} img/s encoding{per_gpu})" if busy else ""
        lines = [f"repa-fused cache-features: {self.found} images found, {self.already_cached} already cached, "
                 f"{self.encoded} encoded, {len(self.skipped)} skipped in {self.seconds:.1f} s{rate} -> "
                 f"{self.path} ({self.entries} keys)"]
        lines += [f"  skipped {key}: {reason}" for key, reason in self.skipped]
        return "\n".join(lines)


def cache_features(images_dir: Union[str, os.PathLike], out: Union[str, os.PathLike],
                   encoder: str = "dinov2_vitg14", image_size: int = 518, *, batch_size: int = 64,
                   dtype: str = "bfloat16", device=None, aspect: str = "square", shard_size: int = 256,
                   num_workers: Optional[int] = None, progress: bool = True,
                   log: Callable[[str], None] = _log_to_stderr) -> CacheSummary:
    """Encode every image under ``images_dir`` not yet in the cache at ``out`` (see the module docstring).

    ``encoder``/``image_size``/``aspect``: as ``load_encoder``; ``dtype``: the storage, "bfloat16" (default),
    "float16", "float8" (e4m3 + a per-token scale, encoded in bfloat16) or "float32" ("bf16", "fp16", "fp8",
    "fp32" also); ``device``: default the GPU (``cuda:LOCAL_RANK`` under a launcher) when there is one;
    ``batch_size``: images per encoder call (halved, with a message, on a CUDA out-of-memory error);
    ``shard_size``: at most this many images per shard file; ``num_workers``: decoding worker processes per
    rank (default: the CPUs per rank less two). Unreadable images are logged by path and skipped. Returns the
    summary over all ranks (on every rank). Raises ValueError for bad arguments, a cache made with other
    settings or a folder another run is writing; CacheError when the cache ends up lacking an image.
    """
    from .encoders import ASPECTS, load_encoder

    storage = storage_name(dtype)
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers must be an int ≥ 0 or None, got {num_workers!r}")
    images_dir, out = os.fspath(images_dir), os.fspath(out)
    if not os.path.isdir(images_dir):
        raise ValueError(f"images folder {images_dir!r} does not exist")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a folder")
    start = time.perf_counter()
    group = _Group()
    lock, keys, unreadable = None, None, []
    try:
        device = group.agree(lambda: _device(device))

        def claim():  # rank 0, before anyone loads an encoder: a refused run costs nothing
            nonlocal lock, keys, unreadable
            if group.rank == 0:
                keys, unreadable = _scan(images_dir, log)
                if not keys:
                    raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {images_dir!r}")
                lock = _BuildLock(out)

        group.agree(claim)
        enc = group.agree(lambda: load_encoder(encoder, image_size, device=device, dtype=STORAGE[storage][1],
                                               aspect=aspect))
        meta = _metadata(enc, storage)
        plan = group.agree(lambda: _plan(out, meta, keys, log) if group.rank == 0 else None)
        plan = group.broadcast(plan)
        mine = plan["pending"][group.rank::group.world]
        if num_workers is None:
            num_workers = max(0, _cpu_count() // group.world - 2)
        encode_start = time.perf_counter()
        try:
            result, error = _encode(enc, device, images_dir, mine, out, meta, batch_size=batch_size,
                                    shard_size=shard_size, num_workers=num_workers, progress=progress,
                                    rank=group.rank, world=group.world, log=log), None
        except Exception as exc:  # every rank raises it, after rank 0 indexed what was written
            result, error = (0, [], batch_size), exc
        # Also the barrier: once every rank has contributed, every rank's shards are on disk.
        done = group.gather((result, error, time.perf_counter() - encode_start, (socket.gethostname(), os.getpid())))
        skipped = sorted(unreadable + [s for d in done for s in d[0][1]])
        entries = group.agree(lambda: _finish(out, meta, plan["pending"], skipped, log,
                                              complete=not any(d[1] for d in done)) if group.rank == 0 else None)
        entries = group.broadcast(entries)
        for d in done:
            if d[1] is not None:
                raise d[1]
    finally:
        if lock is not None:
            lock.release()
        group.close()
    return CacheSummary(path=out, found=plan["found"], already_cached=plan["found"] - len(plan["pending"]),
                        encoded=sum(d[0][0] for d in done), skipped=skipped, entries=entries,
                        seconds=time.perf_counter() - start, encode_seconds=max(d[2] for d in done),
                        rank=group.rank, world=group.world, batch_size=min(d[0][2] for d in done),
                        peers=[d[3] for d in done])


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _metadata(enc, storage: str) -> dict:
    from .._version import __version__

    meta = feature_record(enc)
    # A local directory is recorded absolute: the cache outlives the working directory it was made from.
    meta["encoder"] = os.path.abspath(enc.name) if os.path.isdir(enc.name) else enc.name
    meta.update(dtype=str(STORAGE[storage][0]).split(".")[-1], encoder_dtype=str(enc.model.dtype).split(".")[-1],
                patch_size=int(enc.patch_size), image_loading=IMAGE_LOADING, version=__version__)
    if storage == "float8":
        meta["scale"] = f"per token: max |x| / {FLOAT8_MAX:g}, float32 tensor grid<H>x<W>{SCALE_SUFFIX}"
    return meta


def _check_same(found: dict, wanted: dict, where: str) -> None:
    diff = [f"{k} {found.get(k)!r} (this run: {wanted[k]!r})" for k in record_differences(found, wanted, _COMPARED)]
    if diff:
        raise ValueError(f"{where} was made with {'; '.join(diff)}: write this cache to another --out folder, or "
                         "run with the settings it was made with")


class _BuildLock:
    """The one run allowed to write CACHE_DIR: an exclusive, non-blocking ``flock`` on CACHE_DIR/.repa_fused.lock.
    A second run is refused (two writers would index each other's half-written work); the kernel drops the lock
    when its holder exits or dies, so a crashed run never blocks the next. The file itself stays (removing a
    lock file races with a run opening it)."""

    def __init__(self, folder: str):
        import fcntl

        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"--out {folder!r} cannot be written ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "its holder is starting"
            os.close(fd)
            raise ValueError(f"another repa-fused cache-features run is writing the cache {folder!r} ({holder}): "
                             "wait for it to end and run again (only what it lacks is encoded), or write to another "
                             "--out folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor drops the flock


def _plan(out: str, meta: dict, keys: list[str], log) -> dict:
    """Rank 0, holding the lock: the index brought up to date, and the keys still to encode."""
    stale = [n for n in os.listdir(out) if _TMP_NAME.fullmatch(n)]
    for name in stale:  # written by a run that died mid-write; the lock says no run is writing now
        os.remove(os.path.join(out, name))
    if stale:
        log(f"removed {len(stale)} temporary file(s) an interrupted run left in {out}")
    index = _sync_index(out, meta, log)
    return {"found": len(keys), "pending": [k for k in keys if k not in index["entries"]]}


def _finish(out: str, meta: dict, pending: list[str], skipped: list, log, complete: bool) -> int:
    """Rank 0 after every rank wrote its shards: index them; a run that ended well must have cached every image
    it was given or reported it unreadable. Returns the keys in the cache."""
    index = _sync_index(out, meta, log)
    reported = {key for key, _ in skipped}
    missing = [k for k in pending if k not in index["entries"] and k not in reported]
    if complete and missing:
        raise CacheError(f"{len(missing)} image(s) encoded by this run are not in the cache {out!r} (first: "
                         f"{missing[0]!r}); its shards may have been removed meanwhile: run again to encode them")
    return len(index["entries"])


def _sync_index(out: str, meta: dict, log) -> dict:
    """The index of ``out`` rebuilt from its shards' own headers (the shards are the truth, the index their table
    of contents), checked against ``meta``; rewritten when it changed. An index without shards (a run that
    failed before writing any) binds no settings. A shard that is gone or unreadable is logged: its images are
    encoded again, and an unreadable shard is left where it is."""
    from safetensors import safe_open

    try:
        old = _read_index(out)
    except CacheError as exc:
        log(f"{exc}; rebuilding it")
        old = None
    if old is not None and old["shards"]:
        _check_same(old["metadata"], meta, f"the feature cache {out!r}")
    metadata = old["metadata"] if old is not None and old["shards"] else meta
    shards, entries, twice = [], {}, 0
    for name in sorted(os.listdir(out)):
        if not _SHARD_NAME.fullmatch(name):
            continue
        file = os.path.join(out, name)
        try:
            size = os.path.getsize(file)
            with safe_open(file, framework="pt", device="cpu") as handle:
                header = _shard_header(handle)
        except Exception as exc:
            log(f"ignoring feature cache shard {file}: unreadable ({exc}); its images will be encoded again")
            continue
        _check_same(header["metadata"], meta, f"the feature cache shard {file}")
        for tensor, keys in header["rows"].items():
            grid = _parse_grid(tensor)
            for row, key in enumerate(keys):
                if key in entries:
                    twice += 1
                else:
                    entries[key] = [len(shards), row, *grid]
        shards.append({"file": name, "bytes": size})
    for gone in sorted({s["file"] for s in (old or {}).get("shards", [])} - {s["file"] for s in shards}):
        log(f"feature cache shard {os.path.join(out, gone)} is missing or unreadable: its images will be encoded again")
    if twice:
        log(f"{twice} row(s) of {out} are stored in more than one shard; the index reads the first")
    index = {"format": FORMAT, "metadata": metadata, "shards": shards, "entries": entries}
    if index != old:
        data = json.dumps(index, separators=(",", ":")).encode()
        _atomic_write(os.path.join(out, INDEX_FILE), lambda fh: fh.write(data))
    return index


def _atomic_write(path: str, write: Callable) -> None:
    """``write(file)`` to a temporary name of the cache's own pattern, fsync, rename onto ``path``: readers see
    the old file or the whole new one. On failure only the temporary file this call created is removed."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    created = False
    try:
        with open(tmp, "xb") as fh:
            created = True
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power loss once the folder is synced
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_safetensors(fh, tensors: dict[str, list[torch.Tensor]], metadata: dict[str, str]) -> None:
    """A safetensors file of tensors given as row chunks (concatenated along dim 0), streamed from the chunks
    (no concatenated copy of a GB-sized shard): an 8-byte little-endian header length, the JSON header padded
    with spaces to 8 bytes, then each tensor's bytes in order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, chunks in tensors.items():
        nbytes = sum(c.numel() * c.element_size() for c in chunks)
        header[name] = {"dtype": _SAFETENSORS_DTYPE[chunks[0].dtype],
                        "shape": [sum(c.shape[0] for c in chunks), *chunks[0].shape[1:]],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for chunks in tensors.values():
        for chunk in chunks:
            fh.write(chunk.contiguous().reshape(-1).view(torch.uint8).numpy())


class _ShardWriter:
    """Encoded rows -> shard files of at most ``rows_per_shard`` images. ``put`` starts the device-to-host copy
    and returns; a thread of its own waits for the copy and writes, so the disk overlaps the next batches'
    encoding. At most ``_WRITE_QUEUE`` batches wait (``put`` blocks beyond): host memory stays bounded."""

    def __init__(self, out: str, prefix: str, meta: dict, rows_per_shard: int):
        self.out, self.prefix, self.meta, self.rows_per_shard = out, prefix, meta, rows_per_shard
        self.rows: dict[Grid, tuple[list, dict]] = {}  # grid -> (keys, {tensor suffix: [host chunks]})
        self.count = self.seq = 0
        self.error: Optional[BaseException] = None
        self.queue: queue.Queue = queue.Queue(maxsize=_WRITE_QUEUE)
        self.thread = threading.Thread(target=self._run, name="repa-fused-shard-writer", daemon=True)
        self.thread.start()

    def put(self, keys: Sequence[str], parts: dict[str, torch.Tensor], grid: Grid) -> None:
        if self.error is not None:
            raise self.error
        pin = parts[""].device.type == "cuda"
        host = {}
        for suffix, t in parts.items():
            host[suffix] = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            host[suffix].copy_(t, non_blocking=pin)
        event = None
        if pin:
            event = torch.cuda.Event()
            event.record()
        self.queue.put((list(keys), host, grid, event))

    def close(self) -> None:
        """Write what is left and wait for the thread; raises what the thread failed with."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self, log) -> None:
        """After a failure elsewhere: write what was handed over, without raising (the caller is raising
        already); a failure of the writer itself is logged."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            log(f"the shard writer failed too: {type(self.error).__name__}: {self.error}")

    def _run(self) -> None:
        # After a failure the thread keeps taking items (and drops them) so that put never blocks forever.
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._add(*item)
                except BaseException as exc:
                    self.error = exc
        if self.error is None:
            try:
                self._flush()
            except BaseException as exc:
                self.error = exc

    def _add(self, keys: list, host: dict, grid: Grid, event) -> None:
        if event is not None:
            event.synchronize()
        start = 0
        while start < len(keys):  # a batch is split across shards: the shard size is a hard cap
            take = min(len(keys) - start, self.rows_per_shard - self.count)
            names, chunks = self.rows.setdefault(grid, ([], {}))
            names.extend(keys[start:start + take])
            for suffix, t in host.items():
                chunks.setdefault(suffix, []).append(t[start:start + take])
            self.count += take
            start += take
            if self.count == self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self.count:
            return
        tensors = {_grid_tensor(g) + s: ts for g, (_, parts) in self.rows.items() for s, ts in parts.items()}
        header = {"metadata": self.meta, "rows": {_grid_tensor(g): names for g, (names, _) in self.rows.items()}}
        path = os.path.join(self.out, f"{self.prefix}-{self.seq:05d}{SHARD_SUFFIX}")
        _atomic_write(path, lambda fh: _write_safetensors(fh, tensors, {_HEADER_KEY: json.dumps(header)}))
        self.rows, self.count, self.seq = {}, 0, self.seq + 1


@torch.inference_mode()
def _patch_tokens(enc, x: torch.Tensor) -> torch.Tensor:
    """VisionEncoder.forward after its preprocess: (B, 3, h, w) normalised -> (B, N, D) patch tokens (the
    encoder's own method, so each family's layout and dropped prefix are the live path's)."""
    return enc.patch_tokens(x)


def _encode(enc, device: torch.device, root: str, keys: Sequence[str], out: str, meta: dict, *, batch_size: int,
            shard_size: int, num_workers: int, progress: bool, rank: int, world: int,
            log) -> tuple[int, list, int]:
    """This rank's images -> shards. Returns (images encoded, [(key, reason) skipped], the final batch size)."""
    from tqdm.auto import tqdm

    stored = _stored_dtype(meta, "this run")
    loader = torch.utils.data.DataLoader(
        _ImageFiles(root, keys, enc.preprocessor), batch_size=_DECODE_CHUNK, num_workers=num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None)
    chunks = iter(loader)  # the workers start here, before this process starts threads of its own
    writer = _ShardWriter(out, f"{uuid.uuid4().hex[:8]}-r{rank:03d}", meta, shard_size)
    buckets: dict[tuple[int, int], tuple[list, list]] = {}  # encoder input size -> (keys, [(n, 3, h, w)])
    encoded, skipped, batch = 0, [], batch_size
    desc = "encoding" if world == 1 else f"encoding (rank {rank} of {world})"
    bar = tqdm(total=len(keys), desc=desc, unit="img", disable=not progress or rank != 0, dynamic_ncols=True)

    def run(size, count):
        """Encode the first ``count`` images waiting at ``size``, ``batch`` at a time."""
        nonlocal encoded, batch
        names, xs = buckets.pop(size)
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        grid = (size[0] // enc.patch_size, size[1] // enc.patch_size)
        done = 0
        while done < count:
            n = min(batch, count - done)
            try:
                tokens = _patch_tokens(enc, x[done:done + n])
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
                batch = max(1, n // 2)
                torch.cuda.empty_cache()
                log(f"out of GPU memory at an encoder batch of {n}: going on with {batch} (--batch-size {batch} "
                    "avoids the retry)")
                continue
            writer.put(names[done:done + n], quantize(tokens, stored), grid)
            done += n
            encoded += n
            bar.update(n)
        if count < len(names):
            buckets[size] = (names[count:], [x[count:]])

    try:
        for groups, bad in chunks:
            for key, error in bad:
                skipped.append((key, error))
                if rank == 0:  # under a launcher the other ranks' skipped images come in rank 0's summary
                    log(f"skipped {os.path.join(root, key)}: {error}")
            if bad:
                bar.update(len(bad))
                bar.set_postfix(skipped=len(skipped))
            for names, x in groups:
                size = tuple(x.shape[2:])
                waiting = buckets.setdefault(size, ([], []))
                waiting[0].extend(names)
                waiting[1].append(x.to(device, non_blocking=True))
                if len(waiting[0]) >= batch_size:
                    run(size, len(waiting[0]) // batch_size * batch_size)
            # Mixed sizes leave part-filled buckets; bound what waits on the device.
            while sum(len(b[0]) for b in buckets.values()) > 2 * batch_size:
                size = max(buckets, key=lambda s: len(buckets[s][0]))
                run(size, len(buckets[size][0]))
        for size in list(buckets):
            run(size, len(buckets[size][0]))
    except BaseException:
        writer.abort(log)
        raise
    finally:
        bar.close()
    writer.close()
    return encoded, skipped, batch


def _device(device) -> torch.device:
    try:
        device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r} is not a device ({exc}); use cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is available")
        if device.index is None:  # one GPU per rank under torchrun / accelerate
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {device} is not supported: use cuda, cuda:N or cpu")
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

    def agree(self, fn):
        """``fn()`` on every rank; when it failed anywhere, every rank raises the first rank's error (no rank is
        left waiting for one that gave up)."""
        try:
            result, error = fn(), None
        except Exception as exc:
            result, error = None, exc
        errors = [e for e in self.gather(error) if e is not None]
        if errors:
            raise errors[0]
        return result

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


# -- command line ---------------------------------------------------------------------------------------------


def add_cache_features_parser(subparsers) -> None:
    """Register ``repa-fused cache-features`` on the CLI's subparsers."""
    from .encoders import ASPECTS

    p = subparsers.add_parser(
        "cache-features", help="encode a folder of images once into a feature cache (FeatureCache)",
        description="Encode every png/jpg/jpeg/webp under IMAGES_DIR (recursively, through symbolic links) with "
                    "the vision encoder and write the patch tokens to CACHE_DIR (safetensors shards + index.json). "
                    "Resumable: images already cached are skipped. One run writes a folder at a time (a second is "
                    "refused). Runs under torchrun/accelerate launch, one slice per rank. Exit code 0: all "
                    "encoded; 1: some images were unreadable and skipped (rank 0 reports them; the other ranks "
                    "exit 0); 2: an error.")
    p.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of training images (keys: paths relative to it)")
    p.add_argument("--encoder", default="dinov2_vitg14", help="name, alias, hub id or local directory "
                                                              "(default dinov2_vitg14)")
    p.add_argument("--image-size", type=int, default=518, help="encoder input side in pixels (default 518)")
    p.add_argument("--out", required=True, metavar="CACHE_DIR", help="cache folder (created or resumed)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per encoder call (default 64; halved on a CUDA out-of-memory error)")
    p.add_argument("--dtype", choices=[*STORAGE, *DTYPE_ALIASES], default="bfloat16", metavar="DTYPE",
                   help="stored tokens: bfloat16 (default, 4.0 MiB/image for DINOv2-g at 518 px), float16, float8 "
                        "(e4m3 + a float32 scale per token, 2.0 MiB/image; read back as bfloat16) or float32")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available; cuda:LOCAL_RANK per rank)")
    p.add_argument("--aspect", choices=ASPECTS, default="square",
                   help="square: S×S as SimpleTuner; preserve: aspect kept, about S² pixels (non-square grids)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="at most this many images per shard file (default 256: about 1 GB for DINOv2-g at 518 px "
                        "in bfloat16)")
    p.add_argument("--num-workers", type=int,
                   help="decoding worker processes per rank (default: CPUs per rank less two)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache_features)


def cmd_cache_features(args) -> int:
    try:
        summary = cache_features(args.images_dir, args.out, args.encoder, args.image_size,
                                 batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                                 aspect=args.aspect, shard_size=args.shard_size, num_workers=args.num_workers,
                                 progress=not args.no_progress)
    except (ValueError, CacheError, OSError) as exc:
        _say(f"repa-fused cache-features: error: {exc}", sys.stderr)
        return 2
    except Exception:  # not foreseen: the traceback helps, and the exit code still says "an error"
        _say(traceback.format_exc(), sys.stderr)
        _say("repa-fused cache-features: error (traceback above)", sys.stderr)
        return 2
    if summary.rank != 0:
        return 0
    _say(summary.format(), sys.stdout)
    if not summary.skipped:
        return 0
    _wait_for_local_peers(summary.peers)
    return 1


def _wait_for_local_peers(peers: list, timeout: float = 60.0) -> None:
    """Hold rank 0's exit code 1 until the other ranks on this host have exited: torchrun stops every worker
    still running once one exits non-zero, and those ranks, done with their work, would be killed on their way
    out. (Linux: a rank gone, or a zombie waiting for torchrun to reap it, has exited.)"""
    host, me = socket.gethostname(), os.getpid()
    pids = [pid for h, pid in peers if h == host and pid != me]
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [pid for pid in pids if _running(pid)]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

"""Feature cache on CPU: a generated folder of images (sizes, formats, modes, EXIF, nested folders, one corrupt
file), a tiny random Dinov2; cached tokens equal the live encoder's, resume, two processes, every error, the CLI
and the regularizer's keys= path on a real cache."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from models import TINY_DIT, tiny_dinov2
from PIL import Image, ImageOps
from test_encoders import _tiny_new_encoder

import repa_fused as rf
from repa_fused.training import cache as cache_module
from repa_fused.tools import cli
from repa_fused.training.cache import CacheError, FeatureCache, cache_features, find_images, load_image
from repa_fused.training.encoders import load_encoder

SIZE = 28  # 4 × 4 patches of 7
GOOD = ["a/b/alpha.webp", "a/b/gray.jpeg", "a/wide.jpg", "c/pal.PNG", "c/rotated.jpg", "top.png"]
BAD = "a/bad.jpg"


def _image(path, size, mode="RGB", seed=0, **save):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode if mode != "P" else "RGB"]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
    image = Image.fromarray(array) if channels > 1 else Image.fromarray(array, "L")
    if mode == "P":
        image = image.quantize(16)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **save)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _image(root / "top.png", (40, 30), seed=1)
    _image(root / "a" / "wide.jpg", (50, 20), seed=2)
    _image(root / "a" / "b" / "gray.jpeg", (28, 28), "L", seed=3)
    _image(root / "a" / "b" / "alpha.webp", (33, 33), "RGBA", seed=4, lossless=True)
    _image(root / "c" / "pal.PNG", (24, 36), "P", seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    _image(root / "c" / "rotated.jpg", (36, 20), seed=6, exif=exif)
    (root / BAD).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    _image(root / ".hidden" / "skip.png", (8, 8))
    return str(root)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def build(images, out, dinov2_dir, image_size=SIZE, **kw):
    kw = {"batch_size": 2, "device": "cpu", "num_workers": 0, "progress": False, "log": lambda m: None, **kw}
    return cache_features(images, out, dinov2_dir, image_size, **kw)


@pytest.fixture(scope="module")
def square(images, dinov2_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "square")
    return out, build(images, out, dinov2_dir, shard_size=4)


def live_tokens(encoder, images, key):
    """The live path: the trainer's [-1, 1] pixels of one image through encoder(pixels)."""
    with Image.open(os.path.join(images, key)) as image:
        rgb = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    return encoder(pixels[None])


# -- round trip -----------------------------------------------------------------------------------------------


def test_finds_images_recursively(images):
    assert find_images(images) == sorted(GOOD + [BAD])


def test_load_image_is_rgb_uint8_upright(images):
    image = load_image(os.path.join(images, "c/rotated.jpg"))
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 36, 20)  # EXIF orientation applied
    assert tuple(load_image(os.path.join(images, "a/b/gray.jpeg")).shape) == (3, 28, 28)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("aspect", ["square", "preserve"])
def test_cached_tokens_equal_the_live_encoder(images, dinov2_dir, tmp_path, dtype, aspect):
    summary = build(images, tmp_path / "c", dinov2_dir, dtype=dtype, aspect=aspect)
    assert (summary.found, summary.already_cached, summary.encoded, summary.entries) == (7, 0, 6, 6)
    assert [key for key, _ in summary.skipped] == [BAD]
    cache = FeatureCache(tmp_path / "c")
    live = load_encoder(dinov2_dir, SIZE, dtype=cache_module.STORAGE[cache_module.storage_name(dtype)][1],
                        aspect=aspect)
    assert sorted(cache.keys()) == GOOD and len(cache) == 6 and "top.png" in cache and BAD not in cache
    meta = cache.metadata
    assert meta["encoder"] == os.path.abspath(dinov2_dir) and meta["image_size"] == SIZE
    assert meta["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert meta["preprocessing"] == live.preprocessing and meta["hidden_size"] == 16
    assert meta["model_type"] == "dinov2" and meta["prefix_tokens"] == 1
    assert meta["version"] == rf.__version__
    grids = set()
    for key in GOOD:
        tokens, grid = cache.get([key])
        want, want_grid = live_tokens(live, images, key)
        assert grid == want_grid == cache.grid(key) and tokens.dtype == want.dtype
        # Batched and single-image calls may round differently in bf16 (a different GEMM blocking).
        tol = {} if dtype == "fp32" else {"atol": 2e-2, "rtol": 2e-2}
        torch.testing.assert_close(tokens, want, **tol)
        grids.add(grid)
    assert grids == ({(4, 4)} if aspect == "square" else {(4, 4), (3, 5), (3, 6), (5, 3)})


@pytest.mark.parametrize("kind", ["dinov3", "siglip", "siglip2"])
def test_other_families_cache_the_live_tokens(kind, images, tmp_path):
    """DINOv3 (5 prefix tokens), SigLIP (none), SigLIP2 (NaFlex patches), a bicubic preprocessor config."""
    pre = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 3}
    path = _tiny_new_encoder(kind, tmp_path / "enc", pre)
    build(images, tmp_path / "c", path, image_size=32, dtype="fp32")
    cache, live = FeatureCache(tmp_path / "c"), load_encoder(path, 32)
    assert {k: cache.metadata[k] for k in ("model_type", "prefix_tokens")} == {
        "model_type": live.model_type, "prefix_tokens": live.prefix_tokens}
    assert cache.metadata["preprocessing"]["resize"] == "bicubic"
    for key in GOOD:
        torch.testing.assert_close(cache.get([key])[0], live_tokens(live, images, key)[0])


def test_batch_get_stacks_rows_in_key_order(square):
    cache = FeatureCache(square[0])
    keys = ["top.png", "a/wide.jpg", "top.png", "c/pal.PNG"]
    tokens, grid = cache.get(keys, device="cpu")
    assert tokens.shape == (4, 16, 16) and grid == (4, 4)
    torch.testing.assert_close(tokens, torch.cat([cache.get([k])[0] for k in keys]), rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers: reopens its shards
    torch.testing.assert_close(clone.get(keys)[0], tokens, rtol=0, atol=0)


def test_shards_are_small_and_self_describing(square):
    out, _ = square
    index = json.loads(open(os.path.join(out, "index.json")).read())
    assert len(index["shards"]) == 2  # 6 images, 4 per shard
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# -- resume ---------------------------------------------------------------------------------------------------


def test_resume_encodes_only_new_images(images, dinov2_dir, tmp_path, square):
    folder, out = tmp_path / "images", tmp_path / "cache"
    shutil.copytree(images, folder)
    shutil.copytree(square[0], out)
    before = {n: os.path.getmtime(out / n) for n in os.listdir(out) if n.endswith(".safetensors")}
    _image(folder / "c" / "new.png", (30, 30), seed=9)
    summary = build(folder, out, dinov2_dir)
    assert (summary.found, summary.already_cached, summary.encoded, summary.entries) == (8, 6, 1, 7)
    assert all(os.path.getmtime(out / n) == t for n, t in before.items())  # old shards untouched
    assert "c/new.png" in FeatureCache(out)


def test_an_interrupted_run_loses_no_written_shard(images, dinov2_dir, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real, calls = cache_module._patch_tokens, []

    def dies_on_third_batch(enc, x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(enc, x)

    monkeypatch.setattr(cache_module, "_patch_tokens", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build(images, out, dinov2_dir, batch_size=1, shard_size=1)
    monkeypatch.undo()
    ours = out / ".0123abcd-r000-00007.safetensors.89abcdef.tmp"  # a shard write that died half-way
    ours.write_bytes(b"partial")
    (out / ".left.safetensors.1.tmp").write_bytes(b"a user's file")  # not a name the cache writes
    assert len(FeatureCache(out)) == 0  # the index never heard of the two shards written
    summary = build(images, out, dinov2_dir)
    assert (summary.already_cached, summary.encoded, summary.entries) == (2, 4, 6)
    assert not ours.exists() and (out / ".left.safetensors.1.tmp").read_bytes() == b"a user's file"


def test_a_lost_index_is_rebuilt_from_the_shards(square, images, dinov2_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(square[0], out)
    os.remove(out / "index.json")
    summary = build(images, out, dinov2_dir)
    assert (summary.already_cached, summary.encoded) == (6, 0)
    torch.testing.assert_close(FeatureCache(out).get(GOOD)[0], FeatureCache(square[0]).get(GOOD)[0])


def test_a_missing_shard_is_encoded_again(square, images, dinov2_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(square[0], out)
    index = json.loads((out / "index.json").read_text())
    lost = index["shards"][0]["file"]
    os.remove(out / lost)
    key = next(k for k, e in index["entries"].items() if e[0] == 0)
    with pytest.raises(CacheError, match=f"shard .*{lost} is missing"):
        FeatureCache(out).get([key])
    messages = []
    summary = build(images, out, dinov2_dir, log=messages.append)
    assert (summary.already_cached, summary.encoded, summary.entries) == (2, 4, 6)
    assert any(lost in m and "encoded again" in m for m in messages)


def test_a_cache_made_otherwise_is_not_extended(square, images, dinov2_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(square[0], out)
    with pytest.raises(ValueError, match="was made with image_size 28 \\(this run: 35\\)"):
        cache_features(images, out, dinov2_dir, 35, device="cpu", num_workers=0, progress=False)
    with pytest.raises(ValueError, match="dtype 'bfloat16' \\(this run: 'float32'\\)"):
        build(images, out, dinov2_dir, dtype="fp32")


def test_another_checkpoint_in_the_same_folder_is_not_mixed_in(tmp_path):
    folder, enc, out = tmp_path / "images", str(tmp_path / "enc"), tmp_path / "cache"
    _image(folder / "one.png", (28, 28))
    tiny_dinov2(enc)
    build(folder, out, enc)
    tiny_dinov2(enc, registers=True)  # same name, features with other tokens dropped
    _image(folder / "two.png", (28, 28))
    with pytest.raises(ValueError, match="was made with model_type 'dinov2' \\(this run: 'dinov2_with_registers'\\); "
                                         "prefix_tokens 1 \\(this run: 3\\): write this cache to another --out"):
        build(folder, out, enc)


# -- two processes --------------------------------------------------------------------------------------------


def test_two_processes_split_the_work_and_merge_one_index(images, dinov2_dir, square, tmp_path):
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "repa_fused.tools.cli", "cache-features", images, "--encoder", dinov2_dir, "--image-size", str(SIZE),
               "--out", str(out), "--device", "cpu", "--num-workers", "0", "--batch-size", "2", "--shard-size", "2",
               "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    # The corrupt image: rank 0 reports it and exits 1, after rank 1 exited 0 (torchrun killed no rank).
    assert done.returncode == 1, done.stderr
    assert "exitcode  : 1" in done.stderr and "<NO_OTHER_FAILURES>" in done.stderr, done.stderr
    assert "SIGTERM" not in done.stderr, done.stderr
    assert done.stdout.count("repa-fused cache-features:") == 1, done.stdout  # one summary, from rank 0
    assert "7 images found, 0 already cached, 6 encoded, 1 skipped" in done.stdout
    assert f"skipped {BAD}" in done.stdout
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert {n.split("-")[1] for n in shards} == {"r000", "r001"}
    cache, single = FeatureCache(out), FeatureCache(square[0])
    assert sorted(cache.keys()) == GOOD
    torch.testing.assert_close(cache.get(GOOD)[0], single.get(GOOD)[0], rtol=0, atol=0)


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.fixture
def copy(square, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(square[0], out)
    index = json.loads((out / "index.json").read_text())
    return out, index


def test_missing_key_is_a_key_error_naming_it(square):
    with pytest.raises(KeyError, match="'nope.png' is not in the feature cache"):
        FeatureCache(square[0]).get(["top.png", "nope.png"])
    with pytest.raises(KeyError, match="'nope.png'"):
        FeatureCache(square[0]).grid("nope.png")


def test_truncated_shard_is_an_error_naming_it(copy):
    out, index = copy
    shard = out / index["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    key = next(k for k, e in index["entries"].items() if e[0] == 0)
    with pytest.raises(CacheError, match=f"{shard.name} is truncated or corrupt"):
        FeatureCache(out).get([key])


def test_corrupt_shard_header_is_an_error_naming_it(copy):
    out, index = copy
    shard = out / index["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"#" * 32  # same size, header garbage
    shard.write_bytes(bytes(data))
    key = next(k for k, e in index["entries"].items() if e[0] == 1)
    with pytest.raises(CacheError, match=f"{shard.name} is corrupt"):
        FeatureCache(out).get([key])


def test_unreadable_index_and_not_a_cache(copy, tmp_path):
    out, _ = copy
    (out / "index.json").write_text("{ truncated")
    with pytest.raises(CacheError, match="index.json is unreadable"):
        FeatureCache(out)
    with pytest.raises(FileNotFoundError, match="is not a feature cache"):
        FeatureCache(tmp_path)


def test_mixed_grids_in_one_batch_say_so(images, dinov2_dir, tmp_path):
    build(images, tmp_path / "c", dinov2_dir, aspect="preserve")
    cache = FeatureCache(tmp_path / "c")
    assert cache.grid("a/wide.jpg") == (3, 6) and cache.grid("top.png") == (3, 5)
    with pytest.raises(ValueError, match="different patch grids: 3x6 \\('a/wide.jpg'\\), 3x5 \\('top.png'\\)"):
        cache.get(["a/wide.jpg", "top.png"])


def test_bad_keys_arguments(square):
    cache = FeatureCache(square[0])
    with pytest.raises(TypeError, match="not a single string"):
        cache.get("top.png")
    with pytest.raises(ValueError, match="keys is empty"):
        cache.get([])
    for dtype in (torch.float64, torch.int8, "bfloat16"):
        with pytest.raises(ValueError, match="dtype must be a floating torch dtype the losses take"):
            cache.get(["top.png"], dtype=dtype)


@pytest.mark.parametrize("kw, message", [
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"num_workers": -1}, "num_workers must be an int"),
    ({"aspect": "crop"}, "aspect must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"shard_size": -1}, "shard_size must be a positive int"),
])
def test_bad_build_arguments(images, dinov2_dir, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        build(images, tmp_path / "c", dinov2_dir, **kw)


# -- command line ---------------------------------------------------------------------------------------------


def test_cli_round_trip_progress_and_exit_codes(images, dinov2_dir, tmp_path, capsys):
    good = tmp_path / "good"
    shutil.copytree(images, good, ignore=shutil.ignore_patterns("bad.jpg"))
    args = ["cache-features", str(good), "--encoder", dinov2_dir, "--image-size", str(SIZE), "--out",
            str(tmp_path / "c"), "--device", "cpu", "--num-workers", "0", "--dtype", "fp32"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "6 images found, 0 already cached, 6 encoded, 0 skipped" in captured.out
    assert "6/6" in captured.err and "img/s" in captured.err  # tqdm: count, rate (and ETA)
    assert cli.main(args + ["--no-progress"]) == 0
    assert "6 already cached, 0 encoded" in capsys.readouterr().out
    assert cli.main([args[0], images, *args[2:], "--no-progress"]) == 1  # the corrupt file
    captured = capsys.readouterr()
    assert f"skipped {os.path.join(images, BAD)}: OSError" in captured.err  # reported by path, with why
    assert "1 skipped" in captured.out and f"skipped {BAD}" in captured.out
    assert cli.main([args[0], str(tmp_path / "none"), *args[2:]]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main([args[0], str(tmp_path / "empty"), *args[2:]]) == 2
    assert "no images (png, jpg, jpeg, webp)" in capsys.readouterr().err


# -- the regularizer on a real cache --------------------------------------------------------------------------


def test_regularizer_reads_a_real_cache(square, dinov2_dir):
    tiny = TINY_DIT["dit"]()
    config = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_model": dinov2_dir,
              "crepa_encoder_image_size": SIZE, "crepa_feature_cache": square[0]}
    reg = rf.build_regularizer(config, tiny.model)
    tiny.model(**tiny.inputs(batch=2))
    loss, _ = reg.loss(step=0, keys=["top.png", "a/wide.jpg"])
    assert torch.isfinite(loss) and reg.encoder is None
    with pytest.raises(ValueError, match="was made with .*preprocessing"):
        rf.build_regularizer({**config, "crepa_encoder_aspect": "preserve"}, TINY_DIT["dit"]().model)


def test_regularizer_predicts_the_preprocessor_config_without_weights(tmp_path, monkeypatch):
    """A checkpoint whose preprocessor config says bicubic and its own statistics (as DINOv2's real ones do):
    the config alone predicts the cache's record, and the encoder is never loaded."""
    folder, enc = tmp_path / "images", tiny_dinov2(tmp_path / "enc")
    (tmp_path / "enc" / "preprocessor_config.json").write_text(json.dumps(
        {"resample": 3, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4]}))
    _image(folder / "one.png", (40, 30))
    build(folder, tmp_path / "c", enc)
    monkeypatch.setattr("repa_fused.training.encoders.load_encoder", None)  # a load would fail loudly
    config = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_model": enc, "crepa_encoder_image_size": SIZE,
              "crepa_feature_cache": str(tmp_path / "c")}
    reg = rf.build_regularizer(config, TINY_DIT["dit"]().model)
    assert reg.feature_cache.metadata["preprocessing"]["resize"] == "bicubic" and reg.encoder is None

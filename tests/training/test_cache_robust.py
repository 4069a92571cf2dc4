"""Feature cache at dataset scale (issue 16), on CPU: float16 / float8 storage, the shard-size cap, the
out-of-memory retry, the build lock (in one process and between two real processes), shard checks on open,
shard names confined to the folder, exit codes, symbolic links, and a failed run that blocks nothing."""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from test_cache import BAD, GOOD, SIZE, _image, build, live_tokens

from repa_fused.training import cache as cache_module
from repa_fused.tools import cli
from repa_fused.training.cache import CacheError, FeatureCache, dequantize, find_images, quantize
from repa_fused.training.encoders import load_encoder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Square images with names of one length: shards of equal row counts have equal sizes."""
    root = tmp_path_factory.mktemp("same")
    for i in range(6):
        _image(root / f"img{i}.png", (28, 28), seed=i)
    return str(root)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from models import tiny_dinov2

    return tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def bf16_cache(images, dinov2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "cache"
    build(images, out, dinov2_dir, shard_size=2)
    return out


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def shard_rows(out):
    rows = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(out, name), "pt") as handle:
                header = json.loads(handle.metadata()["repa_fused"])
            rows[name] = [k for keys in header["rows"].values() for k in keys]
    return rows


# -- storage --------------------------------------------------------------------------------------------------


def test_quantize_float8_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 37, generator=g) * torch.logspace(-3, 3, 7)[:, None]  # token norms over 6 decades
    x[1, 2] = 0  # an all-zero token
    parts = quantize(x, torch.float8_e4m3fn)
    assert parts[""].dtype == torch.float8_e4m3fn and parts[".scale"].shape == (3, 7)
    y = dequantize(parts[""], parts[".scale"], torch.float32)
    assert torch.equal(y[1, 2], torch.zeros(37)) and parts[".scale"][1, 2] == 1
    amax = x.abs().amax(-1, keepdim=True)
    # Every token spans e4m3's range: its largest element comes back to float32 rounding, the rest within
    # half of e4m3's spacing (2^-3 relative, 2^-9 of the token's max among subnormals).
    assert torch.allclose(y.abs().amax(-1, keepdim=True), amax, rtol=1e-6, atol=0)
    assert ((y - x).abs() <= torch.maximum(x.abs() / 16, amax / 448 * 2 ** -9) + 1e-12).all()
    assert torch.equal(dequantize(*quantize(x, torch.bfloat16).values(), None, torch.float32),
                       x.bfloat16().float())


def test_float8_and_float16_caches(images, dinov2_dir, bf16_cache, tmp_path):
    live = load_encoder(dinov2_dir, SIZE, dtype=torch.bfloat16)
    for dtype, stored, read in (("float8", torch.float8_e4m3fn, torch.bfloat16),
                                ("fp16", torch.float16, torch.float16)):
        out = tmp_path / dtype
        build(images, out, dinov2_dir, dtype=dtype)
        cache = FeatureCache(out)
        assert cache.storage_dtype == stored and cache.dtype == read
        keys = sorted(cache.keys())
        tokens, grid = cache.get(keys)
        assert tokens.dtype == read and grid == (4, 4)
        assert cache.get(keys, dtype=torch.float32)[0].dtype == torch.float32
        want = torch.cat([live_tokens(live, images, k)[0] for k in keys]).float()
        assert rel_rms(tokens.float(), want) < (0.05 if dtype == "float8" else 0.01)
    shard = next(n for n in os.listdir(tmp_path / "float8") if n.endswith(".safetensors"))
    with safe_open(str(tmp_path / "float8" / shard), "pt") as handle:
        assert handle.get_slice("grid4x4").get_dtype() == "F8_E4M3"
        assert handle.get_slice("grid4x4.scale").get_dtype() == "F32"
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        FeatureCache(tmp_path / "float8").get(keys, dtype=torch.float8_e4m3fn)
    assert FeatureCache(bf16_cache).dtype == torch.bfloat16


def test_a_format_1_cache_still_reads(bf16_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(bf16_cache, out)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "format": 1}))
    keys = sorted(FeatureCache(bf16_cache).keys())
    assert torch.equal(FeatureCache(out).get(keys)[0], FeatureCache(bf16_cache).get(keys)[0])


# -- the build ------------------------------------------------------------------------------------------------


def test_shard_size_is_a_hard_cap(images, dinov2_dir, tmp_path):
    build(images, tmp_path / "c", dinov2_dir, batch_size=5, shard_size=2)
    rows = shard_rows(tmp_path / "c")
    assert sorted(len(r) for r in rows.values()) == [2, 2, 2]
    assert sorted(k for r in rows.values() for k in r) == sorted(FeatureCache(tmp_path / "c").keys())


def test_out_of_memory_halves_the_batch(images, dinov2_dir, bf16_cache, tmp_path, monkeypatch):
    real = cache_module._patch_tokens

    def small_gpu(enc, x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(enc, x)

    monkeypatch.setattr(cache_module, "_patch_tokens", small_gpu)
    messages = []
    summary = build(images, tmp_path / "c", dinov2_dir, batch_size=6, log=messages.append)
    assert summary.encoded == 6 and summary.batch_size == 1  # 6 -> 3 -> 1
    assert any("out of GPU memory at an encoder batch of 6: going on with 3" in m for m in messages)
    keys = sorted(FeatureCache(bf16_cache).keys())
    torch.testing.assert_close(FeatureCache(tmp_path / "c").get(keys)[0], FeatureCache(bf16_cache).get(keys)[0],
                               atol=2e-2, rtol=2e-2)  # bf16: another batch size rounds otherwise


def test_a_running_build_refuses_a_second(images, dinov2_dir, tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    holder = cache_module._BuildLock(str(out))
    with pytest.raises(ValueError, match=f"another repa-fused cache-features run is writing the cache .*\\(pid "
                                         f"{os.getpid()} on "):
        build(images, out, dinov2_dir)
    assert cli.main(["cache-features", images, "--encoder", dinov2_dir, "--image-size", str(SIZE), "--out",
                     str(out), "--device", "cpu", "--num-workers", "0", "--no-progress"]) == 2
    assert "another repa-fused cache-features run is writing" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".repa_fused.lock"]  # refused before writing anything
    holder.release()  # as the kernel does when the holder exits or dies
    assert build(images, out, dinov2_dir).entries == 6


RACER = textwrap.dedent("""
    import os, sys, time
    from repa_fused.training import cache
    from repa_fused.tools import cli  # everything a build imports, before the start line
    import safetensors, tqdm.auto, transformers
    from transformers import Dinov2Model
    ready, go = sys.argv[1:3]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    sys.exit(cli.main(sys.argv[3:]))
""")


def test_two_processes_on_one_folder_complete_or_refuse(images, dinov2_dir, tmp_path):
    folder, out = tmp_path / "images", tmp_path / "cache"
    for i in range(4):  # 24 images
        shutil.copytree(images, folder / f"part{i}")
    args = ["cache-features", str(folder), "--encoder", dinov2_dir, "--image-size", str(SIZE), "--out", str(out),
            "--device", "cpu", "--num-workers", "0", "--batch-size", "1", "--shard-size", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"ready{i}"), str(tmp_path / "go"),
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for i in range(2)]
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert all(r.poll() is None for r in racers), [r.communicate() for r in racers]
    (tmp_path / "go").touch()  # both imported: they start the build at the same moment
    results = [(r.wait(timeout=300), *r.communicate()) for r in racers]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, stdout, stderr in results:
        if code == 2:
            assert "another repa-fused cache-features run is writing" in stderr, stderr
    encoded = sum(int(stdout.split(" encoded")[0].rsplit(" ", 1)[1]) for code, stdout, _ in results if code == 0)
    assert encoded == 24, results  # each image encoded once, by one of them
    rows = [k for r in shard_rows(out).values() for k in r]
    assert len(rows) == len(set(rows)) == 24 and len(FeatureCache(out)) == 24  # complete, nothing twice


def test_swapped_shards_are_detected_and_reindexed(images, dinov2_dir, bf16_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(bf16_cache, out)
    index = json.loads((out / "index.json").read_text())
    a, b = (out / s["file"] for s in index["shards"][:2])
    assert a.stat().st_size == b.stat().st_size  # the size check cannot see the swap
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    key = next(k for k, e in index["entries"].items() if e[0] == 0)
    with pytest.raises(CacheError, match=f"shard .*{a.name} holds '.*' at row 0 of grid4x4, but the index puts"):
        FeatureCache(out).get([key])
    # The next run re-indexes the folder from the shards' headers: every key finds its own tokens again.
    summary = build(images, out, dinov2_dir)
    assert (summary.already_cached, summary.encoded) == (6, 0)
    keys = sorted(index["entries"])
    assert torch.equal(FeatureCache(out).get(keys)[0], FeatureCache(bf16_cache).get(keys)[0])


def test_shard_names_are_confined_to_the_folder(bf16_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(bf16_cache, out)
    index = json.loads((out / "index.json").read_text())
    for bad in ("../secret.safetensors", "/etc/passwd", "sub/0123abcd-r000-00000.safetensors"):
        index["shards"][0]["file"] = bad
        (out / "index.json").write_text(json.dumps(index))
        with pytest.raises(CacheError, match="not a shard of this cache") as error:
            FeatureCache(out)
        assert "bytes on disk" not in str(error.value)


def test_a_failed_run_blocks_no_corrected_run(images, dinov2_dir, tmp_path):
    out = tmp_path / "cache"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build(tmp_path / "empty", out, dinov2_dir, dtype="fp32")
    assert not out.exists()
    # An index with no shards (an older version's failed run) binds no settings either.
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"format": 2, "metadata": {"image_size": 99}, "shards": [],
                                                "entries": {}}))
    assert build(images, out, dinov2_dir, dtype="float8").entries == 6
    # A corrupt index is rebuilt from the shards by the next run, not an error that blocks it.
    (out / "index.json").write_text("{ truncated")
    messages = []
    summary = build(images, out, dinov2_dir, dtype="float8", log=messages.append)
    assert (summary.already_cached, summary.encoded) == (6, 0) and any("rebuilding it" in m for m in messages)


# -- folders and exit codes -----------------------------------------------------------------------------------


def test_symlinked_folders_are_followed_without_loops(tmp_path):
    root = tmp_path / "root"
    _image(root / "a" / "x.png", (8, 8))
    os.symlink(root / "a", root / "link")
    os.symlink(root, root / "a" / "loop")
    (root / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")  # reported as unreadable, not lost
    messages = []
    assert find_images(root, log=messages.append) == ["a/x.png", "dangling.jpg", "link/x.png"]
    assert sum("links back to a folder above it" in m for m in messages) == 2


@pytest.mark.parametrize("args, message", [
    (["--out", "{file}"], "exists and is not a folder"),
    (["--out", "{file}/sub"], "cannot be written"),
    (["--device", "gpu"], "is not a device"),
    (["--device", "cuda:0"], "no CUDA GPU is available"),
])
def test_errors_exit_2_with_a_message(images, dinov2_dir, tmp_path, capsys, args, message):
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "file").write_text("not a folder")
    base = ["cache-features", images, "--encoder", dinov2_dir, "--image-size", str(SIZE), "--num-workers", "0",
            "--out", str(tmp_path / "c")]
    assert cli.main(base + [a.format(file=tmp_path / "file") for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_undecodable_file_names_on_a_strict_stdout(dinov2_dir, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    _image(folder / "good.png", (28, 28))
    with open(os.path.join(os.fsencode(folder), b"bad\xff.jpg"), "wb") as fh:
        fh.write(b"not an image")
    streams = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict") for _ in range(2)]
    monkeypatch.setattr(sys, "stdout", streams[0])
    monkeypatch.setattr(sys, "stderr", streams[1])
    code = cli.main(["cache-features", str(folder), "--encoder", dinov2_dir, "--image-size", str(SIZE), "--out",
                     str(tmp_path / "c"), "--device", "cpu", "--num-workers", "0", "--no-progress"])
    monkeypatch.undo()
    streams[0].flush()
    out = streams[0].buffer.getvalue().decode()
    assert code == 1 and "1 skipped" in out and "skipped bad\\udcff.jpg" in out, out

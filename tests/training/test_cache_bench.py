"""bench/cache_build.py's tiny CPU configuration: the code path the H200 run takes, on a tiny encoder."""

import importlib.util
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench", "cache_build.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cache_build", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_figure(bench, tmp_path, capsys):
    assert bench.main(["--tiny", "--out-dir", str(tmp_path), "--unique", "4"]) == 0
    (path,) = tmp_path.iterdir()
    report = json.loads(path.read_text())
    alone = report["encoder_alone"]
    assert alone["chosen_batch"] in (2, 4) and alone["img_per_s"] > 0
    assert report["decode_only"]["img_per_s"] > 0 and report["disk_write_MBps"] > 0
    builds = report["builds"]
    assert set(builds) == {"bfloat16", "float8", "float16"}
    assert builds["bfloat16"]["images"] == 24 and builds["float16"]["images"] == 8
    assert all(b["skipped"] == 0 and b["img_per_s"] > 0 for b in builds.values())
    # D = 16: float8 is 1 byte a channel plus a 4-byte scale per token, bfloat16 2 bytes a channel
    assert builds["float8"]["mib_per_image"] / builds["bfloat16"]["mib_per_image"] == pytest.approx(20 / 32, rel=0.1)
    errors = report["float8_error"]
    assert set(errors) == {"encoder_cache", "smooth_fields", "smooth_fields_8_large_channels",
                           "small_random_encoder"}
    for e in errors.values():
        assert 0 < e["token_rel_rmse"] < 0.05 and e["cosine_aligned_rel_error"] < 0.01
    assert "| float8 |" in capsys.readouterr().out


def test_the_quantised_fields_go_through_the_cache_functions(bench):
    y = bench.smooth_fields(2, (3, 5), 24, "cpu", large_channels=2)
    assert y.shape == (2, 15, 24) and y.dtype.is_floating_point
    error = bench.float8_error(y, bench.quantized(y))
    assert error["token_rel_rmse"] > 0 and bench.float8_error(y, y)["token_rel_rmse"] == 0

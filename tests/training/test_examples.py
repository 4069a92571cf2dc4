"""The examples run end to end on CPU (tiny random models, a few steps) and log the regularizer's values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, flags, prefix", [
    ("train_dit_repa.py", ["--crepa_scheduler", "linear", "--crepa_warmup_steps", "1"], "crepa"),
    ("train_unet_urepa.py", ["--urepa_align", "y"], "urepa"),
])
def test_example_runs(script, flags, prefix, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--steps", "3", "--batch_size", "2",
                           *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["step"] for line in lines] == [0, 2]
    assert all(f"{prefix}_similarity" in line for line in lines[1:])
    if prefix == "crepa":
        assert lines[0]["crepa_weight"] == 0.0  # warmup starts from 0
    else:
        assert "urepa_manifold_loss" in lines[0]

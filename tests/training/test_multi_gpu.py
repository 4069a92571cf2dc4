"""bench/multi_gpu.py's tiny configuration under torchrun: 2 CPU processes over gloo, the code path of the 2-GPU
run (DDP with and without find_unused_parameters, FSDP2 with a checkpoint round trip, the sharded
cache-features build), checked through the JSON it writes."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
ENV = {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_gpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "multi_gpu.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), os.path.join(ROOT, "bench", "multi_gpu.py"), "--tiny", "--out", str(out),
           "--work", str(tmp / "work")]
    # From a neutral folder: the processes import the installed package, as a user's would. In a session of its
    # own, so that a timeout ends torchrun's workers too, not torchrun alone.
    proc = subprocess.Popen(cmd, cwd=tmp, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"bench/multi_gpu.py --tiny ran past 300 s:\n{stderr[-6000:]}")
    assert proc.returncode == 0, stderr[-6000:]
    return json.loads(out.read_text())


def test_environment_is_recorded(report):
    env = report["env"]
    assert env["world_size"] == 2 and env["backend"] == "gloo" and env["device"].startswith("CPU")
    assert env["torch"] and env["diffusers"] and env["repa_fused"] and env["date"]
    assert "error" not in report


def test_sharded_cache_build_is_complete_and_bit_identical(report):
    cb = report["cache_build"]
    assert set(cb["builds"]) == {"1", "2"}
    for build in cb["builds"].values():
        assert build["images"] == build["encoded"] == cb["setup"]["images"] and build["img_per_s"] > 0
    assert cb["scaling_efficiency"] > 0
    check = cb["check"]
    assert check["index_complete"] and check["reference_complete"] and check["no_duplicates"]
    assert check["keys_compared"] == check["images_found"] == cb["setup"]["images"]
    assert check["keys_differing"] == 0 and check["bit_identical_to_1_rank"]


@pytest.mark.parametrize("flag", [False, True])
def test_ddp_projector_and_lambda_agree_across_ranks(report, flag):
    run = report["ddp"][f"find_unused_parameters_{flag}"]
    assert run["steps_per_s_without"] > 0 and run["steps_per_s_with"] > 0
    assert "overhead_pct_of_step" in run
    assert run["projector_max_abs_difference"] == 0.0
    assert run["lambda_identical_across_ranks"]
    lam = run["runs"]["with_urepa"]["lambda"]
    # Teeth: the ranks' own similarities fell on both sides of the threshold at some step, so λ from a
    # rank-local similarity would have differed; the shared one gated both ranks alike.
    assert lam["steps_where_rank_similarities_straddle_threshold"] > 0
    assert set(lam["per_step_rank0"]) == {0.0, 0.5}


def test_fsdp2_runs_and_resumes(report):
    # FSDP2 runs on CPU with gloo in the torch this project pins (2.13): a "skipped" here is a regression.
    fsdp = report["fsdp2"]
    assert "skipped" not in fsdp, fsdp.get("skipped")
    assert fsdp["steps_per_s_without"] > 0 and fsdp["steps_per_s_with"] > 0
    assert fsdp["projector_max_abs_difference"] == 0.0 and fsdp["lambda_identical_across_ranks"]
    ckpt = fsdp["runs"]["with_urepa"]["checkpoint"]
    assert ckpt["model_max_abs_difference"] == 0.0 and ckpt["projector_equal"] and ckpt["schedule_equal"]
    assert ckpt["next_losses_trained"] == ckpt["next_losses_resumed"]
    assert fsdp["checkpoint_resumed"] is True

"""Acceptance runs of examples/train_repa.py, a diffusers-style script (hooks, accelerate, DDP), in fresh
processes on CPU: resume is bit-identical, two DDP ranks with find_unused_parameters stay identical and
share λ, gradient accumulation equals the larger batch."""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from train_repa import launch  # noqa: E402

ENV = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
DIT = ["--model", "dit", "--crepa_enabled", "--crepa_block_index", "1"]


def by_rank(lines):
    ranks = {}
    for line in lines:
        ranks.setdefault(line["rank"], {})[line["step"]] = line
    return ranks


def test_unet_resume_in_a_fresh_process_equals_the_uninterrupted_run(tmp_path):
    from diffusers import UNet2DConditionModel

    # 8 samples in batches of 2: the checkpoint at step 2 falls mid-epoch. A threshold gives the schedule state.
    flags = ["--model", "unet", "--urepa_enabled", "--max_train_steps", "4", "--urepa_similarity_threshold", "0.9",
             "--urepa_similarity_ema_decay", "0.5", "--urepa_threshold_mode", "recoverable"]
    full = launch([*flags, "--output_dir", str(tmp_path / "full"), "--checkpointing_steps", "2"], env=ENV)
    (tmp_path / "resumed").mkdir()
    (tmp_path / "full" / "checkpoint-2").rename(tmp_path / "resumed" / "checkpoint-2")
    resumed = launch([*flags, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"], env=ENV)
    assert [line["step"] for line in resumed] == [3, 4]
    assert resumed == full[2:]  # every logged value of steps 3 and 4, bit for bit
    a, b = (torch.load(tmp_path / run / "regularizer.pt") for run in ("full", "resumed"))
    assert a["schedule"] == b["schedule"] and a["schedule"]["similarity_ema"] is not None
    assert a["projector"].keys() == b["projector"].keys()
    assert all(torch.equal(a["projector"][k], b["projector"][k]) for k in a["projector"])
    # The checkpoint's model folder is a plain UNet: strict load, nothing foreign in it.
    unet, info = UNet2DConditionModel.from_pretrained(tmp_path / "resumed" / "checkpoint-2" / "unet",
                                                      output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert not any("projector" in k for k in unet.state_dict())


def test_two_ddp_ranks_with_find_unused_parameters_stay_identical_and_share_lambda(tmp_path):
    # Recoverable threshold on the raw (decay 0) similarity, set between the two ranks' own first values.
    threshold = 0.03
    lines = launch([*DIT, "--find_unused_parameters", "--cpu", "--log_every_rank", "--max_train_steps", "3",
                    "--crepa_similarity_threshold", str(threshold), "--crepa_similarity_ema_decay", "0",
                    "--crepa_threshold_mode", "recoverable", "--output_dir", str(tmp_path)], nproc=2, env=ENV)
    ranks = by_rank(lines)
    assert sorted(ranks) == [0, 1] and sorted(ranks[0]) == sorted(ranks[1]) == [1, 2, 3]
    for step in (1, 2, 3):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert r0["projector"] == r1["projector"]
        assert r0["crepa_weight"] == r1["crepa_weight"] and r0["crepa_cutoff"] == r1["crepa_cutoff"]
        assert r0["crepa_similarity_ema"] == r1["crepa_similarity_ema"]
    # Teeth: at some step the ranks' own similarities fall on both sides of the threshold, so λ from a
    # rank-local EMA would have differed there.
    assert any((ranks[0][s]["crepa_similarity"] >= threshold) != (ranks[1][s]["crepa_similarity"] >= threshold)
               for s in (1, 2, 3))
    assert {ranks[0][s]["crepa_weight"] for s in (1, 2, 3)} == {0.0, 0.5}  # the cutoff acted on both ranks


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # Warmup makes λ depend on the global step: a micro-step count would change the result.
    common = [*DIT, "--max_train_steps", "2", "--crepa_warmup_steps", "2", "--num_samples", "8"]
    runs = {"accumulated": ["--train_batch_size", "2", "--gradient_accumulation_steps", "2"],
            "batched": ["--train_batch_size", "4"]}
    with ThreadPoolExecutor(2) as pool:
        logs = dict(zip(runs, pool.map(
            lambda name: launch([*common, *runs[name], "--output_dir", str(tmp_path / name)], env=ENV), runs)))
    assert [line["crepa_weight"] for line in logs["accumulated"]] == [0.0, 0.25]
    a, b = (torch.load(tmp_path / name / "regularizer.pt")["projector"] for name in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_disabled_config_runs_the_same_loop(tmp_path):
    lines = launch(["--model", "dit", "--max_train_steps", "1", "--output_dir", str(tmp_path)], env=ENV)
    assert lines and not any(k.startswith("crepa_") for k in lines[0])
    assert torch.load(tmp_path / "regularizer.pt") == {"kind": None}

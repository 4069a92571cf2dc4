"""The example runs end to end on CPU (tiny random models, a few steps) and is the README's recipe verbatim."""

import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from train_repa import launch  # noqa: E402

ENV = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("flags, prefix", [
    (["--model", "dit", "--crepa_enabled", "--crepa_block_index", "1", "--crepa_scheduler", "linear",
      "--crepa_warmup_steps", "1"], "crepa"),
    (["--model", "unet", "--urepa_enabled", "--urepa_align", "y"], "urepa"),
])
def test_example_runs(flags, prefix, tmp_path):
    lines = launch([*flags, "--max_train_steps", "2", "--output_dir", str(tmp_path)], env=ENV)
    assert [line["step"] for line in lines] == [1, 2]
    assert f"{prefix}_similarity" in lines[1]
    if prefix == "crepa":
        assert lines[0]["crepa_weight"] == 0.0  # warmup starts from 0
    else:
        assert "urepa_manifold_loss" in lines[0]


def test_readme_recipe_is_the_example_loop():
    source = (ROOT / "examples" / "train_repa.py").read_text()
    loop = textwrap.dedent(source.split("# [recipe]\n")[1].split("# [/recipe]")[0]).strip()
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert any(block.strip() == loop for block in blocks), "README's recipe differs from examples/train_repa.py"

"""A normal (non-editable) install: the wheel carries the Triton kernels inside the package and the
package imports from a clean directory."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_wheel_contains_kernels_and_imports_cleanly(tmp_path):
    env = dict(os.environ, REPA_FUSED_NO_CPP="1")  # the C++ build is tested by the editable install
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), ROOT], check=True, env=env)
    (wheel,) = (tmp_path / "dist").glob("repa_fused-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("kernels/__init__.py", "kernels/_runtime.py", "ops/api.py", "ops/reference.py", "ops/dispatch.py",
                   "training/regularizers.py", "tools/cli.py"):
        assert f"repa_fused/{module}" in names, f"{module} missing from {wheel.name}"
    assert not any(name.startswith("kernels/") for name in names), "kernels must live inside repa_fused"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    clean = tmp_path / "elsewhere"
    clean.mkdir()
    probe = ("import repa_fused, repa_fused.kernels, torch; "
             "assert repa_fused.__file__.startswith(%r), repa_fused.__file__; "
             "h = torch.randn(2, 16, 5, requires_grad=True); "
             "repa_fused.urepa_loss(h, torch.randn(2, 9, 5))[0].backward(); print('ok')" % str(target))
    out = subprocess.run([sys.executable, "-c", probe], cwd=clean, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(target)))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

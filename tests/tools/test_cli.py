"""The two CLI jobs, run as a user runs them."""

import csv
import json
import subprocess
import sys

import pytest

from repa_fused.tools import bench, cli


def test_check_passes_on_this_device(capsys):
    # Triton under the CPU interpreter is checked by its own tests; here the native CPU backends.
    assert cli.main(["check", "--backends", "reference", "cpp"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "0 failed" in out


def test_check_fails_loudly_on_a_broken_backend(monkeypatch, capsys):
    from repa_fused.ops import reference
    from repa_fused.tools import check

    original = reference.loss_gradients

    def wrong(op, grad, *args):
        return original(op, grad * 1.5, *args)

    monkeypatch.setattr(reference, "loss_gradients", wrong)
    monkeypatch.setattr(check, "GRADCHECK_CASES", check.GRADCHECK_CASES[:1])
    assert cli.main(["check", "--backends", "reference"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["nope", "unavailable"])
def test_check_rejects_unknown_or_unavailable_backend(name, monkeypatch, capsys):
    from repa_fused.ops import dispatch

    if name == "unavailable":
        name = "cpp"
        monkeypatch.setattr(dispatch.BACKENDS["cpp"], "devices", ())
    assert cli.main(["check", "--backends", name]) == 2
    assert name in capsys.readouterr().err


def test_bench_writes_table_json_and_csv(tmp_path, capsys):
    out_json, out_csv = tmp_path / "b.json", tmp_path / "b.csv"
    code = cli.main(["bench", "--cases", "sd15_min", "--reps", "1", "--no-compile", "--backends", "cpp",
                     "--json", str(out_json), "--csv", str(out_csv)])
    assert code == 0
    table = capsys.readouterr().out
    assert "sd15_min" in table and "eager" in table and "peak MiB" in table
    report = json.loads(out_json.read_text())
    assert report["environment"]["torch"] and report["ceilings"]["copy_gbps"] > 0
    assert {r["variant"] for r in report["results"]} >= {"eager"}
    rows = list(csv.DictReader(out_csv.open()))
    assert rows[0]["case"] == "sd15_min" and float(rows[0]["ms"]) > 0


def test_bench_rejects_unknown_case(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "--cases", "nope"])
    assert exit.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_bench_help_lists_the_cases(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for case in bench.CASES:
        assert f"{case.name}:" in text


def test_bench_plot_without_matplotlib_fails_before_running(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the benchmark ran before the plot check"))
    with pytest.raises(SystemExit, match=r"repa_fused\[plot\]"):
        cli.main(["bench", "--cases", "sd15_min", "--plot", "out.png"])


def test_spread_of_the_runs_is_shown_and_warned():
    row = {"case": "c", "variant": "eager", "loss": "urepa", "ms": 10.0, "ms_min": 6.0, "ms_max": 48.0, "reps": 3}
    steady = dict(row, variant="cpp", ms_min=9.5, ms_max=10.5)
    report = {"environment": {"device": "d", "torch": "t", "triton": None, "date": "now"},
              "ceilings": {"copy_gbps": 1.0, "matmul_dtype": "float32", "matmul_tflops": 1.0}, "results": [row, steady]}
    table = bench.format_table(report)
    assert "6..48" in table and "9.5..10.5" in table
    warnings = bench.spread_warnings(report)
    assert len(warnings) == 1 and "c eager" in warnings[0] and "420%" in warnings[0]


@pytest.mark.parametrize("name", ["tritn", "reference"])
def test_bench_rejects_a_backend_it_cannot_run(name):
    with pytest.raises(SystemExit, match=f"backend\\(s\\) \\['{name}'\\]"):
        cli.main(["bench", "--cases", "sd15_min", "--backends", name])


def test_cpu_scaling_keeps_grids():
    for case in bench.CASES:
        small = case.scaled_for_cpu()
        assert small.h_grid == case.h_grid and small.y_grid == case.y_grid
        assert small.batch == max(1, case.batch // 8) and small.dim == max(64, case.dim // 8)


def test_counted_work():
    case = bench.CASES_BY_NAME["flux_1024"]
    assert case.min_bytes(2) == 2 * 4 * 1536 * (2 * 4096 + 1369)
    hires = bench.CASES_BY_NAME["hires_manifold"]
    n, d, b = 4096, 1024, 8
    assert hires.min_flops() == min(4 * b * n * n * d, 8 * b * n * d * d)


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "repa_fused.tools.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "check" in out.stdout and "bench" in out.stdout


def test_bench_reports_a_failing_variant_and_goes_on(monkeypatch, tmp_path, capsys):
    """torch.compile without a C++ compiler (say) must not end the run: the row says why."""
    def broken(case):
        def loss(h, y):
            raise RuntimeError("no C++ compiler")
        return loss

    monkeypatch.setattr(bench.torch, "compile", lambda fn, **kw: broken(None))
    out_csv = tmp_path / "b.csv"
    assert cli.main(["bench", "--cases", "sd15_min", "--reps", "1", "--backends", "cpp", "--csv", str(out_csv)]) == 0
    table = capsys.readouterr().out
    assert "sd15_min compile failed: RuntimeError: no C++ compiler" in table
    rows = {r["variant"]: r for r in csv.DictReader(out_csv.open())}
    assert rows["compile"]["error"] and float(rows["eager"]["ms"]) > 0


def test_python_m_repa_fused_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "repa_fused", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "sd15_min" in out.stdout


def test_config_module_keeps_its_import_path():
    import repa_fused as rf
    from repa_fused.config import add_config_arguments

    assert add_config_arguments is rf.config.add_config_arguments

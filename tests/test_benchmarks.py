"""The benchmark scripts run (they are never timed here): the GPU scripts only get a GPU in
rare lent sessions, so their CPU dry run guards them against trivial breakage."""
import os
import subprocess
import sys

from benchmarks import cases, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_measures_every_cpu_case_and_prints_a_table():
    rows = [run.measure(name, impl, "quick", "cpu", "float32", repeats=1)
            for name, case in cases.CASES.items() for impl in run.impls_for(case, "cpu")]
    assert {r["impl"] for r in rows} == {"reference", "chunked"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    table = run.markdown(rows, run.machine(), "quick", "float32")
    assert table.count("\n| ") == len(rows) + 1 and "speed-up vs reference" in table


def test_gpu_check_dry_run_passes_on_cpu():
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failures" in result.stdout

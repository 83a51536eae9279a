"""The benchmark scripts run (they are never timed here): the GPU scripts only get a GPU in
rare lent sessions, so their CPU dry run guards them against trivial breakage."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import cases, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(rows=48, vocab=320, d_s=16, d_t=24, chunks=8)


@pytest.mark.parametrize("case_name", list(cases.CASES))
def test_every_cpu_impl_of_every_case_matches_the_float64_reference(case_name):
    impls = [i for i in cases.implementations(cases.CASES[case_name], "cpu")
             if not cases.compiled(i)]                               # a compile per test is too slow here
    assert "chunked" in impls
    for impl in impls:
        row = run.measure(case_name, impl, TINY, "cpu", "float32", repeats=1)
        assert row["ms"] > 0 and row["peak_mb"] >= 0
        if case_name == "compdemo_split":
            assert row["errors"] == {"valid_split": True}
        else:
            assert row["errors"]["loss"] < 1e-4, (impl, row["errors"])
            assert max(v for k, v in row["errors"].items() if k.startswith("grad_")) < 1e-5, (impl, row["errors"])


def test_peers_compute_the_same_scalar_as_tide():
    """Equal work: Liger's JSD (beta 0 / 1, no T^2, weights 0.5 / 0.5) is the KL cases' scalar."""
    for case_name, peer in (("forward_kl_ce", "liger_eager"), ("reverse_kl_ce", "liger_eager")):
        if not cases.peer_available(peer, "cpu"):
            pytest.skip(f"{peer} is not installed")
        x = cases.build(case_name, TINY, torch.device("cpu"), torch.float64)
        ours = cases.make_step(case_name, "reference", x)()
        theirs = cases.make_step(case_name, peer, x)()
        assert torch.allclose(ours, theirs.double(), rtol=1e-6), (case_name, ours, theirs)   # Liger: CE in fp32


def test_report_tables_sweeps_and_growth_exponents(tmp_path):
    base = cases.SHAPES["quick"]
    rows = []
    for axis, values in cases.SWEEPS["quick"].items():
        for v in values:
            if v == base[axis] and any(r["table"] == "main" for r in rows):
                continue                                       # one base-shape row, shared by both sweeps
            shape = dict(dict(rows=base["rows"], vocab=base["vocab"]), **{axis: v})
            size = float(shape["rows"] * shape["vocab"])
            rows.append(dict(case="forward_kl_ce", impl="chunked", table="main" if v == base[axis] else axis,
                             d_s=1, d_t=1, **shape, ms=size ** 2, ms_p20=size ** 2, ms_p80=size ** 2,
                             peak_mb=size, tflops=1.0, errors=dict(loss=0.0, grad_student_hidden=0.0)))
    report = dict(machine=run.machine(1), device="cpu", size="quick", dtype="float32", shape=base,
                  command="python -m benchmarks.run --quick", rows=rows)
    table = run.markdown(report)
    assert "| forward_kl_ce | chunked | 2.00 | 1.00 | 2.00 | 1.00 |" in table
    assert run.exponent([(1, 3.0), (2, 12.0), (4, 48.0)]) == pytest.approx(2.0)
    run._write(report, str(tmp_path))
    assert json.load(open(tmp_path / "run.json"))["rows"] == rows


def test_device_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cuda"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "no CUDA device" in result.stderr


def test_gpu_check_dry_run_passes_on_cpu():
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failures" in result.stdout


def test_sampling_benchmark_runs(tmp_path):
    """`python -m benchmarks.sampling --quick`: a tiny random BD3LM, 32 tokens, batch 1 and 8."""
    from benchmarks import sampling
    report = sampling.main(["--quick", "--threshold", "0.5", "--out", str(tmp_path)])
    assert [r["cache"] for r in report["cache"]] == ["on", "off", "on", "off"]
    assert all(r["same_tokens"] for r in report["cache"][::2]) and report["batch_invariant"]
    assert {r["decoding"] for r in report["decoding_random"]} == {"one token per step", "threshold 0.5"}
    assert "Block KV cache vs none" in sampling.markdown(report)

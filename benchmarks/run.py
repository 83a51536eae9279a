"""Benchmarks: cases x implementations (x peers) -> markdown table, JSON and PNG.

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--cases tidal_ce,...] [--json FILE] [--png FILE]

For every case of benchmarks/cases.py and every implementation that applies
(reference, chunked, and on CUDA triton, triton_stream, plus peers that import):
forward + backward, median time with the 20% / 80% quantiles, peak memory, and
achieved TFLOP/s from the case's FLOP count. On CPU each (case, impl) runs in
its own subprocess so that its peak resident memory is its own; on CUDA peak
memory is `torch.cuda.max_memory_allocated` over the inputs. Ratios against
the reference are measured in the same run. Rows carry the machine, commit,
versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys

import torch

from benchmarks.cases import CASES, SHAPES, peer_available
from benchmarks.timing import time_step


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict:
    info = dict(date=datetime.date.today().isoformat(), commit=_commit(), torch=torch.__version__,
                python=platform.python_version(), cpu=platform.machine(), cores=os.cpu_count())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def measure(case_name: str, impl: str, size: str, device: str, dtype_name: str, repeats: int) -> dict:
    """Time and peak memory of one (case, impl) in this process."""
    case = CASES[case_name]
    shape = SHAPES[size]
    dtype = getattr(torch, dtype_name)
    cuda = device == "cuda"
    step = case.setup(shape, torch.device(device), dtype)(impl)

    base_rss = None if cuda else _current_rss_mb()
    timing = time_step(step, torch.device(device), repeats)          # warm-up (compiles kernels), then timed
    if not cuda:                                                     # own process: peak resident memory
        timing["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return dict(case=case_name, impl=impl, **timing, tflops=case.flops(shape) / timing["ms"] / 1e9)


def impls_for(case, device: str) -> list:
    chosen = []
    for impl in case.impls:
        if impl.startswith("triton") and device != "cuda":
            continue                     # the interpreter is for tests, not timings
        if impl == "liger" and (device != "cuda" or not peer_available(impl)):
            continue
        chosen.append(impl)
    return chosen


def markdown(rows: list, info: dict, size: str, dtype: str) -> str:
    shape = SHAPES[size]
    lines = [f"{info['date']}, commit {info['commit']}, {info.get('gpu', info['cpu'] + ' CPU')}, "
             f"torch {info['torch']}, {dtype}, N={shape['rows']} V={shape['student_vocab']} "
             f"d_s={shape['d_s']} d_t={shape['d_t']}",
             "",
             "| case | impl | ms (median [p20, p80]) | peak MB | TFLOP/s | speed-up vs reference | memory vs reference |",
             "|---|---|---|---|---|---|---|"]
    reference = {r["case"]: r for r in rows if r["impl"] == "reference"}
    for r in rows:
        ref = reference.get(r["case"])
        speed = f"{ref['ms'] / r['ms']:.2f}x" if ref else "-"
        memory = f"1/{ref['peak_mb'] / max(r['peak_mb'], 1e-9):.1f}" if ref else "-"
        lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.1f} [{r['ms_p20']:.1f}, {r['ms_p80']:.1f}] | "
                     f"{r['peak_mb']:.0f} | {r['tflops']:.2f} | {speed} | {memory} |")
    return "\n".join(lines)


def plot(rows: list, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[bench]"): no PNG written')
        return False
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        for ax, key in zip(axes, ("ms", "peak_mb")):
            values = [next((r[key] for r in rows if r["case"] == c and r["impl"] == impl), 0) for c in cases]
            ax.bar([i + k * width for i in range(len(cases))], values, width, label=impl)
    for ax, title in zip(axes, ("time (ms, median)", "peak memory (MB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases)
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", help="write machine info and rows here")
    parser.add_argument("--png", help="write a bar chart of time and memory here")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else args.device
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    repeats = args.repeats or (3 if args.quick or args.device == "cpu" else 10)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.worker:
        print(json.dumps(measure(*args.worker, size, args.device, dtype, repeats)))
        return

    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"--cases: unknown case {name!r}; known: {list(CASES)}")
        for impl in impls_for(CASES[name], args.device):
            if args.device == "cpu":                      # own process: own peak RSS
                command = [sys.executable, "-m", "benchmarks.run", "--device", "cpu", "--worker", name, impl,
                           "--dtype", dtype, "--repeats", str(repeats)] + (["--quick"] if args.quick else [])
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    print(f"{name}/{impl} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(result.stdout.strip().splitlines()[-1])
            else:
                row = measure(name, impl, size, args.device, dtype, repeats)
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"  {name:15s} {impl:14s} {row['ms']:10.1f} ms  {row['peak_mb']:9.0f} MB", flush=True)
    info = machine()
    table = markdown(rows, info, size, dtype)
    print()
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, size=size, shape=SHAPES[size], dtype=dtype, rows=rows), f, indent=2)
    if args.png and plot(rows, args.png):
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

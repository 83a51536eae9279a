"""Benchmarks: every case x every implementation x the peers, in one run.

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--only CASE[,CASE]] [--out DIR]
                             [--threads T] [--repeats R] [--no-sweep]

For each case of benchmarks/cases.py (one scalar of equal work per case) and each
implementation that applies (reference, chunked; on CPU chunked_compile, chunked with
TIDE_COMPILE=1, on the distillation cases; on CUDA triton, triton_stream;
the peers that import: Liger-Kernel, Cut-Cross-Entropy): forward + backward,
median time with its 20% / 80% quantiles, peak memory over the inputs, achieved
TFLOP/s from the case's FLOP count, and a correctness column: the max abs error
of the scalar and of the student gradients against the float64 reference on the
same inputs, so that a fast wrong kernel shows. Then sweeps over N and V for
the cases with peers, with the fitted growth exponent (log-log slope) of time
and memory per implementation.

Every (case, impl, shape) runs in its own process (`--worker`), so that its peak
memory is its own: on CPU the peak resident set of one step above the resident
set with the inputs built (after a warm-up that compiles what compiles, with
glibc's free memory returned and the high-water mark reset), on CUDA
`torch.cuda.max_memory_allocated` over the inputs. CPU threads are fixed
(`--threads`, default 1) and recorded with the load average. Each row is written
to DIR/run.json and DIR/run.md as soon as it finishes; the plots (linear axes,
p20-p80 error bars; time vs V, memory vs N) at the end.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

from benchmarks import cases as C
from benchmarks.timing import time_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- machine and memory
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=_commit(),
                python=platform.python_version(), arch=platform.machine(), cpu=_cpu_model(),
                cores=os.cpu_count(), threads=threads, load_average=list(os.getloadavg()),
                versions={p: _version(p) for p in ("torch", "triton", "liger-kernel", "cut-cross-entropy")})
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _cpu_peak_mb(step) -> float:
    """Peak resident memory of one `step()` above the current resident set (Linux).

    Large blocks go straight to mmap (M_MMAP_THRESHOLD = 64 KiB) so that freed
    buffers leave the resident set, glibc's free memory is trimmed, and the
    high-water mark is reset (/proc/self/clear_refs) before the step.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)                       # M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # reset VmHWM to the current RSS
    base = _rss_mb()
    step()
    return max(_hwm_mb() - base, 0.0)


# --------------------------------------------------------------------------- one measurement
def measure(case_name: str, impl: str, shape: dict, device: str, dtype_name: str, repeats: int) -> dict:
    """Time, peak memory and errors of one (case, impl, shape), in this process."""
    case = C.CASES[case_name]
    dev = torch.device(device)
    x = C.build(case_name, shape, dev, getattr(torch, dtype_name))
    step = C.make_step(case_name, impl, x)
    timing = time_step(step, dev, repeats)             # warm-up (compiles), CUDA peak, then timed runs
    if device == "cpu":
        timing["peak_mb"] = _cpu_peak_mb(step)
    reference = C.expected(case_name, x)
    row = dict(case=case_name, impl=impl, rows=shape["rows"], vocab=shape["vocab"], d_s=shape["d_s"],
               d_t=shape["d_t"], dtype=dtype_name, **timing,
               tflops=case.flops(shape) / timing["ms"] / 1e9 if case.flops(shape) else None,
               errors=C.errors(case_name, x, step, reference))
    return row


def _run_worker(case_name, impl, shape, args, dtype) -> dict:
    command = [sys.executable, "-m", "benchmarks.run", "--device", args.device, "--worker", case_name, impl,
               json.dumps(shape), "--dtype", dtype, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-1500:].strip().splitlines()
        return dict(case=case_name, impl=impl, rows=shape["rows"], vocab=shape["vocab"], failed=True,
                    error=tail[-1] if tail else f"exit {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- reporting
def _fmt_errors(errors: dict | None) -> str:
    if not errors:
        return "-"
    if "valid_split" in errors:
        return "valid split" if errors["valid_split"] else "INVALID split"
    grads = max(v for k, v in errors.items() if k.startswith("grad_"))
    return f"{errors['loss']:.1e} / {grads:.1e}"


def exponent(points) -> float | None:
    """Least-squares slope of log(y) on log(x): y ~ x^slope."""
    points = [(x, y) for x, y in points if x > 0 and y and y > 0]
    if len(points) < 2:
        return None
    lx = [math.log(x) for x, _ in points]
    ly = [math.log(y) for _, y in points]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var else None


def sweep_points(report: dict, case_name: str, impl: str, axis: str) -> list:
    """Rows of one sweep axis, the main table's base-shape row included, sorted along the axis."""
    rows = [r for r in report["rows"] if (r["case"], r["impl"]) == (case_name, impl) and not r.get("failed")
            and (r.get("table") == axis or (r.get("table") == "main" and r["case"] in C.SWEEP_CASES))]
    return sorted(rows, key=lambda r: r[axis])


def markdown(report: dict) -> str:
    info, base = report["machine"], report["shape"]
    where = info.get("gpu") or f"{info['cpu']} ({info['threads']} thread{'s' * (info['threads'] > 1)})"
    lines = [f"# benchmarks.run: {report['size']} on {report['device']}", "",
             f"{info['date']}, commit {info['commit']}, {where}, torch {info['versions']['torch']}, "
             f"{report['dtype']}, load average at start {info['load_average'][0]:.2f}. "
             f"Command: `{report['command']}`", "",
             f"Base shape: N={base['rows']} V={base['vocab']} d_s={base['d_s']} d_t={base['d_t']}. "
             "Errors: max abs error of the scalar / of the student gradients against the float64 reference.", "",
             "| case | impl | ms (median [p20, p80]) | peak MB | TFLOP/s | vs reference: time | vs reference: memory "
             "| error loss / grads |",
             "|---|---|---|---|---|---|---|---|"]
    main_rows = [r for r in report["rows"] if r.get("table") == "main"]
    reference = {r["case"]: r for r in main_rows if r["impl"] == "reference" and not r.get("failed")}
    for r in main_rows:
        if r.get("failed"):
            lines.append(f"| {r['case']} | {r['impl']} | failed: {r['error'][:80]} | | | | | |")
            continue
        ref = reference.get(r["case"])
        speed = f"{ref['ms'] / r['ms']:.2f}x faster" if ref else "-"
        memory = f"{r['peak_mb'] / max(ref['peak_mb'], 1e-9):.3f}x" if ref and ref["peak_mb"] else "-"
        tflops = f"{r['tflops']:.3f}" if r.get("tflops") else "-"
        lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.1f} [{r['ms_p20']:.1f}, {r['ms_p80']:.1f}] | "
                     f"{r['peak_mb']:.0f} | {tflops} | {speed} | {memory} | {_fmt_errors(r.get('errors'))} |")
    sweep_rows = [r for r in report["rows"] if r.get("table") in ("rows", "vocab") and not r.get("failed")]
    if sweep_rows:
        lines += ["", "Sweeps: fitted growth exponents (time ~ N^a, memory ~ N^b at the base V; time ~ V^c, "
                  "memory ~ V^e at the base N).", "",
                  "| case | impl | time vs N | memory vs N | time vs V | memory vs V |", "|---|---|---|---|---|---|"]
        for case_name, impl in dict.fromkeys((r["case"], r["impl"]) for r in sweep_rows):
            cells = []
            for axis in ("rows", "vocab"):
                pts = sweep_points(report, case_name, impl, axis)
                for key in ("ms", "peak_mb"):
                    e = exponent([(r[axis], r[key]) for r in pts])
                    cells.append(f"{e:.2f}" if e is not None else "-")
            lines.append(f"| {case_name} | {impl} | " + " | ".join(cells) + " |")
    failed = [r for r in report["rows"] if r.get("failed") and r.get("table") != "main"]
    for r in failed:
        lines.append(f"\nfailed: {r['case']}/{r['impl']} N={r['rows']} V={r['vocab']}: {r['error'][:200]}")
    return "\n".join(lines) + "\n"


def plots(report: dict, out_dir: str) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[bench]"): no plots written')
        return []
    info = report["machine"]
    where = info.get("gpu") or f"{report['device']} {info['threads']}T"
    written = []
    for axis, key, label, fname in (("vocab", "ms", "time (ms)", "time_vs_V.png"),
                                    ("rows", "peak_mb", "peak memory (MB)", "memory_vs_N.png")):
        swept = [(r["case"], r["impl"]) for r in report["rows"] if r.get("table") == axis and not r.get("failed")]
        if not swept:
            continue
        case_names = list(dict.fromkeys(case for case, _ in swept))
        fig, axes = plt.subplots(1, len(case_names), figsize=(6 * len(case_names), 4.2), squeeze=False)
        for ax, case_name in zip(axes[0], case_names):
            for impl in dict.fromkeys(i for c, i in swept if c == case_name):
                pts = sweep_points(report, case_name, impl, axis)
                xs, ys = [r[axis] for r in pts], [r[key] for r in pts]
                if key == "ms":
                    err = [[y - r["ms_p20"] for y, r in zip(ys, pts)], [r["ms_p80"] - y for y, r in zip(ys, pts)]]
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=impl)
                else:
                    ax.plot(xs, ys, marker="o", label=impl)
            other = "N" if axis == "vocab" else "V"
            fixed = report["shape"]["rows" if axis == "vocab" else "vocab"]
            ax.set_title(f"{case_name}: {other}={fixed} d_s={report['shape']['d_s']} d_t={report['shape']['d_t']}",
                         fontsize=9)
            ax.set_xlabel("V (vocabulary)" if axis == "vocab" else "N (rows)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{label} vs {'V' if axis == 'vocab' else 'N'}: {where}, {report['dtype']}, "
                     f"commit {info['commit']}, {info['date'][:10]}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _write(report: dict, out_dir: str) -> None:
    for name, text in (("run.json", json.dumps(report, indent=1)), ("run.md", markdown(report))):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------- the run
def plan(args, size: str) -> list:
    """(table, case, impl, shape) in run order: the main table, then the sweeps (ascending)."""
    base = C.SHAPES[size]
    jobs = []
    for name in args.only:
        for impl in C.implementations(C.CASES[name], args.device):
            jobs.append(("main", name, impl, base))
    if not args.no_sweep:
        for name in [n for n in args.only if n in C.SWEEP_CASES]:
            for impl in C.implementations(C.CASES[name], args.device):
                if args.quick and C.compiled(impl):
                    continue                                  # a compile per shape: not in a smoke run
                for axis in ("rows", "vocab"):
                    for value in C.SWEEPS[size][axis]:
                        if value != base[axis]:               # the base point is the main table's row
                            jobs.append((axis, name, impl, dict(base, **{axis: value})))
    return jobs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats (under 5 minutes on 2 CPU cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", default=",".join(C.CASES), help=f"comma-separated cases out of {list(C.CASES)}")
    parser.add_argument("--out", help="output folder (default benchmarks/results/run_<device>[_quick])")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every process (recorded)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3 on CPU, 10 on CUDA)")
    parser.add_argument("--no-sweep", action="store_true", help="only the main table, no N / V sweeps")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row before it is recorded as failed")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    if args.worker:
        case_name, impl, shape = args.worker
        print(json.dumps(measure(case_name, impl, json.loads(shape), args.device, dtype, args.repeats)))
        return

    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in C.CASES]
    if unknown or not args.only:
        parser.error(f"--only: unknown case(s) {unknown}; known: {list(C.CASES)}")
    size = "quick" if args.quick else args.device
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", f"run_{args.device}" + ("_quick" if args.quick else ""))
    os.makedirs(out_dir, exist_ok=True)
    report = dict(machine=machine(args.threads), device=args.device, size=size, dtype=dtype, shape=C.SHAPES[size],
                  command="python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                  rows=[])
    jobs = plan(args, size)
    start = time.perf_counter()
    print(f"{len(jobs)} rows, {args.threads} thread(s), writing {out_dir}/run.json and run.md as they finish", flush=True)
    for k, (table, name, impl, shape) in enumerate(jobs, 1):
        row = _run_worker(name, impl, shape, args, dtype)
        row["table"] = table
        report["rows"].append(row)
        report["machine"]["load_average_end"] = list(os.getloadavg())
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        _write(report, out_dir)
        what = f"failed: {row['error'][:100]}" if row.get("failed") else \
            f"{row['ms']:10.1f} ms {row['peak_mb']:9.1f} MB  err {_fmt_errors(row.get('errors'))}"
        print(f"[{k}/{len(jobs)}] {table:5s} {name:15s} {impl:13s} N={shape['rows']:<6d} V={shape['vocab']:<7d} {what}",
              flush=True)
    for path in plots(report, out_dir):
        print(f"wrote {path}")
    print(markdown(report))


if __name__ == "__main__":
    main()

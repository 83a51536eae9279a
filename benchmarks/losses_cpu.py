"""CPU benchmark: TIDAL + CE forward and backward, eager reference vs chunked.

    python -m benchmarks.losses_cpu [--rows 2048] [--vocab 32768] [--repeats 3] [--json FILE]

Each implementation runs in its own subprocess, so the peak resident memory it
reports is its own. Inputs have a realistic logit scale (weights scaled by
2 / sqrt(d), logits with std ~2): unit-scale weights would make exp() run in
denormals and measure nothing. Prints one table and the measured ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def worker(impl: str, rows: int, vocab: int, d_s: int, d_t: int, repeats: int) -> dict:
    """Time one implementation (median of `repeats` after one warm-up) and its peak memory."""
    import torch

    import tide

    g = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(rows, d_s, generator=g).requires_grad_(True)
    student_weight = (torch.randn(vocab, d_s, generator=g) * 2 / d_s ** 0.5).requires_grad_(True)
    teacher_hidden = torch.randn(rows, d_t, generator=g)
    teacher_weight = torch.randn(vocab, d_t, generator=g) * 2 / d_t ** 0.5
    mask_ratio = torch.rand(rows, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)

    def step():
        distill, ce = tide.tidal_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                      mask_ratio, 0.37, targets=targets, impl=impl)
        (distill + ce).backward()
        student_hidden.grad = student_weight.grad = None
        return float(distill), float(ce)

    before = current_rss_mb()
    losses = step()                                          # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(impl=impl, seconds=statistics.median(times), peak_mb=peak_rss_mb() - before,
                peak_rss_mb=peak_rss_mb(), distill=losses[0], ce=losses[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--d-student", type=int, default=256)
    parser.add_argument("--d-teacher", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.rows, args.vocab, args.d_student, args.d_teacher, args.repeats)
    if args.worker:
        print(json.dumps(worker(args.worker, *shape)))
        return

    results = {}
    for impl in ("reference", "chunked"):
        command = [sys.executable, "-m", "benchmarks.losses_cpu", "--worker", impl, "--rows", str(args.rows),
                   "--vocab", str(args.vocab), "--d-student", str(args.d_student),
                   "--d-teacher", str(args.d_teacher), "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(output.strip().splitlines()[-1])

    import torch
    ref, chunk = results["reference"], results["chunked"]
    print(f"TIDAL + CE, forward + backward, float32, N={args.rows} V={args.vocab} "
          f"d_s={args.d_student} d_t={args.d_teacher}")
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| impl      | time (s, median of {args.repeats}) | peak memory over inputs (MB) | loss (distill, ce) |")
    print("|-----------|------------------|------------------------------|--------------------|")
    for name, row in results.items():
        print(f"| {name:9s} | {row['seconds']:16.3f} | {row['peak_mb']:28.0f} | "
              f"{row['distill']:.6f}, {row['ce']:.4f} |")
    print(f"chunked / reference: time {chunk['seconds'] / ref['seconds']:.2f}x, "
          f"peak memory {chunk['peak_mb'] / ref['peak_mb']:.3f}x (1/{ref['peak_mb'] / chunk['peak_mb']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=dict(zip(("rows", "vocab", "d_student", "d_teacher"), shape)),
                           results=results), f, indent=2)


if __name__ == "__main__":
    main()

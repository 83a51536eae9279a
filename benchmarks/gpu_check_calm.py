"""GPU check of the cross-tokenizer kernels: token log-probabilities, (Reverse) CALM, CompDemo split.

    python -m benchmarks.gpu_check_calm [--device cuda|cpu] [--quick] [--json FILE]

The main GPU script calls `run_calm_checks(device, quick)`; it returns a dict
`{"correctness": [...], "timing": [...], "goals": {...}, "markdown": str}` and never raises on a
failed check (each check records ok / detail), so one failure does not hide the others.

1. Correctness of the compiled kernels (the CPU tests only run the interpreter): fused token
   log-probs and CALM vs tide.reference in float64 and float32 on odd shapes, every CALM mode,
   only-some-inputs-require-grad, N = 0; bf16 at a mid shape vs the float32 reference, next to
   the eager bf16 error; the Philox split's properties and seed determinism on CUDA.
2. Timing at the issue's shape (cuda): N_s = N_t = 10,000 rows, student V = 151,936, d = 1,024,
   teacher V = 157,184, d = 2,048, bf16, weights scaled by 2 / sqrt(d) (logit std ~2):
   - token_logprobs forward + backward (student): triton vs eager vs chunked, plus Cut-Cross-
     Entropy's `linear_cross_entropy(reduction="none")` as a peer when it imports (and, unless
     quick, two other tilings of the triton kernels, for tuning);
   - token_logprobs forward only (teacher, no grad);
   - Reverse CALM end to end (`calm_loss`, student backward): triton vs eager (reference) vs chunked.
   "eager" for token log-probs is the CCE paper's baseline `log_softmax((h @ w.T).float())[t]`.
   Reported: median ms (20 / 80 % quantiles), peak MB above the inputs, model TFLOP/s
   (6 N V d forward + backward, 2 N V d forward only; the fused backward really does 8 N V d
   with its recompute), and the goals (>= 2x faster, <= 1/10 peak memory of eager).
   At this scale random targets give chunk probabilities below the 1e-7 clamp, so the CALM
   gradients are zero; the kernels do the same work regardless (no value-dependent skips).

`--device cpu` runs everything at toy shapes under TRITON_INTERPRET=1 (float32: the
interpreter's bf16 tl.dot is wrong), only to rule out crashes; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from benchmarks.timing import time_step


# --------------------------------------------------------------------------- helpers
def _rel(x, ref):
    if ref.numel() == 0:
        return 0.0
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))


class _Checks:
    def __init__(self):
        self.rows = []

    def run(self, name, fn):
        try:
            detail = fn()
            self.rows.append(dict(check=name, ok=True, detail=detail or ""))
        except Exception as error:                      # record and continue: one failure hides nothing
            self.rows.append(dict(check=name, ok=False,
                                  detail=f"{type(error).__name__}: {error}"[:500]))
            traceback.print_exc()


def _require(condition, message):
    if not condition:
        raise AssertionError(message)


# --------------------------------------------------------------------------- correctness
def _correctness(device, checks):
    import torch

    import tide.compdemo as compdemo
    from tide import reference
    from tide.kernels.calm import fused_calm_from_token_logprobs
    from tide.kernels.complementary_split import philox_split
    from tide.kernels.token_logprob import fused_token_logprobs

    def inputs(n, v, d, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(n, d, generator=g, dtype=torch.float64)
        w = torch.randn(v, d, generator=g, dtype=torch.float64) * 2 / d ** 0.5
        t = torch.randint(0, v, (n,), generator=g)
        grad = torch.randn(n, generator=g, dtype=torch.float64)
        return h.to(device, dtype), w.to(device, dtype), t.to(device), grad.to(device)

    def run_logprobs(fn, h, w, t, grad, need=(True, True)):
        h = h.detach().clone().requires_grad_(need[0])
        w = w.detach().clone().requires_grad_(need[1])
        out = fn(h, w, t)
        out.backward(grad.to(out.dtype))
        return out.detach(), h.grad, w.grad

    def logprob_case(dtype, n, v, d, tol, need=(True, True)):
        def check():
            args = inputs(n, v, d, dtype, seed=n + v)
            got = run_logprobs(fused_token_logprobs, *args, need=need)
            ref = run_logprobs(reference.token_logprobs, *[a.double() if a.is_floating_point() else a for a in args],
                               need=need)
            errs = [_rel(x, r) for x, r in zip(got, ref) if r is not None]
            _require(all(e < tol for e in errs), f"rel errors {errs} above {tol}")
            return f"rel errors {['%.1e' % e for e in errs]}"
        return check

    cuda = device.type == "cuda"
    n1, v1, d1 = (37, 1001, 72) if cuda else (21, 67, 20)                  # odd shapes
    n2, v2, d2 = (300, 5003, 136) if cuda else (33, 101, 24)
    n3, v3, d3 = (64, 999, 64) if cuda else (16, 45, 16)
    checks.run(f"token_logprobs float64 odd {n1}x{v1}x{d1}", logprob_case(torch.float64, n1, v1, d1, 1e-9))
    checks.run(f"token_logprobs float32 odd {n2}x{v2}x{d2}", logprob_case(torch.float32, n2, v2, d2, 1e-4))
    checks.run("token_logprobs float32 hidden-only grad", logprob_case(torch.float32, n3, v3, d3, 1e-4, (True, False)))
    checks.run("token_logprobs float32 weight-only grad", logprob_case(torch.float32, n3, v3, d3, 1e-4, (False, True)))
    checks.run("token_logprobs N=0", logprob_case(torch.float32, 0, v3, d3, 1.0))

    def bf16_case():
        if device.type != "cuda":
            return "skipped: the interpreter's bf16 tl.dot is wrong"
        h, w, t, grad = inputs(2048, 32768, 1024, torch.bfloat16, seed=5)
        truth = run_logprobs(reference.token_logprobs, h, w, t, grad)          # float32 from the bf16 inputs
        fused = run_logprobs(fused_token_logprobs, h, w, t, grad)
        eager = run_logprobs(lambda a, b, c: torch.log_softmax((a @ b.T).float(), -1).gather(1, c[:, None])[:, 0],
                             h, w, t, grad)
        fused_err = [_rel(x, r) for x, r in zip(fused, truth)]
        eager_err = [_rel(x, r) for x, r in zip(eager, truth)]
        _require(all(f <= e + 1e-2 for f, e in zip(fused_err, eager_err)),
                 f"fused bf16 errors {fused_err} worse than eager bf16 {eager_err}")
        return "rel err (out, dh, dw) fused " + " ".join("%.1e" % e for e in fused_err) + \
               " | eager bf16 " + " ".join("%.1e" % e for e in eager_err)
    checks.run("token_logprobs bf16 2048x32768x1024 vs float32 truth", bf16_case)

    def calm_case(dtype, mode, reduction, with_weight):
        def check():
            g = torch.Generator().manual_seed(3)
            n_s, n_t, chunks = (3001, 4003, 1500) if device.type == "cuda" else (301, 403, 150)
            s = (-torch.rand(n_s, generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
            t = (-torch.rand(n_t, generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
            sc = torch.randint(0, chunks - 5, (n_s,), generator=g).to(device)
            tc = torch.randint(3, chunks, (n_t,), generator=g).to(device)
            s[:7] = -150.0                                                  # some clamp-active chunks
            lam = torch.rand(chunks, generator=g, dtype=torch.float64).to(device, dtype) if mode == "tidal" else None
            weight = torch.rand(chunks, generator=g, dtype=torch.float64).to(device, dtype) if with_weight else None
            options = dict(num_chunks=chunks, reverse=mode == "reverse", temperature=2.0, lam=lam, weight=weight,
                           reduction=reduction)
            results = []
            for fn, cast in ((fused_calm_from_token_logprobs, dtype), (reference.calm_from_token_logprobs, None)):
                x = (s.double() if cast is None else s).clone().requires_grad_(True)
                opts = options if cast is not None else {k: (v.double() if isinstance(v, torch.Tensor) else v)
                                                         for k, v in options.items()}
                loss = fn(x, sc, t.double() if cast is None else t, tc, **opts)
                loss.backward(torch.tensor(0.7, dtype=loss.dtype, device=device))
                results.append((loss.detach(), x.grad))
            tol = 1e-9 if dtype == torch.float64 else 1e-4
            errs = [_rel(results[0][0], results[1][0]), _rel(results[0][1], results[1][1])]
            _require(all(e < tol for e in errs), f"rel errors {errs} above {tol}")
            _require(bool(torch.isfinite(results[0][1]).all()), "non-finite gradient")
            return f"rel errors {['%.1e' % e for e in errs]}"
        return check

    for dtype in (torch.float64, torch.float32):
        for mode in ("reverse", "forward", "tidal"):
            for reduction in ("mean", "sum"):
                checks.run(f"calm {mode} {reduction} {str(dtype)[6:]}",
                           calm_case(dtype, mode, reduction, with_weight=(mode == "tidal")))

    def split_check():
        masked = torch.rand(8, 8192, device=device) < 0.7
        ids = torch.randint(0, 1000, (8, 8192), device=device)
        chunks = (torch.arange(8192, device=device) // 3).expand(8, -1).contiguous()
        chunks[:, ::5] = -1
        a, b, p1, p2 = philox_split(masked, 0.5, 42, input_ids=ids, mask_token_id=7, chunk_ids=chunks)
        a2, _, _, _ = philox_split(masked, 0.5, 42, input_ids=ids, mask_token_id=7, chunk_ids=chunks)
        _require(not bool((a & b).any()) and bool(torch.equal(a | b, masked)), "not a partition of masked")
        _require(bool(torch.equal(a, a2)), "same seed, different split")
        _require(bool(torch.equal(p1, torch.where(b, 7, ids))) and bool(torch.equal(p2, torch.where(a, 7, ids))),
                 "teacher pass ids wrong")
        freq = float(a.sum() / masked.sum())
        _require(abs(freq - 0.5) < 0.02, f"frequency {freq}")
        same = chunks[:, 1:] == chunks[:, :-1]
        both_masked = masked[:, 1:] & masked[:, :-1] & same & (chunks[:, 1:] >= 0)
        _require(bool(torch.equal(a[:, 1:][both_masked], a[:, :-1][both_masked])), "chunk split inconsistent")
        gen = torch.Generator(device.type).manual_seed(1)
        out1 = compdemo.teacher_inputs(ids, masked, 7, chunk_ids=chunks, generator=gen)
        gen.manual_seed(1)
        out2 = compdemo.teacher_inputs(ids, masked, 7, chunk_ids=chunks, generator=gen)
        _require(bool(torch.equal(out1.mask_a, out2.mask_a)), "teacher_inputs not reproducible per seed")
        return f"frequency {freq:.4f}"
    checks.run("complementary split (Philox) properties", split_check)


# --------------------------------------------------------------------------- timing
def _timing(device, quick):
    import torch

    import tide
    from tide.kernels.token_logprob import fused_token_logprobs

    cuda = device.type == "cuda"
    if cuda:
        n, v_s, d_s, v_t, d_t, dtype, chunk_len = 10_000, 151_936, 1_024, 157_184, 2_048, torch.bfloat16, 3
        repeats = 3 if quick else 10
    else:
        n, v_s, d_s, v_t, d_t, dtype, chunk_len = 48, 300, 32, 331, 48, torch.float32, 3
        repeats = 1
    g = torch.Generator().manual_seed(0)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    s_hidden, s_weight = make(n, d_s), make(v_s, d_s, scale=2 / d_s ** 0.5)
    t_hidden, t_weight = make(n, d_t), make(v_t, d_t, scale=2 / d_t ** 0.5)
    s_targets = torch.randint(0, v_s, (n,), generator=g).to(device)
    t_targets = torch.randint(0, v_t, (n,), generator=g).to(device)
    num_chunks = n // chunk_len
    s_chunk = (torch.arange(n) // chunk_len).clamp(max=num_chunks - 1).to(device)
    t_chunk = (torch.arange(n) * num_chunks // n).to(device)        # a different tokenization of the same chunks
    grad = torch.randn(n, generator=g).to(device)
    s_hidden.requires_grad_(True)
    s_weight.requires_grad_(True)

    def eager_logprobs(h, w, t):
        return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])[:, 0]

    def chunked_logprobs(h, w, t):
        return tide.token_logprobs(h, w, t, impl="chunked")

    impls = {"triton": fused_token_logprobs, "eager": eager_logprobs, "chunked": chunked_logprobs}
    try:
        from cut_cross_entropy import linear_cross_entropy
        if cuda:
            impls["cce (peer)"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
    except Exception as error:                          # not installed, or no GPU build
        print(f"cut_cross_entropy unavailable: {type(error).__name__}: {error}", file=sys.stderr)

    rows = []

    def record(case, impl, fn, flops=None):
        try:
            row = dict(case=case, impl=impl, **time_step(fn, device, repeats))
            if flops:
                row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        except Exception as error:
            traceback.print_exc()
            row = dict(case=case, impl=impl, error=f"{type(error).__name__}: {error}"[:300])
        rows.append(row)
        print(row, file=sys.stderr)
        if cuda:
            torch.cuda.empty_cache()

    # student: forward + backward into hidden and weight
    case = f"token_logprobs fwd+bwd N={n} V={v_s} d={d_s} {str(dtype)[6:]}"
    def student(fn):
        out = fn(s_hidden, s_weight, s_targets)
        return torch.autograd.grad(out, [s_hidden, s_weight], grad.to(out.dtype))

    for impl, fn in impls.items():
        record(case, impl, lambda fn=fn: student(fn), flops=6 * n * v_s * d_s)
    if cuda and not quick:                  # tiling alternatives, for tuning the default
        from tide.kernels.token_logprob import TokenLogprobConfig
        for tiles, config in (("64x128x64 w4", TokenLogprobConfig(block_n=64, block_v=128, block_d=64, num_warps=4)),
                              ("128x256x64 w8", TokenLogprobConfig(block_n=128, block_v=256, block_d=64,
                                                                   num_warps=8, num_stages=2))):
            fn = lambda h, w, t, config=config: fused_token_logprobs(h, w, t, config=config)   # noqa: E731
            record(case, f"triton {tiles}", lambda fn=fn: student(fn), flops=6 * n * v_s * d_s)
    # teacher: forward only, no grad
    case = f"token_logprobs fwd no-grad N={n} V={v_t} d={d_t} {str(dtype)[6:]}"
    for impl, fn in impls.items():
        def teacher(fn=fn):
            with torch.no_grad():
                return fn(t_hidden, t_weight, t_targets)
        record(case, impl, teacher, flops=2 * n * v_t * d_t)
    # Reverse CALM end to end
    case = f"reverse CALM end to end N_s=N_t={n} chunks={num_chunks}"
    for impl, name in (("triton", "triton"), ("reference", "eager"), ("chunked", "chunked")):
        def calm(impl=impl):
            loss = tide.calm_loss(s_hidden, s_weight, s_targets, s_chunk, t_hidden, t_weight, t_targets, t_chunk,
                                  num_chunks=num_chunks, reverse=True, impl=impl)
            return torch.autograd.grad(loss, [s_hidden, s_weight])
        record(case, name, calm)
    return rows


def _goals(rows):
    goals = {}
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["impl"]] = row
    for case, impls in by_case.items():
        fused, eager = impls.get("triton"), impls.get("eager")
        if not fused or not eager or "ms" not in fused or "ms" not in eager:
            continue
        speedup = eager["ms"] / fused["ms"]
        goal = dict(speedup=speedup, faster_2x=speedup >= 2.0)
        if fused.get("peak_mb") is not None and eager.get("peak_mb"):
            goal["memory_ratio"] = fused["peak_mb"] / eager["peak_mb"]
            goal["memory_tenth"] = goal["memory_ratio"] <= 0.1
        goals[case] = goal
    return goals


def _markdown(device_name, correctness, rows, goals):
    lines = [f"### Cross-tokenizer kernels on {device_name}", "",
             "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |" for c in correctness]
    lines += ["", "| case | impl | ms (median) | p20-p80 | peak MB | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | error: {r['error']} | | | |")
            continue
        peak = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        tflops = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.2f} | {r['ms_p20']:.2f}-{r['ms_p80']:.2f} | "
                     f"{peak} | {tflops} |")
    lines += ["", "| case | speed-up vs eager (goal >= 2) | peak memory / eager (goal <= 0.1) |", "|---|---|---|"]
    for case, g in goals.items():
        ratio = f"{g['memory_ratio']:.3f}" if "memory_ratio" in g else "-"
        lines.append(f"| {case} | {g['speedup']:.2f} | {ratio} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points
def run_calm_checks(device="cuda", quick=False):
    """Correctness of the compiled kernels, then timing; returns a dict (see the module docstring)."""
    import torch
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("device cpu needs TRITON_INTERPRET=1 set before triton is imported")
    checks = _Checks()
    _correctness(device, checks)
    try:
        rows = _timing(device, quick)
    except Exception as error:
        traceback.print_exc()
        rows = [dict(case="timing", impl="-", error=f"{type(error).__name__}: {error}"[:300])]
    goals = _goals(rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1, toy shapes)"
    return dict(device=name, correctness=checks.rows, timing=rows, goals=goals,
                markdown=_markdown(name, checks.rows, rows, goals))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    parser.add_argument("--json", help="write the result dict to this file")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before anything imports triton kernels
    result = run_calm_checks(args.device, args.quick)
    print(result["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(c["ok"] for c in result["correctness"]) and \
        not any("error" in r for r in result["timing"]) else 1


if __name__ == "__main__":
    sys.exit(main())

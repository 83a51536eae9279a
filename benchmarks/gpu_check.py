"""GPU check of the Triton kernels: correctness at realistic shapes, then speed and memory.

    python -m benchmarks.gpu_check --only tidal [--json FILE]   # one H200: under 8 minutes
    python -m benchmarks.gpu_check --dry-run                    # CPU, TRITON_INTERPRET=1, tiny shapes
    python -m benchmarks.gpu_check --compile-only               # CPU: compile every kernel for sm_90a

Never a test dependency. `--dry-run` runs every code path of this script (argument
parsing, checks, timing, tables, goals, JSON) on tiny shapes on CPU under the
Triton interpreter, so the script is known not to crash on trivial errors before a
GPU is lent.

`--compile-only` compiles the kernels ahead of time for an H100/H200 (sm_90a) with the
ptxas that ships with Triton, no GPU needed, as a real launch would specialise them
(unit strides, 16-divisible pointers and strides), and prints registers, spills and
shared memory: compile errors that the interpreter cannot see show up here.

Checks are pluggable: this file registers "tidal" (tide.kernels.tidal, both
strategies) and "calm" (token_logprob / calm / complementary_split, through
benchmarks/gpu_check_calm.py's `run_calm_checks`); any module named in PLUGINS that
imports cleanly contributes its own `CHECKS = {"name": fn}`, each `fn(ctx: Context)`
using ctx.timed / ctx.check / ctx.table below, and optionally `COMPILE_CHECKS =
{"name": fn()}` using `aot_compile`. `--only all` runs every registered check; on a
15-minute device budget run `--only tidal` and `--only calm` as two calls.

"tidal" does:
1. correctness of impl="triton" and impl="triton_stream" against the chunked PyTorch
   path in float32 on the same (bf16-exact) values: TIDAL + weighted CE, reverse KL + CE
   ("sum"), forward KL alone; bf16 and fp32 inputs; V_s != V_t; N not a multiple of any
   block, and one run with a small workspace so that chunks are ragged.
2. the benchmark of the issue: N=8192, V=151,936, d_s=1024, d_t=4096, bf16, TIDAL + CE,
   forward + backward: median ms (20/80 quantiles) and peak extra memory of reference,
   chunked, triton, triton_stream and Liger-Kernel's LigerFusedLinearJSDLoss (beta=0:
   forward KL, plus its hard-label CE) when it is installed; the floor F / (bf16 cuBLAS
   rate), F = 2 N V (3 d_s + d_t), measured as the time of those four GEMMs in cuBLAS.
3. the goals of the issue, each PASS / MISS.
Inputs have a realistic logit scale: weights scaled by 2 / sqrt(d), logits std ~2.
"""
from __future__ import annotations

import sys
import os

if "--dry-run" in sys.argv:                          # before triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmarks.timing import time_step  # noqa: E402

PLUGINS = ()             # optional further modules exposing CHECKS = {name: fn(ctx)} / COMPILE_CHECKS


# --------------------------------------------------------------------------- harness
class Context:
    """What a check gets: the arguments, the device, timing, assertions and tables."""

    def __init__(self, args):
        self.args = args
        self.dry_run = args.dry_run
        self.device = torch.device(args.device)
        self.started = time.perf_counter()
        self.failures: list[str] = []
        self.tables: dict[str, list[dict]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check(self, name: str, ok: bool, detail: str = ""):
        print(f"  [{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)
        if not ok:
            self.failures.append(f"{name} {detail}")

    def table(self, title: str, row: dict):
        self.tables.setdefault(title, []).append(row)

    def timed(self, step, repeats: int | None = None, warmup: int = 1) -> dict:
        """Median / 20% / 80% milliseconds of `step()` and its peak extra memory (MB, CUDA only)."""
        result = time_step(step, self.device, repeats or self.args.repeats, warmup)
        if result["peak_mb"] is None:
            result["peak_mb"] = float("nan")              # the tables print n/a
        return result


def machine_info(device: torch.device) -> dict:
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:                                # noqa: BLE001 (informational only)
        commit = "unknown"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "commit": commit, "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v):
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tidal
def _distill_inputs(n, v_s, v_t, d_s, d_t, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    sh, sw = rnd(n, d_s), rnd(v_s, d_s, scale=2 / d_s ** 0.5)
    th, tw = rnd(n, d_t), rnd(v_t, d_t, scale=2 / d_t ** 0.5)
    t = torch.rand(n, generator=g).to(device)
    if n >= 2:
        t[0], t[1] = 0.0, 1.0
    targets = torch.randint(0, v_s, (n,), generator=g).to(device)
    ce_weight = (torch.rand(n, generator=g) * 2).to(device)
    return sh, sw, th, tw, t, targets, ce_weight


def _grads(fn, sh, sw, grad_outputs):
    a, b = sh.detach().clone().requires_grad_(True), sw.detach().clone().requires_grad_(True)
    out = fn(a, b)
    outs = tuple(o for o in out if o is not None) if isinstance(out, tuple) else (out,)   # DistillOutput
    sum((o * g).sum() for o, g in zip(outs, grad_outputs)).backward()      # per-row outputs for "none"
    return [o.detach().double() for o in outs], [a.grad.double(), b.grad.double()]


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def tidal_correctness(ctx: Context):
    import tide
    if ctx.dry_run:
        shapes = dict(n=37, v_s=301, v_t=283, shared=257, d_s=24, d_t=40)
    else:
        shapes = dict(n=1031, v_s=50280, v_t=50304, shared=50257, d_s=1024, d_t=2048)
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.bfloat16, torch.float32):
        sh, sw, th, tw, t, targets, ce_weight = _distill_inputs(
            shapes["n"], shapes["v_s"], shapes["v_t"], shapes["d_s"], shapes["d_t"], dtype, ctx.device)
        cases = {
            "tidal+ce mean": lambda impl: (lambda a, b: tide.tidal_loss(
                a, b, th, tw, t, 0.4, shared_vocab=shapes["shared"], targets=targets, ce_weight=ce_weight,
                impl=impl)),
            "reverse kl+ce sum": lambda impl: (lambda a, b: tide.kl_loss(
                a, b, th, tw, reverse=True, shared_vocab=shapes["shared"], targets=targets, reduction="sum",
                impl=impl)),
            "forward kl": lambda impl: (lambda a, b: tide.kl_loss(
                a, b, th, tw, shared_vocab=shapes["shared"], impl=impl)),
            "tidal+ce none softcap+bias": lambda impl: (lambda a, b: tide.tidal_loss(
                a, b, th, tw, t, 0.4, shared_vocab=shapes["shared"], targets=targets, student_softcap=30.0,
                teacher_softcap=20.0, student_bias=0.1 * torch.ones_like(b[:, 0]), reduction="none", impl=impl)),
        }
        loss_tol, grad_tol = (2e-4, 2e-2) if dtype == torch.bfloat16 else (2e-5, 1e-4)
        for name, make in cases.items():
            gos = (torch.tensor(0.7, device=ctx.device), torch.tensor(1.3, device=ctx.device))
            # ground: the chunked PyTorch path in float32 on the same (exactly upcast) values
            want = _grads(make("chunked"), sh.float(), sw.float(), gos)
            for impl in ("triton", "triton_stream"):
                got = _grads(make(impl), sh, sw, gos)
                loss_err = max(_rel(g, w) for g, w in zip(got[0], want[0]))
                grad_err = max(_rel(g, w) for g, w in zip(got[1], want[1]))
                ok = loss_err <= loss_tol and grad_err <= grad_tol
                ctx.check(f"{impl} {name} {str(dtype)[6:]}", ok,
                          f"loss rel err {loss_err:.2e} (tol {loss_tol}), grad rel err {grad_err:.2e} (tol {grad_tol})")
                ctx.table("tidal correctness", {"impl": impl, "case": name, "dtype": str(dtype)[6:],
                                                "loss_rel_err": loss_err, "grad_rel_err": grad_err, "ok": ok})
    # ragged chunks: a small workspace so that N is split into several chunks, the last one short
    sh, sw, th, tw, t, targets, ce_weight = _distill_inputs(
        shapes["n"], shapes["v_s"], shapes["v_t"], shapes["d_s"], shapes["d_t"], torch.bfloat16, ctx.device)
    old = os.environ.get("TIDE_WORKSPACE_BYTES")
    os.environ["TIDE_WORKSPACE_BYTES"] = str(2 * 4 * shapes["v_s"] * (7 if ctx.dry_run else 166))
    try:
        fn = lambda impl: (lambda a, b: tide.tidal_loss(a, b, th, tw, t, 0.9, shared_vocab=shapes["shared"],  # noqa: E731
                                                        targets=targets, impl=impl))
        gos = (torch.tensor(1.0, device=ctx.device), torch.tensor(1.0, device=ctx.device))
        want = _grads(fn("chunked"), sh.float(), sw.float(), gos)
        got = _grads(fn("triton"), sh, sw, gos)
        loss_err = max(_rel(g, w) for g, w in zip(got[0], want[0]))
        grad_err = max(_rel(g, w) for g, w in zip(got[1], want[1]))
        ctx.check("triton ragged chunks bf16", loss_err <= 2e-4 and grad_err <= 2e-2,
                  f"loss rel err {loss_err:.2e}, grad rel err {grad_err:.2e}")
    finally:
        if old is None:
            os.environ.pop("TIDE_WORKSPACE_BYTES", None)
        else:
            os.environ["TIDE_WORKSPACE_BYTES"] = old


def _liger_step(sh, sw, th, tw, targets, temperature):
    """Liger's fused linear JSD at beta=0 (forward KL) with its hard-label CE: the nearest same work."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as exc:                         # noqa: BLE001
        return None, f"liger-kernel not importable ({type(exc).__name__})"
    import inspect
    params = inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters
    options = {"beta": 0.0, "weight_hard_loss": 1.0, "weight_soft_loss": 1.0, "temperature": temperature}
    loss_fn = LigerFusedLinearJSDLoss(**{k: v for k, v in options.items() if k in params})

    def step():
        loss = loss_fn(sh, sw, th, tw, targets)
        loss.backward()
        sh.grad = sw.grad = None
    return step, "LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=1, weight_soft_loss=1)"


def tidal_benchmark(ctx: Context):
    import tide
    if ctx.dry_run:
        n, v, d_s, d_t = 64, 512, 32, 64
    else:
        n, v, d_s, d_t = ctx.args.rows, ctx.args.vocab, ctx.args.d_s, ctx.args.d_t
    sh, sw, th, tw, t, targets, _ = _distill_inputs(n, v, v, d_s, d_t, torch.bfloat16, ctx.device)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    flops = 2 * n * v * (3 * d_s + d_t)
    title = f"tidal+ce fwd+bwd N={n} V={v} d_s={d_s} d_t={d_t} bf16"

    def gemm_floor():                                # the four GEMMs of F, in cuBLAS, bf16
        with torch.no_grad():
            s = sh @ sw.T
            th @ tw.T
            s @ sw
            s.T @ sh

    floor = ctx.timed(gemm_floor)
    floor_ms = floor["ms"]
    ctx.table(title, {"impl": "floor: F / cuBLAS bf16 GEMM rate", "ms": floor_ms, "ms_p20": floor["ms_p20"],
                      "ms_p80": floor["ms_p80"], "peak_mb": float("nan"),
                      "TFLOP/s": flops / floor_ms / 1e9, "x_floor": 1.0})
    print(f"  floor: F = {flops / 1e12:.2f} TFLOP in {floor_ms:.2f} ms ({flops / floor_ms / 1e9:.0f} TFLOP/s)",
          flush=True)

    def impl_step(impl, env=None):
        def step():
            saved = {k: os.environ.get(k) for k in (env or {})}
            os.environ.update(env or {})
            try:
                distill, ce = tide.tidal_loss(sh, sw, th, tw, t, 0.37, targets=targets, impl=impl)
                (distill + ce).backward()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            sh.grad = sw.grad = None
        return step

    steps = {impl: impl_step(impl) for impl in ("reference", "chunked", "triton", "triton_stream")}
    # the memory / time trade of the chunk workspace (default budget: min(1 GiB, free / 4))
    small = str(1 << 16) if ctx.dry_run else str(256 << 20)
    steps["triton ws=256MiB"] = impl_step("triton", {"TIDE_WORKSPACE_BYTES": small})
    if ctx.args.autotune:
        steps["triton autotuned"] = impl_step("triton", {"TIDE_AUTOTUNE": "1"})
    liger, liger_note = _liger_step(sh, sw, th, tw, targets, 2.0) if ctx.device.type == "cuda" else (
        None, "CUDA only")
    if liger is not None:
        steps["liger"] = liger
    print(f"  liger: {liger_note}", flush=True)
    results = {}
    old = os.environ.get("TIDE_CHUNK_BYTES")
    os.environ["TIDE_CHUNK_BYTES"] = str(1 << 30 if not ctx.dry_run else 1 << 16)   # chunked at its best budget
    try:
        for impl, step in steps.items():
            if ctx.out_of_time():
                print(f"  {impl}: skipped, time budget of {ctx.args.budget_s}s spent", flush=True)
                continue
            try:
                r = ctx.timed(step)
            except Exception as exc:                 # noqa: BLE001 (OOM, a peer's API drift: record, go on)
                note = "OOM" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"[:200]
                print(f"  {impl}: {note}", flush=True)
                ctx.table(title, {"impl": impl, "ms": float("nan"), "peak_mb": float("nan"), "note": note})
                if impl in ("triton", "triton_stream"):
                    ctx.failures.append(f"{impl} benchmark: {note}")
                sh.grad = sw.grad = None
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results[impl] = r
            ctx.table(title, {"impl": impl, **r, "TFLOP/s": flops / r["ms"] / 1e9, "x_floor": r["ms"] / floor_ms})
            print(f"  {impl}: {r['ms']:.2f} ms, peak {r['peak_mb']:.0f} MB", flush=True)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if old is None:
            os.environ.pop("TIDE_CHUNK_BYTES", None)
        else:
            os.environ["TIDE_CHUNK_BYTES"] = old

    def _fmt(r):
        return "n/a" if r is None else f"{r:.3g}"

    def goal(name, ok):
        status = "n/a" if ok is None else ("PASS" if ok else "MISS")
        ctx.table("tidal goals", {"goal": name, "status": status})
        print(f"  goal {name}: {status}", flush=True)

    def ratio(a, b, key="ms"):
        if a in results and b in results and results[b][key] == results[b][key] and results[b][key] > 0:
            return results[a][key] / results[b][key]
        return None

    r = ratio("reference", "triton")
    goal(f"triton >= 3x faster than eager ({_fmt(r)}x)", None if r is None else r >= 3)
    r = ratio("liger", "triton")
    goal(f"triton >= 1.5x faster than Liger ({_fmt(r)}x)", None if r is None else r >= 1.5)
    cuda = ctx.device.type == "cuda"
    r = ratio("triton", "reference", "peak_mb") if cuda else None
    goal(f"triton peak <= eager / 20 ({_fmt(r)})", None if r is None else r <= 1 / 20)
    r = results["triton"]["ms"] / floor_ms if "triton" in results else None
    goal(f"triton time <= 1.5x floor ({_fmt(r)}x)", None if r is None else r <= 1.5)
    r = ratio("triton_stream", "reference", "peak_mb") if cuda else None
    goal(f"triton_stream peak <= eager / 100 ({_fmt(r)})", None if r is None else r <= 1 / 100)


def check_tidal(ctx: Context):
    print("tidal: correctness", flush=True)
    tidal_correctness(ctx)
    print("tidal: benchmark", flush=True)
    tidal_benchmark(ctx)


# --------------------------------------------------------------------------- ahead-of-time compile
UNIT_STRIDES = ("stride_ak", "stride_bn", "stride_cn", "stride_shk", "stride_swk", "stride_thk", "stride_twk")


def aot_compile(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90,
                unit_strides=UNIT_STRIDES) -> dict:
    """Compile a @triton.jit kernel for `arch` without a GPU; returns shared bytes, registers, spills.

    `signature`: {arg: "*bf16" | "i32" | "fp32" ...} for the runtime arguments; `constexprs`: values of
    the constexpr ones. Pointers, strides and M/N sizes are marked 16-divisible and the arguments
    named in unit_strides are specialised to 1, as a real launch does on contiguous tensors.
    """
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = kernel
    while not isinstance(jit, JITFunction):            # heuristics / autotune wrappers
        jit = jit.fn
    names = jit.arg_names
    consts = dict(constexprs)
    consts.update({n: 1 for n in names if n in unit_strides and n not in consts})
    sig = {n: ("constexpr" if n in consts else signature[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in consts and (signature[n].startswith("*") or n.startswith("stride") or n in ("M", "N"))}
    src = ASTSource(fn=jit, signature=sig, attrs=attrs, constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    info = {"kernel": jit.__name__, "shared_bytes": compiled.metadata.shared, "registers": None, "spill_bytes": None}
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(ptxas):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        for line in out.splitlines():
            if "Used" in line and "registers" in line:
                info["registers"] = int(line.split("Used")[1].split("registers")[0])
            if "spill stores" in line:
                info["spill_bytes"] = int(line.split("bytes spill stores")[0].split(",")[-1])
    return info


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compile_tidal() -> list[dict]:
    """Every Triton kernel of tide.kernels.tidal, in the configs a bf16 / fp32 H100-H200 run launches."""
    from tide.kernels import tidal
    out = []
    mm_sig = dict(A="*bf16", B="*bf16", C="*fp32", M="i32", N="i32", stride_am="i32", stride_ak="i32",
                  stride_bk="i32", stride_bn="i32", stride_cs="i32", stride_cm="i32", stride_cn="i32")
    for a_ty, b_ty in (("bf16", "bf16"), ("fp32", "bf16"), ("fp32", "fp32")):
        for accumulate in (False, True):
            bm, bn, bk, warps, stages = tidal._matmul_config(4 if b_ty == "fp32" else 2, accumulate)
            info = aot_compile(tidal._matmul_kernel, dict(mm_sig, A="*" + a_ty, B="*" + b_ty),
                               dict(K=1024, K_SPLIT=1024, ACCUMULATE=accumulate, IEEE=b_ty == "fp32",
                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), warps, stages)
            out.append({**info, "config": f"{a_ty}x{b_ty} acc={accumulate}"})
    rows_sig = dict(S="*fp32", U="*fp32", lam_ptr="*fp32", w_ptr="*fp32", tgt_ptr="*i64", cw_ptr="*fp32",
                    distill_ptr="*fp32", ce_ptr="*fp32", sb_ptr="*fp32", tb_ptr="*fp32", R="i32", stride_s="i32",
                    stride_u="i32", T="fp32", inv_T="fp32", cap_s="fp32", inv_cap_s="fp32", cap_t="fp32",
                    inv_cap_t="fp32")
    block_r, block_v, warps = tidal._row_kernel_config(151936)
    for reverse in (False, True):
        for targets in (False, True):
            for extras in (False, True):                 # biases + softcaps on both sides
                flags = dict(HAS_SB=extras, HAS_TB=extras, HAS_SCAP=extras, HAS_TCAP=extras)
                info = aot_compile(tidal._chunk_rows_kernel, rows_sig,
                                   dict(V=151936, V_s=151936 if targets else 0, REVERSE=reverse, NEED_GRAD=True,
                                        HAS_TARGETS=targets, BLOCK_R=block_r, BLOCK_V=block_v, **flags), warps, 1)
                out.append({**info, "config": f"reverse={reverse} targets={targets} bias+softcap={extras}"})
    stream_sig = dict(SH="*bf16", SW="*bf16", TH="*bf16", TW="*bf16", lam_ptr="*fp32", tgt_ptr="*i64",
                      SB="*fp32", TB="*fp32", part_ptr="*fp32", stats_ptr="*fp32", coef_d_ptr="*fp32",
                      coef_c_ptr="*fp32", DH="*fp32", DW="*fp32", DB="*fp32", N="i32", SPLIT_SHARED="i32",
                      col_offset="i32",
                      stride_shn="i32", stride_shk="i32", stride_swv="i32", stride_swk="i32", stride_thn="i32",
                      stride_thk="i32", stride_twv="i32", stride_twk="i32", stride_dhn="i32", stride_dwv="i32",
                      inv_T="fp32", cap_s="fp32", inv_cap_s="fp32", cap_t="fp32", inv_cap_t="fp32")
    vocab, d_s, d_t = 151936, 1024, 4096
    for dtype, elem in (("bf16", 2), ("fp32", 4)):
        sig = {k: ("*" + dtype if k in ("SH", "SW", "TH", "TW") else v) for k, v in stream_sig.items()}
        bm, bv, bk, warps, stages = tidal._stream_config(elem)
        fwd_tiles, _ = tidal._stream_tiles(triton_cdiv(vocab, bv))
        slab = tidal.stream_slab_rows(vocab, d_s, 4, bv)
        bwd_tiles, splits = tidal._stream_tiles(triton_cdiv(slab, bv))
        for reverse in (False, True):
            extras = reverse                             # biases + softcaps (+ d bias) with reverse KL
            meta = dict(d_s=d_s, d_t=d_t, REVERSE=reverse, HAS_TARGETS=True, IEEE=dtype == "fp32",
                        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, HAS_SB=extras, HAS_TB=extras, HAS_SCAP=extras,
                        HAS_TCAP=extras)
            info = aot_compile(tidal._stream_fwd_kernel, sig, dict(meta, V=vocab, V_s=vocab, TILES=fwd_tiles),
                               warps, stages)
            out.append({**info, "config": f"{dtype} reverse={reverse}"})
            for shared in (True, False):
                info = aot_compile(tidal._stream_bwd_kernel, sig,
                                   dict(meta, V_SLAB=slab, SHARED=shared, NEED_DH=True, NEED_DW=True,
                                        NEED_DB=extras, DH_ATOMIC=splits > 1, TILES=bwd_tiles), warps, stages)
                out.append({**info, "config": f"{dtype} reverse={reverse} shared={shared}"})
    return out


def check_calm(ctx: Context):
    """token_logprob / calm / complementary_split: benchmarks/gpu_check_calm.py's run_calm_checks."""
    try:
        from benchmarks.gpu_check_calm import run_calm_checks
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks.gpu_check_calm":
            raise
        print("calm: benchmarks/gpu_check_calm.py is not present; skipped", flush=True)
        return
    print("calm: correctness and timing (benchmarks/gpu_check_calm.py)", flush=True)
    result = run_calm_checks(str(ctx.device), quick=ctx.dry_run)
    print(result["markdown"], flush=True)
    for row in result["correctness"]:
        ctx.table("calm correctness", row)
        if not row.get("ok", False):
            ctx.failures.append(f"calm {row}")
    for row in result["timing"]:
        ctx.table("calm timing", row)
        if "error" in row:
            ctx.failures.append(f"calm timing {row['error']}")


CHECKS = {"tidal": check_tidal, "calm": check_calm}
def compile_token_logprob() -> list[dict]:
    """The token log-prob kernels (bf16, the default H100/H200 config), plain and with bias + softcap."""
    from tide.kernels import token_logprob
    config = token_logprob.default_config(torch.device("cuda"), torch.bfloat16)
    fwd_sig = dict(hidden_ptr="*bf16", weight_ptr="*bf16", targets_ptr="*i64", bias_ptr="*fp32", max_ptr="*fp32",
                   sum_ptr="*fp32", target_logit_ptr="*fp32", N="i32", V="i32", stride_hn="i32", stride_hd="i32",
                   stride_wv="i32", stride_wd="i32", cap="fp32", inv_cap="fp32")
    bwd_sig = dict(hidden_ptr="*bf16", weight_ptr="*bf16", targets_ptr="*i64", lse_ptr="*fp32",
                   grad_out_ptr="*fp32", grad_hidden_ptr="*fp32", grad_weight_ptr="*fp32", bias_ptr="*fp32",
                   grad_bias_ptr="*fp32", N="i32", V="i32", stride_hn="i32", stride_hd="i32", stride_wv="i32",
                   stride_wd="i32", cap="fp32", inv_cap="fp32")
    meta = dict(D=1024, BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
                ACC_DTYPE=tl_float32(), DOT_PRECISION="tf32")
    out = []
    for extras in (False, True):
        flags = dict(HAS_BIAS=extras, HAS_CAP=extras)
        info = aot_compile(token_logprob._token_logprob_fwd_kernel, fwd_sig, dict(meta, V_SPLIT=8192, **flags),
                           config.num_warps, config.num_stages)
        out.append({**info, "config": f"bias+softcap={extras}"})
        info = aot_compile(token_logprob._token_logprob_bwd_kernel, bwd_sig,
                           dict(meta, GROUP_N=config.group_n, HAS_GRAD_HIDDEN=True, HAS_GRAD_WEIGHT=True,
                                HAS_GRAD_BIAS=extras, **flags), config.num_warps, config.num_stages)
        out.append({**info, "config": f"bias+softcap={extras}"})
    return out


def tl_float32():
    import triton.language as tl
    return tl.float32


COMPILE_CHECKS = {"tidal": compile_tidal, "token_logprob": compile_token_logprob}


def registered_checks(attribute: str = "CHECKS") -> dict:
    checks = dict(globals()[attribute])
    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            print(f"(plugin {name} not present: its checks are not registered)", flush=True)
            continue
        checks.update(getattr(module, attribute, {}))
    return checks


def compile_only(args) -> int:
    """Ahead-of-time compile for sm_90a of every registered kernel set; fails on any compile error."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("--compile-only needs TRITON_INTERPRET unset (the interpreter replaces @triton.jit)",
              file=sys.stderr)
        return 2
    checks = registered_checks("COMPILE_CHECKS")
    names = list(checks) if args.only == "all" else [args.only]
    rows = []                                          # a compile error raises: non-zero exit
    for name in names:
        if name not in checks:
            print(f"(no compile check for {name!r})")
            continue
        for row in checks[name]():
            rows.append({"check": name, **row})
    for row in rows:
        if row.get("spill_bytes"):
            print(f"note: {row['kernel']} {row['config']} spills {row['spill_bytes']} bytes")
    print(markdown(rows))
    return 0


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="all", help="a registered check (tidal, calm, ...) or 'all'")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--compile-only", dest="compile_only", action="store_true",
                   help="compile the kernels for sm_90a on this machine (no GPU needed) and stop")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1: exercises the script, measures nothing")
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--d-s", dest="d_s", type=int, default=1024)
    p.add_argument("--d-t", dest="d_t", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", dest="budget_s", type=float, default=420.0,
                   help="skip the remaining timings after this many seconds")
    p.add_argument("--autotune", action="store_true",
                   help="also time impl='triton' with TIDE_AUTOTUNE=1 (GEMM block sizes autotuned)")
    p.add_argument("--json", default=None, help="write machine info, tables and failures here")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if args.dry_run:
        args.repeats = min(args.repeats, 2)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" and not args.compile_only:
        p.error("--device cpu needs --dry-run (TRITON_INTERPRET=1): the Triton impls need CUDA otherwise")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        return compile_only(args)
    checks = registered_checks()
    names = list(checks) if args.only == "all" else [args.only]
    unknown = [n for n in names if n not in checks]
    if unknown:
        print(f"unknown check {unknown[0]!r}; registered: {sorted(checks)}", file=sys.stderr)
        return 2
    ctx = Context(args)
    info = machine_info(ctx.device)
    print(json.dumps(info), flush=True)
    for name in names:
        checks[name](ctx)
    for title, rows in ctx.tables.items():
        print(f"\n### {title}\n\n{markdown(rows)}")
    print(f"\n{len(ctx.failures)} failures; {ctx.elapsed():.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "tables": ctx.tables, "failures": ctx.failures}, f, indent=1, default=str)
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())

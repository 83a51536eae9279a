"""Fused Triton TIDAL / KL (+ CE), both strategies, under TRITON_INTERPRET=1 on CPU.

Ground truth: tide.reference.distill_loss (eager, autograd) in float64, where the
interpreter runs tl.dot in float64 too, so the kernels must agree to ~1e-9 relative.
Plus float32, bf16 and fp16 cases against the float32 reference with dtype-sized
tolerances, the public functions (every option) against impl="reference", and a
check that no tensor of [N, V] size is ever created by the Triton paths.

Ragged everywhere: V_s = 301, V_t = 283, shared 257 (no block size divides them),
N = 37 with a workspace of 5 rows (the chunk size does not divide N).
"""
import os

import pytest
import torch
from allocations import LargestTensor

# Without a GPU the kernels run under TRITON_INTERPRET=1, set in conftest.py before any import.
pytest.importorskip("triton")
import tide  # noqa: E402
from tide import reference, schedules  # noqa: E402
from tide.kernels import tidal  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STRATEGIES = ("chunked", "stream")


def workspace_for(rows, width, elem_bytes):
    """Byte budget that gives `rows` rows per chunk for a workspace of this width."""
    return 2 * width * elem_bytes * rows


def make_inputs(num_rows=37, student_vocab=301, teacher_vocab=283, d_s=24, d_t=40,
                dtype=torch.float64, seed=0):
    """Realistic logit scale: weights scaled by 2 / sqrt(d), so logits have std ~2."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    sh = torch.randn(num_rows, d_s, generator=g, dtype=f64)
    sw = torch.randn(student_vocab, d_s, generator=g, dtype=f64) * 2 / d_s ** 0.5
    th = torch.randn(num_rows, d_t, generator=g, dtype=f64)
    tw = torch.randn(teacher_vocab, d_t, generator=g, dtype=f64) * 2 / d_t ** 0.5
    t = torch.rand(num_rows, generator=g, dtype=f64)
    if num_rows >= 3:
        t[0], t[1] = 0.0, 1.0                              # the ends: t = 0 and t = 1 (all masked)
    targets = torch.randint(0, student_vocab, (num_rows,), generator=g)
    ce_weight = torch.rand(num_rows, generator=g, dtype=f64) * 3
    if num_rows >= 4:
        ce_weight[2] = 0.0                                 # a row that takes no CE
    to = dict(device=DEVICE, dtype=dtype)
    return (sh.to(**to), sw.to(**to), th.to(**to), tw.to(**to), t.to(DEVICE), targets.to(DEVICE),
            ce_weight.to(DEVICE))


def run(fn, tensors, grad_outputs, requires):
    """Loss value(s) and gradients of student_hidden / student_weight (None where not required)."""
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip(tensors[:2], requires)]
    out = fn(*leaves, *tensors[2:])
    outs = tuple(o for o in out if o is not None) if isinstance(out, tuple) else (out,)
    wanted = [x for x in leaves if x.requires_grad]
    grads = [None, None]
    if wanted:
        total = sum(o * g for o, g in zip(outs, grad_outputs))
        got = iter(torch.autograd.grad(total, wanted))
        grads = [next(got) if x.requires_grad else None for x in leaves]
    return [o.detach() for o in outs], grads


def assert_close(got, want, rtol, what):
    if want is None:
        assert got is None, what
        return
    assert got is not None, what
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    if want.numel() == 0:
        return
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def compare(strategy, *, num_rows=37, chunk_rows=5, dtype=torch.float64, rtol=1e-9, reverse=False,
            with_targets=True, with_ce_weight=True, shared=(301, 283, 257), reduction="mean",
            requires=(True, True), progress=0.6, grad_outputs=(0.7, -1.3), seed=0):
    student_vocab, teacher_vocab, vocab = shared
    sh, sw, th, tw, t, targets, ce_weight = make_inputs(num_rows, student_vocab, teacher_vocab, dtype=dtype,
                                                        seed=seed)
    lam = schedules.row_lambda(t, progress)
    w = schedules.timestep_weight(t)
    if reverse:
        lam, w = torch.ones_like(lam), torch.ones_like(w)
    targets = targets if with_targets else None
    ce_weight = ce_weight.to(dtype) if with_targets and with_ce_weight else None
    kwargs = dict(temperature=2.0, shared_vocab=vocab, reverse=reverse, reduction=reduction)
    width = student_vocab if with_targets else vocab
    elem = 8 if dtype == torch.float64 else 4
    budget = workspace_for(chunk_rows, width, elem)
    rest = (th, tw, lam, w, targets, ce_weight)

    def fused(a, b, *others):
        return tidal.fused_distill_loss(a, b, *others, **kwargs, stream=(strategy == "stream"),
                                        workspace_bytes=budget)

    def eager(a, b, *others):                       # bf16 / fp32 inputs: computes in fp32 itself
        return reference.distill_loss(a, b, *others, **kwargs)

    n_out = 2 if with_targets else 1
    gos = tuple(torch.tensor(g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                for g in grad_outputs[:n_out])
    got_out, got_grads = run(fused, (sh, sw) + rest, gos, requires)
    want_out, want_grads = run(eager, (sh, sw) + rest, gos, requires)
    assert len(got_out) == len(want_out) == n_out
    for i, (g, r) in enumerate(zip(got_out, want_out)):
        assert g.dtype == r.dtype, (g.dtype, r.dtype)
        assert_close(g, r, rtol, f"loss output {i}")
    grad_rtol = rtol if dtype not in (torch.bfloat16, torch.float16) else 3e-2   # logit gradient rounded for the dot
    assert_close(got_grads[0], want_grads[0], grad_rtol, "d student_hidden")
    assert_close(got_grads[1], want_grads[1], grad_rtol, "d student_weight")
    return got_out, got_grads


# ----------------------------------------------------------------------------- float64, every branch
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", [
    dict(),                                                             # TIDAL + weighted CE, V_s != V_t, mean
    dict(with_ce_weight=False, reduction="sum", progress=0.0),          # unweighted CE, sum
    dict(with_targets=False, shared=(283, 283, 283)),                   # TIDAL alone, V_s == V_t
    dict(reverse=True),                                                 # reverse KL + CE
    dict(reverse=True, with_targets=False, reduction="sum", shared=(301, 283, 283)),
    dict(chunk_rows=40, shared=(283, 301, 283)),   # one chunk; V_s == V < V_t; stream: dH atomics
], ids=["tidal_ce", "tidal_ce_sum", "tidal", "reverse_ce", "reverse_sum", "one_chunk"])
def test_float64_matches_reference(strategy, case):
    compare(strategy, **case)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("requires", [(True, False), (False, True), (False, False)], ids=["h", "w", "none"])
def test_partial_requires_grad(strategy, requires):
    compare(strategy, requires=requires, num_rows=11, chunk_rows=4, reverse=requires == (True, False))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_rows", [0, 1])
def test_tiny_batches(strategy, num_rows):
    out, grads = compare(strategy, num_rows=num_rows, chunk_rows=3)
    if num_rows == 0:
        assert all(o.item() == 0.0 for o in out)
        assert grads[0].shape == (0, 24) and grads[1].abs().max().item() == 0.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_output_unused(strategy):
    """Upstream gradient 0 for CE: only the distillation gradient must remain."""
    compare(strategy, num_rows=9, grad_outputs=(1.0, 0.0))
    compare(strategy, num_rows=9, grad_outputs=(0.0, 2.0), reverse=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_inputs(strategy):
    """Transposed / strided views (tied embeddings, sliced hidden states) go in as they are."""
    sh, sw, th, tw, t, targets, ce_weight = make_inputs(9)
    lam, w = schedules.row_lambda(t, 0.2), schedules.timestep_weight(t)
    views = (sh.repeat_interleave(2, 1)[:, ::2], sw.T.contiguous().T, th.T.contiguous().T,
             tw.repeat_interleave(2, 1)[:, ::2])
    assert not any(v.is_contiguous() for v in views)
    kwargs = dict(temperature=2.0, shared_vocab=257, reverse=False, reduction="mean")
    gos = (torch.tensor(1.0, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64))
    got = run(lambda a, b, *o: tidal.fused_distill_loss(a, b, *o, **kwargs, stream=strategy == "stream",
                                                        workspace_bytes=workspace_for(4, 301, 8)),
              views + (lam, w, targets, ce_weight), gos, (True, True))
    want = run(lambda a, b, *o: reference.distill_loss(a, b, *o, **kwargs),
               (sh, sw, th, tw, lam, w, targets, ce_weight), gos, (True, True))
    for g, r in zip(got[0] + got[1], want[0] + want[1]):
        assert_close(g, r, 1e-9, "non-contiguous")


# ----------------------------------------------------------------------------- lower precisions
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32(strategy):
    compare(strategy, dtype=torch.float32, rtol=2e-5, num_rows=13)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(strategy, dtype):
    # 16-bit inputs are exact in fp32; logits accumulate in fp32 like the reference's upcast, so
    # the loss is fp32-accurate; the gradient GEMMs take the logit gradient rounded to 16 bits.
    compare(strategy, dtype=dtype, rtol=2e-5, num_rows=13, reverse=dtype == torch.float16)


# ----------------------------------------------------------------------------- public functions
@pytest.mark.parametrize("impl", ["triton", "triton_stream"])
def test_public_functions_every_option(impl, monkeypatch):
    monkeypatch.setenv("TIDE_WORKSPACE_BYTES", str(workspace_for(3, 301, 8)))
    sh, sw, th, tw, t, targets, ce_weight = make_inputs(10)
    options = [
        dict(schedule="linear", axis="training_only", timestep_weight="uniform", temperature=1.5,
             shared_vocab=257, targets=targets, ce_weight=ce_weight, reduction="sum"),
        dict(schedule="cosine", axis="timestep_only", timestep_weight="midrange", lambda_init=0.2,
             lambda_max=0.7, shared_vocab=283),
    ]
    for opt in options:
        got = run(lambda a, b: tide.losses.tidal_loss(a, b, th, tw, t, 0.3, **opt, impl=impl),
                  (sh, sw), (torch.tensor(1.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)),
                  (True, True))
        want = run(lambda a, b: tide.losses.tidal_loss(a, b, th, tw, t, 0.3, **opt, impl="reference"),
                   (sh, sw), (torch.tensor(1.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)),
                   (True, True))
        for g, r in zip(got[0] + got[1], want[0] + want[1]):
            assert_close(g, r, 1e-9, f"tidal_loss {opt.keys()}")
    for reverse in (False, True):
        got = run(lambda a, b: tide.losses.kl_loss(a, b, th, tw, reverse=reverse, temperature=3.0,
                                                   shared_vocab=257, targets=targets, impl=impl),
                  (sh, sw), (torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
                  (True, True))
        want = run(lambda a, b: tide.losses.kl_loss(a, b, th, tw, reverse=reverse, temperature=3.0,
                                                    shared_vocab=257, targets=targets, impl="reference"),
                   (sh, sw), (torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
                   (True, True))
        for g, r in zip(got[0] + got[1], want[0] + want[1]):
            assert_close(g, r, 1e-9, f"kl_loss reverse={reverse}")


# ----------------------------------------------------------------------------- no [N, V] tensor
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_never_allocates_n_by_v(strategy):
    """Every tensor created in forward and backward stays far below N * V float64 (here N V / 4)."""
    num_rows, vocab, d = 64, 300, 8                        # weights [V, d] are small next to N V
    sh, sw, th, tw, t, targets, ce_weight = make_inputs(num_rows, vocab, vocab, d, d)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    lam, w = schedules.row_lambda(t, 0.5), schedules.timestep_weight(t)
    with LargestTensor() as mode:
        distill, ce = tidal.fused_distill_loss(
            sh, sw, th, tw, lam, w, targets, ce_weight, temperature=2.0, shared_vocab=vocab, reverse=False,
            reduction="mean", stream=(strategy == "stream"), workspace_bytes=workspace_for(5, vocab, 8))
        (2 * distill + ce).backward()
    assert sh.grad is not None and sw.grad is not None
    assert mode.largest * 4 <= num_rows * vocab * 8, f"{mode.op} made a tensor of {mode.largest} bytes"


def test_no_grad_skips_the_gradient_gemms(monkeypatch):
    """Under torch.no_grad the chunked path computes the loss only (no gradient GEMM launched)."""
    sh, sw, th, tw, t, targets, ce_weight = make_inputs(7)
    sh.requires_grad_(True)
    lam, w = schedules.row_lambda(t, 0.5), schedules.timestep_weight(t)
    calls = []
    real = tidal._matmul
    monkeypatch.setattr(tidal, "_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = dict(temperature=2.0, shared_vocab=257, reverse=False, reduction="mean")
    with torch.no_grad():
        got = tidal.fused_distill_loss(sh, sw, th, tw, lam, w, targets, ce_weight, **kwargs)
    assert len(calls) == 2                                  # the two logit GEMMs of the single chunk
    want = reference.distill_loss(sh.detach(), sw, th, tw, lam, w, targets, ce_weight, **kwargs)
    for g, r in zip(got, want):
        assert_close(g, r, 1e-9, "no_grad loss")
    assert len(got) == len(want) == 2


def test_workspace_rows_independent_of_n():
    budget = workspace_for(5, 300, 4)
    rows = {tidal.workspace_rows(n, 300, 4, torch.device("cpu"), budget) for n in (10, 1000, 10 ** 6)}
    assert rows == {5}


def test_chunked_is_deterministic():
    first = compare("chunked", num_rows=9)
    second = compare("chunked", num_rows=9)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- compiled for the GPU
def test_kernels_compile_for_sm90():
    """Compiles every kernel for H100/H200 (sm_90a) with Triton's bundled ptxas, no GPU needed:
    the compiled path has rules the interpreter does not check (types, constexprs, shared memory)."""
    import subprocess
    import sys

    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--compile-only", "--only", "tidal"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("_stream_bwd_kernel") == 8 and "_chunk_rows_kernel" in result.stdout

"""tidal_loss / kl_loss / token_logprobs: the chunked path against the eager reference.

float64 everywhere it can be, fresh random inputs per case, ragged shapes
(V a multiple of no block size, N not a multiple of block_rows), and small
`TIDE_CHUNK_BYTES` so that every case walks several row blocks.
"""
import itertools
import math

import pytest
import torch
from allocations import LargestTensor

import tide
from tide import chunked

IMPLS_CPU = ("chunked", "reference")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # ~3 rows per block for V ~ 300 in float64: every case crosses block boundaries.
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(8 * 301 * 3))


def make_inputs(num_rows, student_vocab=301, teacher_vocab=301, d_s=24, d_t=40,
                dtype=torch.float64, seed=0, logit_std=2.0):
    """Random rows at a realistic logit scale (weights scaled by logit_std / sqrt(d))."""
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(num_rows, d_s, generator=g, dtype=torch.float64)
    student_weight = torch.randn(student_vocab, d_s, generator=g, dtype=torch.float64) * logit_std / d_s ** 0.5
    teacher_hidden = torch.randn(num_rows, d_t, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(teacher_vocab, d_t, generator=g, dtype=torch.float64) * logit_std / d_t ** 0.5
    mask_ratio = torch.rand(num_rows, generator=g, dtype=torch.float64)
    if num_rows >= 3:            # the ends of the range: t = 0 and t = 1
        mask_ratio[0], mask_ratio[1] = 0.0, 1.0
    targets = torch.randint(0, student_vocab, (num_rows,), generator=g)
    ce_weight = torch.rand(num_rows, generator=g, dtype=torch.float64) * 3
    tensors = [student_hidden, student_weight, teacher_hidden, teacher_weight]
    return [t.to(dtype) for t in tensors] + [mask_ratio.to(dtype), targets, ce_weight.to(dtype)]


def run(loss_fn, impl, inputs, grad_outputs=None, **options):
    """Loss value(s) and gradients w.r.t. student hidden and weight."""
    student_hidden, student_weight = (t.detach().clone().requires_grad_(True) for t in inputs[:2])
    out = loss_fn(student_hidden, student_weight, *inputs[2:], impl=impl, **options)
    outs = tuple(o for o in out if o is not None) if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = [torch.tensor(1.0 + 0.5 * k, dtype=o.dtype) for k, o in enumerate(outs)]
    torch.autograd.backward(outs, grad_outputs)
    return [o.detach() for o in outs], student_hidden.grad, student_weight.grad


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def compare(loss_fn, inputs, **options):
    got = run(loss_fn, "chunked", inputs, **options)
    ref = run(loss_fn, "reference", inputs, **options)
    for a, b in zip(got[0], ref[0]):
        assert_close(a, b)
    assert_close(got[1], ref[1])
    assert_close(got[2], ref[2])


def tidal(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, targets, ce_weight,
          *, use_targets, use_ce_weight, progress=0.37, **options):
    return tide.tidal_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, progress,
                           targets=targets if use_targets else None,
                           ce_weight=ce_weight if use_ce_weight else None, **options)


def kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, targets, ce_weight,
       *, use_targets, use_ce_weight, **options):
    return tide.kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                        targets=targets if use_targets else None,
                        ce_weight=ce_weight if use_ce_weight else None, **options)


@pytest.mark.parametrize("num_rows", [0, 1, 7, 300])
@pytest.mark.parametrize("targets_mode", ["none", "targets", "targets+ce_weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tidal_chunked_matches_reference(num_rows, targets_mode, reduction):
    inputs = make_inputs(num_rows, seed=num_rows)
    compare(tidal, inputs, use_targets=targets_mode != "none", use_ce_weight=targets_mode == "targets+ce_weight",
            reduction=reduction)


@pytest.mark.parametrize("schedule,axis,timestep_weight,progress",
                         [(s, a, w, p) for s, a, w in itertools.product(
                             ["cosine", "linear"], ["both", "training_only", "timestep_only"],
                             ["midrange", "uniform"]) for p in (0.0, 0.37, 1.0)])
def test_tidal_every_option(schedule, axis, timestep_weight, progress):
    inputs = make_inputs(23, seed=7)
    compare(tidal, inputs, use_targets=True, use_ce_weight=False, schedule=schedule, axis=axis,
            timestep_weight=timestep_weight, progress=progress, lambda_init=0.2, lambda_max=0.8,
            temperature=1.5)


@pytest.mark.parametrize("loss_fn", [tidal, kl], ids=["tidal", "kl"])
def test_different_vocab_sizes_with_shared_vocab(loss_fn):
    inputs = make_inputs(29, student_vocab=301, teacher_vocab=347, seed=3)
    compare(loss_fn, inputs, use_targets=True, use_ce_weight=True, shared_vocab=257)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("num_rows", [0, 1, 300])
@pytest.mark.parametrize("targets_mode", ["none", "targets+ce_weight"])
def test_kl_chunked_matches_reference(reverse, num_rows, targets_mode):
    inputs = make_inputs(num_rows, seed=11 + num_rows)
    compare(kl, inputs, use_targets=targets_mode != "none", use_ce_weight=targets_mode != "none",
            reverse=reverse, reduction="sum" if reverse else "mean", temperature=3.0)


def test_forward_kl_is_tidal_with_full_teacher_weight():
    """KL(q || p) equals TIDAL at lambda = 1 with uniform weights (independent check of both)."""
    inputs = make_inputs(17, seed=5)
    forward_kl = run(kl, "reference", inputs, use_targets=False, use_ce_weight=False)
    tidal_at_one = run(tidal, "reference", inputs, use_targets=False, use_ce_weight=False, axis="training_only",
                       lambda_init=1.0, lambda_max=1.0, timestep_weight="uniform")
    for a, b in zip(forward_kl, tidal_at_one):
        assert_close(a[0] if isinstance(a, list) else a, b[0] if isinstance(b, list) else b)


def test_tidal_matches_hand_computed_kl():
    """The reference against a direct formula on one row: T^2 w KL(r || p)."""
    inputs = make_inputs(1, student_vocab=11, teacher_vocab=11, seed=2)
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio = inputs[:5]
    T, t = 2.0, float(mask_ratio[0])
    s, u = student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T
    lam = (0.1 + 0.8 * (1 - math.cos(math.pi * 0.37)) / 2) * (1 - t)
    r = torch.softmax(((1 - lam) * s + lam * u) / T, -1)
    p = torch.softmax(s / T, -1)
    w = math.exp(-(t - 0.5) ** 2 / (2 * 0.15 ** 2))
    expected = T * T * w * (r * (r.log() - p.log())).sum()
    for impl in IMPLS_CPU:
        got = tide.tidal_loss(*inputs[:5], 0.37, impl=impl)
        assert got.ce is None
        assert_close(got.distill, expected)


@pytest.mark.parametrize("num_rows", [0, 1, 37])
def test_token_logprobs_chunked_matches_reference(num_rows):
    g = torch.Generator().manual_seed(num_rows)
    hidden = torch.randn(num_rows, 24, generator=g, dtype=torch.float64)
    weight = torch.randn(301, 24, generator=g, dtype=torch.float64) / 24 ** 0.5 * 2
    targets = torch.randint(0, 301, (num_rows,), generator=g)
    grad_out = torch.randn(num_rows, generator=g, dtype=torch.float64)
    results = []
    for impl in IMPLS_CPU:
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = tide.token_logprobs(h, w, targets, impl=impl)
        out.backward(grad_out)
        results.append((out.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        assert_close(a, b)


def test_only_some_inputs_require_grad():
    inputs = make_inputs(13, seed=9)
    for impl in IMPLS_CPU:
        student_weight = inputs[1].clone().requires_grad_(True)           # hidden frozen
        loss = tide.tidal_loss(inputs[0], student_weight, *inputs[2:5], 0.5, impl=impl).distill
        loss.backward()
        assert student_weight.grad is not None and torch.isfinite(student_weight.grad).all()
        student_hidden = inputs[0].clone().requires_grad_(True)           # weight frozen
        loss = tide.tidal_loss(student_hidden, inputs[1], *inputs[2:5], 0.5, impl=impl).distill
        loss.backward()
        assert student_hidden.grad is not None


def test_teacher_gets_no_gradient():
    inputs = make_inputs(9, seed=4)
    teacher_hidden = inputs[2].clone().requires_grad_(True)
    teacher_weight = inputs[3].clone().requires_grad_(True)
    student_hidden = inputs[0].clone().requires_grad_(True)
    for impl in IMPLS_CPU:
        loss = tide.tidal_loss(student_hidden, inputs[1], teacher_hidden, teacher_weight, inputs[4], 0.5,
                               impl=impl).distill
        loss.backward()
        assert teacher_hidden.grad is None and teacher_weight.grad is None


@pytest.mark.parametrize("impl", IMPLS_CPU + ("triton", "triton_stream"))
def test_gradcheck(impl, monkeypatch):
    """Finite differences in float64; the Triton impls run under the interpreter (conftest.py)
    and are checked in gradcheck's fast mode (random projections) to stay quick."""
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(8 * 13 * 2))
    monkeypatch.setenv("TIDE_WORKSPACE_BYTES", str(8 * 13 * 2))
    inputs = make_inputs(5, student_vocab=13, teacher_vocab=15, d_s=4, d_t=3, seed=1)
    student_hidden, student_weight = (t.clone().requires_grad_(True) for t in inputs[:2])
    rest = inputs[2:5]
    targets, ce_weight = inputs[5], inputs[6]

    def tidal_both(h, w):
        # r is a stop-gradient target, so finite differences see its dependence on s unless
        # lambda = 1 (r = q); lambda < 1 is covered by the comparisons with the reference.
        return tuple(tide.tidal_loss(h, w, *rest, 0.6, targets=targets, ce_weight=ce_weight, shared_vocab=12,
                                     lambda_init=1.0, lambda_max=1.0, axis="training_only", impl=impl))

    def reverse_kl(h, w):
        return tide.kl_loss(h, w, *rest[:2], reverse=True, shared_vocab=12, reduction="sum", impl=impl).distill

    def logprobs(h, w):
        return tide.token_logprobs(h, w, targets, impl=impl)

    fast = impl.startswith("triton")
    for fn in (tidal_both, reverse_kl) + ((logprobs,) if impl != "triton_stream" else ()):
        assert torch.autograd.gradcheck(fn, (student_hidden, student_weight), fast_mode=fast)


@pytest.mark.parametrize("impl", IMPLS_CPU)
def test_extreme_logits_stay_finite(impl):
    g = torch.Generator().manual_seed(0)
    num_rows, vocab = 6, 50
    student_hidden = torch.zeros(num_rows, 2)
    student_hidden[:, 0] = 1.0
    student_weight = (torch.rand(vocab, 2, generator=g) * 2 - 1) * 1e4      # logits up to +-1e4
    teacher_hidden = student_hidden.flip(1).clone()
    teacher_weight = (torch.rand(vocab, 2, generator=g) * 2 - 1) * 1e4
    mask_ratio = torch.linspace(0, 1, num_rows)
    targets = torch.randint(0, vocab, (num_rows,), generator=g)
    for call in (lambda h, w: tide.tidal_loss(h, w, teacher_hidden, teacher_weight, mask_ratio, 0.5,
                                              targets=targets, impl=impl),
                 lambda h, w: tide.kl_loss(h, w, teacher_hidden, teacher_weight, reverse=True, impl=impl),
                 lambda h, w: tide.token_logprobs(h, w, targets, impl=impl)):
        h, w = student_hidden.clone().requires_grad_(True), student_weight.clone().requires_grad_(True)
        out = call(h, w)
        outs = tuple(o for o in out if o is not None) if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.sum() for o in outs])
        assert all(torch.isfinite(o).all() for o in outs)
        assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    inputs = make_inputs(64, dtype=torch.float32, seed=12)
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    # The fp32 ground truth on the same (rounded) values.
    rounded = [t.to(dtype).float() if t.is_floating_point() else t for t in inputs]
    for impl in IMPLS_CPU:
        got = run(tidal, impl, low, use_targets=True, use_ce_weight=False)
        ref = run(tidal, "reference", rounded, use_targets=True, use_ce_weight=False)
        for a, b in zip(got[0], ref[0]):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert got[1].dtype == dtype and got[2].dtype == dtype
        # Gradients are returned in the input dtype: bf16/fp16 rounding of the fp32 gradient.
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(got[1].float(), ref[1], rtol=tol, atol=tol * ref[1].abs().max().item())
        torch.testing.assert_close(got[2].float(), ref[2], rtol=tol, atol=tol * ref[2].abs().max().item())


def test_block_rows_bounded_by_budget(monkeypatch):
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(4 * 1000 * 16))
    assert chunked.block_rows_for(1000, torch.float32, 10_000) == 16
    assert chunked.block_rows_for(10 ** 9, torch.float32, 10_000) == 1
    assert chunked.block_rows_for(1000, torch.float32, 5) == 5
    monkeypatch.delenv("TIDE_CHUNK_BYTES")
    assert chunked.block_rows_for(10 ** 9, torch.float32, 10_000) == chunked.MIN_BLOCK_ROWS
    assert chunked.block_rows_for(32768, torch.float32, 10_000) == chunked.DEFAULT_CHUNK_BYTES["cpu"] // (4 * 32768)


def test_chunked_never_allocates_n_by_v(monkeypatch):
    """Every tensor made during the chunked forward+backward is smaller than [N, V]."""
    num_rows, vocab = 200, 301
    inputs = make_inputs(num_rows, student_vocab=vocab, teacher_vocab=vocab, dtype=torch.float32, seed=6)
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(4 * vocab * 8))
    student_hidden, student_weight = (t.clone().requires_grad_(True) for t in inputs[:2])
    with LargestTensor() as mode:
        distill, ce = tide.tidal_loss(student_hidden, student_weight, *inputs[2:5], 0.5, targets=inputs[5],
                                      impl="chunked")
        (distill + ce).backward()
    assert mode.largest_numel < num_rows * vocab // 4


@pytest.mark.parametrize("grad_outputs", [(1.0, 1.0), (0.7, 0.7), (0.3, 1.7), (1.0, 0.0), (0.0, 2.0)])
@pytest.mark.parametrize("loss", ["tidal", "forward_kl", "reverse_kl"])
def test_chunked_distill_plus_ce_gradient_for_any_pair_of_upstream_gradients(loss, grad_outputs):
    """chunked contracts d (distill + ce) / d logits in its forward walk: exact for equal upstream
    gradients, and for unequal ones (or one output unused) backward adds the CE gradient alone."""
    num_rows, vocab, d_s = 37, 301, 24
    inputs = make_inputs(num_rows, seed=11)
    g = torch.Generator().manual_seed(3)
    student_bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    if loss == "tidal":
        fn = lambda h, w, th, tw, mr, tg, cw, **kw: tide.tidal_loss(h, w, th, tw, mr, 0.37, targets=tg, ce_weight=cw,
                                                                   **kw)
    else:
        fn = lambda h, w, th, tw, mr, tg, cw, **kw: tide.kl_loss(h, w, th, tw, reverse=loss == "reverse_kl",
                                                                targets=tg, ce_weight=cw, **kw)
    results = {}
    for impl in ("chunked", "reference"):
        bias = student_bias.clone().requires_grad_(True)
        ups = [torch.tensor(v, dtype=torch.float64) for v in grad_outputs]
        got = run(fn, impl, inputs, grad_outputs=ups, student_bias=bias, student_softcap=7.0)
        results[impl] = (*got, bias.grad)
    (values_c, *grads_c), (values_r, *grads_r) = results["chunked"], results["reference"]
    for a, b in zip(values_c + grads_c, values_r + grads_r):
        assert_close(a, b)

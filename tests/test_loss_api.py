"""The drop-in loss API (issue 16) for every loss and every impl: `[..., d]` inputs with
ignore_index / row_mask, reduction="none" under any upstream gradient, student/teacher
softcaps and biases, the DistillOutput return type, the nn.Module wrappers, autocast.

Ground truth: the eager reference in float64 on the flat, hand-gathered rows. The Triton
impls run under TRITON_INTERPRET=1 (conftest.py) on small ragged shapes.
"""
import pytest
import torch
from allocations import LargestTensor

import tide
from tide import reference

CPU_IMPLS = ("reference", "chunked")
DISTILL_IMPLS = CPU_IMPLS + ("triton", "triton_stream")
LOGPROB_IMPLS = CPU_IMPLS + ("triton",)
B, L = 2, 5                                   # [b, l] leading dims: 10 rows, ragged against every block
V_S, V_T, SHARED, D_S, D_T = 37, 41, 33, 6, 7


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(8 * V_T * 3))           # ~3 rows per chunked block
    monkeypatch.setenv("TIDE_WORKSPACE_BYTES", str(2 * 8 * V_S * 3))   # ~3 rows per Triton chunk


def make(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = dict(student_hidden=randn(B, L, D_S), student_weight=randn(V_S, D_S, scale=2 / D_S ** 0.5),
             teacher_hidden=randn(B, L, D_T), teacher_weight=randn(V_T, D_T, scale=2 / D_T ** 0.5),
             student_bias=randn(V_S, scale=0.5), teacher_bias=randn(V_T, scale=0.5),
             mask_ratio=torch.rand(B, L, generator=g, dtype=torch.float64).to(dtype),
             ce_weight=(torch.rand(B, L, generator=g, dtype=torch.float64) * 2).to(dtype))
    targets = torch.randint(0, V_S, (B, L), generator=g)
    targets[0, 1] = targets[1, 3] = targets[1, 4] = -100                 # ignored rows
    x["targets"] = targets
    x["row_mask"] = torch.ones(B, L, dtype=torch.bool)
    x["row_mask"][0, 4] = False
    return x


LOSSES = {
    "tidal": lambda x, **o: tide.tidal_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                            x["teacher_weight"], x["mask_ratio"], 0.4, shared_vocab=SHARED, **o),
    "reverse_kl": lambda x, **o: tide.kl_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                              x["teacher_weight"], reverse=True, shared_vocab=SHARED, **o),
}


def grads_of(fn, x, names=("student_hidden", "student_weight", "student_bias"), seed=3):
    """Outputs of fn(x) (a DistillOutput or a tensor) and the gradients of a random weighted sum."""
    x = dict(x)
    for name in names:
        x[name] = x[name].detach().clone().requires_grad_(True)
    out = fn(x)
    outs = [o for o in out if o is not None] if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    leaves = [x[name] for name in names]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def flat_reference(loss, x, reduction, options):
    """The eager float64 reference on the hand-gathered rows (the rows that take part)."""
    keep = (x["targets"] != -100) & x["row_mask"]
    rows = keep.reshape(-1)
    flat = {k: (v.reshape(B * L, *v.shape[2:])[rows] if v.dim() and v.shape[:2] == (B, L) else v)
            for k, v in x.items()}
    if loss == "tidal":
        lam = tide.schedules.row_lambda(flat["mask_ratio"], 0.4)
        w = tide.schedules.timestep_weight(flat["mask_ratio"])
    else:
        lam = w = torch.ones(int(rows.sum()), dtype=torch.float64)
    distill, ce = reference.distill_loss(
        flat["student_hidden"], flat["student_weight"], flat["teacher_hidden"], flat["teacher_weight"], lam, w,
        flat["targets"], flat["ce_weight"], temperature=2.0, shared_vocab=SHARED, reverse=loss != "tidal",
        reduction=reduction, student_bias=flat["student_bias"], teacher_bias=flat["teacher_bias"], **options)
    if reduction == "none":                                           # back to [b, l], 0 at ignored rows
        distill = torch.zeros(B * L, dtype=distill.dtype).index_copy(0, rows.nonzero()[:, 0], distill).view(B, L)
        ce = torch.zeros(B * L, dtype=ce.dtype).index_copy(0, rows.nonzero()[:, 0], ce).view(B, L)
    return distill, ce


def close(got, want, tol=1e-9):
    for a, b in zip(got, want):
        if a is None and b is None:
            continue
        assert a.shape == b.shape, (a.shape, b.shape)
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def logprob_reference(x, softcap):
    """token_logprobs' float64 eager ground truth on [b, l] rows: 0 at ignored rows."""
    logits = reference.lm_logits(x["student_hidden"], x["student_weight"], x["student_bias"], softcap, torch.float64)
    logp = logits.log_softmax(-1).gather(-1, x["targets"].clamp(min=0)[..., None])[..., 0]
    return torch.where(x["targets"] != -100, logp, torch.zeros_like(logp))


NUM_CHUNKS = 4
CALM_CAPS = dict(student_softcap=4.0, teacher_softcap=3.0)


def calm_rows(x, seed=1):
    """calm_loss's other inputs on make()'s rows: chunk ids for the [b, l] student rows (-1, not
    read, at ignored rows) and a [b, l] teacher side with its own targets, ignored rows and chunks."""
    g = torch.Generator().manual_seed(seed)
    student_chunk = torch.randint(0, NUM_CHUNKS, (B, L), generator=g)
    student_chunk[x["targets"] == -100] = -1
    teacher_targets = torch.randint(0, V_T, (B, L), generator=g)
    teacher_targets[0, 0] = teacher_targets[1, 2] = -100
    teacher_chunk = torch.randint(0, NUM_CHUNKS, (B, L), generator=g)
    teacher_chunk[teacher_targets == -100] = -1
    return dict(student_chunk=student_chunk, teacher_targets=teacher_targets, teacher_chunk=teacher_chunk)


def calm_call(x, rows, reduction, impl, caps=CALM_CAPS):
    return tide.calm_loss(x["student_hidden"], x["student_weight"], x["targets"], rows["student_chunk"],
                          x["teacher_hidden"], x["teacher_weight"], rows["teacher_targets"], rows["teacher_chunk"],
                          num_chunks=NUM_CHUNKS, student_bias=x["student_bias"], teacher_bias=x["teacher_bias"],
                          reduction=reduction, impl=impl, **caps)


def calm_flat_reference(x, rows, reduction, caps=CALM_CAPS):
    """The eager float64 composition on each side's hand-gathered rows."""
    sides = []
    for hidden, weight, bias, targets, chunk, cap in (
            (x["student_hidden"], x["student_weight"], x["student_bias"], x["targets"], rows["student_chunk"],
             caps["student_softcap"]),
            (x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"], rows["teacher_targets"],
             rows["teacher_chunk"], caps["teacher_softcap"])):
        keep = (targets != -100).reshape(-1)
        h = hidden.reshape(B * L, -1)[keep]
        sides += [reference.token_logprobs(h, weight, targets.reshape(-1)[keep], bias, cap),
                  chunk.reshape(-1)[keep]]
    return reference.calm_from_token_logprobs(*sides, num_chunks=NUM_CHUNKS, reverse=True, temperature=2.0,
                                              reduction=reduction)


# ----------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("impl", DISTILL_IMPLS)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction,caps", [("mean", (None, None)), ("sum", (3.0, None)), ("none", (2.5, 4.0))])
def test_leading_dims_ignore_index_softcap_bias_match_flat_reference(impl, loss, reduction, caps):
    """[b, l, d] rows with ignore_index + row_mask, biases and softcaps, every reduction, against the
    float64 reference on the hand-gathered rows: values and the gradients of hidden, weight, bias."""
    if impl.startswith("triton") and reduction == "mean":
        pytest.skip("covered by the sum / none cases (interpreter time)")
    x = make(seed=hash((loss, reduction)) % 1000)
    options = dict(student_softcap=caps[0], teacher_softcap=caps[1])

    def ours(x):
        return LOSSES[loss](x, targets=x["targets"], ce_weight=x["ce_weight"], row_mask=x["row_mask"],
                            student_bias=x["student_bias"], teacher_bias=x["teacher_bias"],
                            reduction=reduction, impl=impl, **options)

    def flat(x):
        return flat_reference(loss, x, reduction, options)

    got = grads_of(ours, x)
    want = grads_of(flat, x)
    close(got[0], want[0])
    close(got[1], want[1])
    if reduction == "none":
        assert got[0][0].shape == (B, L)
        assert (got[0][0][x["targets"] == -100] == 0).all()


@pytest.mark.parametrize("impl", DISTILL_IMPLS)
def test_reduction_none_any_upstream_gradient_without_targets(impl):
    """Per-row values with a random per-row upstream gradient, no targets (distill only)."""
    x = make(seed=5)

    def ours(x):
        out = tide.kl_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                           shared_vocab=SHARED, row_mask=x["row_mask"], student_bias=x["student_bias"],
                           student_softcap=5.0, reduction="none", impl=impl)
        assert out.ce is None and out.distill.shape == (B, L)
        return out.distill

    def eager(x):
        s = reference.lm_logits(x["student_hidden"], x["student_weight"], x["student_bias"], 5.0,
                                torch.float64)[..., :SHARED] / 2
        u = (x["teacher_hidden"] @ x["teacher_weight"].T)[..., :SHARED] / 2
        kl = (u.softmax(-1) * (u.log_softmax(-1) - s.log_softmax(-1))).sum(-1) * 4
        return torch.where(x["row_mask"], kl, torch.zeros_like(kl))

    close(grads_of(ours, x)[0] + grads_of(ours, x)[1], grads_of(eager, x)[0] + grads_of(eager, x)[1])


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_token_logprobs_leading_dims_bias_softcap(impl):
    x = make(seed=8)

    def ours(x):
        return tide.token_logprobs(x["student_hidden"], x["student_weight"], x["targets"], bias=x["student_bias"],
                                   softcap=3.0, impl=impl)

    got, want = grads_of(ours, x), grads_of(lambda x: logprob_reference(x, 3.0), x)
    assert got[0][0].shape == (B, L)
    close(got[0] + got[1], want[0] + want[1])


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_calm_leading_dims_ignore_index_bias_softcap(impl, reduction):
    """calm_loss on [b, l, d] student rows and [l_t, d_t] teacher rows with ignore_index, biases and
    softcaps against the reference composition on the gathered rows."""
    x = make(seed=9)
    g = torch.Generator().manual_seed(1)
    num_chunks = 4
    student_chunk = torch.randint(0, num_chunks, (B, L), generator=g)
    student_chunk[x["targets"] == -100] = -1                            # not read: ignored rows
    teacher_targets = torch.randint(0, V_T, (7,), generator=g)
    teacher_chunk = torch.tensor([0, 0, 1, 2, 2, 3, 0])
    teacher_hidden = x["teacher_hidden"].reshape(-1, D_T)[:7]
    caps = dict(student_softcap=4.0, teacher_softcap=3.0)

    def ours(x):
        return tide.calm_loss(x["student_hidden"], x["student_weight"], x["targets"], student_chunk,
                              teacher_hidden, x["teacher_weight"], teacher_targets, teacher_chunk,
                              num_chunks=num_chunks, student_bias=x["student_bias"], teacher_bias=x["teacher_bias"],
                              reduction=reduction, impl=impl, **caps)

    def eager(x):
        keep = (x["targets"] != -100).reshape(-1)
        h = x["student_hidden"].reshape(-1, D_S)[keep]
        s = reference.token_logprobs(h, x["student_weight"], x["targets"].reshape(-1)[keep], x["student_bias"], 4.0)
        t = reference.token_logprobs(teacher_hidden, x["teacher_weight"], teacher_targets, x["teacher_bias"], 3.0)
        return reference.calm_from_token_logprobs(s, student_chunk.reshape(-1)[keep], t, teacher_chunk,
                                                  num_chunks=num_chunks, reverse=True, temperature=2.0,
                                                  reduction=reduction)

    got, want = grads_of(ours, x), grads_of(eager, x)
    assert got[0][0].shape == (() if reduction == "sum" else (num_chunks,))
    close(got[0] + got[1], want[0] + want[1])


@pytest.mark.parametrize("impl", DISTILL_IMPLS)
def test_gradcheck_softcap_bias_reduction_none(impl):
    """Finite differences through the softcap derivative, the bias and per-row upstream gradients
    (fast mode for the Triton impls). lambda = 1 (r = q) so that r's stop-gradient is no issue."""
    x = make(seed=11)
    rest = (x["teacher_hidden"][:, :3], x["teacher_weight"], x["mask_ratio"][:, :3])
    targets = x["targets"][:, :3]

    def fn(h, w, b):
        out = tide.tidal_loss(h, w, *rest, 0.5, shared_vocab=SHARED, targets=targets, student_bias=b,
                              teacher_bias=x["teacher_bias"], student_softcap=1.5, teacher_softcap=2.0,
                              lambda_init=1.0, lambda_max=1.0, axis="training_only", reduction="none", impl=impl)
        return out.distill, out.ce

    inputs = tuple(t.clone().requires_grad_(True) for t in (x["student_hidden"][:, :3], x["student_weight"],
                                                            x["student_bias"]))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=impl.startswith("triton"))


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_gradcheck_token_logprobs_softcap_bias(impl):
    """Finite differences through token_logprobs' softcap derivative and bias on [b, l] rows with an
    ignored row, per-row outputs (fast mode for the Triton impl)."""
    x = make(seed=12)
    targets = x["targets"][:, :3]
    assert (targets == -100).any()

    def fn(h, w, b):
        return tide.token_logprobs(h, w, targets, bias=b, softcap=1.5, impl=impl)

    inputs = tuple(t.clone().requires_grad_(True) for t in (x["student_hidden"][:, :3], x["student_weight"],
                                                            x["student_bias"]))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_gradcheck_calm_softcap_bias_reduction_none(impl):
    """Finite differences through calm_loss with both softcaps and biases on, ignored rows on both
    sides and per-chunk outputs (any upstream gradient; fast mode for the Triton impl)."""
    x = make(seed=15)
    rows = calm_rows(x, seed=2)

    def fn(h, w, b):
        return calm_call(dict(x, student_hidden=h, student_weight=w, student_bias=b), rows, "none", impl,
                         dict(student_softcap=1.5, teacher_softcap=2.0))

    inputs = tuple(t.clone().requires_grad_(True) for t in (x["student_hidden"], x["student_weight"],
                                                            x["student_bias"]))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=impl == "triton")


# ----------------------------------------------------------------------------- edge cases, bad values
@pytest.mark.parametrize("impl", DISTILL_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_and_zero_gradients(impl, reduction):
    x = make(seed=2)
    x["targets"] = torch.full((B, L), -100)
    _, grads = grads_of(lambda x: LOSSES["tidal"](x, targets=x["targets"], student_bias=x["student_bias"],
                                                  student_softcap=3.0, reduction=reduction, impl=impl), x)
    out = LOSSES["tidal"](x, targets=x["targets"], reduction=reduction, impl=impl)
    for value in out:
        assert torch.equal(value, torch.zeros_like(value))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def assert_zero_values_and_gradients(fn, x):
    outs, grads = grads_of(fn, x)
    for value in outs:
        assert torch.equal(value, torch.zeros_like(value)), value
    for grad in grads:
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), grad


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_token_logprobs_all_rows_ignored_gives_zero_and_zero_gradients(impl):
    x = make(seed=2)
    x["targets"] = torch.full((B, L), -100)
    assert_zero_values_and_gradients(
        lambda x: tide.token_logprobs(x["student_hidden"], x["student_weight"], x["targets"], bias=x["student_bias"],
                                      softcap=3.0, impl=impl), x)


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_calm_all_rows_ignored_gives_zero_and_zero_gradients(impl, reduction, side):
    """Every row of one side ignored: no active chunk, so 0 (not 0 / 0) and zero gradients."""
    x = make(seed=2)
    rows = calm_rows(x)
    if side == "student":
        x["targets"] = torch.full((B, L), -100)
        rows["student_chunk"] = torch.full((B, L), -1)
    else:
        rows["teacher_targets"] = torch.full((B, L), -100)
        rows["teacher_chunk"] = torch.full((B, L), -1)
    assert_zero_values_and_gradients(lambda x: calm_call(x, rows, reduction, impl), x)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("nan"), float("inf"), True, "3"])
@pytest.mark.parametrize("name", ["student_softcap", "teacher_softcap"])
def test_softcap_must_be_a_positive_number(softcap, name):
    x = make()
    with pytest.raises(ValueError, match=name):
        LOSSES["tidal"](x, **{name: softcap})
    with pytest.raises(ValueError, match=name):
        tide.TIDALLoss(**{name: softcap})
    with pytest.raises(ValueError, match="softcap"):
        tide.token_logprobs(x["student_hidden"], x["student_weight"], x["targets"], softcap=softcap)
    with pytest.raises(ValueError, match=name):
        calm_call(x, calm_rows(x), "mean", "reference", dict(CALM_CAPS, **{name: softcap}))
    with pytest.raises(ValueError, match=name):
        tide.CALMLoss(**{name: softcap})


def test_bad_bias_and_row_mask_are_named():
    x = make()
    with pytest.raises(ValueError, match=r"student_bias.*V_s=37"):
        LOSSES["tidal"](x, student_bias=torch.zeros(36, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"teacher_bias.*V_t=41"):
        LOSSES["reverse_kl"](x, teacher_bias=torch.zeros(V_T, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"row_mask.*bool"):
        LOSSES["tidal"](x, row_mask=torch.ones(B, L))
    with pytest.raises(ValueError, match=r"targets.*\[2, 5\]"):
        LOSSES["tidal"](x, targets=x["targets"].reshape(-1))
    with pytest.raises(ValueError, match=r"targets.*ignore_index=-1"):
        LOSSES["tidal"](x, targets=x["targets"], ignore_index=-1)


def test_mask_ratio_per_sequence_equals_per_row():
    x = make(seed=4)
    per_sequence = torch.tensor([0.2, 0.7], dtype=torch.float64)
    a = tide.tidal_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                        per_sequence, 0.3, shared_vocab=SHARED, impl="chunked")
    b = tide.tidal_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                        per_sequence[:, None].expand(B, L), 0.3, shared_vocab=SHARED, impl="chunked")
    close(a, b, 1e-12)


# ----------------------------------------------------------------------------- return type, modules
def test_distill_losses_always_return_a_distill_output():
    x = make()
    for loss in LOSSES.values():
        plain = loss(x, impl="chunked")
        with_ce = loss(x, targets=x["targets"], impl="chunked")
        assert isinstance(plain, tide.DistillOutput) and isinstance(with_ce, tide.DistillOutput)
        assert plain.ce is None and plain.distill.dim() == 0
        distill, ce = with_ce
        assert distill.dim() == 0 and ce.dim() == 0


def test_modules_check_options_in_the_constructor_and_show_them():
    with pytest.raises(ValueError, match="impl"):
        tide.TIDALLoss(impl="bad")
    with pytest.raises(TypeError, match="bogus"):
        tide.TIDALLoss(bogus=1)
    with pytest.raises(ValueError, match="temperature"):
        tide.KLLoss(temperature=float("nan"))
    with pytest.raises(TypeError, match="reverse"):
        tide.CALMLoss(reverse="yes")
    with pytest.raises(ValueError, match="reduction"):
        tide.CALMLoss(reduction="avg")
    text = repr(tide.TIDALLoss(temperature=1.5, student_softcap=30.0, impl="chunked"))
    for word in ("TIDALLoss(", "temperature=1.5", "student_softcap=30.0", "impl='chunked'", "lambda_max=0.9"):
        assert word in text, text
    assert "reverse=True" in repr(tide.KLLoss(reverse=True)) and "reverse=True" in repr(tide.CALMLoss())
    x = make()
    module = tide.TIDALLoss(shared_vocab=SHARED, reduction="none", impl="chunked")
    out = module(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                 x["mask_ratio"], 0.4, targets=x["targets"], student_bias=x["student_bias"])
    want = LOSSES["tidal"](x, targets=x["targets"], student_bias=x["student_bias"], reduction="none",
                           impl="chunked")
    close(out, want, 1e-12)


# ----------------------------------------------------------------------------- precision, memory
@pytest.mark.parametrize("impl", DISTILL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_with_every_option(impl, dtype):
    """16-bit inputs accumulate in float32: the result equals the float32 reference on the same
    (rounded) values; gradients come back in the input dtype."""
    low = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in make(seed=6).items()}
    rounded = {k: (v.double() if v.is_floating_point() else v) for k, v in low.items()}
    options = dict(student_softcap=3.0, teacher_softcap=5.0)

    def ours(x):
        return LOSSES["tidal"](x, targets=x["targets"], ce_weight=x["ce_weight"], row_mask=x["row_mask"],
                               student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], reduction="none",
                               impl=impl, **options)

    got = grads_of(ours, low)
    want = grads_of(lambda x: flat_reference("tidal", x, "none", options), rounded)
    assert got[0][0].dtype == torch.float32 and got[1][0].dtype == dtype
    close(got[0], want[0], 1e-5)
    close(got[1], want[1], 1e-2 if dtype == torch.bfloat16 else 2e-3)


def _half(dtype, seed):
    low = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in make(seed=seed).items()}
    return low, {k: (v.double() if v.is_floating_point() else v) for k, v in low.items()}


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_token_logprobs_half_precision_with_bias_softcap(impl, dtype):
    """16-bit [b, l] rows with ignored rows, a bias and a softcap: the float32 result of the float64
    reference on the rounded values; gradients (hidden, weight, bias) in the input dtype."""
    low, rounded = _half(dtype, seed=16)

    def ours(x):
        return tide.token_logprobs(x["student_hidden"], x["student_weight"], x["targets"], bias=x["student_bias"],
                                   softcap=3.0, impl=impl)

    got, want = grads_of(ours, low), grads_of(lambda x: logprob_reference(x, 3.0), rounded)
    assert got[0][0].dtype == torch.float32 and [g.dtype for g in got[1]] == [dtype] * 3
    close(got[0], want[0], 1e-5)
    close(got[1], want[1], 1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_calm_half_precision_with_every_option(impl, dtype):
    """calm_loss on 16-bit [b, l] rows (both sides) with ignore_index, biases, softcaps and per-chunk
    values: the float32 result of the float64 reference on the rounded values."""
    low, rounded = _half(dtype, seed=17)
    rows = calm_rows(low, seed=3)
    got = grads_of(lambda x: calm_call(x, rows, "none", impl), low)
    want = grads_of(lambda x: calm_flat_reference(x, rows, "none"), rounded)
    assert got[0][0].dtype == torch.float32 and [g.dtype for g in got[1]] == [dtype] * 3
    assert (want[0][0] != 0).sum() >= 2                                 # active chunks
    close(got[0], want[0], 1e-5)
    close(got[1], want[1], 1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("impl", ["chunked", "triton", "triton_stream"])
def test_no_n_by_v_tensor_with_the_new_options(impl, monkeypatch):
    """[b, l, d] rows with ignore_index, softcaps, biases and reduction="none": every tensor made in
    forward and backward stays far below [N, V]."""
    b, l, vocab, d = 4, 16, 300, 8
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, l, d, generator=g, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g) / d ** 0.5).requires_grad_(True)
    bias = torch.zeros(vocab, requires_grad=True)
    th, tw = torch.randn(b, l, d, generator=g), torch.randn(vocab, d, generator=g) / d ** 0.5
    targets = torch.randint(0, vocab, (b, l), generator=g)
    targets[:, ::3] = -100
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(4 * vocab * 8))
    monkeypatch.setenv("TIDE_WORKSPACE_BYTES", str(2 * 4 * vocab * 8))
    with LargestTensor() as mode:
        distill, ce = tide.tidal_loss(h, w, th, tw, torch.rand(b), 0.5, targets=targets, student_bias=bias,
                                      teacher_bias=torch.zeros(vocab), student_softcap=3.0, teacher_softcap=3.0,
                                      reduction="none", impl=impl)
        (distill.sum() + 2 * ce.sum()).backward()
    assert bias.grad is not None
    # bytes (the interpreter's host copies of kernel arguments are uint8 storages): below a quarter
    # of one float32 [N, V]
    assert mode.largest < b * l * vocab * 4 // 4, f"{mode.op} made a tensor of {mode.largest} bytes"


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("loss", ["token_logprobs", "calm"])
def test_no_n_by_v_tensor_token_logprobs_calm_with_the_new_options(loss, impl, monkeypatch):
    """token_logprobs and calm_loss on [b, l, d] rows with ignore_index, softcaps and biases: every
    tensor made in forward and backward stays far below [N, V]."""
    b, l, vocab, d, num_chunks = 4, 16, 300, 8, 32          # 2 rows a chunk: chunk probabilities not clamped
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, l, d, generator=g, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g) / d ** 0.5).requires_grad_(True)
    bias = torch.zeros(vocab, requires_grad=True)
    th, tw = torch.randn(b, l, d, generator=g), torch.randn(vocab, d, generator=g) / d ** 0.5
    targets = torch.randint(0, vocab, (b, l), generator=g)
    targets[:, ::3] = -100
    chunk = torch.arange(b * l).reshape(b, l) % num_chunks
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(4 * vocab * 8))
    with LargestTensor() as mode:
        if loss == "token_logprobs":
            out = tide.token_logprobs(h, w, targets, bias=bias, softcap=3.0, impl=impl)
        else:
            out = tide.calm_loss(h, w, targets, chunk, th, tw, targets.flip(0), chunk, num_chunks=num_chunks,
                                 student_bias=bias, teacher_bias=torch.zeros(vocab), student_softcap=3.0,
                                 teacher_softcap=3.0, reduction="none", impl=impl)
        (out * torch.linspace(0.5, 1.5, out.numel()).view(out.shape)).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    assert mode.largest < b * l * vocab * 4 // 4, f"{mode.op} made a tensor of {mode.largest} bytes"


# ----------------------------------------------------------------------------- autocast
def _autocast_cases(impl):
    """Flat [N, d] rows and the options every version has: what the trainer calls under autocast."""
    x = {k: (v.reshape(B * L, *v.shape[2:]) if v.dim() >= 2 and v.shape[:2] == (B, L) else v)
         for k, v in make(dtype=torch.float32, seed=13).items()}
    h, w, th, tw, t = x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["mask_ratio"]
    targets = x["targets"].clamp(min=0)
    cases = {
        "tidal": lambda: tide.tidal_loss(h, w, th, tw, t, 0.4, shared_vocab=SHARED, targets=targets, impl=impl),
        "reverse_kl": lambda: tide.kl_loss(h, w, th, tw, reverse=True, shared_vocab=SHARED, targets=targets,
                                           reduction="sum", impl=impl),
        "forward_kl": lambda: tide.kl_loss(h, w, th, tw, reverse=False, shared_vocab=SHARED, targets=targets,
                                           impl=impl),
    }
    if impl != "triton_stream":
        cases["token_logprobs"] = lambda: tide.token_logprobs(h, w, targets, impl=impl)
        cases["calm"] = lambda: tide.calm_loss(h, w, targets, targets % 3, th, tw, targets, targets % 3,
                                               num_chunks=3, impl=impl)
    return cases


@pytest.mark.parametrize("impl", DISTILL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_gives_the_float32_result(impl, dtype):
    """Inside torch.autocast (CPU; the losses switch autocast off for their device type, so CUDA
    autocast takes the same path) every loss and impl returns the float32 result, not a 16-bit one
    (before: chunked kl/tidal crashed, the reference's token_logprobs computed in bf16)."""
    for name, call in _autocast_cases(impl).items():
        plain = call()
        with torch.autocast("cpu", dtype=dtype):
            inside = call()
        plain = [o for o in plain if o is not None] if isinstance(plain, tuple) else [plain]
        inside = [o for o in inside if o is not None] if isinstance(inside, tuple) else [inside]
        for a, b in zip(inside, plain):
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", ["chunked"])
def test_backward_inside_autocast(impl):
    """Backward inside the autocast region (the recomputing backward of reduction="none" and of
    token_logprobs runs GEMMs there) gives the float32 gradients. (PyTorch advises against backward
    under autocast; the eager reference's autograd backward does get recast there.)"""
    x = make(dtype=torch.float32, seed=14)

    def ours(x):
        return LOSSES["tidal"](x, targets=x["targets"], student_bias=x["student_bias"], reduction="none", impl=impl)

    def both(x):
        return tuple(ours(x)) + (tide.token_logprobs(x["student_hidden"], x["student_weight"], x["targets"],
                                                     impl=impl),)

    plain = grads_of(both, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = grads_of(both, x)
    close(inside[0] + inside[1], plain[0] + plain[1], 1e-6)

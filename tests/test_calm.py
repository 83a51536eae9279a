"""calm_loss (forward CALM, Reverse CALM, CALM+TIDAL): chunked vs reference, and the chunk rules."""
import math

import pytest
import torch
from allocations import LargestTensor

import tide
from tide import reference

IMPLS_CPU = ("chunked", "reference")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(8 * 211 * 4))


def make_chunks(num_student=41, num_teacher=37, num_chunks=15, student_vocab=211, teacher_vocab=233,
                d_s=16, d_t=24, seed=0, dtype=torch.float64, logit_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        student_hidden=torch.randn(num_student, d_s, generator=g, dtype=dtype),
        student_weight=torch.randn(student_vocab, d_s, generator=g, dtype=dtype) * logit_scale / d_s ** 0.5,
        student_targets=torch.randint(0, student_vocab, (num_student,), generator=g),
        # sorted chunk ids, as alignment gives them; chunk num_chunks - 1 is left empty on the teacher side
        student_chunk=torch.sort(torch.randint(0, num_chunks, (num_student,), generator=g)).values,
        teacher_hidden=torch.randn(num_teacher, d_t, generator=g, dtype=dtype),
        teacher_weight=torch.randn(teacher_vocab, d_t, generator=g, dtype=dtype) * logit_scale / d_t ** 0.5,
        teacher_targets=torch.randint(0, teacher_vocab, (num_teacher,), generator=g),
        teacher_chunk=torch.sort(torch.randint(0, max(num_chunks - 1, 1), (num_teacher,), generator=g)).values,
    )


def run(impl, data, grad_output=1.7, **options):
    student_hidden = data["student_hidden"].clone().requires_grad_(True)
    student_weight = data["student_weight"].clone().requires_grad_(True)
    loss = tide.calm_loss(student_hidden, student_weight, data["student_targets"], data["student_chunk"],
                          data["teacher_hidden"], data["teacher_weight"], data["teacher_targets"],
                          data["teacher_chunk"], impl=impl, **options)
    (loss * grad_output).backward()
    return loss.detach(), student_hidden.grad, student_weight.grad


def variants(num_chunks, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    lam = torch.rand(num_chunks, generator=g, dtype=torch.float64)
    weight = torch.rand(num_chunks, generator=g, dtype=torch.float64) * 2
    return {
        "reverse_calm": dict(reverse=True),
        "forward_calm": dict(reverse=False),
        "reverse_calm_weighted_sum": dict(reverse=True, weight=weight, reduction="sum"),
        "calm_tidal": dict(reverse=False, lam=lam, weight=weight),
    }


@pytest.mark.parametrize("variant", list(variants(15)))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_calm_chunked_matches_reference(variant, temperature):
    data = make_chunks(seed=3)
    options = variants(15, seed=3)[variant]
    got = run("chunked", data, num_chunks=15, temperature=temperature, **options)
    ref = run("reference", data, num_chunks=15, temperature=temperature, **options)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_reverse_calm_matches_formula():
    """Chunk sums and the Bernoulli loss written out by hand on a tiny case."""
    data = make_chunks(num_student=5, num_teacher=4, num_chunks=3, seed=8, logit_scale=0.3)
    data["student_chunk"] = torch.tensor([0, 0, 1, 2, 2])
    data["teacher_chunk"] = torch.tensor([0, 1, 1, 1])           # chunk 2 has no teacher row: inactive
    T = 2.0
    ls = torch.log_softmax(data["student_hidden"] @ data["student_weight"].T, -1)
    ls = ls.gather(1, data["student_targets"][:, None]).squeeze(1)
    lt = torch.log_softmax(data["teacher_hidden"] @ data["teacher_weight"].T, -1)
    lt = lt.gather(1, data["teacher_targets"][:, None]).squeeze(1)
    total = 0.0
    for chunk, (s_rows, t_rows) in enumerate([([0, 1], [0]), ([2], [1, 2, 3])]):
        a = min(max(math.exp(float(ls[s_rows].sum()) / T), 1e-7), 1 - 1e-7)
        b = min(max(math.exp(float(lt[t_rows].sum()) / T), 1e-7), 1 - 1e-7)
        total += -(a * math.log(b) + (1 - a) * math.log(1 - b))
    for impl in IMPLS_CPU:
        loss, _, _ = run(impl, data, num_chunks=3, temperature=T)
        assert abs(float(loss) - total / 2) < 1e-12


def test_one_sided_chunks_are_inactive():
    data = make_chunks(seed=5)
    with_empty = run("chunked", data, num_chunks=20)            # chunks 15..19 have no rows at all
    without = run("chunked", data, num_chunks=15)
    for a, b in zip(with_empty, without):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", IMPLS_CPU)
def test_all_inactive_gives_zero_loss_and_zero_gradient(impl):
    data = make_chunks(seed=6)
    data["teacher_chunk"] = torch.full_like(data["teacher_chunk"], 15)   # teacher rows only in chunk 15
    data["student_chunk"] = data["student_chunk"].clamp(max=14)
    loss, grad_hidden, grad_weight = run(impl, data, num_chunks=16)
    assert float(loss) == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


@pytest.mark.parametrize("impl", IMPLS_CPU)
def test_empty_rows(impl):
    data = make_chunks(num_student=0, num_teacher=0, seed=2)
    loss, grad_hidden, _ = run(impl, data, num_chunks=4)
    assert float(loss) == 0.0 and grad_hidden.shape == (0, 16)


def test_clamp_active_chunks_get_zero_gradient():
    """A chunk whose student probability is clamped at 1e-7 contributes no gradient."""
    data = make_chunks(num_student=6, num_teacher=6, num_chunks=2, seed=9, logit_scale=0.5)
    data["student_chunk"] = torch.tensor([0, 0, 0, 1, 1, 1])
    data["teacher_chunk"] = torch.tensor([0, 0, 0, 1, 1, 1])
    data["student_hidden"][:3, 0] = 0.0                          # chunk 0: ordinary logits
    data["student_hidden"][3:] *= 0.0
    data["student_hidden"][3:, 0] = 1.0
    data["student_weight"][:, 0] = 60.0                          # chunk 1: flat huge logits ...
    data["student_weight"][data["student_targets"][3:], 0] = -60.0   # ... the targets' are tiny: a ~ 0
    for impl in IMPLS_CPU:
        _, grad_hidden, _ = run(impl, data, num_chunks=2)
        assert torch.count_nonzero(grad_hidden[3:]) == 0
        assert torch.count_nonzero(grad_hidden[:3]) > 0


@pytest.mark.parametrize("impl", IMPLS_CPU + ("triton",))
def test_calm_gradcheck(impl):
    data = make_chunks(num_student=7, num_teacher=6, num_chunks=4, student_vocab=9, teacher_vocab=11,
                       d_s=3, d_t=2, seed=4, logit_scale=0.3)
    lam = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    for options in (dict(reverse=True), dict(reverse=False), dict(reverse=False, lam=lam, weight=lam + 0.5)):
        def fn(h, w):
            return tide.calm_loss(h, w, data["student_targets"], data["student_chunk"], data["teacher_hidden"],
                                  data["teacher_weight"], data["teacher_targets"], data["teacher_chunk"],
                                  num_chunks=4, impl=impl, **options)
        # The CALM+TIDAL target m is detached, so finite differences only match where m does not
        # depend on the student: lam = 1 (m = b).
        if "lam" in options:
            options["lam"] = torch.ones(4, dtype=torch.float64)
        h = data["student_hidden"].clone().requires_grad_(True)
        w = data["student_weight"].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(fn, (h, w), fast_mode=impl == "triton")   # triton: interpreted


def test_segment_sums_do_not_build_dense_alignment(monkeypatch):
    """Chunk sums go through index_add by chunk id: no [N, num_chunks] tensor is created."""
    num_chunks = 500
    data = make_chunks(num_student=300, num_teacher=280, num_chunks=num_chunks, seed=1)
    logprobs_s = torch.randn(300, dtype=torch.float64, requires_grad=True)
    logprobs_t = torch.randn(280, dtype=torch.float64)
    with LargestTensor() as mode:
        loss = reference.calm_from_token_logprobs(logprobs_s, data["student_chunk"], logprobs_t,
                                                  data["teacher_chunk"], num_chunks=num_chunks, reverse=True,
                                                  temperature=2.0, reduction="mean")
        loss.backward()
    assert mode.largest_numel <= max(num_chunks, 300)


@pytest.mark.parametrize("variant", ["reverse_calm", "forward_calm", "reverse_calm_weighted_sum", "calm_tidal",
                                     "reverse_calm_tidal"])
@pytest.mark.parametrize("impl", IMPLS_CPU)
def test_calm_from_logprobs_equals_calm_loss(variant, impl):
    """The trainer's one pass: token log-probabilities computed once (for CE) feed the chunk objective."""
    data = make_chunks(seed=5)
    options = dict(variants(15, seed=5).get(variant, {}))
    if variant == "reverse_calm_tidal":
        options = dict(reverse=True, lam=variants(15, seed=5)["calm_tidal"]["lam"])
    expected = run(impl, data, num_chunks=15, **options)
    student_hidden = data["student_hidden"].clone().requires_grad_(True)
    student_weight = data["student_weight"].clone().requires_grad_(True)
    student_logprobs = tide.token_logprobs(student_hidden, student_weight, data["student_targets"], impl=impl)
    teacher_logprobs = tide.token_logprobs(data["teacher_hidden"], data["teacher_weight"], data["teacher_targets"],
                                           impl=impl)
    loss = tide.calm_from_logprobs(student_logprobs, data["student_chunk"], teacher_logprobs, data["teacher_chunk"],
                                   num_chunks=15, impl=impl, **options)
    (loss * 1.7).backward()
    for got, want in zip((loss.detach(), student_hidden.grad, student_weight.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_calm_from_logprobs_bad_input_names_the_argument():
    logprobs, chunk = torch.randn(5, dtype=torch.float64), torch.tensor([0, 0, 1, 2, 2])
    with pytest.raises(ValueError, match="student_logprobs must be a 1-D float tensor"):
        tide.calm_from_logprobs(logprobs[:, None], chunk, logprobs, chunk, num_chunks=3)
    with pytest.raises(ValueError, match="teacher_chunk"):
        tide.calm_from_logprobs(logprobs, chunk, logprobs, chunk + 5, num_chunks=3)
    with pytest.raises(ValueError, match="num_chunks"):
        tide.calm_from_logprobs(logprobs, chunk, logprobs, chunk, num_chunks=-1)

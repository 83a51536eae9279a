"""Triton CALM / Reverse CALM / CALM+TIDAL (tide/kernels/calm.py) against tide.reference,
and calm_loss(impl="triton") end to end (token log-probs + chunk losses).

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py before import)."""

import pytest
import torch

from tide import reference
from tide.kernels.calm import CHUNK_PROB_EPS, fused_calm_from_token_logprobs


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = ["reverse", "forward", "tidal"]


def _chunk_inputs(num_student, num_teacher, num_chunks, dtype, seed=0, mode="reverse", with_weight=False):
    g = torch.Generator().manual_seed(seed)
    # per-token log-probs small enough that chunk probabilities stay inside the clamps
    student = -torch.rand(num_student, generator=g, dtype=torch.float64) * 0.8
    teacher = -torch.rand(num_teacher, generator=g, dtype=torch.float64) * 0.8
    # chunk 0 has no teacher token, the last chunk no student token (both inactive)
    student_chunk = torch.randint(0, max(num_chunks - 1, 1), (num_student,), generator=g)
    teacher_chunk = torch.randint(min(1, num_chunks - 1), num_chunks, (num_teacher,), generator=g)
    lam = torch.rand(num_chunks, generator=g, dtype=torch.float64) if mode == "tidal" else None
    weight = torch.rand(num_chunks, generator=g, dtype=torch.float64) + 0.5 if with_weight else None
    to = lambda x: x.to(DEVICE, dtype) if x is not None else None          # noqa: E731
    return (to(student), student_chunk.to(DEVICE), to(teacher), teacher_chunk.to(DEVICE),
            dict(num_chunks=num_chunks, reverse=(mode == "reverse"), lam=to(lam), weight=to(weight)))


def _loss_and_grad(fn, student, student_chunk, teacher, teacher_chunk, options, grad_output=1.7, **extra):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, student_chunk, teacher, teacher_chunk, **options, **extra)
    loss.backward(torch.tensor(grad_output, dtype=loss.dtype, device=loss.device))
    return loss.detach(), s.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_float64_matches_reference(mode, reduction, with_weight):
    student, sc, teacher, tc, options = _chunk_inputs(53, 71, 17, torch.float64, seed=1, mode=mode,
                                                      with_weight=with_weight)
    kwargs = dict(temperature=0.7, reduction=reduction)
    loss, grad = _loss_and_grad(fused_calm_from_token_logprobs, student, sc, teacher, tc, options, **kwargs)
    ref, ref_grad = _loss_and_grad(reference.calm_from_token_logprobs, student, sc, teacher, tc, options, **kwargs)
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert abs(float(loss - ref)) <= 1e-9 * abs(float(ref))
    assert float((grad - ref_grad).abs().max()) <= 1e-9 * float(ref_grad.abs().max())
    assert ref_grad.abs().max() > 0                                   # the case has a gradient to compare


@pytest.mark.parametrize("mode", MODES)
def test_float32_close_to_float64(mode):
    args64 = _chunk_inputs(40, 55, 11, torch.float64, seed=2, mode=mode, with_weight=True)
    truth, truth_grad = _loss_and_grad(reference.calm_from_token_logprobs, *args64[:4], args64[4],
                                       temperature=2.0, reduction="mean")
    options32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args64[4].items()}
    args32 = (args64[0].float(), args64[1], args64[2].float(), args64[3], options32)
    eager, eager_grad = _loss_and_grad(reference.calm_from_token_logprobs, *args32, temperature=2.0, reduction="mean")
    fused, fused_grad = _loss_and_grad(fused_calm_from_token_logprobs, *args32, temperature=2.0, reduction="mean")
    assert fused.dtype == torch.float32
    tol = 1e-6 * abs(float(truth))
    assert abs(float(fused.double() - truth)) <= abs(float(eager.double() - truth)) + tol
    scale = float(truth_grad.abs().max())
    assert float((fused_grad.double() - truth_grad).abs().max()) <= \
        float((eager_grad.double() - truth_grad).abs().max()) + 1e-6 * scale


def test_all_chunks_inactive():
    # student and teacher tokens in disjoint chunks: no active chunk
    student = -torch.rand(9, dtype=torch.float64, device=DEVICE)
    teacher = -torch.rand(6, dtype=torch.float64, device=DEVICE)
    sc = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2], device=DEVICE)
    tc = torch.tensor([3, 3, 4, 4, 5, 5], device=DEVICE)
    for mode in MODES:
        lam = torch.rand(6, dtype=torch.float64, device=DEVICE) if mode == "tidal" else None
        for reduction in ("mean", "sum"):
            loss, grad = _loss_and_grad(fused_calm_from_token_logprobs, student, sc, teacher, tc,
                                        dict(num_chunks=6, reverse=mode == "reverse", lam=lam),
                                        temperature=2.0, reduction=reduction)
            assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("mode", MODES)
def test_clamp_active_chunks_have_zero_gradient(mode):
    # chunk 0: l_s = -200 -> exp(l_s / T) far below eps; chunk 1: l_s = 0 -> exp = 1 above 1 - eps;
    # chunk 2: ordinary. Teacher probabilities ordinary everywhere.
    student = torch.tensor([-120.0, -80.0, 0.0, 0.0, -0.3, -0.2], dtype=torch.float64, device=DEVICE)
    sc = torch.tensor([0, 0, 1, 1, 2, 2], device=DEVICE)
    teacher = torch.tensor([-0.4, -0.5, -0.1, -0.9], dtype=torch.float64, device=DEVICE)
    tc = torch.tensor([0, 1, 2, 2], device=DEVICE)
    lam = torch.tensor([0.3, 0.6, 0.5], dtype=torch.float64, device=DEVICE) if mode == "tidal" else None
    options = dict(num_chunks=3, reverse=mode == "reverse", lam=lam)
    loss, grad = _loss_and_grad(fused_calm_from_token_logprobs, student, sc, teacher, tc, options,
                                temperature=2.0, reduction="mean")
    ref, ref_grad = _loss_and_grad(reference.calm_from_token_logprobs, student, sc, teacher, tc, options,
                                   temperature=2.0, reduction="mean")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[:4], torch.zeros(4, dtype=torch.float64, device=DEVICE))
    assert (grad[4:] != 0).all()
    assert abs(float(loss - ref)) <= 1e-9 * abs(float(ref))
    assert float((grad - ref_grad).abs().max()) <= 1e-12
    assert CHUNK_PROB_EPS == reference.CHUNK_PROB_EPS


def test_empty_inputs():
    empty = torch.zeros(0, dtype=torch.float64, device=DEVICE)
    empty_ids = torch.zeros(0, dtype=torch.long, device=DEVICE)
    for num_chunks in (0, 4):
        loss, grad = _loss_and_grad(fused_calm_from_token_logprobs, empty, empty_ids, empty, empty_ids,
                                    dict(num_chunks=num_chunks, reverse=True), temperature=2.0, reduction="mean")
        assert float(loss) == 0.0 and grad.shape == (0,)
    # teacher side empty: every chunk inactive
    student = -torch.rand(5, dtype=torch.float64, device=DEVICE)
    loss, grad = _loss_and_grad(fused_calm_from_token_logprobs, student, torch.arange(5, device=DEVICE),
                                empty, empty_ids, dict(num_chunks=5, reverse=False),
                                temperature=2.0, reduction="sum")
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_single_token_and_many_blocks():
    # N = 1 on each side, then more tokens than one kernel block (block=16)
    one = torch.tensor([-0.3], dtype=torch.float64, device=DEVICE)
    zero = torch.zeros(1, dtype=torch.long, device=DEVICE)
    options = dict(num_chunks=1, reverse=True)
    loss, grad = _loss_and_grad(fused_calm_from_token_logprobs, one, zero, one - 0.1, zero, options,
                                temperature=2.0, reduction="mean")
    ref, ref_grad = _loss_and_grad(reference.calm_from_token_logprobs, one, zero, one - 0.1, zero, options,
                                   temperature=2.0, reduction="mean")
    assert abs(float(loss - ref)) <= 1e-12 and abs(float(grad - ref_grad)) <= 1e-12
    args = _chunk_inputs(90, 70, 37, torch.float64, seed=3)
    loss, grad = _loss_and_grad(fused_calm_from_token_logprobs, *args[:4], args[4], temperature=2.0,
                                reduction="mean", block=16)
    ref, ref_grad = _loss_and_grad(reference.calm_from_token_logprobs, *args[:4], args[4], temperature=2.0,
                                   reduction="mean")
    assert abs(float(loss - ref)) <= 1e-9 * abs(float(ref))
    assert float((grad - ref_grad).abs().max()) <= 1e-9 * float(ref_grad.abs().max())


def _calm_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_s, n_t, d_s, d_t, v_s, v_t, chunks = 23, 31, 20, 24, 67, 83, 9
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)  # noqa: E731
    return dict(
        student_hidden=make(n_s, d_s), student_weight=make(v_s, d_s, scale=2 / d_s ** 0.5),
        student_targets=torch.randint(0, v_s, (n_s,), generator=g).to(DEVICE),
        student_chunk=torch.randint(0, chunks, (n_s,), generator=g).to(DEVICE),
        teacher_hidden=make(n_t, d_t), teacher_weight=make(v_t, d_t, scale=2 / d_t ** 0.5),
        teacher_targets=torch.randint(0, v_t, (n_t,), generator=g).to(DEVICE),
        teacher_chunk=torch.randint(1, chunks, (n_t,), generator=g).to(DEVICE),
    )


@pytest.mark.parametrize("mode", MODES)
def test_calm_loss_end_to_end(mode):
    losses = pytest.importorskip("tide.losses")
    case = _calm_case(torch.float64, seed=4)
    chunks = 9
    lam = torch.rand(chunks, dtype=torch.float64, device=DEVICE) if mode == "tidal" else None
    weight = torch.rand(chunks, dtype=torch.float64, device=DEVICE) if mode == "tidal" else None
    results = {}
    for impl in ("triton", "reference"):
        h = case["student_hidden"].clone().requires_grad_(True)
        w = case["student_weight"].clone().requires_grad_(True)
        teacher_w = case["teacher_weight"].clone().requires_grad_(True)
        loss = losses.calm_loss(h, w, case["student_targets"], case["student_chunk"],
                                case["teacher_hidden"], teacher_w, case["teacher_targets"], case["teacher_chunk"],
                                num_chunks=chunks, reverse=mode == "reverse", temperature=3.0, lam=lam,
                                weight=weight, impl=impl)
        (0.6 * loss).backward()
        assert teacher_w.grad is None                                  # the teacher gets no gradient
        results[impl] = (loss.detach(), h.grad, w.grad)
    for got, ref in zip(results["triton"], results["reference"]):
        assert float((got - ref).abs().max()) <= 1e-9 * max(float(ref.abs().max()), 1e-12)
    assert results["reference"][1].abs().max() > 0


def test_calm_loss_with_a_bf16_teacher_under_the_interpreter():
    """A bf16 teacher (its token log-probs through the Triton kernel) gives the float32 result of
    the same rounded values (before: the interpreter's bf16 tl.dot gave log-probs of about -3e9)."""
    losses = pytest.importorskip("tide.losses")
    case = _calm_case(torch.float32, seed=6)
    teacher = dict(teacher_hidden=case["teacher_hidden"].bfloat16(), teacher_weight=case["teacher_weight"].bfloat16())
    results = {}
    for impl in ("triton", "reference"):
        h = case["student_hidden"].clone().requires_grad_(True)
        loss = losses.calm_loss(h, case["student_weight"], case["student_targets"], case["student_chunk"],
                                teacher["teacher_hidden"], teacher["teacher_weight"], case["teacher_targets"],
                                case["teacher_chunk"], num_chunks=9, reverse=True, impl=impl)
        loss.backward()
        results[impl] = (loss.detach(), h.grad)
    for got, ref in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)

"""Bad input gets a clear error naming the argument and the expected shape or range."""
import pytest
import torch

import tide


def inputs(num_rows=4, student_vocab=10, teacher_vocab=10, d_s=3, d_t=5):
    return (torch.randn(num_rows, d_s), torch.randn(student_vocab, d_s), torch.randn(num_rows, d_t),
            torch.randn(teacher_vocab, d_t), torch.rand(num_rows))


def tidal(*args, **kwargs):
    tensors = list(inputs())
    progress = kwargs.pop("progress", 0.5)
    for index, value in args:
        tensors[index] = value
    return tide.tidal_loss(*tensors, progress, **kwargs)


@pytest.mark.parametrize("call,error,words", [
    (lambda: tidal((4, torch.rand(5))), ValueError, ["mask_ratio", "[N=4]"]),
    (lambda: tidal((2, torch.randn(5, 5))), ValueError, ["teacher_hidden", "N=4"]),
    (lambda: tidal((1, torch.randn(10, 4))), ValueError, ["student_weight", "d_s=3"]),
    (lambda: tidal((3, torch.randn(10, 4))), ValueError, ["teacher_weight", "d_t=5"]),
    (lambda: tidal((0, torch.randn(4))), ValueError, ["student_hidden", "[N, d_s]"]),
    (lambda: tidal((0, torch.randint(0, 3, (4, 3)))), TypeError, ["student_hidden", "floating"]),
    (lambda: tidal((4, torch.tensor([0.1, 0.2, 1.5, 0.3]))), ValueError, ["mask_ratio", "[0.0, 1.0]"]),
    (lambda: tidal((4, torch.tensor([0.1, -0.2, 0.5, 0.3]))), ValueError, ["mask_ratio", "[0.0, 1.0]"]),
    (lambda: tidal(progress=1.5), ValueError, ["progress", "[0, 1]"]),
    (lambda: tidal(progress=-0.1), ValueError, ["progress", "[0, 1]"]),
    (lambda: tidal(targets=torch.tensor([0, 1, 10, 2])), ValueError, ["targets", "[0, 10)"]),
    (lambda: tidal(targets=torch.tensor([0, 1, 2])), ValueError, ["targets", "[N=4]"]),
    (lambda: tidal(targets=torch.tensor([0.0, 1, 2, 3])), TypeError, ["targets", "integer"]),
    (lambda: tidal(ce_weight=torch.ones(4)), ValueError, ["ce_weight", "targets"]),
    (lambda: tidal(targets=torch.tensor([0, 1, 2, 3]), ce_weight=torch.ones(3)), ValueError, ["ce_weight"]),
    (lambda: tidal(impl="fast"), ValueError, ["impl", "chunked"]),
    (lambda: tidal(axis="sideways"), ValueError, ["axis", "timestep_only"]),
    (lambda: tidal(schedule="step"), ValueError, ["schedule", "cosine"]),
    (lambda: tidal(timestep_weight="edge"), ValueError, ["timestep_weight", "midrange"]),
    (lambda: tidal(reduction="avg"), ValueError, ["reduction", "mean", "none"]),
    (lambda: tidal(temperature=0.0), ValueError, ["temperature", "positive"]),
    (lambda: tidal(lambda_max=2.0), ValueError, ["lambda_max", "[0, 1]"]),
    (lambda: tidal(shared_vocab=11), ValueError, ["shared_vocab", "min(V_s, V_t)=10"]),
    (lambda: tidal((3, torch.randn(12, 5))), ValueError, ["V_s=10", "V_t=12", "shared_vocab"]),
    (lambda: tide.kl_loss(*inputs()[:3], torch.randn(10, 5), reverse=True, impl="triton_stream",
                          temperature=-1), ValueError, ["temperature"]),
    (lambda: tide.token_logprobs(torch.randn(3, 4), torch.randn(9, 5), torch.tensor([0, 1, 2])),
     ValueError, ["weight", "d=4"]),
    (lambda: tide.token_logprobs(torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, 1, 9])),
     ValueError, ["targets", "[0, 9)"]),
    (lambda: tide.token_logprobs(torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, 1]),
                                 impl="triton_stream"), ValueError, ["targets"]),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def calm(**overrides):
    args = dict(student_hidden=torch.randn(5, 3), student_weight=torch.randn(10, 3),
                student_targets=torch.tensor([0, 1, 2, 3, 4]), student_chunk=torch.tensor([0, 0, 1, 2, 2]),
                teacher_hidden=torch.randn(4, 6), teacher_weight=torch.randn(12, 6),
                teacher_targets=torch.tensor([0, 1, 11, 3]), teacher_chunk=torch.tensor([0, 1, 1, 2]))
    options = dict(num_chunks=3)
    for key, value in overrides.items():
        (args if key in args else options)[key] = value
    return tide.calm_loss(*args.values(), **options)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(student_chunk=torch.tensor([0, 0, 1, 2, 3])), ValueError, ["student_chunk", "[0, 3)"]),
    (dict(teacher_chunk=torch.tensor([0, 1, -1, 2])), ValueError, ["teacher_chunk", "[0, 3)"]),
    (dict(teacher_chunk=torch.tensor([0, 1, 2])), ValueError, ["teacher_chunk", "[N=4]"]),
    (dict(student_targets=torch.tensor([0, 1, 2, 3, 10])), ValueError, ["student_targets", "[0, 10)"]),
    (dict(teacher_weight=torch.randn(12, 5)), ValueError, ["teacher_weight", "d_t=6"]),
    (dict(num_chunks=-1), ValueError, ["num_chunks"]),
    (dict(lam=torch.rand(4), reverse=False), ValueError, ["lam", "[N=3]"]),
    (dict(lam=torch.tensor([0.5, 1.5, 0.2]), reverse=False), ValueError, ["lam", "[0.0, 1.0]"]),
    (dict(weight=torch.rand(2)), ValueError, ["weight", "[N=3]"]),
])
def test_calm_bad_input(overrides, error, words):
    with pytest.raises(error) as info:
        calm(**overrides)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_calm_good_input_runs():
    assert torch.isfinite(calm())


def test_triton_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # the interpreter would run triton on CPU
    with pytest.raises(ValueError, match="CUDA tensors.*TRITON_INTERPRET=1.*chunked"):
        tidal(impl="triton")


def test_complementary_split_bad_input():
    with pytest.raises((ValueError, TypeError), match="masked"):
        tide.complementary_split(torch.ones(3, 4), 0.5)        # not bool
    with pytest.raises(ValueError, match="demo_ratio"):
        tide.complementary_split(torch.ones(3, 4, dtype=torch.bool), 1.5)


# ----------------------------------------------------------------------------- hardening (issue 12)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call,words", [
    (lambda: tidal((4, torch.tensor([0.1, NAN, 0.5, 0.3]))), ["mask_ratio", "finite"]),
    (lambda: tidal(progress=NAN), ["progress"]),
    (lambda: tidal(progress=INF), ["progress"]),
    (lambda: tidal(lambda_init=NAN), ["lambda_init"]),
    (lambda: tidal(lambda_max=NAN), ["lambda_max"]),
    (lambda: tidal(temperature=INF), ["temperature", "finite"]),
    (lambda: tidal(temperature=NAN), ["temperature"]),
    (lambda: tidal(targets=torch.tensor([0, 1, 2, 3]), ce_weight=torch.tensor([1.0, INF, 1, 1])),
     ["ce_weight", "finite"]),
    (lambda: calm(lam=torch.tensor([0.5, NAN, 0.2]), reverse=False), ["lam", "finite"]),
    (lambda: calm(temperature=NAN), ["temperature"]),
])
def test_nan_and_inf_are_rejected_where_a_range_is_checked(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("call,words", [
    (lambda: tidal((1, torch.randn(0, 3)), (3, torch.randn(0, 5))), ["student_weight", "V_s >= 1"]),
    (lambda: tide.kl_loss(*inputs()[:3], torch.randn(0, 5)), ["teacher_weight", "V_t >= 1"]),
    (lambda: tide.token_logprobs(torch.randn(3, 4), torch.randn(0, 4), torch.tensor([0, 0, 0])), ["weight", "V >= 1"]),
    (lambda: calm(student_weight=torch.randn(0, 3)), ["student_weight", "V_s >= 1"]),
])
def test_empty_vocabulary_is_rejected(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("call,name", [
    (lambda: tidal(shared_vocab=True), "shared_vocab"),
    (lambda: tidal(progress=True), "progress"),
    (lambda: tidal(temperature=True), "temperature"),
    (lambda: tidal(lambda_max=True), "lambda_max"),
    (lambda: tidal(student_softcap=True), "student_softcap"),
    (lambda: tidal(ignore_index=True), "ignore_index"),
    (lambda: calm(num_chunks=True), "num_chunks"),
    (lambda: tide.kl_loss(*inputs()[:4], reverse=1), "reverse"),
])
def test_booleans_are_not_numbers(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_loss_modules_validate_in_the_constructor_and_show_their_options():
    with pytest.raises(ValueError, match="impl must be one of"):
        tide.TIDALLoss(impl="bad")
    with pytest.raises(TypeError, match="bogus"):
        tide.TIDALLoss(bogus=1)
    with pytest.raises(ValueError, match="lambda_init"):
        tide.TIDALLoss(lambda_init=2.0)
    with pytest.raises(ValueError, match="temperature"):
        tide.KLLoss(temperature=0)
    with pytest.raises(ValueError, match="impl"):
        tide.CALMLoss(impl="triton_stream")
    text = repr(tide.TIDALLoss(lambda_max=0.8, impl="chunked"))
    assert "lambda_max=0.8" in text and "impl='chunked'" in text and "temperature=2.0" in text


def test_logits_passed_as_hidden_states_say_hidden_states_were_expected():
    logits = torch.randn(4, 10)                                    # [N, V_s]: logits, not [N, d_s]
    with pytest.raises(ValueError, match="hidden states .* were expected"):
        tidal((0, logits))
    with pytest.raises(ValueError, match="hidden states .* were expected"):
        tide.token_logprobs(torch.randn(3, 9), torch.randn(9, 4), torch.tensor([0, 1, 2]))


def test_progress_may_be_a_0d_tensor():
    torch.manual_seed(0)
    a = tidal(progress=torch.tensor(0.3))
    torch.manual_seed(0)
    b = tidal(progress=0.3)
    torch.testing.assert_close(a.distill, b.distill)
    with pytest.raises(ValueError, match="progress"):
        tidal(progress=torch.tensor([0.3]))


def test_compdemo_chunk_ids_below_minus_one_are_rejected():
    from tide import compdemo
    masked = torch.ones(1, 4, dtype=torch.bool)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_ids"):
        compdemo.teacher_inputs(ids, masked, 5, chunk_ids=torch.tensor([[0, -2, 1, -1]]))
    compdemo.teacher_inputs(ids, masked, 5, chunk_ids=torch.tensor([[0, -1, 1, -1]]))   # -1: no chunk


def test_merge_teacher_hidden_rejects_mixed_dtypes():
    from tide import compdemo
    mask_a = torch.zeros(1, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="dtype"):
        compdemo.merge_teacher_hidden(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2, dtype=torch.bfloat16), mask_a)


@pytest.mark.parametrize("value", ["abc", "-5", "0"])
def test_chunk_bytes_env_that_is_not_a_positive_integer_is_a_clear_error(value, monkeypatch):
    monkeypatch.setenv("TIDE_CHUNK_BYTES", value)
    with pytest.raises(ValueError, match="TIDE_CHUNK_BYTES must be a positive integer"):
        tidal(impl="chunked")

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
    (lambda: tidal(reduction="none"), ValueError, ["reduction", "mean"]),
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
    (dict(lam=torch.rand(3)), ValueError, ["lam", "reverse=False"]),
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

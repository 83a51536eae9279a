"""The public losses (API.md): argument checks in one place, then dispatch on `impl`.

Fused-linear form: callers pass final hidden states and LM-head weights of the
rows that take part (the masked positions); no implementation except
"reference" ever holds an `[N, V]` tensor.

impl:
- "auto": "triton" for CUDA tensors, "chunked" otherwise;
- "triton": row-chunked logit workspace + fused Triton kernels (on CPU only
  under TRITON_INTERPRET=1); `token_logprobs` and `calm_loss` stream here already;
- "triton_stream": `tidal_loss` / `kl_loss` only, fully streaming Triton kernels
  (logit tiles never leave the chip, O(N) extra memory, more FLOPs);
- "chunked": pure PyTorch, bounded memory, any device;
- "reference": eager, materialises logits; the ground truth.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import chunked, reference, schedules

IMPLS = ("auto", "triton", "triton_stream", "chunked", "reference")
REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------- checks
def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_matrix(name, tensor, rows=None, cols=None, rows_name="N", cols_name="d"):
    """A floating 2-D tensor, optionally with a given number of rows / columns."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{rows_name}, {cols_name}], "
                        f"got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
                        f"got {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape [{rows_name}, {cols_name}], got {tuple(tensor.shape)}")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows_name}={rows}, {cols_name}], "
                         f"got {tuple(tensor.shape)}")
    if cols is not None and tensor.shape[1] != cols:
        raise ValueError(f"{name} must have shape [{rows_name}, {cols_name}={cols}], "
                         f"got {tuple(tensor.shape)}")


def _check_rows(name, tensor, num_rows, *, integer=False, low=None, high=None, device=None):
    """A 1-D per-row tensor `[N]`; integer ids in [low, high) or floats in [low, high]."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N={num_rows}], got {type(tensor).__name__}")
    if tensor.dim() != 1 or tensor.shape[0] != num_rows:
        raise ValueError(f"{name} must have shape [N={num_rows}] (one value per row), got {tuple(tensor.shape)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} must be on {device} like the hidden states, got {tensor.device}")
    if integer:
        if tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")
        # One small reduction; argument checks are not on the per-element hot path.
        if tensor.numel() and (int(tensor.min()) < low or int(tensor.max()) >= high):
            raise ValueError(f"{name} values must lie in [{low}, {high}), "
                             f"got min {int(tensor.min())}, max {int(tensor.max())}")
    else:
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
        if tensor.numel() and low is not None and (float(tensor.min()) < low or float(tensor.max()) > high):
            raise ValueError(f"{name} values must lie in [{low}, {high}], "
                             f"got min {float(tensor.min())}, max {float(tensor.max())}")


def _check_temperature(temperature):
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _shared_vocab(shared_vocab, student_vocab, teacher_vocab):
    """Vocabulary prefix both sides share: V_s == V_t unless shared_vocab says how many."""
    if shared_vocab is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student_weight has V_s={student_vocab} rows but teacher_weight has V_t={teacher_vocab}; "
                f"pass shared_vocab=<size of the common prefix> (at most {min(student_vocab, teacher_vocab)})")
        return student_vocab
    if not isinstance(shared_vocab, int) or not 1 <= shared_vocab <= min(student_vocab, teacher_vocab):
        raise ValueError(f"shared_vocab must be an int in [1, min(V_s, V_t)={min(student_vocab, teacher_vocab)}], "
                         f"got {shared_vocab!r}")
    return shared_vocab


def _resolve_impl(impl, device, allowed=IMPLS):
    _check_choice("impl", impl, allowed)
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    if impl in ("triton", "triton_stream") and device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl={impl!r} needs CUDA tensors (got {device}) or TRITON_INTERPRET=1; "
                         f"use impl='chunked' on CPU")
    return impl


def _check_distill(student_hidden, student_weight, teacher_hidden, teacher_weight,
                   temperature, shared_vocab, targets, ce_weight, reduction):
    _check_matrix("student_hidden", student_hidden, cols_name="d_s")
    num_rows, student_width = student_hidden.shape
    _check_matrix("student_weight", student_weight, cols=student_width, rows_name="V_s", cols_name="d_s")
    _check_matrix("teacher_hidden", teacher_hidden, rows=num_rows, cols_name="d_t")
    _check_matrix("teacher_weight", teacher_weight, cols=teacher_hidden.shape[1], rows_name="V_t", cols_name="d_t")
    for name, tensor in (("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
                         ("teacher_weight", teacher_weight)):
        if tensor.device != student_hidden.device:
            raise ValueError(f"{name} must be on {student_hidden.device} like student_hidden, got {tensor.device}")
    _check_temperature(temperature)
    _check_choice("reduction", reduction, REDUCTIONS)
    vocab = _shared_vocab(shared_vocab, student_weight.shape[0], teacher_weight.shape[0])
    if targets is not None:
        _check_rows("targets", targets, num_rows, integer=True, low=0, high=student_weight.shape[0],
                    device=student_hidden.device)
        targets = targets.long()
    if ce_weight is not None:
        if targets is None:
            raise ValueError("ce_weight is given but targets is None: ce_weight weights the CE term of targets")
        _check_rows("ce_weight", ce_weight, num_rows, device=student_hidden.device)
    return num_rows, vocab, targets


def _distill_dispatch(impl, student_hidden, student_weight, teacher_hidden, teacher_weight,
                      row_lambda, row_weight, targets, ce_weight, *, temperature, vocab, reverse, reduction):
    impl = _resolve_impl(impl, student_hidden.device)
    kwargs = dict(temperature=float(temperature), shared_vocab=vocab, reverse=reverse, reduction=reduction)
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight, row_lambda, row_weight,
            targets, ce_weight)
    if impl == "reference":
        return reference.distill_loss(*args, **kwargs)
    if impl == "chunked":
        return chunked.distill_loss(*args, **kwargs)
    from .kernels import tidal as tidal_kernels
    return tidal_kernels.fused_distill_loss(*args, **kwargs, stream=(impl == "triton_stream"))


# --------------------------------------------------------------------------- losses
def tidal_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, progress, *,
               lambda_init=0.1, lambda_max=0.9, schedule="cosine", axis="both",
               timestep_weight="midrange", temperature=2.0, shared_vocab=None, targets=None,
               ce_weight=None, reduction="mean", impl="auto"):
    """TIDAL distillation loss (SPEC.md §2.1), optionally with the CE term in the same vocab pass.

    student_hidden `[N, d_s]`, student_weight `[V_s, d_s]`, teacher_hidden `[N, d_t]`,
    teacher_weight `[V_t, d_t]`, mask_ratio `[N]` (t of each row's sequence, in [0, 1]),
    progress = step / max_steps in [0, 1].
    Returns `T^2 * sum_i w_i KL(r_i || p_i)` (/N for "mean"); with targets `[N]` the pair
    `(distill, ce)`, `ce = sum_i ce_weight_i * CE_i` (/N for "mean").
    Gradients reach student_hidden and student_weight; the teacher gets none.
    """
    num_rows, vocab, targets = _check_distill(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                              temperature, shared_vocab, targets, ce_weight, reduction)
    _check_rows("mask_ratio", mask_ratio, num_rows, low=0.0, high=1.0, device=student_hidden.device)
    if not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be a float in [0, 1] (step / max_steps), got {progress!r}")
    for name, value in (("lambda_init", lambda_init), ("lambda_max", lambda_max)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    _check_choice("schedule", schedule, schedules.SCHEDULES)
    _check_choice("axis", axis, schedules.AXES)
    _check_choice("timestep_weight", timestep_weight, schedules.TIMESTEP_WEIGHTS)
    row_lambda = schedules.row_lambda(mask_ratio, float(progress), lambda_init, lambda_max, schedule, axis)
    row_weight = schedules.timestep_weight(mask_ratio, timestep_weight)
    return _distill_dispatch(impl, student_hidden, student_weight, teacher_hidden, teacher_weight,
                             row_lambda, row_weight, targets, ce_weight, temperature=temperature,
                             vocab=vocab, reverse=False, reduction=reduction)


def kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, reverse=False,
            temperature=2.0, shared_vocab=None, targets=None, ce_weight=None, reduction="mean",
            impl="auto"):
    """Forward `T^2 KL(q || p)` or reverse `T^2 KL(p || q)` per row (SPEC.md baselines).

    Shapes as in `tidal_loss`. Forward KL is TIDAL with lambda = 1 and w = 1.
    """
    num_rows, vocab, targets = _check_distill(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                              temperature, shared_vocab, targets, ce_weight, reduction)
    ones = torch.ones(num_rows, dtype=torch.float32, device=student_hidden.device)
    return _distill_dispatch(impl, student_hidden, student_weight, teacher_hidden, teacher_weight,
                             ones, ones, targets, ce_weight, temperature=temperature,
                             vocab=vocab, reverse=bool(reverse), reduction=reduction)


def _token_logprobs(hidden, weight, targets, impl):
    if impl == "reference":
        return reference.token_logprobs(hidden, weight, targets)
    if impl == "chunked":
        return chunked.token_logprobs(hidden, weight, targets)
    from .kernels import token_logprob as token_logprob_kernels
    return token_logprob_kernels.fused_token_logprobs(hidden, weight, targets)


def token_logprobs(hidden, weight, targets, *, impl="auto"):
    """`log_softmax(hidden @ weight.T)[i, targets[i]]` per row: `[N]`, differentiable.

    hidden `[N, d]`, weight `[V, d]`, targets `[N]` ids in [0, V).
    """
    _check_matrix("hidden", hidden)
    _check_matrix("weight", weight, cols=hidden.shape[1], rows_name="V")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on {hidden.device} like hidden, got {weight.device}")
    _check_rows("targets", targets, hidden.shape[0], integer=True, low=0, high=weight.shape[0],
                device=hidden.device)
    impl = _resolve_impl(impl, hidden.device, allowed=("auto", "triton", "chunked", "reference"))
    return _token_logprobs(hidden, weight, targets.long(), impl)


def calm_loss(student_hidden, student_weight, student_targets, student_chunk,
              teacher_hidden, teacher_weight, teacher_targets, teacher_chunk, *,
              num_chunks, reverse=True, temperature=2.0, lam=None, weight=None,
              reduction="mean", impl="auto"):
    """(Reverse) CALM on chunk log-likelihoods (SPEC.md §2.3); CALM+TIDAL with `lam`.

    student_hidden `[N_s, d_s]`, student_weight `[V_s, d_s]`, student_targets `[N_s]`,
    student_chunk `[N_s]` (chunk index of each row in [0, num_chunks)); the teacher
    side likewise with `[N_t]`. `lam [num_chunks]`: CALM+TIDAL target weight (a forward
    objective: needs reverse=False); `weight [num_chunks]`: per-chunk loss weights.
    A chunk is active when it has at least one row on each side; "mean" divides by the
    number of active chunks (0 active chunks give 0 and zero gradients).
    """
    if not isinstance(num_chunks, int) or num_chunks < 0:
        raise ValueError(f"num_chunks must be a non-negative int, got {num_chunks!r}")
    _check_matrix("student_hidden", student_hidden, rows_name="N_s", cols_name="d_s")
    _check_matrix("student_weight", student_weight, cols=student_hidden.shape[1], rows_name="V_s", cols_name="d_s")
    _check_matrix("teacher_hidden", teacher_hidden, rows_name="N_t", cols_name="d_t")
    _check_matrix("teacher_weight", teacher_weight, cols=teacher_hidden.shape[1], rows_name="V_t", cols_name="d_t")
    device = student_hidden.device
    for name, tensor in (("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
                         ("teacher_weight", teacher_weight)):
        if tensor.device != device:
            raise ValueError(f"{name} must be on {device} like student_hidden, got {tensor.device}")
    num_student, num_teacher = student_hidden.shape[0], teacher_hidden.shape[0]
    _check_rows("student_targets", student_targets, num_student, integer=True, low=0,
                high=student_weight.shape[0], device=device)
    _check_rows("teacher_targets", teacher_targets, num_teacher, integer=True, low=0,
                high=teacher_weight.shape[0], device=device)
    _check_rows("student_chunk", student_chunk, num_student, integer=True, low=0, high=num_chunks, device=device)
    _check_rows("teacher_chunk", teacher_chunk, num_teacher, integer=True, low=0, high=num_chunks, device=device)
    _check_temperature(temperature)
    _check_choice("reduction", reduction, REDUCTIONS)
    if lam is not None:
        if reverse:
            raise ValueError("lam (the CALM+TIDAL target) is a forward objective: pass reverse=False with lam")
        _check_rows("lam", lam, num_chunks, low=0.0, high=1.0, device=device)
    if weight is not None:
        _check_rows("weight", weight, num_chunks, device=device)
    impl = _resolve_impl(impl, device, allowed=("auto", "triton", "chunked", "reference"))

    student_logprobs = _token_logprobs(student_hidden, student_weight, student_targets.long(), impl)
    with torch.no_grad():
        teacher_logprobs = _token_logprobs(teacher_hidden, teacher_weight, teacher_targets.long(), impl)
    kwargs = dict(num_chunks=num_chunks, reverse=bool(reverse), temperature=float(temperature),
                  lam=lam, weight=weight, reduction=reduction)
    chunk_args = (student_logprobs, student_chunk.long(), teacher_logprobs, teacher_chunk.long())
    if impl == "triton":
        from .kernels import calm as calm_kernels
        return calm_kernels.fused_calm_from_token_logprobs(*chunk_args, **kwargs)
    return reference.calm_from_token_logprobs(*chunk_args, **kwargs)


def complementary_split(masked, demo_ratio=0.5, *, generator=None):
    """CompDemo's random split of the masked set into complementary halves (SPEC.md §2.2).

    masked: bool `[b, l]` (or chunk-level `[b, n_chunks]`). Returns `(mask_a, mask_b)`:
    disjoint, union `masked`, each masked element in mask_a with probability demo_ratio.
    """
    from . import compdemo
    return compdemo.complementary_split(masked, demo_ratio, generator=generator)


# --------------------------------------------------------------------------- modules
class TIDALLoss(nn.Module):
    """`tidal_loss` with its keyword options held: `forward(student_hidden, student_weight,
    teacher_hidden, teacher_weight, mask_ratio, progress, targets=None, ce_weight=None)`."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, progress,
                targets=None, ce_weight=None):
        return tidal_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, progress,
                          targets=targets, ce_weight=ce_weight, **self.options)


class KLLoss(nn.Module):
    """`kl_loss` with its keyword options held (reverse=, temperature=, ...)."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None,
                ce_weight=None):
        return kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                       targets=targets, ce_weight=ce_weight, **self.options)


class CALMLoss(nn.Module):
    """`calm_loss` with its keyword options held (reverse=, temperature=, ...); num_chunks,
    lam and weight vary per batch and are passed to forward."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, student_hidden, student_weight, student_targets, student_chunk,
                teacher_hidden, teacher_weight, teacher_targets, teacher_chunk, *, num_chunks,
                lam=None, weight=None):
        return calm_loss(student_hidden, student_weight, student_targets, student_chunk,
                         teacher_hidden, teacher_weight, teacher_targets, teacher_chunk,
                         num_chunks=num_chunks, lam=lam, weight=weight, **self.options)

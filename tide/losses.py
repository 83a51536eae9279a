"""The public losses (API.md): argument checks in one place, then dispatch on `impl`.

Fused-linear form: callers pass final hidden states `[..., d]` (any leading dims,
e.g. `[b, l, d]`) and LM-head weights; per-row tensors are shaped like the leading
dims. The rows that take part are chosen by `ignore_index` on the targets and / or a
boolean `row_mask`; they are gathered here (an `[N_rows, d]` copy, never `[..., V]`),
so every implementation sees flat `[N, d]` rows. No implementation except
"reference" ever holds an `[N, V]` tensor.

impl:
- "auto": "triton" for CUDA tensors, "chunked" otherwise;
- "triton": row-chunked logit workspace + fused Triton kernels (on CPU only
  under TRITON_INTERPRET=1); `token_logprobs`, `cross_entropy` and `calm_loss` stream here;
- "triton_stream": `tidal_loss` / `kl_loss` only, fully streaming Triton kernels
  (logit tiles never leave the chip, O(N) extra memory, more FLOPs);
- "chunked": pure PyTorch, bounded memory, any device;
- "reference": eager, materialises logits; the ground truth.

Every impl computes in float32 (float64 for float64 inputs) whatever the input dtype,
and autocast is switched off inside the losses: the result is the same with or
without `torch.autocast` (CPU or CUDA, bf16 or fp16).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import nn

from . import chunked, reference, schedules

IMPLS = ("auto", "triton", "triton_stream", "chunked", "reference")
REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100          # torch.nn.functional.cross_entropy's default


class DistillOutput(NamedTuple):
    """What `tidal_loss` and `kl_loss` return, whatever the options: `(distill, ce)`.

    `distill`: the distillation term; `ce`: the CE term of `targets`, None without targets.
    Each is a 0-d tensor for reduction "mean" / "sum", per-row values shaped like the
    leading dims of the hidden states for "none" (0 at rows that take no part).
    """
    distill: torch.Tensor
    ce: torch.Tensor | None


# --------------------------------------------------------------------------- checks
def _is_number(value) -> bool:
    """A real Python number; booleans are not numbers here (`temperature=True` is a mistake)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(name, value, choices):
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_float(name, value, low=None, high=None, *, open_low=False, tensor_ok=False, hint=""):
    """A finite real number in [low, high] ((low, high] with open_low); a 0-d tensor with tensor_ok."""
    if tensor_ok and isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low == 0 and high is None and open_low:
            what = "a finite positive number"
        else:
            what = f"a finite number in {'(' if open_low else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {what}{hint}, got {value!r}")
    return float(value)


def _check_int(name, value, low=None):
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        raise ValueError(f"{name} must be an int{'' if low is None else f' >= {low}'}, got {value!r}")
    return value


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_softcap(name, value):
    if value is not None:
        _check_float(name, value, 0, open_low=True,
                     hint=" (the logits become softcap * tanh(logits / softcap)) or None")
        return float(value)
    return None


def _shape_text(lead) -> str:
    return f"[N={lead[0]}]" if len(lead) == 1 else str(list(lead))


def _check_tensor(name, tensor, shape_text):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_text}, got {type(tensor).__name__}")


def _check_float_tensor(name, tensor):
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
                        f"got {tensor.dtype}")


def _check_hidden(name, tensor, width_name, lead=None, lead_name="student_hidden"):
    """Hidden states `[..., d]`; with `lead`, the leading dims must be exactly those."""
    _check_tensor(name, tensor, f"[..., {width_name}]")
    _check_float_tensor(name, tensor)
    if tensor.dim() < 2:
        raise ValueError(f"{name} must have shape [N, {width_name}] or [b, l, {width_name}] "
                         f"(hidden states, any leading dims), got {tuple(tensor.shape)}")
    if lead is not None and tuple(tensor.shape[:-1]) != tuple(lead):
        shape = f"[N={lead[0]}, {width_name}]" if len(lead) == 1 else f"{list(lead) + [width_name]}"
        raise ValueError(f"{name} must have shape {shape} (the leading dims of {lead_name}), "
                         f"got {tuple(tensor.shape)}")


def _check_weight(name, weight, hidden, hidden_name, vocab_name, width_name):
    """LM-head weight `[V, d]` with V >= 1 and d the hidden states' last dim."""
    _check_tensor(name, weight, f"[{vocab_name}, {width_name}]")
    _check_float_tensor(name, weight)
    width = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{name} must have shape [{vocab_name}, {width_name}] with {vocab_name} >= 1, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[1] != width:
        hint = ""
        if width == weight.shape[0]:
            hint = (f"; {hidden_name}'s last dim equals {vocab_name}={width}: these look like logits, "
                    f"but hidden states [..., {width_name}={weight.shape[1]}] (before the LM head) were expected")
        raise ValueError(f"{name} must have shape [{vocab_name}, {width_name}={width}], "
                         f"got {tuple(weight.shape)}{hint}")
    if weight.device != hidden.device:
        raise ValueError(f"{name} must be on {hidden.device} like {hidden_name}, got {weight.device}")


def _check_bias(name, bias, weight, weight_name, vocab_name):
    if bias is None:
        return
    _check_tensor(name, bias, f"[{vocab_name}]")
    _check_float_tensor(name, bias)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name} must have shape [{vocab_name}={weight.shape[0]}] (one per row of {weight_name}), "
                         f"got {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"{name} must be on {weight.device} like {weight_name}, got {bias.device}")


def _check_rows(name, tensor, lead, *, low=None, high=None, device=None, lead_name="student_hidden"):
    """A floating per-row tensor shaped like the leading dims, finite, in [low, high] when given."""
    shape = _shape_text(lead)
    _check_tensor(name, tensor, shape)
    if tuple(tensor.shape) != tuple(lead):
        raise ValueError(f"{name} must have shape {shape} (one value per row, the leading dims of {lead_name}), "
                         f"got {tuple(tensor.shape)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} must be on {device} like {lead_name}, got {tensor.device}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
    # One small reduction; argument checks are not on the per-element hot path.
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf")
    if tensor.numel() and low is not None and (float(tensor.min()) < low or float(tensor.max()) > high):
        raise ValueError(f"{name} values must lie in [{low}, {high}], "
                         f"got min {float(tensor.min())}, max {float(tensor.max())}")


def _check_ids(name, tensor, lead, high, *, device, ignore_index=None, lead_name="student_hidden"):
    """Integer ids shaped like the leading dims, in [0, high) or equal to ignore_index."""
    shape = _shape_text(lead)
    _check_tensor(name, tensor, shape)
    if tuple(tensor.shape) != tuple(lead):
        raise ValueError(f"{name} must have shape {shape} (one value per row, the leading dims of {lead_name}), "
                         f"got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device} like {lead_name}, got {tensor.device}")
    if tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")
    values = tensor if ignore_index is None else tensor[tensor != ignore_index]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= high):
        also = "" if ignore_index is None else f" (or equal ignore_index={ignore_index})"
        raise ValueError(f"{name} values must lie in [0, {high}){also}, "
                         f"got min {int(values.min())}, max {int(values.max())}")


def _check_row_mask(name, mask, lead, device, lead_name="student_hidden"):
    if mask is None:
        return
    shape = _shape_text(lead)
    _check_tensor(name, mask, shape)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(lead):
        raise ValueError(f"{name} must be a bool tensor of shape {shape} (True: the row takes part), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device} like {lead_name}, got {mask.device}")


def _shared_vocab(shared_vocab, student_vocab, teacher_vocab):
    """Vocabulary prefix both sides share: V_s == V_t unless shared_vocab says how many."""
    if shared_vocab is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student_weight has V_s={student_vocab} rows but teacher_weight has V_t={teacher_vocab}; "
                f"pass shared_vocab=<size of the common prefix> (at most {min(student_vocab, teacher_vocab)})")
        return student_vocab
    if not isinstance(shared_vocab, int) or isinstance(shared_vocab, bool) \
            or not 1 <= shared_vocab <= min(student_vocab, teacher_vocab):
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


def _check_distill_options(temperature, shared_vocab, reduction, impl, ignore_index, student_softcap,
                           teacher_softcap):
    """The options of tidal_loss / kl_loss that do not depend on the tensors (also run by the modules)."""
    _check_float("temperature", temperature, 0, open_low=True)
    if shared_vocab is not None:
        _check_int("shared_vocab", shared_vocab, low=1)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("impl", impl, IMPLS)
    if ignore_index is not None:
        _check_int("ignore_index", ignore_index)
    _check_softcap("student_softcap", student_softcap)
    _check_softcap("teacher_softcap", teacher_softcap)


def _check_tidal_options(lambda_init, lambda_max, schedule, axis, timestep_weight):
    for name, value in (("lambda_init", lambda_init), ("lambda_max", lambda_max)):
        _check_float(name, value, 0.0, 1.0)
    _check_choice("schedule", schedule, schedules.SCHEDULES)
    _check_choice("axis", axis, schedules.AXES)
    _check_choice("timestep_weight", timestep_weight, schedules.TIMESTEP_WEIGHTS)


def _no_autocast(device):
    """Switch autocast off inside a loss: every impl accumulates in float32 itself."""
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------- rows taking part
class _Rows:
    """The rows that take part, out of the flattened leading dims: `gather` picks them from a
    `[..., *]` tensor, `scatter` puts per-row results back (0 elsewhere), shaped like the dims."""

    def __init__(self, lead, keep):
        self.lead, self.total = tuple(lead), math.prod(lead)
        self.index = None
        if keep is not None and not bool(keep.all()):
            self.index = keep.reshape(-1).nonzero().squeeze(1)

    @property
    def count(self):
        return self.total if self.index is None else self.index.numel()

    def gather(self, tensor):
        if tensor is None:
            return None
        flat = tensor.reshape(self.total, *tensor.shape[len(self.lead):])
        return flat if self.index is None else flat.index_select(0, self.index)

    def scatter(self, values):
        if values is None:
            return None
        if self.index is not None:
            values = values.new_zeros(self.total).index_copy(0, self.index, values)
        return values.reshape(self.lead)


def _keep(targets, ignore_index, row_mask):
    keep = None
    if targets is not None and ignore_index is not None:
        keep = targets != ignore_index
    if row_mask is not None:
        keep = row_mask if keep is None else keep & row_mask
    return keep


# --------------------------------------------------------------------------- distillation
def _distill(student_hidden, student_weight, teacher_hidden, teacher_weight, *, mask_ratio, tidal, reverse,
             temperature, shared_vocab, targets, ce_weight, row_mask, ignore_index, student_bias, teacher_bias,
             student_softcap, teacher_softcap, reduction, impl):
    """Checks, row selection, per-row TIDAL quantities, dispatch, and the DistillOutput."""
    _check_distill_options(temperature, shared_vocab, reduction, impl, ignore_index, student_softcap,
                           teacher_softcap)
    _check_hidden("student_hidden", student_hidden, "d_s")
    lead = tuple(student_hidden.shape[:-1])
    device = student_hidden.device
    _check_weight("student_weight", student_weight, student_hidden, "student_hidden", "V_s", "d_s")
    _check_hidden("teacher_hidden", teacher_hidden, "d_t", lead=lead)
    if teacher_hidden.device != device:
        raise ValueError(f"teacher_hidden must be on {device} like student_hidden, got {teacher_hidden.device}")
    _check_weight("teacher_weight", teacher_weight, teacher_hidden, "teacher_hidden", "V_t", "d_t")
    _check_bias("student_bias", student_bias, student_weight, "student_weight", "V_s")
    _check_bias("teacher_bias", teacher_bias, teacher_weight, "teacher_weight", "V_t")
    vocab = _shared_vocab(shared_vocab, student_weight.shape[0], teacher_weight.shape[0])
    if targets is not None:
        _check_ids("targets", targets, lead, student_weight.shape[0], device=device, ignore_index=ignore_index)
    if ce_weight is not None:
        if targets is None:
            raise ValueError("ce_weight is given but targets is None: ce_weight weights the CE term of targets")
        _check_rows("ce_weight", ce_weight, lead, device=device)
    _check_row_mask("row_mask", row_mask, lead, device)
    rows = _Rows(lead, _keep(targets, ignore_index, row_mask))

    if tidal is not None:
        progress, options = tidal
        row_lambda = schedules.row_lambda(rows.gather(mask_ratio), progress, options["lambda_init"],
                                          options["lambda_max"], options["schedule"], options["axis"])
        row_weight = schedules.timestep_weight(rows.gather(mask_ratio), options["timestep_weight"])
    else:
        row_lambda = row_weight = torch.ones(rows.count, dtype=torch.float32, device=device)
    impl = _resolve_impl(impl, device)
    args = (rows.gather(student_hidden), student_weight, rows.gather(teacher_hidden), teacher_weight,
            row_lambda, row_weight, None if targets is None else rows.gather(targets).long(), rows.gather(ce_weight))
    kwargs = dict(temperature=float(temperature), shared_vocab=vocab, reverse=reverse, reduction=reduction,
                  student_bias=student_bias, teacher_bias=teacher_bias,
                  student_softcap=_check_softcap("student_softcap", student_softcap),
                  teacher_softcap=_check_softcap("teacher_softcap", teacher_softcap))
    with _no_autocast(device):
        if impl == "reference":
            distill, ce = reference.distill_loss(*args, **kwargs)
        elif impl == "chunked":
            distill, ce = chunked.distill_loss(*args, **kwargs)
        else:
            from .kernels import tidal as tidal_kernels
            distill, ce = tidal_kernels.fused_distill_loss(*args, **kwargs, stream=(impl == "triton_stream"))
    if reduction == "none":
        distill, ce = rows.scatter(distill), rows.scatter(ce)
    return DistillOutput(distill, ce)


def _tidal_mask_ratio(mask_ratio, lead, device):
    """mask_ratio per row (shaped like the leading dims), or per sequence (all leading dims but the
    last, e.g. `[b]` for `[b, l, d]` hidden states), expanded to the rows."""
    if isinstance(mask_ratio, torch.Tensor) and len(lead) >= 2 and tuple(mask_ratio.shape) == lead[:-1]:
        _check_rows("mask_ratio", mask_ratio, lead[:-1], low=0.0, high=1.0, device=device)
        return mask_ratio[..., None].expand(lead)
    _check_rows("mask_ratio", mask_ratio, lead, low=0.0, high=1.0, device=device)
    return mask_ratio


def tidal_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, progress, *,
               lambda_init=0.1, lambda_max=0.9, schedule="cosine", axis="both",
               timestep_weight="midrange", temperature=2.0, shared_vocab=None, targets=None,
               ce_weight=None, row_mask=None, ignore_index=IGNORE_INDEX, student_bias=None, teacher_bias=None,
               student_softcap=None, teacher_softcap=None, reduction="mean", impl="auto") -> DistillOutput:
    """TIDAL distillation loss (SPEC.md §2.1), optionally with the CE term in the same vocab pass.

    student_hidden `[..., d_s]` (e.g. `[b, l, d_s]` or `[N, d_s]`), student_weight `[V_s, d_s]`,
    teacher_hidden `[..., d_t]` (same leading dims), teacher_weight `[V_t, d_t]`,
    mask_ratio shaped like the leading dims (the t of each row's sequence, in [0, 1]) or one
    per sequence (`[b]` for `[b, l, d]`), progress = step / max_steps in [0, 1] (float or 0-d tensor).
    targets (ids, shaped like the leading dims) add the CE term; rows whose target is
    `ignore_index` and rows where `row_mask` (bool, like the leading dims) is False take no part
    in either term. student_bias `[V_s]` / teacher_bias `[V_t]`: LM-head biases;
    student_softcap / teacher_softcap: logits become `c * tanh(logits / c)` before the temperature.
    Returns `DistillOutput(distill, ce)`: `distill = T^2 * sum_i w_i KL(r_i || p_i)`,
    `ce = sum_i ce_weight_i * CE_i` (None without targets), over the N rows that take part;
    "mean" divides by N (0 rows give 0 and zero gradients), "none" gives per-row values
    shaped like the leading dims (0 at rows that take no part).
    Gradients reach student_hidden, student_weight and student_bias; the teacher gets none.
    """
    _check_tidal_options(lambda_init, lambda_max, schedule, axis, timestep_weight)
    progress = _check_float("progress", progress, 0.0, 1.0, tensor_ok=True, hint=" (step / max_steps)")
    if isinstance(student_hidden, torch.Tensor) and student_hidden.dim() >= 2:
        mask_ratio = _tidal_mask_ratio(mask_ratio, tuple(student_hidden.shape[:-1]), student_hidden.device)
    options = dict(lambda_init=lambda_init, lambda_max=lambda_max, schedule=schedule, axis=axis,
                   timestep_weight=timestep_weight)
    return _distill(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio=mask_ratio,
                    tidal=(progress, options), reverse=False, temperature=temperature, shared_vocab=shared_vocab,
                    targets=targets, ce_weight=ce_weight, row_mask=row_mask, ignore_index=ignore_index,
                    student_bias=student_bias, teacher_bias=teacher_bias, student_softcap=student_softcap,
                    teacher_softcap=teacher_softcap, reduction=reduction, impl=impl)


def kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, *, reverse=False,
            temperature=2.0, shared_vocab=None, targets=None, ce_weight=None, row_mask=None,
            ignore_index=IGNORE_INDEX, student_bias=None, teacher_bias=None, student_softcap=None,
            teacher_softcap=None, reduction="mean", impl="auto") -> DistillOutput:
    """Forward `T^2 KL(q || p)` or reverse `T^2 KL(p || q)` per row (SPEC.md baselines).

    Shapes, options and the returned `DistillOutput(distill, ce)` as in `tidal_loss`.
    Forward KL is TIDAL with lambda = 1 and w = 1.
    """
    _check_bool("reverse", reverse)
    return _distill(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio=None, tidal=None,
                    reverse=reverse, temperature=temperature, shared_vocab=shared_vocab, targets=targets,
                    ce_weight=ce_weight, row_mask=row_mask, ignore_index=ignore_index, student_bias=student_bias,
                    teacher_bias=teacher_bias, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                    reduction=reduction, impl=impl)


# --------------------------------------------------------------------------- log-probabilities, CALM
def _token_logprobs(hidden, weight, targets, bias, softcap, impl):
    """Flat `[N, d]` rows, checked; `[N]` float32 (float64) log-probabilities."""
    with _no_autocast(hidden.device):
        if impl == "reference":
            return reference.token_logprobs(hidden, weight, targets, bias, softcap)
        if impl == "chunked":
            return chunked.token_logprobs(hidden, weight, targets, bias, softcap)
        from .kernels import token_logprob as token_logprob_kernels
        return token_logprob_kernels.fused_token_logprobs(hidden, weight, targets, bias=bias, softcap=softcap)


def token_logprobs(hidden, weight, targets, *, bias=None, softcap=None, ignore_index=IGNORE_INDEX,
                   impl="auto") -> torch.Tensor:
    """`log_softmax(c * tanh((hidden @ weight.T + bias) / c))[..., targets]` per row, differentiable.

    hidden `[..., d]`, weight `[V, d]`, bias `[V]` or None, softcap c or None (no cap),
    targets (ids in [0, V), shaped like the leading dims). Returns a tensor shaped like
    targets (float32; float64 for float64 hidden), 0 where targets == ignore_index.
    """
    _check_hidden("hidden", hidden, "d")
    lead = tuple(hidden.shape[:-1])
    _check_weight("weight", weight, hidden, "hidden", "V", "d")
    _check_bias("bias", bias, weight, "weight", "V")
    softcap = _check_softcap("softcap", softcap)
    if ignore_index is not None:
        _check_int("ignore_index", ignore_index)
    _check_ids("targets", targets, lead, weight.shape[0], device=hidden.device, ignore_index=ignore_index,
               lead_name="hidden")
    impl = _resolve_impl(impl, hidden.device, allowed=("auto", "triton", "chunked", "reference"))
    rows = _Rows(lead, _keep(targets, ignore_index, None))
    out = _token_logprobs(rows.gather(hidden), weight, rows.gather(targets).long(), bias, softcap, impl)
    return rows.scatter(out)


def _check_ce_options(reduction, impl, ignore_index, softcap):
    """The options of cross_entropy that do not depend on the tensors (also run by CrossEntropyLoss)."""
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("impl", impl, ("auto", "triton", "chunked", "reference"))
    if ignore_index is not None:
        _check_int("ignore_index", ignore_index)
    return _check_softcap("softcap", softcap)


def cross_entropy(hidden, weight, targets, *, ce_weight=None, reduction="mean", ignore_index=IGNORE_INDEX,
                  bias=None, softcap=None, impl="auto") -> torch.Tensor:
    """Fused linear cross-entropy: `ce_weight_i * CE_i` over the rows that take part, reduced.

    `CE_i = -log_softmax(c * tanh((hidden @ weight.T + bias) / c))[i, targets[i]]` (no softcap c:
    the plain logits; no bias: none). hidden `[..., d]` (e.g. `[b, l, d]` or `[N, d]`), weight
    `[V, d]`, bias `[V]` or None, targets (ids in [0, V), shaped like the leading dims); rows whose
    target is `ignore_index` take no part. ce_weight (floats shaped like targets, None: 1) weights
    each row's CE as in `tidal_loss`'s CE term; it is a constant (no gradient reaches it).
    Returns a tensor (float32; float64 for float64 hidden): "sum" `sum_i ce_weight_i CE_i` and
    "mean" that sum divided by N, the number of rows that take part (not by the sum of
    ce_weight, unlike `F.cross_entropy(weight=)`; 0 rows give 0 and zero gradients), both 0-d;
    "none" the per-row values shaped like targets (0 where targets == ignore_index).
    Gradients reach hidden, weight and bias.

    impl "chunked" (the CPU default) finishes the gradients in its forward walk for "mean" /
    "sum": three GEMMs per row block over the LM head (logits, d hidden, d weight), backward only
    scales them by the upstream gradient, none under torch.no_grad; "none" recomputes the logits
    in backward (as `token_logprobs`). "triton" (the CUDA default) is `-ce_weight * token_logprobs`
    on the fused token log-prob kernel (streams the logits, recomputes them in backward): the
    forward-gradient fusion is the chunked path's. "reference": eager `F.cross_entropy`.
    """
    softcap = _check_ce_options(reduction, impl, ignore_index, softcap)
    _check_hidden("hidden", hidden, "d")
    lead = tuple(hidden.shape[:-1])
    _check_weight("weight", weight, hidden, "hidden", "V", "d")
    _check_bias("bias", bias, weight, "weight", "V")
    _check_ids("targets", targets, lead, weight.shape[0], device=hidden.device, ignore_index=ignore_index,
               lead_name="hidden")
    if ce_weight is not None:
        _check_rows("ce_weight", ce_weight, lead, device=hidden.device, lead_name="hidden")
    impl = _resolve_impl(impl, hidden.device, allowed=("auto", "triton", "chunked", "reference"))
    rows = _Rows(lead, _keep(targets, ignore_index, None))
    args = (rows.gather(hidden), weight, rows.gather(targets).long(),
            None if ce_weight is None else rows.gather(ce_weight).detach())
    with _no_autocast(hidden.device):
        if impl == "reference":
            out = reference.cross_entropy(*args, bias, softcap, reduction=reduction)
        elif impl == "chunked":
            out = chunked.cross_entropy(*args, bias, softcap, reduction=reduction)
        else:
            from .kernels import token_logprob as token_logprob_kernels
            logprobs = token_logprob_kernels.fused_token_logprobs(*args[:3], bias=bias, softcap=softcap)
            out = reference.ce_from_token_logprobs(logprobs, args[3], reduction=reduction)
    return rows.scatter(out) if reduction == "none" else out


def _check_calm_options(reverse, temperature, reduction, impl, ignore_index, student_softcap, teacher_softcap):
    _check_bool("reverse", reverse)
    _check_float("temperature", temperature, 0, open_low=True)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("impl", impl, ("auto", "triton", "chunked", "reference"))
    if ignore_index is not None:
        _check_int("ignore_index", ignore_index)
    _check_softcap("student_softcap", student_softcap)
    _check_softcap("teacher_softcap", teacher_softcap)


def calm_loss(student_hidden, student_weight, student_targets, student_chunk,
              teacher_hidden, teacher_weight, teacher_targets, teacher_chunk, *,
              num_chunks, reverse=True, temperature=2.0, lam=None, weight=None, ignore_index=IGNORE_INDEX,
              student_bias=None, teacher_bias=None, student_softcap=None, teacher_softcap=None,
              reduction="mean", impl="auto") -> torch.Tensor:
    """(Reverse) CALM on chunk log-likelihoods (SPEC.md §2.3); CALM+TIDAL with `lam`.

    student_hidden `[..., d_s]`, student_weight `[V_s, d_s]`, student_targets and
    student_chunk (chunk index of each row in [0, num_chunks)) shaped like its leading
    dims; the teacher side likewise with its own leading dims. Rows whose target is
    `ignore_index` take no part (their chunk id is not read). Biases / softcaps as in
    `tidal_loss`, applied to each side's logits. `lam [num_chunks]`: TIDAL's weight of
    the teacher in the detached chunk target `m = clamp((1 - lam) a + lam b)`: with
    reverse=False CALM+TIDAL `-(m log a + (1 - m) log(1 - a))`, with reverse=True Reverse
    CALM+TIDAL `-(a log m + (1 - a) log(1 - m))`; `weight [num_chunks]`: per-chunk
    loss weights. A chunk is active when it has at least one row on each side.
    Returns a tensor: 0-d for "mean" (divided by the number of active chunks; 0 active
    chunks give 0 and zero gradients) and "sum", per-chunk values `[num_chunks]` for
    "none" (0 for inactive chunks).
    """
    _check_int("num_chunks", num_chunks, low=0)
    _check_calm_options(reverse, temperature, reduction, impl, ignore_index, student_softcap, teacher_softcap)
    _check_hidden("student_hidden", student_hidden, "d_s")
    _check_weight("student_weight", student_weight, student_hidden, "student_hidden", "V_s", "d_s")
    _check_hidden("teacher_hidden", teacher_hidden, "d_t")
    _check_weight("teacher_weight", teacher_weight, teacher_hidden, "teacher_hidden", "V_t", "d_t")
    device = student_hidden.device
    if teacher_hidden.device != device:
        raise ValueError(f"teacher_hidden must be on {device} like student_hidden, got {teacher_hidden.device}")
    _check_bias("student_bias", student_bias, student_weight, "student_weight", "V_s")
    _check_bias("teacher_bias", teacher_bias, teacher_weight, "teacher_weight", "V_t")
    sides = []
    for side, hidden, targets, chunk in (("student", student_hidden, student_targets, student_chunk),
                                         ("teacher", teacher_hidden, teacher_targets, teacher_chunk)):
        lead = tuple(hidden.shape[:-1])
        vocab = (student_weight if side == "student" else teacher_weight).shape[0]
        _check_ids(f"{side}_targets", targets, lead, vocab, device=device, ignore_index=ignore_index,
                   lead_name=f"{side}_hidden")
        rows = _Rows(lead, _keep(targets, ignore_index, None))
        _check_tensor(f"{side}_chunk", chunk, _shape_text(lead))
        if tuple(chunk.shape) != lead:
            raise ValueError(f"{side}_chunk must have shape {_shape_text(lead)} (one value per row, the leading "
                             f"dims of {side}_hidden), got {tuple(chunk.shape)}")
        chunk_rows = rows.gather(chunk)
        _check_ids(f"{side}_chunk", chunk_rows, chunk_rows.shape, num_chunks, device=device,
                   lead_name=f"{side}_hidden")
        sides.append((rows, chunk_rows))
    _check_chunk_weights(lam, weight, num_chunks, device)
    impl = _resolve_impl(impl, device, allowed=("auto", "triton", "chunked", "reference"))
    (student_rows, student_chunk), (teacher_rows, teacher_chunk) = sides
    softcaps = (_check_softcap("student_softcap", student_softcap), _check_softcap("teacher_softcap", teacher_softcap))

    student_logprobs = _token_logprobs(student_rows.gather(student_hidden), student_weight,
                                       student_rows.gather(student_targets).long(), student_bias, softcaps[0], impl)
    with torch.no_grad():
        teacher_logprobs = _token_logprobs(teacher_rows.gather(teacher_hidden), teacher_weight,
                                           teacher_rows.gather(teacher_targets).long(), teacher_bias,
                                           softcaps[1], impl)
    return _calm_from_logprobs(student_logprobs, student_chunk, teacher_logprobs, teacher_chunk, num_chunks=num_chunks,
                               reverse=reverse, temperature=temperature, lam=lam, weight=weight,
                               reduction=reduction, impl=impl)


def _check_chunk_weights(lam, weight, num_chunks, device):
    if lam is not None:
        _check_rows("lam", lam, (num_chunks,), low=0.0, high=1.0, device=device, lead_name="num_chunks")
    if weight is not None:
        _check_rows("weight", weight, (num_chunks,), device=device, lead_name="num_chunks")


def calm_from_logprobs(student_logprobs, student_chunk, teacher_logprobs, teacher_chunk, *, num_chunks,
                       reverse=True, temperature=2.0, lam=None, weight=None, reduction="mean",
                       impl="auto") -> torch.Tensor:
    """`calm_loss` from per-row token log-probabilities instead of hidden states.

    For a training step that already has the student's token log-probabilities (for its CE
    term, say): one pass over the vocabulary then serves both. student_logprobs `[N_s]`
    (differentiable: `token_logprobs` of the student's rows), student_chunk `[N_s]` (chunk
    ids in [0, num_chunks)); teacher_logprobs `[N_t]` (no gradient is passed to it) and
    teacher_chunk `[N_t]`. Options and return value as in `calm_loss`.
    """
    _check_int("num_chunks", num_chunks, low=0)
    _check_calm_options(reverse, temperature, reduction, impl, None, None, None)
    device = student_logprobs.device if isinstance(student_logprobs, torch.Tensor) else None
    for side, logprobs, chunk in (("student", student_logprobs, student_chunk),
                                  ("teacher", teacher_logprobs, teacher_chunk)):
        _check_tensor(f"{side}_logprobs", logprobs, f"[N_{side[0]}]")
        if logprobs.dim() != 1 or not logprobs.is_floating_point():
            raise ValueError(f"{side}_logprobs must be a 1-D float tensor [N_{side[0]}] of per-row token "
                             f"log-probabilities, got {tuple(logprobs.shape)} {logprobs.dtype}")
        if logprobs.device != device:
            raise ValueError(f"{side}_logprobs must be on {device} like student_logprobs, got {logprobs.device}")
        _check_ids(f"{side}_chunk", chunk, tuple(logprobs.shape), num_chunks, device=device,
                   lead_name=f"{side}_logprobs")
    _check_chunk_weights(lam, weight, num_chunks, device)
    impl = _resolve_impl(impl, device, allowed=("auto", "triton", "chunked", "reference"))
    return _calm_from_logprobs(student_logprobs, student_chunk, teacher_logprobs.detach(), teacher_chunk,
                               num_chunks=num_chunks, reverse=bool(reverse), temperature=temperature, lam=lam,
                               weight=weight, reduction=reduction, impl=impl)


def _calm_from_logprobs(student_logprobs, student_chunk, teacher_logprobs, teacher_chunk, *, num_chunks, reverse,
                        temperature, lam, weight, reduction, impl):
    """The chunk objective on checked per-row log-likelihoods (impl resolved)."""
    device = student_logprobs.device
    if lam is not None and reverse:  # Reverse CALM + TIDAL = Reverse CALM against the mixed target m
        teacher_logprobs, teacher_chunk = _mixed_chunk_target(student_logprobs, student_chunk, teacher_logprobs,
                                                              teacher_chunk, num_chunks, float(temperature), lam)
        lam = None
    kwargs = dict(num_chunks=num_chunks, reverse=reverse, temperature=float(temperature),
                  lam=lam, weight=weight, reduction=reduction)
    chunk_args = (student_logprobs, student_chunk.long(), teacher_logprobs, teacher_chunk.long())
    with _no_autocast(device):
        if impl == "triton":
            from .kernels import calm as calm_kernels
            return calm_kernels.fused_calm_from_token_logprobs(*chunk_args, **kwargs)
        return reference.calm_from_token_logprobs(*chunk_args, **kwargs)


@torch.no_grad()
def _mixed_chunk_target(student_logprobs, student_chunk, teacher_logprobs, teacher_chunk, num_chunks, temperature,
                        lam):
    """Teacher rows that make Reverse CALM compute Reverse CALM + TIDAL: one row per chunk that has
    teacher rows, with log-likelihood `T log m`, so its chunk probability is the detached mixture
    `m = clamp((1 - lam) a + lam b, eps, 1 - eps)` of the student's `a` and the teacher's `b`.
    Returns `(logprobs [C], chunk ids [C])`."""
    T, eps = temperature, reference.CHUNK_PROB_EPS
    dtype = student_logprobs.dtype
    student_chunk, teacher_chunk = student_chunk.long(), teacher_chunk.long()
    chunk_student = student_logprobs.new_zeros(num_chunks).index_add(0, student_chunk, student_logprobs.detach())
    chunk_teacher = student_logprobs.new_zeros(num_chunks).index_add(0, teacher_chunk, teacher_logprobs.to(dtype))
    a = torch.clamp(torch.exp(chunk_student / T), eps, 1 - eps)
    b = torch.clamp(torch.exp(chunk_teacher / T), eps, 1 - eps)
    m = torch.clamp((1 - lam.to(dtype)) * a + lam.to(dtype) * b, eps, 1 - eps)
    chunks = torch.bincount(teacher_chunk, minlength=num_chunks).nonzero().squeeze(1)
    return T * torch.log(m[chunks]), chunks


def complementary_split(masked, demo_ratio=0.5, *, generator=None):
    """CompDemo's random split of the masked set into complementary halves (SPEC.md §2.2).

    masked: bool `[b, l]` (or chunk-level `[b, n_chunks]`). Returns `(mask_a, mask_b)`:
    disjoint, union `masked`, each masked element in mask_a with probability demo_ratio.
    """
    from . import compdemo
    return compdemo.complementary_split(masked, demo_ratio, generator=generator)


# --------------------------------------------------------------------------- modules
class _LossModule(nn.Module):
    """Holds a loss's keyword options, checked in the constructor and listed by `repr`."""

    def extra_repr(self):
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class TIDALLoss(_LossModule):
    """`tidal_loss` with its keyword options held (checked here, shown by `repr`):
    `forward(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, progress,
    targets=None, ce_weight=None, row_mask=None, student_bias=None, teacher_bias=None)` returns
    `DistillOutput(distill, ce)`."""

    def __init__(self, *, lambda_init=0.1, lambda_max=0.9, schedule="cosine", axis="both",
                 timestep_weight="midrange", temperature=2.0, shared_vocab=None, ignore_index=IGNORE_INDEX,
                 student_softcap=None, teacher_softcap=None, reduction="mean", impl="auto"):
        super().__init__()
        _check_tidal_options(lambda_init, lambda_max, schedule, axis, timestep_weight)
        _check_distill_options(temperature, shared_vocab, reduction, impl, ignore_index, student_softcap,
                               teacher_softcap)
        self.options = dict(lambda_init=lambda_init, lambda_max=lambda_max, schedule=schedule, axis=axis,
                            timestep_weight=timestep_weight, temperature=temperature, shared_vocab=shared_vocab,
                            ignore_index=ignore_index, student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap, reduction=reduction, impl=impl)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, progress,
                targets=None, ce_weight=None, row_mask=None, student_bias=None, teacher_bias=None) -> DistillOutput:
        return tidal_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask_ratio, progress,
                          targets=targets, ce_weight=ce_weight, row_mask=row_mask, student_bias=student_bias,
                          teacher_bias=teacher_bias, **self.options)


class KLLoss(_LossModule):
    """`kl_loss` with its keyword options held (reverse=, temperature=, ...; checked here, shown by
    `repr`): `forward(student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None,
    ce_weight=None, row_mask=None, student_bias=None, teacher_bias=None)` returns `DistillOutput`."""

    def __init__(self, *, reverse=False, temperature=2.0, shared_vocab=None, ignore_index=IGNORE_INDEX,
                 student_softcap=None, teacher_softcap=None, reduction="mean", impl="auto"):
        super().__init__()
        _check_bool("reverse", reverse)
        _check_distill_options(temperature, shared_vocab, reduction, impl, ignore_index, student_softcap,
                               teacher_softcap)
        self.options = dict(reverse=reverse, temperature=temperature, shared_vocab=shared_vocab,
                            ignore_index=ignore_index, student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap, reduction=reduction, impl=impl)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None,
                ce_weight=None, row_mask=None, student_bias=None, teacher_bias=None) -> DistillOutput:
        return kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets=targets,
                       ce_weight=ce_weight, row_mask=row_mask, student_bias=student_bias,
                       teacher_bias=teacher_bias, **self.options)


class CrossEntropyLoss(_LossModule):
    """`cross_entropy` with its keyword options held (reduction=, ignore_index=, softcap=, impl=; checked
    here, shown by `repr`): `forward(hidden, weight, targets, ce_weight=None, bias=None)` returns a tensor."""

    def __init__(self, *, reduction="mean", ignore_index=IGNORE_INDEX, softcap=None, impl="auto"):
        super().__init__()
        _check_ce_options(reduction, impl, ignore_index, softcap)
        self.options = dict(reduction=reduction, ignore_index=ignore_index, softcap=softcap, impl=impl)

    def forward(self, hidden, weight, targets, ce_weight=None, bias=None) -> torch.Tensor:
        return cross_entropy(hidden, weight, targets, ce_weight=ce_weight, bias=bias, **self.options)


class CALMLoss(_LossModule):
    """`calm_loss` with its keyword options held (reverse=, temperature=, ...; checked here, shown by
    `repr`); num_chunks, lam, weight and the biases vary per batch and are passed to forward."""

    def __init__(self, *, reverse=True, temperature=2.0, ignore_index=IGNORE_INDEX, student_softcap=None,
                 teacher_softcap=None, reduction="mean", impl="auto"):
        super().__init__()
        _check_calm_options(reverse, temperature, reduction, impl, ignore_index, student_softcap, teacher_softcap)
        self.options = dict(reverse=reverse, temperature=temperature, ignore_index=ignore_index,
                            student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                            reduction=reduction, impl=impl)

    def forward(self, student_hidden, student_weight, student_targets, student_chunk,
                teacher_hidden, teacher_weight, teacher_targets, teacher_chunk, *, num_chunks,
                lam=None, weight=None, student_bias=None, teacher_bias=None) -> torch.Tensor:
        return calm_loss(student_hidden, student_weight, student_targets, student_chunk,
                         teacher_hidden, teacher_weight, teacher_targets, teacher_chunk,
                         num_chunks=num_chunks, lam=lam, weight=weight, student_bias=student_bias,
                         teacher_bias=teacher_bias, **self.options)

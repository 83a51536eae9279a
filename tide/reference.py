"""Eager ground truth of every loss, line by line from SPEC.md.

Simple on purpose: it materialises the full `[N, V]` logits and lets autograd
differentiate. Every other implementation (tide.chunked, tide.kernels) must
compute the same function and the same gradients; the tests compare them with
this file in float64.

All functions here take already-checked arguments (tide.losses checks them) and
the per-row TIDAL quantities from tide.schedules:
- `row_lambda [N]`: weight of the teacher in the target r (1 for forward KL);
- `row_weight [N]`: per-row loss weight w (1 for plain KL).
Computation runs in float64 for float64 inputs, float32 otherwise (bf16/fp16
inputs are upcast: fp32 accumulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Chunk probabilities are clamped to [CHUNK_PROB_EPS, 1 - CHUNK_PROB_EPS] (SPEC.md).
CHUNK_PROB_EPS = 1e-7


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _normaliser(total: torch.Tensor, count, reduction: str) -> torch.Tensor:
    """"sum" keeps the total; "mean" divides by count (at least 1, so empty input gives 0)."""
    if reduction == "sum":
        return total
    if isinstance(count, torch.Tensor):
        return total / count.clamp(min=1).to(total.dtype)
    return total / max(int(count), 1)


def _reduce_rows(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    """"none": the per-row values `[N]`; "sum" / "mean" (over N, 0 for N = 0) a 0-d tensor."""
    if reduction == "none":
        return per_row
    return _normaliser(per_row.sum(), per_row.shape[0], reduction)


def lm_logits(hidden, weight, bias=None, softcap=None, dtype=torch.float32):
    """`softcap * tanh((hidden @ weight.T + bias) / softcap)` `[N, V]` in `dtype` (no cap: the
    plain logits). Softcapping is Gemma's final-logit cap; its derivative is `1 - tanh^2`."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                 row_lambda, row_weight, targets=None, ce_weight=None, *,
                 temperature: float, shared_vocab: int, reverse: bool, reduction: str,
                 student_bias=None, teacher_bias=None, student_softcap=None, teacher_softcap=None):
    """TIDAL / forward KL (reverse=False) or reverse KL (reverse=True), plus CE.

    student_hidden `[N, d_s]`, student_weight `[V_s, d_s]`, teacher_hidden
    `[N, d_t]`, teacher_weight `[V_t, d_t]`, row_lambda/row_weight `[N]`,
    targets `[N]` long or None, ce_weight `[N]` or None, student_bias `[V_s]` /
    teacher_bias `[V_t]` or None, softcaps positive floats or None (applied to the
    logits, bias included, before the temperature).
    Returns `(distill, ce)`: `T^2 * w_i * KL_i` and `ce_weight_i * CE_i` per row
    `[N]` for "none", else their sums (/N for "mean"); ce is None without targets.
    """
    dtype = compute_dtype(student_hidden)
    T = temperature
    student_logits = lm_logits(student_hidden, student_weight, student_bias, student_softcap, dtype)  # [N, V_s]
    with torch.no_grad():
        teacher_logits = lm_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, dtype)  # [N, V_t]
    s = student_logits[:, :shared_vocab]
    u = teacher_logits[:, :shared_vocab]
    log_p = F.log_softmax(s / T, dim=-1)                                         # student at T
    if reverse:
        log_q = F.log_softmax(u / T, dim=-1)                                     # teacher at T
        per_row = (log_p.exp() * (log_p - log_q)).sum(-1)                        # KL(p || q)
    else:
        lam = row_lambda.to(dtype)[:, None]
        log_r = F.log_softmax(((1 - lam) * s + lam * u) / T, dim=-1).detach()   # stop-gradient target
        per_row = (log_r.exp() * (log_r - log_p)).sum(-1)                        # KL(r || p)
    distill = _reduce_rows(T * T * row_weight.to(dtype) * per_row, reduction)
    if targets is None:
        return distill, None
    ce_rows = F.cross_entropy(student_logits, targets, reduction="none")         # at T = 1, full V_s
    if ce_weight is not None:
        ce_rows = ce_weight.to(dtype) * ce_rows
    return distill, _reduce_rows(ce_rows, reduction)


def cross_entropy(hidden, weight, targets, ce_weight=None, bias=None, softcap=None, *, reduction: str):
    """`ce_weight_i * CE_i` per row, `CE_i = -log_softmax(softcap(hidden @ weight.T + bias))[i, targets[i]]`.

    hidden `[N, d]`, weight `[V, d]`, targets `[N]` long, ce_weight `[N]` or None (1 per row),
    bias `[V]` or None, softcap a positive float or None. Returns the per-row values `[N]` for
    "none", else their sum (/N for "mean": the rows' count, not the sum of ce_weight).
    """
    dtype = compute_dtype(hidden)
    logits = lm_logits(hidden, weight, bias, softcap, dtype)                    # [N, V]
    ce_rows = F.cross_entropy(logits, targets, reduction="none")
    if ce_weight is not None:
        ce_rows = ce_weight.to(dtype) * ce_rows
    return _reduce_rows(ce_rows, reduction)


def ce_from_token_logprobs(logprobs, ce_weight=None, *, reduction: str):
    """`-ce_weight_i * logprobs_i` per row (`logprobs [N]` from `token_logprobs`), reduced as in
    `cross_entropy`: the CE of impls that compute token log-probabilities (autograd carries any
    upstream gradient through them)."""
    ce_rows = -logprobs if ce_weight is None else -(ce_weight.to(logprobs.dtype) * logprobs)
    return _reduce_rows(ce_rows, reduction)


def token_logprobs(hidden, weight, targets, bias=None, softcap=None):
    """`log_softmax(softcap(hidden @ weight.T + bias))[i, targets[i]]` per row: `[N]`."""
    logits = lm_logits(hidden, weight, bias, softcap, compute_dtype(hidden))    # [N, V]
    return F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def calm_from_token_logprobs(student_logprobs, student_chunk, teacher_logprobs, teacher_chunk, *,
                             num_chunks: int, reverse: bool, temperature: float,
                             lam=None, weight=None, reduction: str):
    """(Reverse) CALM and CALM+TIDAL on chunk log-likelihoods (SPEC.md, "Cross-tokenizer chunks").

    student_logprobs `[N_s]` (differentiable), student_chunk `[N_s]`, teacher_logprobs
    `[N_t]`, teacher_chunk `[N_t]`: chunk index of each row in [0, num_chunks).
    Segment sums by chunk id (index_add), never a dense `[N, num_chunks]` matrix.
    A chunk is active when it has at least one row on each side; "mean" divides by
    the number of active chunks; "none" returns the per-chunk values `[num_chunks]` (0 for
    inactive chunks).
    """
    dtype = student_logprobs.dtype
    T = temperature
    chunk_student = student_logprobs.new_zeros(num_chunks).index_add(0, student_chunk, student_logprobs)
    chunk_teacher = student_logprobs.new_zeros(num_chunks).index_add(
        0, teacher_chunk, teacher_logprobs.detach().to(dtype))
    active = (torch.bincount(student_chunk, minlength=num_chunks) > 0) & \
             (torch.bincount(teacher_chunk, minlength=num_chunks) > 0)
    a = torch.clamp(torch.exp(chunk_student / T), CHUNK_PROB_EPS, 1 - CHUNK_PROB_EPS)   # student chunk prob
    b = torch.clamp(torch.exp(chunk_teacher / T), CHUNK_PROB_EPS, 1 - CHUNK_PROB_EPS)   # teacher chunk prob
    if lam is not None:                                  # CALM + TIDAL: mixed, detached target m
        m = torch.clamp((1 - lam.to(dtype)) * a + lam.to(dtype) * b,
                        CHUNK_PROB_EPS, 1 - CHUNK_PROB_EPS).detach()
        per_chunk = -(m * torch.log(a) + (1 - m) * torch.log(1 - a))
    elif reverse:                                        # Reverse CALM
        per_chunk = -(a * torch.log(b) + (1 - a) * torch.log(1 - b))
    else:                                                # forward CALM
        per_chunk = -(b * torch.log(a) + (1 - b) * torch.log(1 - a))
    if weight is not None:
        per_chunk = per_chunk * weight.to(dtype)
    per_chunk = torch.where(active, per_chunk, torch.zeros_like(per_chunk))
    if reduction == "none":
        return per_chunk
    return _normaliser(per_chunk.sum(), active.sum(), reduction)

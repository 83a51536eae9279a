"""Chunk segment sums and the (Reverse) CALM Bernoulli losses (SPEC.md, cross-tokenizer chunks).

Eager equivalent (tide.reference.calm_from_token_logprobs):

    l_s = zeros(C).index_add(0, student_chunk, student_logprobs)     # chunk log-likelihoods
    l_t = zeros(C).index_add(0, teacher_chunk, teacher_logprobs)
    active = (bincount(student_chunk) > 0) & (bincount(teacher_chunk) > 0)
    a = clamp(exp(l_s / T), eps, 1 - eps);  b = clamp(exp(l_t / T), eps, 1 - eps)
    reverse CALM:  -(a log b + (1 - a) log(1 - b))
    forward CALM:  -(b log a + (1 - b) log(1 - a))
    CALM + TIDAL:  m = clamp((1 - lam) a + lam b, eps, 1 - eps) (detached);  -(m log a + (1 - m) log(1 - a))
    loss = sum(weight * per_chunk over active chunks) / (number of active chunks, "mean") or the sum

The token log-probabilities come from tide.kernels.token_logprob (never `[N, V]`).
Here every tensor is `[N_s]`, `[N_t]` or `[C]`; no `[N, C]` alignment matrix.

Three small kernels, 1-D grids:

    segment_sum:  for each token block: atomic_add(sums[chunk[j]], logprob[j]); atomic_add(counts[chunk[j]], 1)
                  (run once for the student, once for the teacher)
    chunk_loss:   for each chunk block: a, b, the per-chunk loss and d loss / d l_s (below), zero when inactive
    scatter_grad: for each student token block: grad[j] = coef * dchunk[chunk[j]],
                  coef = grad_output / (active chunks, "mean") — a 0-d device tensor: no host sync

HBM bytes: reads N_s + N_t log-probs and chunk ids twice at most, writes O(C);
the eager reference's dense alignment (the public code's bmm) would touch N * C.

Numerics: float64 inputs compute in float64, every other dtype in float32. The
float segment sums use atomics, so on a GPU the float32 result may differ from run
to run in the last bits (summation order); float64 is exact to ~1e-16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Chunk probabilities are clamped to [CHUNK_PROB_EPS, 1 - CHUNK_PROB_EPS] (SPEC.md; tide.reference).
CHUNK_PROB_EPS = 1e-7

MODE_FORWARD, MODE_REVERSE, MODE_TIDAL = 0, 1, 2
_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@dataclass(frozen=True)
class CalmParams:
    """Non-tensor options of one call (they travel as one object into Function.forward)."""
    num_chunks: int
    mode: int             # MODE_FORWARD | MODE_REVERSE | MODE_TIDAL
    temperature: float
    reduction: str        # "mean" | "sum"
    block: int = 1024


# --------------------------------------------------------------------------- kernels
@triton.jit
def _segment_sum_kernel(
    values_ptr,    # [N] per-token log-probabilities
    chunk_ptr,     # [N] int64 chunk id of each token, in [0, C)
    sums_ptr,      # [C] out: sum of values per chunk (ACC_DTYPE, zero-initialised)
    counts_ptr,    # [C] out: tokens per chunk (int32, zero-initialised)
    N,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < N
    values = tl.load(values_ptr + offsets, mask=ok, other=0.0)
    chunks = tl.load(chunk_ptr + offsets, mask=ok, other=0)
    tl.atomic_add(sums_ptr + chunks, values.to(sums_ptr.dtype.element_ty), mask=ok)
    tl.atomic_add(counts_ptr + chunks, tl.full((BLOCK,), 1, tl.int32), mask=ok)


# Gradient w.r.t. the student chunk log-likelihood l_s (the teacher side and the
# TIDAL target m are constants). With e = exp(l_s / T) and a = clamp(e):
#   da/dl_s = e / T where eps <= e <= 1 - eps, else 0 (clamp active: zero gradient)
#   reverse:  dL/da = -(log b - log(1 - b)) = -log(b / (1 - b))
#   forward:  dL/da = -(b / a - (1 - b) / (1 - a))
#   TIDAL:    dL/da = -(m / a - (1 - m) / (1 - a))
#   dL/dl_s = weight * dL/da * da/dl_s, and 0 for inactive chunks.
@triton.jit
def _chunk_loss_kernel(
    student_sum_ptr,    # [C] l_s
    teacher_sum_ptr,    # [C] l_t
    student_count_ptr,  # [C] int32 student tokens per chunk
    teacher_count_ptr,  # [C] int32 teacher tokens per chunk
    lam_ptr,            # [C] TIDAL lambda per chunk (MODE == 2 only)
    weight_ptr,         # [C] per-chunk loss weight (HAS_WEIGHT only)
    loss_ptr,           # [C] out: per-chunk loss, 0 when inactive
    grad_ptr,           # [C] out: d loss / d l_s, 0 when inactive or clamped
    active_ptr,         # [C] out: 1.0 for active chunks, else 0.0
    C,
    MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    TEMPERATURE: tl.constexpr, EPS: tl.constexpr, ONE_MINUS_EPS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < C
    # constants in the accumulation dtype (exact float64 when computing in float64)
    temperature = tl.full((), TEMPERATURE, ACC_DTYPE)
    lo = tl.full((), EPS, ACC_DTYPE)
    hi = tl.full((), ONE_MINUS_EPS, ACC_DTYPE)

    l_s = tl.load(student_sum_ptr + offsets, mask=ok, other=0.0)
    l_t = tl.load(teacher_sum_ptr + offsets, mask=ok, other=0.0)
    active = (tl.load(student_count_ptr + offsets, mask=ok, other=0) > 0) & \
             (tl.load(teacher_count_ptr + offsets, mask=ok, other=0) > 0)
    e_s = tl.exp(l_s / temperature)
    e_t = tl.exp(l_t / temperature)
    a = tl.minimum(tl.maximum(e_s, lo), hi)             # student chunk probability
    b = tl.minimum(tl.maximum(e_t, lo), hi)             # teacher chunk probability
    a_free = (e_s >= lo) & (e_s <= hi)                  # clamp inactive: gradient flows

    if MODE == 1:                                       # reverse CALM
        loss = -(a * tl.log(b) + (1 - a) * tl.log(1 - b))
        d_a = -(tl.log(b) - tl.log(1 - b))
    else:
        if MODE == 2:                                   # CALM + TIDAL: detached mixed target m
            lam = tl.load(lam_ptr + offsets, mask=ok, other=0.0).to(ACC_DTYPE)
            target = tl.minimum(tl.maximum((1 - lam) * a + lam * b, lo), hi)
        else:                                           # forward CALM: target b
            target = b
        loss = -(target * tl.log(a) + (1 - target) * tl.log(1 - a))
        d_a = -(target / a - (1 - target) / (1 - a))
    grad = tl.where(a_free, d_a * e_s / temperature, 0.0)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + offsets, mask=ok, other=0.0).to(ACC_DTYPE)
        loss = loss * weight
        grad = grad * weight
    tl.store(loss_ptr + offsets, tl.where(active, loss, 0.0), mask=ok)
    tl.store(grad_ptr + offsets, tl.where(active, grad, 0.0), mask=ok)
    tl.store(active_ptr + offsets, active.to(ACC_DTYPE), mask=ok)


@triton.jit
def _scatter_grad_kernel(
    chunk_grad_ptr,   # [C] d loss / d l_s per chunk
    chunk_ptr,        # [N] int64 chunk id of each student token
    coef_ptr,         # [] grad_output / normaliser
    out_ptr,          # [N] out: d loss / d student_logprobs
    N,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < N
    chunks = tl.load(chunk_ptr + offsets, mask=ok, other=0)
    coef = tl.load(coef_ptr)
    grad = tl.load(chunk_grad_ptr + chunks, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, (coef * grad).to(out_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- launchers
def _segment_sum(values, chunks, num_chunks, acc, block):
    sums = torch.zeros(num_chunks, dtype=acc, device=values.device)
    counts = torch.zeros(num_chunks, dtype=torch.int32, device=values.device)
    if values.numel() and num_chunks:
        _segment_sum_kernel[(triton.cdiv(values.numel(), block),)](
            values.contiguous(), chunks.contiguous(), sums, counts, values.numel(), BLOCK=block)
    return sums, counts


def calm_chunk_losses(student_logprobs, student_chunk, teacher_logprobs, teacher_chunk, lam, weight,
                      params: CalmParams):
    """Per-chunk `(loss [C], d loss / d l_s [C], active [C] as 0/1)` in the accumulation dtype."""
    acc = torch.float64 if student_logprobs.dtype == torch.float64 else torch.float32
    num_chunks, block = params.num_chunks, params.block
    student_sum, student_count = _segment_sum(student_logprobs.detach(), student_chunk, num_chunks, acc, block)
    teacher_sum, teacher_count = _segment_sum(teacher_logprobs.detach(), teacher_chunk, num_chunks, acc, block)
    loss = torch.empty(num_chunks, dtype=acc, device=student_logprobs.device)
    grad = torch.empty_like(loss)
    active = torch.empty_like(loss)
    if num_chunks:
        _chunk_loss_kernel[(triton.cdiv(num_chunks, block),)](
            student_sum, teacher_sum, student_count, teacher_count,
            lam if lam is not None else loss, weight if weight is not None else loss,
            loss, grad, active, num_chunks,
            MODE=params.mode, HAS_WEIGHT=weight is not None,
            TEMPERATURE=float(params.temperature), EPS=CHUNK_PROB_EPS, ONE_MINUS_EPS=1 - CHUNK_PROB_EPS,
            ACC_DTYPE=_TL_DTYPE[acc], BLOCK=block,
        )
    return loss, grad, active


# --------------------------------------------------------------------------- autograd
class CalmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logprobs, student_chunk, teacher_logprobs, teacher_chunk, lam, weight,
                params: CalmParams):
        loss, grad, active = calm_chunk_losses(student_logprobs, student_chunk, teacher_logprobs,
                                               teacher_chunk, lam, weight, params)
        norm = active.sum().clamp(min=1) if params.reduction == "mean" else torch.ones_like(loss[:1].sum())
        ctx.save_for_backward(grad, student_chunk, norm)
        ctx.params = params
        if params.reduction == "none":
            return loss.to(student_logprobs.dtype)                   # [C], 0 for inactive chunks
        return (loss.sum() / norm).to(student_logprobs.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        chunk_grad, student_chunk, norm = ctx.saved_tensors
        out = torch.empty(student_chunk.shape, dtype=grad_output.dtype, device=grad_output.device)
        if out.numel():
            if ctx.params.reduction == "none":                      # per-chunk upstream gradients [C]
                chunk_grad = chunk_grad * grad_output.to(chunk_grad.dtype)
                grad_output = torch.ones((), dtype=grad_output.dtype, device=grad_output.device)
            coef = (grad_output.to(chunk_grad.dtype) / norm).reshape(())
            block = ctx.params.block
            _scatter_grad_kernel[(triton.cdiv(out.numel(), block),)](
                chunk_grad, student_chunk, coef, out, out.numel(), BLOCK=block)
        return out, None, None, None, None, None, None


def fused_calm_from_token_logprobs(student_logprobs, student_chunk, teacher_logprobs, teacher_chunk, *,
                                   num_chunks, reverse, temperature, lam=None, weight=None, reduction="mean",
                                   block=1024):
    """(Reverse) CALM / CALM+TIDAL on chunk log-likelihoods; semantics of
    tide.reference.calm_from_token_logprobs (arguments checked by tide.losses).

    student_logprobs `[N_s]` (differentiable), student_chunk `[N_s]` int64 in [0, num_chunks),
    teacher_logprobs `[N_t]` (no gradient), teacher_chunk `[N_t]`, lam / weight `[num_chunks]` or None.
    Returns a 0-d tensor in student_logprobs' dtype ("mean" / "sum"), or the per-chunk losses
    `[num_chunks]` for "none" (0 for inactive chunks; backward scales each chunk's gradient by its
    upstream gradient before the scatter).
    """
    mode = MODE_TIDAL if lam is not None else (MODE_REVERSE if reverse else MODE_FORWARD)
    params = CalmParams(num_chunks=int(num_chunks), mode=mode, temperature=float(temperature),
                        reduction=reduction, block=block)
    acc = torch.float64 if student_logprobs.dtype == torch.float64 else torch.float32
    lam = lam.to(acc).contiguous() if lam is not None else None
    weight = weight.to(acc).contiguous() if weight is not None else None
    return CalmFunction.apply(student_logprobs, student_chunk.long().contiguous(), teacher_logprobs,
                              teacher_chunk.long().contiguous(), lam, weight, params)

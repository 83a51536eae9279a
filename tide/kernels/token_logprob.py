"""Fused linear per-token log-probability, without ever holding `[N, V]`.

Eager equivalent (tide.reference.token_logprobs):

    a = hidden.float() @ weight.float().T + bias                   # [N, V] (bias optional)
    x = c * tanh(a / c)                                            # softcap c (optional; else x = a)
    out = torch.log_softmax(x, -1).gather(1, targets[:, None])[:, 0]   # [N]

(float64 inputs compute in float64, every other dtype accumulates in float32.)

Forward (CCE-style log-sum-exp streaming). The vocabulary is cut into
`num_splits` contiguous ranges so that short inputs still fill the GPU; each
program owns BLOCK_N rows and one range, and keeps a running max / sum per row:

    for n0 in range(0, N, BLOCK_N):            # program axis 0
      for s in range(num_splits):              # program axis 1
        m, z, t = -inf, 0, 0                   # [BLOCK_N] each
        for v0 in range(s * V_SPLIT, (s + 1) * V_SPLIT, BLOCK_V):
          x = hidden[n0:, :] @ weight[v0:, :].T          # [BLOCK_N, BLOCK_V], loop over d in BLOCK_D
          t += x[row, targets[row]] if the target is in this tile
          m_new = max(m, rowmax(x)); z = z * exp(m - m_new) + rowsum(exp(x - m_new)); m = m_new
        partial[s, n0:] = (m, z, t)
    lse = logsumexp_s(m_s + log z_s); out = sum_s t_s - lse          # [num_splits, N] -> [N], in torch

The target logit is read from the very tile product that feeds the LSE, so the
two agree to the last bit. Saved for backward: `lse [N]` only.

Backward (recompute; CCE). With `g [N]` the upstream gradient and
`p = softmax(x)`: d out_i / d x_iv = 1[v = t_i] - p_iv, so

    dx_iv = g_i * (1[v = t_i] - exp(x_iv - lse_i))
    da_iv = dx_iv * (1 - tanh^2(a_iv / c))          (softcap derivative; da = dx without a cap)
    d hidden = da @ weight        d weight = da.T @ hidden        d bias = sum_i da_i

One program per (BLOCK_N x BLOCK_V) tile (grouped order, tutorial 03): recompute
x, form da in registers, atomically add its column sums into d bias, then for
each BLOCK_D slice atomically add `da @ weight[v0:, d0:]` into d hidden and
`da.T @ hidden[n0:, d0:]` into d weight (float32 / float64 buffers, cast to the
input dtype at the end). Each product is skipped when its input does not require
grad. No gradient filtering. Under TRITON_INTERPRET=1, bf16 tiles are upcast to
float32 before tl.dot (the interpreter's dot misreads bf16, as in tide/kernels/tidal.py).

HBM traffic vs eager (bf16 inputs, N rows, V vocab, width d):
- eager: writes and reads the `[N, V]` logits several times (matmul out, float
  copy, log-softmax out, and the same again in backward): about 20 * N * V bytes;
  at N = 10k, V = 152k that is ~30 GB, plus the `[N, V]` float32 peak (6 GB).
- fused: reads hidden and weight once per tile row/column (L2 absorbs most of
  it), writes `[num_splits, N]` floats forward and the `[N, d]` + `[V, d]`
  float32 gradient buffers backward: O(N d + V d) memory, no `[N, V]` at all.
  The price is the atomics: every element of d hidden receives V / BLOCK_V adds and
  every element of d weight N / BLOCK_N, i.e. 4 * N * V * d * (1/BLOCK_N + 1/BLOCK_V)
  bytes of L2 atomic traffic (~100 GB at N = 10k, V = 152k, d = 1024, 128 x 128
  tiles). They land in L2, not HBM, but they bound the backward: expect it, not the
  GEMM FLOPs, to set the speed, and tune BLOCK_N / BLOCK_V first.
FLOPs: fused 2NVd forward + 6NVd backward (one recompute), eager 2NVd + 4NVd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .tidal import INTERPRET_BF16, _lm_logits


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class TokenLogprobConfig:
    """Tile sizes and the vocabulary split. Fixed good values; tests pass small ones."""
    block_n: int = 128
    block_v: int = 128
    block_d: int = 64
    group_n: int = 8          # tiles of rows grouped together in the backward (L2 reuse)
    num_warps: int = 8
    num_stages: int = 3
    num_splits: int | None = None   # vocabulary ranges in the forward; None: fill the device


def default_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> TokenLogprobConfig:
    if device.type == "cuda":
        if dtype == torch.float64:      # 8-byte tiles: smaller, or the shared memory runs out
            return TokenLogprobConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2)
        if dtype == torch.float32:
            return TokenLogprobConfig(block_n=128, block_v=128, block_d=32, num_stages=2)
        return TokenLogprobConfig()
    # Interpreter (TRITON_INTERPRET=1): small tiles, everything is numpy.
    return TokenLogprobConfig(block_n=16, block_v=32, block_d=16, group_n=2, num_warps=1, num_stages=1,
                              num_splits=2)


def _acc_dtype(dtype):
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """acc + a @ b in ACC_DTYPE; bf16 tiles upcast under the interpreter (it misreads bf16 in tl.dot)."""
    if INTERPRET_BF16:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)


def _dot_precision(dtype):
    # float32 inputs must not be rounded to tf32: the reference is full float32.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# --------------------------------------------------------------------------- forward kernel
@triton.jit
def _token_logprob_fwd_kernel(
    # pointers (row / column offsets are widened to int64: V * d may exceed 2**31)
    hidden_ptr,        # [N, d] hidden states
    weight_ptr,        # [V, d] LM-head weight
    targets_ptr,       # [N] int64 target ids
    bias_ptr,          # [V] LM-head bias (HAS_BIAS)
    max_ptr,           # [num_splits, N] out: running max per row and split
    sum_ptr,           # [num_splits, N] out: sum of exp(x - max)
    target_logit_ptr,  # [num_splits, N] out: target logit (0 where not in the split)
    # sizes (D and V_SPLIT are loop bounds: compile-time, one build per model width)
    N, V, D: tl.constexpr, V_SPLIT: tl.constexpr,
    # strides, softcap
    stride_hn, stride_hd, stride_wv, stride_wd, cap, inv_cap,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)

    row_max = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_N,), ACC_DTYPE)
    target_logit = tl.zeros((BLOCK_N,), ACC_DTYPE)
    v_begin = pid_s * V_SPLIT
    for v_offset in range(0, V_SPLIT, BLOCK_V):      # V_SPLIT is a multiple of BLOCK_V
        cols = v_begin + v_offset + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        # logits tile x = hidden[rows] @ weight[cols].T, reduced over d in BLOCK_D slices
        x = tl.zeros((BLOCK_N, BLOCK_V), ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < D
            h = tl.load(hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn + dims[None, :] * stride_hd,
                        mask=row_ok[:, None] & dim_ok[None, :], other=0.0)           # [BLOCK_N, BLOCK_D]
            w = tl.load(weight_ptr + cols.to(tl.int64)[:, None] * stride_wv + dims[None, :] * stride_wd,
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)           # [BLOCK_V, BLOCK_D]
            x = _dot(h, tl.trans(w), x, DOT_PRECISION, ACC_DTYPE)
        x, _ = _lm_logits(x, bias_ptr, cols, col_ok, cap, inv_cap, HAS_BIAS, HAS_CAP)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        is_target = cols[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, x, 0.0), axis=1)
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        row_max = new_max

    out = pid_s * N + rows
    tl.store(max_ptr + out, row_max, mask=row_ok)
    tl.store(sum_ptr + out, row_sum, mask=row_ok)
    tl.store(target_logit_ptr + out, target_logit, mask=row_ok)


# --------------------------------------------------------------------------- backward kernel
# Gradient (per row i, vocab entry v; g = upstream gradient, t = target):
#   out_i = x_it - lse_i,   d lse_i / d x_iv = p_iv = exp(x_iv - lse_i)
#   => dx_iv = g_i * (1[v == t_i] - p_iv)
#   d hidden_i = sum_v dx_iv * weight_v        (dx @ weight)
#   d weight_v = sum_i dx_iv * hidden_i        (dx.T @ hidden)
# Every (row tile, vocab tile) program adds its share with atomics.
@triton.jit
def _token_logprob_bwd_kernel(
    # pointers
    hidden_ptr,        # [N, d] hidden states
    weight_ptr,        # [V, d] LM-head weight
    targets_ptr,       # [N] int64 target ids
    lse_ptr,           # [N] log-sum-exp saved by the forward
    grad_out_ptr,      # [N] upstream gradient g
    grad_hidden_ptr,   # [N, d] out (ACC_DTYPE, zero-initialised, contiguous)
    grad_weight_ptr,   # [V, d] out (ACC_DTYPE, zero-initialised, contiguous)
    bias_ptr,          # [V] LM-head bias (HAS_BIAS)
    grad_bias_ptr,     # [V] out (ACC_DTYPE, zero-initialised; HAS_GRAD_BIAS)
    # sizes
    N, V, D: tl.constexpr,
    # strides, softcap
    stride_hn, stride_hd, stride_wv, stride_wd, cap, inv_cap,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_GRAD_HIDDEN: tl.constexpr, HAS_GRAD_WEIGHT: tl.constexpr, HAS_GRAD_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
):
    # grouped tile order (tutorial 03): GROUP_N row tiles sweep the vocabulary together
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    tiles_per_group = GROUP_N * num_v
    group = pid // tiles_per_group
    first_n = group * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % tiles_per_group) % group_size
    pid_v = (pid % tiles_per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_out_ptr + rows, mask=row_ok, other=0.0)

    x = tl.zeros((BLOCK_N, BLOCK_V), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        h = tl.load(hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn + dims[None, :] * stride_hd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        w = tl.load(weight_ptr + cols.to(tl.int64)[:, None] * stride_wv + dims[None, :] * stride_wd,
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        x = _dot(h, tl.trans(w), x, DOT_PRECISION, ACC_DTYPE)
    x, tanh_x = _lm_logits(x, bias_ptr, cols, col_ok, cap, inv_cap, HAS_BIAS, HAS_CAP)
    p = tl.exp(x - lse[:, None])
    onehot = (cols[None, :] == targets[:, None]).to(ACC_DTYPE)
    dx = g[:, None] * (onehot - p)
    if HAS_CAP:
        dx = dx * (1.0 - tanh_x * tanh_x)          # through the softcap: d x / d a = 1 - tanh^2
    dx = tl.where(row_ok[:, None] & col_ok[None, :], dx, 0.0)
    if HAS_GRAD_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dx, axis=0), mask=col_ok)
    dx = dx.to(hidden_ptr.dtype.element_ty)        # operand dtype of the products (CCE does the same)

    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        if HAS_GRAD_HIDDEN:
            w = tl.load(weight_ptr + cols.to(tl.int64)[:, None] * stride_wv + dims[None, :] * stride_wd,
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            tl.atomic_add(grad_hidden_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :],
                          _dot(dx, w, tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE), DOT_PRECISION, ACC_DTYPE),
                          mask=row_ok[:, None] & dim_ok[None, :])
        if HAS_GRAD_WEIGHT:
            h = tl.load(hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn + dims[None, :] * stride_hd,
                        mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            tl.atomic_add(grad_weight_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :],
                          _dot(tl.trans(dx), h, tl.zeros((BLOCK_V, BLOCK_D), ACC_DTYPE), DOT_PRECISION, ACC_DTYPE),
                          mask=col_ok[:, None] & dim_ok[None, :])


# --------------------------------------------------------------------------- launchers
def _num_splits(config, num_rows, vocab, device):
    if config.num_splits is not None:
        splits = config.num_splits
    else:
        # enough programs for ~4 waves of the SMs, never more than one split per 16 vocab tiles
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        row_tiles = triton.cdiv(num_rows, config.block_n)
        splits = triton.next_power_of_2(triton.cdiv(4 * sms, row_tiles))   # powers of 2: few builds
        splits = min(splits, max(1, triton.cdiv(vocab, 16 * config.block_v)))
    splits = max(1, min(splits, triton.cdiv(vocab, config.block_v)))
    # split size a multiple of BLOCK_V; recount so that no split is empty
    v_split = triton.cdiv(triton.cdiv(vocab, splits), config.block_v) * config.block_v
    return triton.cdiv(vocab, v_split), v_split


def _cap_args(softcap):
    return (softcap, 1.0 / softcap) if softcap is not None else (1.0, 1.0)


def token_logprob_forward(hidden, weight, targets, config=None, bias=None, softcap=None):
    """Returns `(logprobs [N], lse [N])` in the accumulation dtype. No autograd."""
    config = config or default_config(hidden.device, hidden.dtype)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    if num_rows == 0:
        empty = hidden.new_zeros(0, dtype=acc)
        return empty, empty
    splits, v_split = _num_splits(config, num_rows, vocab, hidden.device)
    partial = torch.empty(3, splits, num_rows, dtype=acc, device=hidden.device)
    grid = (triton.cdiv(num_rows, config.block_n), splits)
    _token_logprob_fwd_kernel[grid](
        hidden, weight, targets, bias if bias is not None else partial, partial[0], partial[1], partial[2],
        num_rows, vocab, width, v_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), *_cap_args(softcap),
        BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
        ACC_DTYPE=_TL_DTYPE[acc], DOT_PRECISION=_dot_precision(hidden.dtype),
        HAS_BIAS=bias is not None, HAS_CAP=softcap is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    row_max, row_sum, target_logit = partial
    top = row_max.max(0).values
    lse = top + torch.log((row_sum * torch.exp(row_max - top)).sum(0))
    return target_logit.sum(0) - lse, lse


def token_logprob_backward(hidden, weight, targets, lse, grad_out, need_hidden, need_weight, config=None,
                           bias=None, softcap=None, need_bias=False):
    """Returns `(grad_hidden, grad_weight, grad_bias)` (None where not needed) in the input dtypes."""
    config = config or default_config(hidden.device, hidden.dtype)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    grad_hidden = torch.zeros(num_rows, width, dtype=acc, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros(vocab, width, dtype=acc, device=hidden.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_bias else None
    if num_rows and (need_hidden or need_weight or need_bias):
        grid = (triton.cdiv(num_rows, config.block_n) * triton.cdiv(vocab, config.block_v),)
        _token_logprob_bwd_kernel[grid](
            hidden, weight, targets, lse, grad_out.to(acc).contiguous(),
            grad_hidden if need_hidden else lse, grad_weight if need_weight else lse,
            bias if bias is not None else lse, grad_bias if need_bias else lse,
            num_rows, vocab, width,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), *_cap_args(softcap),
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d, GROUP_N=config.group_n,
            HAS_GRAD_HIDDEN=need_hidden, HAS_GRAD_WEIGHT=need_weight, HAS_GRAD_BIAS=need_bias,
            ACC_DTYPE=_TL_DTYPE[acc], DOT_PRECISION=_dot_precision(hidden.dtype),
            HAS_BIAS=bias is not None, HAS_CAP=softcap is not None,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return (grad_hidden.to(hidden.dtype) if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None, grad_bias)


# --------------------------------------------------------------------------- autograd
class TokenLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, config):
        bias_c = None if bias is None else bias.detach().to(_acc_dtype(hidden.dtype)).contiguous()
        logprobs, lse = token_logprob_forward(hidden, weight, targets, config, bias_c, softcap)
        ctx.save_for_backward(hidden, weight, bias_c, targets, lse)
        ctx.config, ctx.softcap = config, softcap
        ctx.bias_dtype = None if bias is None else bias.dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias_c, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden, grad_weight, grad_bias = token_logprob_backward(
            hidden, weight, targets, lse, grad_out, need_hidden, need_weight, ctx.config, bias_c, ctx.softcap,
            need_bias)
        return grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(ctx.bias_dtype), None, None, None


def fused_token_logprobs(hidden, weight, targets, *, bias=None, softcap=None,
                         config: TokenLogprobConfig | None = None):
    """`log_softmax(softcap * tanh((hidden @ weight.T + bias) / softcap))[i, targets[i]]` per row, `[N]`,
    streaming over V (no bias / no cap: the plain logits).

    hidden `[N, d]`, weight `[V, d]`, bias `[V]` or None, softcap a positive float or None,
    targets `[N]` int64 (arguments checked by tide.losses). Float64 in -> float64 out; anything
    else -> float32 out. Differentiable w.r.t. hidden, weight and bias, each only if it requires
    grad. Without grad (the teacher, or torch.no_grad()) it runs the forward alone and saves nothing.
    """
    if hidden.dtype != weight.dtype:      # one operand dtype for tl.dot
        acc = _acc_dtype(hidden.dtype if hidden.dtype == torch.float64 else weight.dtype)
        hidden, weight = hidden.to(acc), weight.to(acc)
    targets = targets.long().contiguous()
    needs = (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if torch.is_grad_enabled() and needs:
        return TokenLogprobFunction.apply(hidden, weight, bias, targets, softcap, config)
    bias_c = None if bias is None else bias.detach().to(_acc_dtype(hidden.dtype)).contiguous()
    return token_logprob_forward(hidden, weight, targets, config, bias_c, softcap)[0]

"""Fused linear TIDAL / forward KL / reverse KL, with the CE term in the same vocabulary sweep.

Exact eager equivalent (tide.reference.distill_loss; float32 compute for bf16/fp16/fp32
inputs, float64 for float64 inputs)::

    a = student_hidden.float() @ student_weight.float().T + student_bias     # [N, V_s] (bias optional)
    s = c_s * tanh(a / c_s)                                          # student_softcap c_s (optional: s = a)
    u = c_t * tanh((teacher_hidden.float() @ teacher_weight.float().T + teacher_bias) / c_t)   # [N, V_t], no grad
    z, y = s[:, :V] / T, u[:, :V] / T                                # V = shared_vocab
    x = ((1 - lam) * s[:, :V] + lam * u[:, :V]) / T                   # TIDAL mixture (lam = 1: forward KL)
    forward:  kl = sum_j r_j (log r_j - log p_j),  r = softmax(x) detached, p = softmax(z)
    reverse:  kl = sum_j p_j (log p_j - log q_j),  q = softmax(y)
    distill = T^2 * sum_i w_i kl_i                                   (/ N for "mean"; per row for "none")
    ce      = sum_i ce_weight_i * (logsumexp(s_i) - s_i[targets_i])  (/ N for "mean"; full V_s, T = 1)

Biases and softcaps are applied to each logit tile as it is loaded (workspace) or computed
(streaming): the GEMMs stay plain `hidden @ weight.T`.

Neither strategy below ever holds an [N, V] tensor, in forward or in backward.

One online sweep gives the loss
-------------------------------
Call `a` the logits (divided by T) of the distribution that weights the KL and `b` the other
one: forward a = x, b = z; reverse a = z, b = y. Then, per row,

    KL(softmax(a) || softmax(b)) = E_a[a - b] - lse(a) + lse(b)
                                 = acc / l_a - (m_a + log l_a) + (m_b + log l_b)

with the flash-attention style running maximum m, running sum l = sum_j exp(a_j - m_a) and
acc = sum_j exp(a_j - m_a) * (a_j - b_j); when m_a grows, l_a and acc are both rescaled by
exp(m_old - m_new). So the loss is complete after ONE sweep over the vocabulary, and a second
sweep writes the logit gradient. Per row we keep 7 scalars: (m, l) for z, for the target logits
(x or y) and for the student at T = 1 (CE), plus acc. CE's target logit is picked up on the way.

Gradients with respect to the student logits (derivation)
---------------------------------------------------------
Forward / TIDAL, with r detached: d/ds_j [T^2 w sum_k r_k (log r_k - log p_k)]
    = -T^2 w sum_k r_k d(log p_k)/ds_j = -T^2 w sum_k r_k (delta_kj - p_j) / T
    = T w (p_j - r_j).
Reverse, L = sum_k p_k (log p_k - log q_k), with p = softmax(s / T):
    dp_k/ds_j = p_k (delta_kj - p_j) / T,  dL/dp_k = log p_k - log q_k + 1, so
    dL/ds_j = (1/T) sum_k p_k (delta_kj - p_j)(log p_k - log q_k + 1)
            = (p_j / T) [(log p_j - log q_j + 1) - (KL + 1)] = (p_j / T)(log p_j - log q_j - KL),
    and d/ds_j [T^2 w L] = T w p_j (log p_j - log q_j - KL).
    (The +1 cancels; KL is the row's loss, known after the first sweep: that is why the loss
    must be finished before the gradient sweep.)
CE: d/ds_j [cw (lse(s) - s_t)] = cw (softmax(s)_j - [j == t]), over the full V_s.
Columns j >= V get no distillation gradient. Softcap: d s_j / d a_j = 1 - tanh^2(a_j / c_s)
= 1 - (s_j / c_s)^2, so dA = dS * (1 - tanh^2) (tanh recomputed from a in the gradient sweep;
tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|), no overflow). Bias: d student_bias = sum_i dA_i.
Then d student_hidden = dA @ W_s, d student_weight = dA^T @ H_s and d student_bias = column sums of
dA (dA the [N, V_s] logit gradient, never materialised whole).
reduction="none": the upstream gradient g_i differs per row, so it must reach the logit gradient
before the GEMMs: the workspace strategy runs its chunk walk again in backward with w_i g_distill_i
and cw_i g_ce_i as the loss weights (the gradient is linear in them) and one combined dA per chunk;
the streaming backward takes the per-row coefficients as it does for a scalar upstream gradient.

Strategy 1: row-chunked workspace (impl="triton", `_ChunkedDistill`)
-------------------------------------------------------------------
    for each chunk of c rows (c from a byte budget, independent of N):
        S[c, V_s'] = H_s[chunk] @ W_s[:V_s'].T           # tl.dot GEMM, fp32 out (V_s' = V_s with CE, else V)
        U[c, V]    = H_t[chunk] @ W_t[:V].T              # teacher GEMM only over the shared vocab
        _chunk_rows_kernel, grid (cdiv(c, BLOCK_R),):    # + bias, softcap on load; sweep 1: stats + loss;
            S <- dDistill/dA (in place),  U <- dCE/dA (in place, width V_s')     # sweep 2: gradients
        dH_distill[chunk]  = S @ W_s;   dW_distill += S^T @ H_s[chunk];   db_distill += S.sum(0)
        (same for CE from U)
The GEMMs are one tl.dot kernel (tutorial 03: grouped ordering, 128 x 256 x 64 bf16 tiles, fp32
out, any strides so transposes are views); the logit gradient is rounded to the weight dtype
for the tensor cores (as Liger and CCE do), accumulation is fp32. d student_hidden = S @ W_s has
few output tiles and a reduction over the whole vocabulary, so it is split-K: each program
reduces one K range into an fp32 partials buffer [SPLIT, c, d_s], summed afterwards.
The gradients are computed in forward (Liger style) for unit upstream gradients and kept as
fp32 [N, d_s] and [V_s, d_s] per term (the reduction's 1/N is applied in fp32 afterwards, never
to the logit gradient that is rounded for the dot); backward only scales and adds them
(g_distill * G_distill + g_ce * G_ce), no sync. Without targets that is exactly F = 2 N V (3 d_s + d_t) FLOPs (logits once + two gradient GEMMs). With targets the two
terms' gradients must stay separate until backward knows both upstream gradients, so the two
gradient GEMMs run once per term: 2 N V (5 d_s + d_t) FLOPs (1.29 F at d_s = 1024, d_t = 4096),
still no logit recomputed. (The alternative, recomputing the logits in backward, costs
2 N V (4 d_s + 2 d_t) = 1.71 F.)
Memory: workspace 2 * c * V_s' * 4 bytes (default budget min(1 GiB, free memory / 4), env
TIDE_WORKSPACE_BYTES, or the `workspace_bytes=` argument; c never depends on N), plus the fp32
gradients (one or two [V_s, d_s] and [N, d_s]). HBM traffic per chunk: the GEMMs write S and U
once (8 c V bytes), the row kernel reads them twice and writes them once (24 c V bytes), the
gradient GEMMs read them once (8 c V): about 5 passes over fp32 [c, V] per chunk, against about
15 over [N, V] for the eager reference. Determinism: every output tile of every GEMM is owned by
one program, d student_weight accumulates chunk after chunk in order, split-K partials are summed
by torch: bit-for-bit reproducible.

Strategy 2: streaming (impl="triton_stream", `_StreamDistill`), Cut-Cross-Entropy style
----------------------------------------------------------------------------------------
    _stream_fwd_kernel, grid (cdiv(N, BLOCK_M), SPLITS ~ 16 vocabulary ranges [+ CE-only ranges]):
        for each vocab tile [v0, v0 + BLOCK_V) of the program's range:
            s_tile = H_s[rows] @ W_s[tile].T  (tl.dot over d_s in BLOCK_K steps), u_tile likewise
            update the 8 per-row partials                    # tiles never leave the chip
        write the partials [SPLITS, N, 8]; the launcher merges them (LSE merge, O(N SPLITS))
        -> per row lse(z), lse(target), KL, lse(s) and the two loss terms   (O(N) memory)
    for each vocabulary slab [lo, hi) (fp32 [hi - lo, d_s] fits 64 MiB; cut at V):
      _stream_bwd_kernel, grid (cdiv(N, BLOCK_M), ~16 ranges of the slab), upstream gradients known:
        for each vocab tile of the program's range:
          recompute s_tile, u_tile; G = coef_d * dDistill + coef_c * dCE   [BLOCK_M, BLOCK_V]
          for each BLOCK_K slice of d_s:
            dH[rows, k] += G @ W_s[tile, k]           (tl.atomic_add; plain RMW if one range)
            dW[tile, k] += G^T @ H_s[rows, k]         (tl.atomic_add, fp32)
      d student_weight[lo:hi] = dW (cast to the weight dtype)
The vocabulary split keeps the GPU full at small N (16 programs per row block) and, with the
row blocks as the fastest grid axis, the programs running together read the same weight tiles
(L2 reuse). Tiles per program depend on V only: N never triggers a recompile.
FLOPs: 2 N V (d_s + d_t) forward + 2 N V (d_s + d_t) recompute + 2 * 2 N V d_s gradients
= 2 N V (4 d_s + 2 d_t) (1.71 F at d_s = 1024, d_t = 4096), for O(N) extra memory: the per-row
statistics and partials, the fp32 dH [N, d_s] and one 64 MiB fp32 dW slab, next to the returned
gradients. HBM traffic: no [N, V] bytes at all; the weights are streamed once per row block.
Determinism: the fp32 atomics add row blocks / vocabulary ranges in no fixed order (last-bit
differences between runs); the forward is deterministic.

Block sizes: a fixed config per kernel, chosen for H100/H200 and checked for register spills
by `python -m benchmarks.gpu_check --compile-only` (sm_90a, no GPU needed); small blocks under
TRITON_INTERPRET=1. Autotuning of the GEMM is behind TIDE_AUTOTUNE=1. Loop bounds (V, V_s,
d_s, d_t, K) are constexpr: Triton 3.6's interpreter cannot loop to a runtime bound with
NumPy 2, and on the GPU they are fixed per model (one compile per shape; the GEMM's K is the
chunk height for d student_weight, so the last, shorter chunk compiles once more).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

DEFAULT_WORKSPACE_BYTES = 1 << 30   # 1 GiB cap for the chunk workspace (further capped by free memory)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Under TRITON_INTERPRET=1 (3.6), tl.dot on bfloat16 tiles multiplies the raw bits; upcast first.
INTERPRET_BF16 = tl.constexpr(_interpreting())


# =============================================================================================
# Shared tile math: both strategies call these on [R, BLOCK_V] tiles of logits.
# =============================================================================================
@triton.jit
def _online_kl_update(z, x, valid, m_z, l_z, m_x, l_x, acc, REVERSE: tl.constexpr):
    """One vocab tile of the online sweep. z = student / T, x = target / T (mixture or teacher),
    [R, BV]; valid [R or 1, BV]. Returns the updated (m_z, l_z, m_x, l_x, acc), each [R]."""
    diff = tl.where(valid, z - x, 0.0)                        # z - x, 0 off the vocabulary
    z = tl.where(valid, z, float("-inf"))
    x = tl.where(valid, x, float("-inf"))
    m_z_new = tl.maximum(m_z, tl.max(z, 1))
    m_x_new = tl.maximum(m_x, tl.max(x, 1))
    alpha_z = tl.exp(m_z - m_z_new)
    alpha_x = tl.exp(m_x - m_x_new)
    e_z = tl.exp(z - m_z_new[:, None])
    e_x = tl.exp(x - m_x_new[:, None])
    if REVERSE:                                               # E_p[z - y]
        acc = acc * alpha_z + tl.sum(e_z * diff, 1)
    else:                                                     # E_r[x - z]
        acc = acc * alpha_x - tl.sum(e_x * diff, 1)
    l_z = l_z * alpha_z + tl.sum(e_z, 1)
    l_x = l_x * alpha_x + tl.sum(e_x, 1)
    return m_z_new, l_z, m_x_new, l_x, acc


@triton.jit
def _online_lse_update(s, valid, m, l):
    """Online log-sum-exp of s [R, BV] (CE at T = 1)."""
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
    return m_new, l


@triton.jit
def _distill_grad_tile(z, x, lse_z, lse_x, kl, coef, valid, REVERSE: tl.constexpr):
    """d(T^2 w KL)/ds on a tile, times coef = g * T * w (see the module docstring):
    forward coef * (p - r), reverse coef * p * (log p - log q - KL)."""
    p = tl.exp(z - lse_z[:, None])
    if REVERSE:
        g = p * ((z - lse_z[:, None]) - (x - lse_x[:, None]) - kl[:, None])
    else:
        g = p - tl.exp(x - lse_x[:, None])
    return tl.where(valid, coef[:, None] * g, 0.0)


@triton.jit
def _ce_grad_tile(s, cols, tgt, lse_1, coef, valid):
    """d(cw * CE)/ds on a tile, times coef = g * cw: coef * (softmax(s) - onehot(t))."""
    g = tl.exp(s - lse_1[:, None]) - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    return tl.where(valid, coef[:, None] * g, 0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, accumulating in acc's dtype (fp32, or fp64 for fp64 inputs); IEEE: exact fp32."""
    if INTERPRET_BF16:      # the interpreter's numpy dot reads bf16 as integers: exact upcast instead
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, out_dtype=acc.dtype)


@triton.jit
def _tanh(x):
    """tanh from exp (no libdevice, so it runs under the interpreter too): sign(x) (1 - e) / (1 + e),
    e = exp(-2 |x|) never overflows; absolute error ~ one ulp."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _lm_logits(a, bias_ptr, cols, col_ok, cap, inv_cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """Logits of a tile from the GEMM output a [R, BV]: s = cap * tanh((a + bias[cols]) / cap) (the
    plain a + bias without a cap). Returns (s, tanh); d s / d a = 1 - tanh^2 (tanh unused without a cap)."""
    if HAS_BIAS:
        a += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(a.dtype)[None, :]
    t = a
    if HAS_CAP:
        t = _tanh(a * inv_cap)
        a = cap * t
    return a, t


@triton.jit
def _target_logits(s, u, lam, inv_T, REVERSE: tl.constexpr):
    """x: the TIDAL mixture ((1 - lam) s + lam u) / T, or the teacher u / T for reverse KL."""
    if REVERSE:
        x = u * inv_T
    else:
        x = ((1.0 - lam[:, None]) * s + lam[:, None] * u) * inv_T
    return x


# =============================================================================================
# Strategy 1, part a: a plain tiled GEMM with fp32 (or fp64) output, tutorial 03 style.
# C[M, N] (+)= A[M, K] @ B[K, N]; any strides (transposes are views); tiles cast to B's dtype
# before tl.dot (bf16 tensor cores for bf16 weights), fp32 accumulation.
# Split-K for the one short-and-wide GEMM (d student_hidden = G[c, V] @ W[V, d]: few output
# tiles, a reduction over the whole vocabulary): program (tile, k) reduces K range k into its
# own slice of an fp32 partials buffer [SPLIT, M, N], summed afterwards: deterministic.
# =============================================================================================
@triton.jit
def _matmul_kernel(
        A, B, C,                                  # pointers: [M, K], [K, N], [SPLIT, M, N] (fp32 / fp64)
        M, N, K: tl.constexpr,                    # sizes (loop bounds constexpr: the interpreter needs it)
        stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,   # strides
        K_SPLIT: tl.constexpr,                    # length of the K range of one program (multiple of BLOCK_K)
        ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,                                  # meta-parameters
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n                 # grouped ordering for L2 reuse
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)   # int64: large V * d
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * K_SPLIT + tl.arange(0, BLOCK_K)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=C.dtype.element_ty)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(A + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(B + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = _dot(a.to(B.dtype.element_ty), b, acc, IEEE)
    c_ptrs = C + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc, mask=c_mask)


def _matmul_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                                      (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 4, 4))]


def _matmul_config(elem_bytes: int, accumulate: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for H100/H200: 128 x 256 bf16 wgmma tiles;
    128 x 128 when the epilogue also reads C (no register spills); small tiles in the interpreter."""
    if _interpreting():
        return 32, 64, 32, 4, 1
    if elem_bytes >= 4:
        return 128, 128, 32, 8, 3
    if accumulate:
        return 128, 128, 64, 8, 4
    return 128, 256, 64, 8, 3


_matmul_autotuned = None
_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if _interpreting() or device.type != "cuda":
        return 2                                   # small: the interpreter tests exercise split-K
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """out[M, N] (+)= a[M, K] @ b[K, N] with fp32/fp64 accumulation; a, b any strides."""
    global _matmul_autotuned
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.zero_()
        return out
    ieee = b.dtype in (torch.float32, torch.float64)
    strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    if os.environ.get("TIDE_AUTOTUNE") == "1" and not _interpreting():
        if _matmul_autotuned is None:
            # restore_value: tuning runs the kernel repeatedly, which must not accumulate into C
            _matmul_autotuned = triton.autotune(_matmul_configs(), key=["M", "N", "K", "ACCUMULATE"],
                                                restore_value=["C"])(_matmul_kernel)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), 1)  # noqa: E731
        _matmul_autotuned[grid](a, b, out, M, N, K, *strides, 0, out.stride(0), out.stride(1),
                                K_SPLIT=triton.cdiv(K, 64) * 64, ACCUMULATE=accumulate, IEEE=ieee)
        return out
    bm, bn, bk, warps, stages = _matmul_config(b.element_size(), accumulate)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = 1
    if tiles < 2 * _sm_count(out.device) and K >= 8 * bk:
        split = min(triton.cdiv(2 * _sm_count(out.device), tiles), K // (4 * bk))
    k_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_split)
    target = out if split == 1 else torch.empty(split, M, N, dtype=out.dtype, device=out.device)
    stride_c = (0, out.stride(0), out.stride(1)) if split == 1 else target.stride()
    _matmul_kernel[(tiles, split)](a, b, target, M, N, K, *strides, *stride_c, K_SPLIT=k_split,
                                   ACCUMULATE=accumulate and split == 1, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn,
                                   BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    if split > 1:
        partial = target.sum(0)
        if accumulate:
            out.add_(partial)
        else:
            out.copy_(partial)
    return out


# =============================================================================================
# Strategy 1, part b: the fused row kernel over the chunk workspace (two sweeps per row).
# =============================================================================================
@triton.heuristics({"HAS_TARGETS": lambda args: args["V_s"] > 0})
@triton.jit
def _chunk_rows_kernel(
        S, U,                        # [R, >= V_s] student logits -> d distill / dS (in place);
                                     # [R, >= V_s] teacher logits (first V columns) -> d CE / dS
        lam_ptr, w_ptr, tgt_ptr, cw_ptr,   # [R] TIDAL lambda, loss weight, target ids, CE weight
        distill_ptr, ce_ptr,         # [R] per-row losses out: T^2 w KL, cw CE
        sb_ptr, tb_ptr,              # [>= V_s] student bias, [>= V] teacher bias (HAS_SB / HAS_TB)
        R, V: tl.constexpr, V_s: tl.constexpr,   # rows, shared vocab, student vocab for CE (0: no targets)
        stride_s, stride_u,          # row strides of S and U
        T, inv_T,                    # temperature, 1 / T
        cap_s, inv_cap_s, cap_t, inv_cap_t,   # softcaps (HAS_SCAP / HAS_TCAP) and their inverses
        REVERSE: tl.constexpr, NEED_GRAD: tl.constexpr, HAS_TARGETS: tl.constexpr,
        HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < R
    acc_ty = S.dtype.element_ty
    lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
    s_row = S + rows[:, None] * stride_s
    u_row = U + rows[:, None] * stride_u
    neg_inf = tl.full((BLOCK_R,), float("-inf"), acc_ty)
    zero = tl.zeros((BLOCK_R,), acc_ty)
    m_z, l_z, m_x, l_x, acc = neg_inf, zero, neg_inf, zero, zero
    m_1, l_1, s_t = neg_inf, zero, zero
    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)
        cw = tl.load(cw_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)

    # ---- sweep 1: online statistics, loss complete at the end
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols[None, :] < V                            # padded rows load 0: finite stats
        s = tl.load(s_row + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0)
        u = tl.load(u_row + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0)
        s, _ = _lm_logits(s, sb_ptr, cols, cols < V, cap_s, inv_cap_s, HAS_SB, HAS_SCAP)
        u, _ = _lm_logits(u, tb_ptr, cols, cols < V, cap_t, inv_cap_t, HAS_TB, HAS_TCAP)
        x = _target_logits(s, u, lam, inv_T, REVERSE)
        m_z, l_z, m_x, l_x, acc = _online_kl_update(s * inv_T, x, col_ok, m_z, l_z, m_x, l_x, acc, REVERSE)
        if HAS_TARGETS:
            m_1, l_1 = _online_lse_update(s, col_ok, m_1, l_1)
            s_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), 1)
    if HAS_TARGETS:
        for v0 in range(V, V_s, BLOCK_V):                     # student-only columns: CE only
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols[None, :] < V_s
            s = tl.load(s_row + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0)
            s, _ = _lm_logits(s, sb_ptr, cols, cols < V_s, cap_s, inv_cap_s, HAS_SB, HAS_SCAP)
            m_1, l_1 = _online_lse_update(s, col_ok, m_1, l_1)
            s_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), 1)

    lse_z = m_z + tl.log(l_z)
    lse_x = m_x + tl.log(l_x)
    if REVERSE:
        kl = acc / l_z - lse_z + lse_x
    else:
        kl = acc / l_x - lse_x + lse_z
    tl.store(distill_ptr + rows, T * T * w * kl, mask=row_ok)
    if HAS_TARGETS:
        lse_1 = m_1 + tl.log(l_1)
        tl.store(ce_ptr + rows, cw * (lse_1 - s_t), mask=row_ok)

    # ---- sweep 2: logit gradients (w.r.t. the GEMM output, i.e. through bias and softcap) for
    # upstream gradients folded into w and cw (unit ones in forward), written in place
    if NEED_GRAD:
        coef_d = T * w                                        # the 1 / N of "mean" comes after the GEMMs
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            valid = row_ok[:, None] & (cols[None, :] < V)
            s = tl.load(s_row + cols[None, :], mask=valid, other=0.0)
            u = tl.load(u_row + cols[None, :], mask=valid, other=0.0)
            s, tanh_s = _lm_logits(s, sb_ptr, cols, cols < V, cap_s, inv_cap_s, HAS_SB, HAS_SCAP)
            u, _ = _lm_logits(u, tb_ptr, cols, cols < V, cap_t, inv_cap_t, HAS_TB, HAS_TCAP)
            x = _target_logits(s, u, lam, inv_T, REVERSE)
            g_d = _distill_grad_tile(s * inv_T, x, lse_z, lse_x, kl, coef_d, valid, REVERSE)
            if HAS_SCAP:
                g_d = g_d * (1.0 - tanh_s * tanh_s)           # d s / d a of the softcap
            tl.store(s_row + cols[None, :], g_d, mask=valid)
            if HAS_TARGETS:
                g_c = _ce_grad_tile(s, cols, tgt, lse_1, cw, valid)
                if HAS_SCAP:
                    g_c = g_c * (1.0 - tanh_s * tanh_s)
                tl.store(u_row + cols[None, :], g_c, mask=valid)
        if HAS_TARGETS:
            for v0 in range(V, V_s, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                valid = row_ok[:, None] & (cols[None, :] < V_s)
                s = tl.load(s_row + cols[None, :], mask=valid, other=0.0)
                s, tanh_s = _lm_logits(s, sb_ptr, cols, cols < V_s, cap_s, inv_cap_s, HAS_SB, HAS_SCAP)
                g_c = _ce_grad_tile(s, cols, tgt, lse_1, cw, valid)
                if HAS_SCAP:
                    g_c = g_c * (1.0 - tanh_s * tanh_s)
                tl.store(s_row + cols[None, :], tl.zeros((BLOCK_R, BLOCK_V), acc_ty), mask=valid)
                tl.store(u_row + cols[None, :], g_c, mask=valid)


# =============================================================================================
# Strategy 2: streaming kernels, logit tiles computed with tl.dot and never written out.
# =============================================================================================
@triton.jit
def _logit_tile(H, W, rows, cols, row_ok, col_ok, K: tl.constexpr, stride_hn, stride_hk, stride_wv, stride_wk,
                acc_ty: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """H[rows, :K] @ W[cols, :K].T as a [BLOCK_M, BLOCK_V] tile in acc_ty, over K in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(H + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)            # [BM, BK]
        w = tl.load(W + cols[None, :] * stride_wv + ks[:, None] * stride_wk,
                    mask=col_ok[None, :] & (ks[:, None] < K), other=0.0)            # [BK, BV]
        acc = _dot(h, w, acc, IEEE)
    return acc


@triton.jit
def _contract_grad_tile(G, rows, cols, row_ok, col_ok, SH, SW, DH, DW, d_s: tl.constexpr,
                        stride_shn, stride_shk, stride_swv, stride_swk, stride_dhn, stride_dwv,
                        NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, DH_ATOMIC: tl.constexpr,
                        IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """dH[rows] += G @ W_s[cols] (plain read-modify-write when this program owns the rows, else
    atomics); dW[cols] += G^T @ H_s[rows] (atomics: row blocks run in parallel)."""
    g = G.to(SW.dtype.element_ty)
    for k0 in range(0, d_s, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d_s
        if NEED_DH:
            w = tl.load(SW + cols[:, None] * stride_swv + ks[None, :] * stride_swk,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)             # [BV, BK]
            dh = _dot(g, w, tl.zeros((G.shape[0], BLOCK_K), G.dtype), IEEE)
            dh_ptrs = DH + rows[:, None] * stride_dhn + ks[None, :]
            dh_mask = row_ok[:, None] & k_ok[None, :]
            if DH_ATOMIC:
                tl.atomic_add(dh_ptrs, dh, mask=dh_mask)
            else:
                tl.store(dh_ptrs, tl.load(dh_ptrs, mask=dh_mask, other=0.0) + dh, mask=dh_mask)
        if NEED_DW:
            h = tl.load(SH + rows[:, None] * stride_shn + ks[None, :] * stride_shk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)             # [BM, BK]
            dw = _dot(tl.trans(g), h, tl.zeros((G.shape[1], BLOCK_K), G.dtype), IEEE)
            tl.atomic_add(DW + cols[:, None] * stride_dwv + ks[None, :], dw,
                          mask=col_ok[:, None] & k_ok[None, :])


@triton.heuristics({"HAS_TARGETS": lambda args: args["V_s"] > 0})
@triton.jit
def _stream_fwd_kernel(
        SH, SW, TH, TW,              # [N, d_s], [V_s, d_s], [N, d_t], [V_t, d_t]
        lam_ptr, tgt_ptr,            # [N] TIDAL lambda, target ids
        SB, TB,                      # [V_s] student bias, [V_t] teacher bias (HAS_SB / HAS_TB)
        part_ptr,                    # [SPLITS, N, 8] out: partial (m_z, l_z, m_x, l_x, acc, m_1, l_1, s_t)
        N, SPLIT_SHARED,             # programs on axis 1 below SPLIT_SHARED sweep [0, V), the others [V, V_s)
        V: tl.constexpr, V_s: tl.constexpr, d_s: tl.constexpr, d_t: tl.constexpr,   # loop bounds constexpr
        stride_shn, stride_shk, stride_swv, stride_swk,
        stride_thn, stride_thk, stride_twv, stride_twk,
        inv_T, cap_s, inv_cap_s, cap_t, inv_cap_t,
        REVERSE: tl.constexpr, HAS_TARGETS: tl.constexpr, IEEE: tl.constexpr, TILES: tl.constexpr,
        HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, split) sweeps TILES vocabulary tiles and writes its 8 partial statistics
    per row; the launcher merges the splits (an LSE merge, O(N * SPLITS))."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pid_v = tl.program_id(1)
    row_ok = rows < N
    acc_ty: tl.constexpr = part_ptr.dtype.element_ty
    lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
    neg_inf = tl.full((BLOCK_M,), float("-inf"), acc_ty)
    zero = tl.zeros((BLOCK_M,), acc_ty)
    m_z, l_z, m_x, l_x, acc = neg_inf, zero, neg_inf, zero, zero
    m_1, l_1, s_t = neg_inf, zero, zero
    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)

    if pid_v < SPLIT_SHARED:                                  # shared vocabulary: distillation (+ CE)
        for i in range(0, TILES):
            cols = ((pid_v * TILES + i) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # int64: cols * stride
            col_ok = cols < V
            s = _logit_tile(SH, SW, rows, cols, row_ok, col_ok, d_s, stride_shn, stride_shk, stride_swv,
                            stride_swk, acc_ty, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)
            u = _logit_tile(TH, TW, rows, cols, row_ok, col_ok, d_t, stride_thn, stride_thk, stride_twv,
                            stride_twk, acc_ty, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)
            s, _ = _lm_logits(s, SB, cols, col_ok, cap_s, inv_cap_s, HAS_SB, HAS_SCAP)
            u, _ = _lm_logits(u, TB, cols, col_ok, cap_t, inv_cap_t, HAS_TB, HAS_TCAP)
            x = _target_logits(s, u, lam, inv_T, REVERSE)
            valid = col_ok[None, :]
            m_z, l_z, m_x, l_x, acc = _online_kl_update(s * inv_T, x, valid, m_z, l_z, m_x, l_x, acc, REVERSE)
            if HAS_TARGETS:
                m_1, l_1 = _online_lse_update(s, valid, m_1, l_1)
                s_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), 1)
    else:                                                     # student-only columns: CE only
        if HAS_TARGETS:
            for i in range(0, TILES):
                cols = (V + ((pid_v - SPLIT_SHARED) * TILES + i) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
                col_ok = cols < V_s
                s = _logit_tile(SH, SW, rows, cols, row_ok, col_ok, d_s, stride_shn, stride_shk, stride_swv,
                                stride_swk, acc_ty, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)
                s, _ = _lm_logits(s, SB, cols, col_ok, cap_s, inv_cap_s, HAS_SB, HAS_SCAP)
                m_1, l_1 = _online_lse_update(s, col_ok[None, :], m_1, l_1)
                s_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), 1)

    out = part_ptr + (pid_v * N + rows) * 8
    tl.store(out + 0, m_z, mask=row_ok)
    tl.store(out + 1, l_z, mask=row_ok)
    tl.store(out + 2, m_x, mask=row_ok)
    tl.store(out + 3, l_x, mask=row_ok)
    tl.store(out + 4, acc, mask=row_ok)
    tl.store(out + 5, m_1, mask=row_ok)
    tl.store(out + 6, l_1, mask=row_ok)
    tl.store(out + 7, s_t, mask=row_ok)


@triton.jit
def _stream_bwd_kernel(
        SH, SW, TH, TW,              # [N, d_s]; [V_slab, d_s] and [V_slab, d_t] from the slab's first row; [N, d_t]
        lam_ptr, tgt_ptr,            # [N]
        SB, TB,                      # [V_slab] student / teacher bias from the slab's first column
        stats_ptr,                   # [N, 4] merged: lse(z), lse(target), KL, lse(s)
        coef_d_ptr, coef_c_ptr,      # [N] g_distill * T * w, g_ce * cw (1 / N applied after)
        DH, DW, DB,                  # [N, d_s] fp32 accumulator, [V_slab, d_s] / [V_slab] fp32 slab accumulators
        N, col_offset,               # rows; first vocabulary column of the slab (for the target ids)
        V_SLAB: tl.constexpr, d_s: tl.constexpr, d_t: tl.constexpr,
        stride_shn, stride_shk, stride_swv, stride_swk,
        stride_thn, stride_thk, stride_twv, stride_twk, stride_dhn, stride_dwv,
        inv_T, cap_s, inv_cap_s, cap_t, inv_cap_t,
        SHARED: tl.constexpr,        # slab inside [0, V): distillation (+ CE); else CE only
        REVERSE: tl.constexpr, HAS_TARGETS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
        NEED_DB: tl.constexpr, DH_ATOMIC: tl.constexpr, IEEE: tl.constexpr, TILES: tl.constexpr,
        HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pid_v = tl.program_id(1)
    row_ok = rows < N
    acc_ty: tl.constexpr = stats_ptr.dtype.element_ty
    lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
    lse_z = tl.load(stats_ptr + rows * 4 + 0, mask=row_ok, other=0.0)
    lse_x = tl.load(stats_ptr + rows * 4 + 1, mask=row_ok, other=0.0)
    kl = tl.load(stats_ptr + rows * 4 + 2, mask=row_ok, other=0.0)
    coef_d = tl.load(coef_d_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
    if HAS_TARGETS:
        lse_1 = tl.load(stats_ptr + rows * 4 + 3, mask=row_ok, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0) - col_offset   # slab-local target column
        coef_c = tl.load(coef_c_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)

    for i in range(0, TILES):
        cols = ((pid_v * TILES + i) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)   # int64: cols * stride
        col_ok = cols < V_SLAB
        valid = row_ok[:, None] & col_ok[None, :]
        s = _logit_tile(SH, SW, rows, cols, row_ok, col_ok, d_s, stride_shn, stride_shk, stride_swv, stride_swk,
                        acc_ty, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)
        s, tanh_s = _lm_logits(s, SB, cols, col_ok, cap_s, inv_cap_s, HAS_SB, HAS_SCAP)
        if SHARED:
            u = _logit_tile(TH, TW, rows, cols, row_ok, col_ok, d_t, stride_thn, stride_thk, stride_twv,
                            stride_twk, acc_ty, IEEE, BLOCK_M, BLOCK_V, BLOCK_K)
            u, _ = _lm_logits(u, TB, cols, col_ok, cap_t, inv_cap_t, HAS_TB, HAS_TCAP)
            x = _target_logits(s, u, lam, inv_T, REVERSE)
            G = _distill_grad_tile(s * inv_T, x, lse_z, lse_x, kl, coef_d, valid, REVERSE)
            if HAS_TARGETS:
                G += _ce_grad_tile(s, cols, tgt, lse_1, coef_c, valid)
        else:
            G = _ce_grad_tile(s, cols, tgt, lse_1, coef_c, valid)
        if HAS_SCAP:
            G = G * (1.0 - tanh_s * tanh_s)                   # d s / d a of the softcap
        if NEED_DB:
            tl.atomic_add(DB + cols, tl.sum(G, 0), mask=col_ok)
        _contract_grad_tile(G, rows, cols, row_ok, col_ok, SH, SW, DH, DW, d_s,
                            stride_shn, stride_shk, stride_swv, stride_swk, stride_dhn, stride_dwv,
                            NEED_DH, NEED_DW, DH_ATOMIC, IEEE, BLOCK_K)


# =============================================================================================
# Launchers and autograd.Functions
# =============================================================================================
@dataclasses.dataclass(frozen=True)
class DistillParams:
    """Non-tensor options of one call (CCE's CCEParams): one ctx argument, one None in backward."""
    temperature: float
    vocab: int                 # shared vocabulary V (prefix of both)
    reverse: bool
    reduction: str
    has_targets: bool
    workspace_bytes: int | None = None
    grad_enabled: bool = True  # torch.is_grad_enabled() at the call (needs_input_grad ignores no_grad)
    student_softcap: float | None = None
    teacher_softcap: float | None = None

    def caps(self):
        """(cap_s, 1 / cap_s, cap_t, 1 / cap_t) kernel scalars (1.0 where there is no cap)."""
        cs, ct = self.student_softcap or 1.0, self.teacher_softcap or 1.0
        return cs, 1.0 / cs, ct, 1.0 / ct

    def cap_flags(self):
        return dict(HAS_SCAP=self.student_softcap is not None, HAS_TCAP=self.teacher_softcap is not None)

    def scale(self, num_rows: int) -> float:
        return 1.0 / max(num_rows, 1) if self.reduction == "mean" else 1.0


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _pair(hidden: torch.Tensor, weight: torch.Tensor, compute: torch.dtype):
    """Operands of one logit GEMM in one dtype: kept as they are when they agree (bf16 stays bf16
    for the tensor cores, fp32 accumulation), else both cast to the compute dtype (rare)."""
    if hidden.dtype == weight.dtype and (compute != torch.float64 or hidden.dtype == torch.float64):
        return hidden, weight
    return hidden.to(compute), weight.to(compute)


def _row_vectors(num_rows, row_lambda, row_weight, targets, ce_weight, compute, device):
    lam = row_lambda.to(device=device, dtype=compute).contiguous()
    w = row_weight.to(device=device, dtype=compute).contiguous()
    if targets is None:
        return lam, w, lam, w                                   # dummies, never read
    tgt = targets.to(device=device, dtype=torch.int64).contiguous()
    cw = (torch.ones(num_rows, dtype=compute, device=device) if ce_weight is None
          else ce_weight.to(device=device, dtype=compute).contiguous())
    return lam, w, tgt, cw


def workspace_rows(num_rows: int, width: int, elem_bytes: int, device: torch.device,
                   workspace_bytes: int | None = None) -> int:
    """Rows per chunk so that the two [rows, width] workspaces fit the byte budget.

    Budget: `workspace_bytes`, else env TIDE_WORKSPACE_BYTES, else min(1 GiB, free memory / 4)
    on CUDA (1 GiB elsewhere). Independent of N: the workspace never grows with N.
    """
    budget = workspace_bytes
    if budget is None and os.environ.get("TIDE_WORKSPACE_BYTES"):
        budget = int(os.environ["TIDE_WORKSPACE_BYTES"])
    if budget is None:
        budget = DEFAULT_WORKSPACE_BYTES
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(budget, free // 4)
    rows = max(1, budget // max(1, 2 * width * elem_bytes))
    if rows >= 256:
        rows = rows // 128 * 128                                 # whole GEMM tiles
    return min(rows, max(num_rows, 1))


DEFAULT_STREAM_SLAB_BYTES = 64 << 20   # fp32 d student_weight slab of the streaming backward


def stream_slab_rows(width: int, d_s: int, elem_bytes: int, block_v: int,
                     workspace_bytes: int | None = None) -> int:
    """Vocabulary rows per backward slab of triton_stream: the fp32 [rows, d_s] d-weight accumulator
    fits `workspace_bytes` (else env TIDE_WORKSPACE_BYTES, else 64 MiB); a multiple of BLOCK_V."""
    budget = workspace_bytes
    if budget is None and os.environ.get("TIDE_WORKSPACE_BYTES"):
        budget = int(os.environ["TIDE_WORKSPACE_BYTES"])
    if budget is None:
        budget = DEFAULT_STREAM_SLAB_BYTES
    rows = max(block_v, budget // max(1, d_s * elem_bytes) // block_v * block_v)
    return min(rows, triton.cdiv(max(width, 1), block_v) * block_v)


def _row_kernel_config(width: int):
    if _interpreting():
        return 2, 128, 4
    return 1, min(4096, triton.next_power_of_2(max(width, 16))), 8   # BLOCK_R, BLOCK_V, num_warps


def _chunk_pass(sh, sw, sb, th, tw, tb, lam, w, tgt, cw, params, need_grad, grads_h, grads_w, grads_b,
                workspace_rows_count, combine_terms=False):
    """One walk over the row chunks: per-row losses, and with need_grad the logit gradients
    contracted into grads_h / grads_w / grads_b (lists, one entry per term, or None).
    combine_terms: add the CE gradient to the distill one before the GEMMs (one term)."""
    num_rows = sh.shape[0]
    V, V_s = params.vocab, sw.shape[0]
    width = V_s if params.has_targets else V
    compute = lam.dtype
    device = sh.device
    distill_rows = torch.zeros(num_rows, dtype=compute, device=device)
    ce_rows = torch.zeros(num_rows if params.has_targets else 0, dtype=compute, device=device)
    chunk = workspace_rows_count
    ws_s = torch.empty(chunk, width, dtype=compute, device=device)       # student logits -> d distill
    ws_u = torch.empty(chunk, width, dtype=compute, device=device)       # teacher logits -> d CE
    block_r, block_v, warps = _row_kernel_config(width)
    sw_used, tw_used = sw[:width], tw[:V]
    n_terms = 1 if combine_terms or not params.has_targets else 2
    for r0 in range(0, num_rows, chunk):
        r1 = min(num_rows, r0 + chunk)
        c = r1 - r0
        S, U = ws_s[:c], ws_u[:c]
        _matmul(sh[r0:r1], sw_used.T, S)                                 # [c, width]
        _matmul(th[r0:r1], tw_used.T, U[:, :V])                          # [c, V]
        _chunk_rows_kernel[(triton.cdiv(c, block_r),)](
            S, U, lam[r0:], w[r0:], tgt[r0:], cw[r0:], distill_rows[r0:],
            (ce_rows if params.has_targets else distill_rows)[r0:],
            sb if sb is not None else lam, tb if tb is not None else lam,
            c, V, V_s if params.has_targets else 0, S.stride(0), U.stride(0),
            params.temperature, 1.0 / params.temperature, *params.caps(),
            REVERSE=params.reverse, NEED_GRAD=need_grad, HAS_SB=sb is not None, HAS_TB=tb is not None,
            **params.cap_flags(), BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps)
        if not need_grad:
            continue
        if combine_terms and params.has_targets:
            S.add_(U)                                                    # d distill + d CE, upstream folded in
        for term, G in enumerate((S, U)[:n_terms]):                      # G: d term / d logits
            if grads_h is not None:
                _matmul(G, sw_used, grads_h[term][r0:r1])                # [c, d_s]
            if grads_w is not None:
                _matmul(G.T, sh[r0:r1], grads_w[term][:width], accumulate=True)   # [width, d_s]
            if grads_b is not None:
                grads_b[term][:width] += G.sum(0)                        # [width]
    return distill_rows, ce_rows


class _ChunkedDistill(torch.autograd.Function):
    """Row-chunked workspace: GEMMs into a bounded [c, V_s'] fp32 workspace, fused row kernel,
    gradient GEMMs. "mean" / "sum": gradients for unit upstream gradients computed in forward,
    scaled in backward; "none": backward walks the chunks again with each row's upstream
    gradients folded into its loss weights (w g_distill, cw g_ce)."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                row_lambda, row_weight, targets, ce_weight, params: DistillParams):
        compute = _compute_dtype(student_hidden)
        device = student_hidden.device
        num_rows, d_s = student_hidden.shape
        V_s = student_weight.shape[0]
        width = V_s if params.has_targets else params.vocab              # student logit columns needed
        per_row = params.reduction == "none"
        wants = [ctx.needs_input_grad[i] and params.grad_enabled for i in range(3)]
        grads_now = any(wants) and not per_row
        sh, sw = _pair(student_hidden, student_weight, compute)
        th, tw = _pair(teacher_hidden, teacher_weight, compute)
        sb = None if student_bias is None else student_bias.detach().to(compute).contiguous()
        tb = None if teacher_bias is None else teacher_bias.detach().to(compute).contiguous()
        lam, w, tgt, cw = _row_vectors(num_rows, row_lambda, row_weight, targets, ce_weight, compute, device)
        n_terms = 2 if params.has_targets else 1
        shapes = ((num_rows, d_s), (V_s, d_s), (V_s,))
        grads = [[torch.zeros(shape, dtype=compute, device=device) for _ in range(n_terms)]
                 if want and grads_now else None for shape, want in zip(shapes, wants)]
        chunk = workspace_rows(num_rows, width, torch.finfo(compute).bits // 8, device, params.workspace_bytes)
        distill_rows, ce_rows = _chunk_pass(sh, sw, sb, th, tw, tb, lam, w, tgt, cw, params, grads_now,
                                            *grads, chunk)
        ctx.params = params
        ctx.in_dtypes = (student_hidden.dtype, student_weight.dtype,
                         None if student_bias is None else student_bias.dtype)
        ctx.num_rows = num_rows
        ctx.wants = wants
        if per_row:
            if any(wants):
                ctx.save_for_backward(sh, sw, sb, th, tw, tb, lam, w, tgt, cw)
            outs = (distill_rows, ce_rows)
        else:
            ctx.save_for_backward(*[g for term_grads in grads if term_grads is not None for g in term_grads])
            scale = params.scale(num_rows)
            outs = (distill_rows.sum() * scale, ce_rows.sum() * scale)
        return outs if params.has_targets else outs[0]

    @staticmethod
    def backward(ctx, *grad_outputs):
        params = ctx.params
        n_terms = 2 if params.has_targets else 1
        if params.reduction == "none":
            sh, sw, sb, th, tw, tb, lam, w, tgt, cw = ctx.saved_tensors
            compute = lam.dtype
            w = w * grad_outputs[0].to(compute)                      # upstream gradients folded in
            if params.has_targets:
                cw = cw * grad_outputs[1].to(compute)
            shapes = (tuple(sh.shape), tuple(sw.shape), (sw.shape[0],))
            grads = [[torch.zeros(shape, dtype=compute, device=sh.device)] if want else None
                     for shape, want in zip(shapes, ctx.wants)]
            width = sw.shape[0] if params.has_targets else params.vocab
            chunk = workspace_rows(sh.shape[0], width, torch.finfo(compute).bits // 8, sh.device,
                                   params.workspace_bytes)
            _chunk_pass(sh, sw, sb, th, tw, tb, lam, w, tgt, cw, params, True, *grads, chunk, combine_terms=True)
            out = [None if g is None else g[0].to(dtype) for g, dtype in zip(grads, ctx.in_dtypes)]
            return (*out, None, None, None, None, None, None, None, None)
        saved = list(ctx.saved_tensors)
        grads = [[saved.pop(0) for _ in range(n_terms)] if want else None for want in ctx.wants]
        scale = params.scale(ctx.num_rows)

        def combine(term_grads, dtype):            # scale * (g_distill G_distill + g_ce G_ce), no sync
            if term_grads is None:
                return None
            out = term_grads[0] * (grad_outputs[0].to(term_grads[0].dtype) * scale)
            for g, go in zip(term_grads[1:], grad_outputs[1:]):
                out.addcmul_(g, go.to(g.dtype) * scale)  # in place: no third [V_s, d_s] buffer
            return out.to(dtype)

        out = [combine(g, dtype) for g, dtype in zip(grads, ctx.in_dtypes)]
        return (*out, None, None, None, None, None, None, None, None)


def _stream_config(elem_bytes: int):
    if _interpreting():
        return 16, 64, 32, 4, 1           # BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages
    if elem_bytes >= 4:
        return 64, 64, 32, 8, 2
    return 64, 128, 64, 8, 3


def _stream_strides(sh, sw, th, tw):
    return (sh.stride(0), sh.stride(1), sw.stride(0), sw.stride(1),
            th.stride(0), th.stride(1), tw.stride(0), tw.stride(1))


STREAM_SPLITS = 16   # vocabulary splits per row block: enough programs for 132 SMs at small N too


def _stream_tiles(num_tiles: int) -> tuple[int, int]:
    """(tiles per program, programs) covering num_tiles vocabulary tiles in about STREAM_SPLITS
    programs; tiles per program depends on the vocabulary only, so N never triggers a recompile."""
    tiles = triton.cdiv(max(num_tiles, 1), STREAM_SPLITS)
    return tiles, triton.cdiv(num_tiles, tiles)


def _merge_lse(m, l):
    """Merge split log-sum-exp partials [S, N] (running max m, sum l): (max, sum, rescale [S, N])."""
    top = m.max(0).values
    rescale = torch.exp(m - top)                                   # splits that saw nothing: exp(-inf) = 0
    return top, (l * rescale).sum(0), rescale


class _StreamDistill(torch.autograd.Function):
    """Fully streaming: forward keeps 4 statistics per row; backward recomputes the logit tiles."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                row_lambda, row_weight, targets, ce_weight, params: DistillParams):
        compute = _compute_dtype(student_hidden)
        device = student_hidden.device
        num_rows, d_s = student_hidden.shape
        d_t = teacher_hidden.shape[1]
        sb = None if student_bias is None else student_bias.detach().to(compute).contiguous()
        tb = None if teacher_bias is None else teacher_bias.detach().to(compute).contiguous()
        V, V_s = params.vocab, student_weight.shape[0]
        sh, sw = _pair(student_hidden, student_weight, compute)
        th, tw = _pair(teacher_hidden, teacher_weight, compute)
        if th.dtype != sh.dtype:                 # one dot dtype inside the kernel
            th, tw = th.to(sh.dtype), tw.to(sh.dtype)
        lam, w, tgt, cw = _row_vectors(num_rows, row_lambda, row_weight, targets, ce_weight, compute, device)
        T = params.temperature
        bm, bv, bk, warps, stages = _stream_config(sh.element_size())
        tiles, split_shared = _stream_tiles(triton.cdiv(V, bv))
        split_ce = triton.cdiv(triton.cdiv(V_s - V, bv), tiles) if params.has_targets else 0
        part = torch.empty(split_shared + split_ce, num_rows, 8, dtype=compute, device=device)
        if num_rows:
            _stream_fwd_kernel[(triton.cdiv(num_rows, bm), split_shared + split_ce)](
                sh, sw, th, tw, lam, tgt, sb if sb is not None else lam, tb if tb is not None else lam,
                part, num_rows, split_shared,
                V, V_s if params.has_targets else 0, d_s, d_t, *_stream_strides(sh, sw, th, tw), 1.0 / T,
                *params.caps(), REVERSE=params.reverse, IEEE=sh.dtype in (torch.float32, torch.float64),
                TILES=tiles, HAS_SB=sb is not None, HAS_TB=tb is not None, **params.cap_flags(),
                BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        # Merge the splits (O(N * SPLITS) elementwise): KL = acc / l_a - lse(a) + lse(b), a the weighting side.
        m_z, l_z, m_x, l_x, acc, m_1, l_1, s_t = part.unbind(-1)
        top_z, sum_z, rescale_z = _merge_lse(m_z[:split_shared], l_z[:split_shared])
        top_x, sum_x, rescale_x = _merge_lse(m_x[:split_shared], l_x[:split_shared])
        lse_z, lse_x = top_z + torch.log(sum_z), top_x + torch.log(sum_x)
        if params.reverse:
            kl = (acc[:split_shared] * rescale_z).sum(0) / sum_z - lse_z + lse_x
        else:
            kl = (acc[:split_shared] * rescale_x).sum(0) / sum_x - lse_x + lse_z
        distill_rows = T * T * w * kl
        stats = torch.stack([lse_z, lse_x, kl, torch.zeros_like(kl)], dim=1)     # [N, 4]
        if params.has_targets:
            top_1, sum_1, _ = _merge_lse(m_1, l_1)
            stats[:, 3] = top_1 + torch.log(sum_1)
            ce_rows = cw * (stats[:, 3] - s_t.sum(0))
        ctx.params = params
        ctx.in_dtypes = (student_hidden.dtype, student_weight.dtype,
                         None if student_bias is None else student_bias.dtype)
        ctx.save_for_backward(sh, sw, sb, th, tw, tb, lam, w, tgt, cw, stats)
        if params.reduction == "none":
            return (distill_rows, ce_rows) if params.has_targets else distill_rows
        scale = params.scale(num_rows)
        distill = distill_rows.sum() * scale
        if params.has_targets:
            return distill, ce_rows.sum() * scale
        return distill

    @staticmethod
    def backward(ctx, *grad_outputs):
        sh, sw, sb, th, tw, tb, lam, w, tgt, cw, stats = ctx.saved_tensors
        params = ctx.params
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        num_rows, d_s = sh.shape
        d_t = th.shape[1]
        V_s = sw.shape[0]
        compute = stats.dtype
        scale = params.scale(num_rows)
        T = params.temperature
        # [N] on device, no sync; the 1 / N of "mean" is applied to the fp32 results, not to the logit
        # gradient that is rounded to the weight dtype for the dot (fp16 would underflow at large N);
        # "none" gives per-row upstream gradients [N], the others a 0-d one
        coef_d = (grad_outputs[0].to(compute) * T) * w
        coef_c = grad_outputs[1].to(compute) * cw if params.has_targets else coef_d
        dh = torch.zeros(num_rows, d_s, dtype=compute, device=sh.device) if need_dh else stats
        dw_out = torch.zeros(V_s, d_s, dtype=ctx.in_dtypes[1], device=sh.device) if need_dw else None
        db = torch.zeros(V_s, dtype=compute, device=sh.device) if need_db else None
        bm, bv, bk, warps, stages = _stream_config(sh.element_size())
        width = V_s if params.has_targets else params.vocab
        rows = stream_slab_rows(width, d_s, torch.finfo(compute).bits // 8, bv, params.workspace_bytes)
        if num_rows and (need_dh or need_dw or need_db):
            # Vocabulary slabs [lo, hi), cut at V so each slab is all-distill (+CE) or all-CE: the fp32
            # d-weight accumulator is one slab, cast into the output after its launch. No FLOP is
            # repeated: every logit tile is still recomputed exactly once.
            slabs = [(lo, min(lo + rows, params.vocab)) for lo in range(0, params.vocab, rows)]
            slabs += [(lo, min(lo + rows, width)) for lo in range(params.vocab, width, rows)]
            for lo, hi in slabs:
                dw = torch.zeros(hi - lo, d_s, dtype=compute, device=sh.device) if need_dw else stats
                shared = lo < params.vocab
                tiles, splits = _stream_tiles(triton.cdiv(hi - lo, bv))
                _stream_bwd_kernel[(triton.cdiv(num_rows, bm), splits)](
                    sh, sw[lo:], th, tw[lo:] if shared else tw, lam, tgt,
                    sb[lo:] if sb is not None else lam, tb[lo:] if tb is not None and shared else lam,
                    stats, coef_d, coef_c, dh, dw, db[lo:] if need_db else stats,
                    num_rows, lo, hi - lo, d_s, d_t,
                    *_stream_strides(sh, sw, th, tw), dh.stride(0), dw.stride(0), 1.0 / T, *params.caps(),
                    SHARED=shared, REVERSE=params.reverse, HAS_TARGETS=params.has_targets,
                    NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, DH_ATOMIC=splits > 1,
                    IEEE=sh.dtype in (torch.float32, torch.float64), TILES=tiles,
                    HAS_SB=sb is not None, HAS_TB=tb is not None and shared, **params.cap_flags(),
                    BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                if need_dw:
                    dw_out[lo:hi] = dw * scale
        return ((dh * scale).to(ctx.in_dtypes[0]) if need_dh else None, dw_out,
                (db * scale).to(ctx.in_dtypes[2]) if need_db else None,
                None, None, None, None, None, None, None, None)


def fused_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                       row_lambda, row_weight, targets=None, ce_weight=None, *,
                       temperature: float, shared_vocab: int, reverse: bool, reduction: str,
                       student_bias=None, teacher_bias=None, student_softcap=None, teacher_softcap=None,
                       stream: bool = False, workspace_bytes: int | None = None):
    """Same arguments, returns `(distill, ce or None)` and gradients as tide.reference.distill_loss
    (already checked by tide.losses). stream=False: row-chunked workspace (impl="triton");
    stream=True: fully streaming kernels (impl="triton_stream"). workspace_bytes bounds the chunk
    workspace."""
    params = DistillParams(temperature=float(temperature), vocab=int(shared_vocab), reverse=bool(reverse),
                           reduction=reduction, has_targets=targets is not None,
                           workspace_bytes=workspace_bytes, grad_enabled=torch.is_grad_enabled(),
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    fn = _StreamDistill if stream else _ChunkedDistill
    out = fn.apply(student_hidden, student_weight, student_bias, teacher_hidden.detach(), teacher_weight.detach(),
                   None if teacher_bias is None else teacher_bias.detach(), row_lambda, row_weight, targets,
                   ce_weight, params)
    return out if targets is not None else (out, None)

"""Pure-PyTorch bounded-memory losses: the default on CPU, correct on any device.

Same functions, arguments and gradients as tide.reference, computed by walking
the rows in blocks so that no tensor larger than `[block_rows, V]` ever exists,
however large N is. `block_rows` comes from a byte budget per `[block_rows, V]`
tensor (`TIDE_CHUNK_BYTES`; default 8 MiB on CPU, 256 MiB on CUDA, at least 32
rows), so memory is independent of N.

Distillation (TIDAL / forward KL / reverse KL, + CE), per block of rows:

    s = student_hidden[rows] @ student_weight.T          [R, V_s]   (compute dtype)
    u = teacher_hidden[rows] @ teacher_weight[:V].T      [R, V]     (no autograd; V = shared_vocab)
    loss rows and d loss / d s                           [R, V_s]
    d student_hidden[rows]  = (d loss / d s) @ student_weight
    d student_weight       += (d loss / d s).T @ student_hidden[rows]

The gradients are computed in the forward walk (one pass of GEMMs, as Liger
does) and scaled by the upstream gradient in backward. With targets the
Function has two outputs (distill, ce), so the gradient of each is kept apart
(`[N, d_s]` and `[V_s, d_s]` each) and combined in backward.

Gradients w.r.t. the student logits s at one row (temperature T, x = s / T):
- TIDAL / forward KL, `T^2 w KL(r || p)` with r detached: `T w (p - r)`;
- reverse KL, `T^2 KL(p || q)`: d/dx KL = p * (log p - log q - KL), so
  `T p (log p - log q - KL)`;
- CE at T = 1, `c * CE`: `c (softmax(s) - onehot(target))`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Byte budget of one [block_rows, V] tensor: small on CPU (cache-sized blocks, a small
# peak), large on GPUs (big GEMMs). At least MIN_BLOCK_ROWS rows, so that each read of
# the LM-head weight is shared by enough rows.
DEFAULT_CHUNK_BYTES = {"cpu": 8 * 2 ** 20, "cuda": 256 * 2 ** 20}
MIN_BLOCK_ROWS = 32


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def block_rows_for(vocab: int, dtype: torch.dtype, num_rows: int, device_type: str = "cpu") -> int:
    """Rows per block: one `[rows, vocab]` tensor within the budget (`TIDE_CHUNK_BYTES` overrides)."""
    budget = int(os.environ.get("TIDE_CHUNK_BYTES", 0)) or DEFAULT_CHUNK_BYTES.get(device_type, 2 ** 28)
    element = torch.finfo(dtype).bits // 8
    rows = budget // (element * max(vocab, 1))
    if "TIDE_CHUNK_BYTES" not in os.environ:
        rows = max(rows, MIN_BLOCK_ROWS)
    return max(1, min(max(num_rows, 1), rows))


@dataclass(frozen=True)
class DistillParams:
    """Non-tensor options of the distillation Function (one object, not a row of Nones)."""
    temperature: float
    shared_vocab: int
    reverse: bool
    reduction: str
    has_targets: bool


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in place (one [R, V] buffer fewer than torch.log_softmax)."""
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[i, j] * b[i, j] per row `[R]`, without an [R, V] product buffer."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def _distill_block(hidden, teacher_block, weight, teacher_weight, row_lambda, row_weight, targets,
                   ce_weight, params, scale):
    """Loss sums and d loss / d s for one block of rows.

    hidden `[R, d_s]`, teacher_block `[R, d_t]`, weight `[V_s, d_s]`, teacher_weight
    `[V_t, d_t]` (compute dtype). Returns (distill_sum, ce_sum, grad_distill `[R, V_s]`,
    grad_ce `[R, V_s]` or None), gradients already multiplied by `scale` (1/N for "mean").
    At most four `[R, V]` buffers are alive at once; each is reused in place.
    """
    T = params.temperature
    V = params.shared_vocab
    s = hidden @ weight.T                                            # student logits [R, V_s]
    u = teacher_block @ teacher_weight[:V].T                         # teacher logits [R, V]
    log_p = _log_softmax_(s[:, :V] / T)                              # student at T
    row_weight = row_weight.to(s.dtype)
    if params.reverse:
        log_q = _log_softmax_(u.div_(T))                             # teacher at T, in u's buffer
        p = torch.exp(log_p)
        diff = log_p.sub_(log_q)                                     # log p - log q
        del u, log_q
        kl = _row_dot(p, diff)                                       # KL(p || q) [R]
        grad = diff.sub_(kl[:, None]).mul_(p)                        # p (log p - log q - KL)
        del p
    else:
        # mixture ((1 - lam) s + lam u) / T = (s + lam (u - s)) / T, in u's buffer
        lam = row_lambda.to(s.dtype)[:, None]
        log_r = _log_softmax_(u.sub_(s[:, :V]).mul_(lam).add_(s[:, :V]).div_(T))
        del u
        r = torch.exp(log_r)
        kl = _row_dot(r, log_r.sub_(log_p))                          # KL(r || p) [R]
        del log_r
        grad = log_p.exp_().sub_(r)                                  # p - r, in log_p's buffer
        del r
    distill_sum = T * T * (row_weight * kl).sum()
    grad.mul_((T * scale) * row_weight[:, None])
    if s.shape[1] > V:                                               # logits outside the shared prefix
        grad = torch.nn.functional.pad(grad, (0, s.shape[1] - V))
    if not params.has_targets:
        return distill_sum, None, grad, None
    log_p1 = _log_softmax_(s)                                        # student at T = 1, full V_s, in s
    ce_rows = -log_p1.gather(1, targets[:, None]).squeeze(1)         # [R]
    ce_coef = ce_weight.to(s.dtype) if ce_weight is not None else torch.ones_like(ce_rows)
    grad_ce = log_p1.exp_()                                          # softmax(s) - onehot, in place
    grad_ce[torch.arange(grad_ce.shape[0], device=s.device), targets] -= 1.0
    grad_ce.mul_(scale * ce_coef[:, None])
    return distill_sum, (ce_coef * ce_rows).sum(), grad, grad_ce


class _DistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight,
                row_lambda, row_weight, targets, ce_weight, params: DistillParams):
        dtype = _compute_dtype(student_hidden)
        num_rows = student_hidden.shape[0]
        scale = 1.0 / max(num_rows, 1) if params.reduction == "mean" else 1.0
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        terms = 2 if params.has_targets else 1
        weight_c = student_weight.to(dtype)                          # [V_s, d_s] (a view for fp32/fp64)
        teacher_weight_c = teacher_weight.detach().to(dtype)         # [V_t, d_t]
        grad_hidden = [torch.zeros(student_hidden.shape, dtype=dtype, device=student_hidden.device)
                       for _ in range(terms)] if want_hidden else None
        grad_weight = [torch.zeros(student_weight.shape, dtype=dtype, device=student_weight.device)
                       for _ in range(terms)] if want_weight else None
        sums = [student_hidden.new_zeros((), dtype=dtype) for _ in range(terms)]
        block = block_rows_for(max(student_weight.shape[0], teacher_weight.shape[0]), dtype, num_rows,
                               student_hidden.device.type)
        with torch.no_grad():
            for start in range(0, num_rows, block):
                rows = slice(start, min(start + block, num_rows))
                hidden = student_hidden[rows].to(dtype)              # [R, d_s]
                results = _distill_block(
                    hidden, teacher_hidden[rows].to(dtype), weight_c, teacher_weight_c,
                    row_lambda[rows], row_weight[rows],
                    targets[rows] if targets is not None else None,
                    ce_weight[rows] if ce_weight is not None else None, params, scale)
                for term in range(terms):
                    sums[term] += results[term]
                    grad_logits = results[2 + term]                  # [R, V_s]
                    if want_hidden:
                        grad_hidden[term][rows] = grad_logits @ weight_c
                    if want_weight:
                        grad_weight[term].addmm_(grad_logits.T, hidden)
        losses = [total * scale for total in sums]
        ctx.params = params
        ctx.grads = (grad_hidden, grad_weight)
        ctx.input_dtypes = (student_hidden.dtype, student_weight.dtype)
        return tuple(losses) if params.has_targets else losses[0]

    @staticmethod
    def backward(ctx, *grad_outputs):
        grad_hidden, grad_weight = ctx.grads
        hidden_dtype, weight_dtype = ctx.input_dtypes

        def combine(grads, out_dtype):
            """sum_k grad_output_k * grads_k (out of place: backward may run again with retain_graph)."""
            if grads is None:
                return None
            total = grads[0] * grad_outputs[0]
            for grad, grad_output in zip(grads[1:], grad_outputs[1:]):
                total.addcmul_(grad, grad_output)
            return total.to(out_dtype)

        return (combine(grad_hidden, hidden_dtype), combine(grad_weight, weight_dtype),
                None, None, None, None, None, None, None)


def distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                 row_lambda, row_weight, targets=None, ce_weight=None, *,
                 temperature: float, shared_vocab: int, reverse: bool, reduction: str):
    """Same contract as `tide.reference.distill_loss`, in bounded memory."""
    params = DistillParams(temperature=temperature, shared_vocab=shared_vocab, reverse=reverse,
                           reduction=reduction, has_targets=targets is not None)
    return _DistillFunction.apply(student_hidden, student_weight, teacher_hidden.detach(),
                                  teacher_weight.detach(), row_lambda, row_weight, targets,
                                  ce_weight, params)


class _TokenLogprobFunction(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row; saves only the per-row LSE `[N]`.

    Backward recomputes each block's logits: d logprob_i / d logits_i = onehot - softmax.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        dtype = _compute_dtype(hidden)
        num_rows = hidden.shape[0]
        weight_c = weight.to(dtype)
        logprobs = torch.empty(num_rows, dtype=dtype, device=hidden.device)
        lse = torch.empty(num_rows, dtype=dtype, device=hidden.device)
        block = block_rows_for(weight.shape[0], dtype, num_rows, hidden.device.type)
        with torch.no_grad():
            for start in range(0, num_rows, block):
                rows = slice(start, min(start + block, num_rows))
                logits = hidden[rows].to(dtype) @ weight_c.T            # [R, V]
                lse[rows] = torch.logsumexp(logits, dim=-1)
                logprobs[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(hidden, weight, targets, lse)
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, lse = ctx.saved_tensors
        dtype = lse.dtype
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight_c = weight.to(dtype)
        grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_weight else None
        num_rows = hidden.shape[0]
        block = block_rows_for(weight.shape[0], dtype, num_rows, hidden.device.type)
        for start in range(0, num_rows, block):
            rows = slice(start, min(start + block, num_rows))
            block_hidden = hidden[rows].to(dtype)
            grad_logits = (block_hidden @ weight_c.T).sub_(lse[rows, None]).exp_().neg_()   # -softmax
            grad_logits[torch.arange(grad_logits.shape[0], device=hidden.device), targets[rows]] += 1.0
            grad_logits.mul_(grad_logprobs[rows, None].to(dtype))
            if want_hidden:
                grad_hidden[rows] = grad_logits @ weight_c
            if want_weight:
                grad_weight.addmm_(grad_logits.T, block_hidden)
        return (grad_hidden.to(hidden.dtype) if want_hidden else None,
                grad_weight.to(weight.dtype) if want_weight else None, None)


def token_logprobs(hidden, weight, targets):
    """Same contract as `tide.reference.token_logprobs`, in bounded memory."""
    return _TokenLogprobFunction.apply(hidden, weight, targets)

"""Pure-PyTorch bounded-memory losses: the default on CPU, correct on any device.

Same functions, arguments and gradients as tide.reference, computed by walking
the rows in blocks so that no tensor larger than `[block_rows, V]` ever exists,
however large N is. `block_rows` comes from a byte budget per `[block_rows, V]`
tensor (`TIDE_CHUNK_BYTES`; default 16 MiB on CPU, 256 MiB on CUDA, at least 32
rows), so memory is independent of N.

Distillation (TIDAL / forward KL / reverse KL, + CE), per block of rows:

    a = student_hidden[rows] @ student_weight.T + student_bias      [R, V_s]  (compute dtype)
    s = c_s * tanh(a / c_s)            (student_softcap c_s; s = a without it)
    u = c_t * tanh((teacher_hidden[rows] @ teacher_weight[:V].T + teacher_bias[:V]) / c_t)
                                                                    [R, V]    (no autograd)
    loss rows and d loss / d a = (d loss / d s) * (1 - tanh^2(a / c_s))        [R, V_s]
    d student_hidden[rows]  = (d loss / d a) @ student_weight
    d student_weight       += (d loss / d a).T @ student_hidden[rows]
    d student_bias         += (d loss / d a).sum(0)

"mean" / "sum": the gradients are computed in the forward walk (one pass of
GEMMs, as Liger does) and scaled by the (scalar) upstream gradient in backward.
With targets the Function has two outputs (distill, ce); the forward walk adds
their logit gradients before the GEMMs (one `[N, d_s]` / `[V_s, d_s]` gradient,
three student GEMMs per block instead of five), which is exact when both outputs
get the same upstream gradient, as in `distill + ce`. For other weights,
backward adds (g_ce - g_distill) times the CE gradient alone, from one more walk
over the student's logits (three more GEMMs per block).
Forward KL (lambda = 1 on every row) takes the target r = softmax(u / T) directly
instead of the mixture's arithmetic.
"none": the per-row values `[N]`; an upstream gradient g_i per row cannot be
applied to a finished `d student_weight`, so backward walks the blocks again and
scales each row's logit gradient by its g_i before the GEMMs.

Compiled elementwise step (opt-in, `TIDE_COMPILE=1`; "0" or unset: eager; anything
else is a ValueError; read at each walk, like `TIDE_CHUNK_BYTES`): in the distillation
walks (forward, and the backward walk of "none"), everything between a block's two logit
GEMMs and its gradient GEMMs (the softcaps and their derivative, the log-softmaxes at T and
at 1, the mixture, the KL and CE rows, d (distill + ce) / d a with its per-row coefficients
and the shared_vocab zero padding) is one `torch.compile`d function, `_distill_math`.
Inductor fuses it into a few row loops with one `[R, V_s]` output (two for TIDAL and
reverse KL), where eager makes a pass per op: ~15-20 ms instead of ~35-45 ms per
128 x 32768 float32 block on one CPU thread. At N=2048, V=32768, d_s=256, d_t=512
(benchmarks.run, one thread, 16 MiB blocks), forward + backward: forward KL + CE 3.12 ->
2.75 s, TIDAL + CE 3.04 -> 2.86 s, reverse KL + CE 3.06 -> 2.87 s; peak 64-68 MB instead
of 96-98 MB on forward KL. The GEMMs stay eager. The options (temperature and softcap
values, reverse, targets, gradients wanted) are constants of the compiled function: one
compile per configuration per process (~5-10 s; a new temperature value compiles anew),
the row dimension dynamic so that the last, smaller block reuses it (a one-row block runs
eager). Default off because of that compile time per process and configuration and the C++
compiler it needs (inductor's CPU backend); it pays over many steps. If compilation fails
(no compiler, an unsupported platform), one RuntimeWarning names the reason and the eager
block runs from then on: the loss never fails for it. Same values as eager to rounding
(float64 stays float64). The CE-only walks (`cross_entropy`, `token_logprobs`, the extra
CE walk for unequal upstream gradients) stay eager: compiling their in-place block
measured no gain (~7-8.5 ms vs eager's ~7.8 ms per 128 x 32768 block, one more buffer).

Cross-entropy alone (`cross_entropy`), "mean" / "sum": the same forward walk with
the CE term only, `_CrossEntropyFunction`: three GEMMs per block (logits, d hidden,
d weight) where `token_logprobs` needs four (it recomputes the logits in backward);
no gradient GEMM under torch.no_grad. "none" is `-ce_weight * token_logprobs`.

Gradients w.r.t. the (capped) student logits s at one row (temperature T, x = s / T):
- TIDAL / forward KL, `T^2 w KL(r || p)` with r detached: `T w (p - r)`;
- reverse KL, `T^2 KL(p || q)`: d/dx KL = p * (log p - log q - KL), so
  `T p (log p - log q - KL)`;
- CE at T = 1, `c * CE`: `c (softmax(s) - onehot(target))`;
and d s / d a = 1 - tanh^2(a / c_s) = 1 - (s / c_s)^2 with a softcap (1 without).
"""
from __future__ import annotations

import os
import types
import warnings
from dataclasses import dataclass

import torch

from . import reference

# Byte budget of one [block_rows, V] tensor: small on CPU (a small peak; 16 MiB measured fastest
# of 8/16/32/64 MiB for forward KL + CE at N=2048, V=32768, one thread: larger blocks' buffers
# exceed glibc's mmap threshold and are page-faulted anew each block), large on GPUs (big GEMMs).
# At least MIN_BLOCK_ROWS rows, so that each read of the LM-head weight is shared by enough rows.
DEFAULT_CHUNK_BYTES = {"cpu": 16 * 2 ** 20, "cuda": 256 * 2 ** 20}
MIN_BLOCK_ROWS = 32


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def env_bytes(name: str) -> int | None:
    """A byte budget from the environment variable `name` (None when unset): a positive integer."""
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer number of bytes, got {text!r}")
    return value


def block_rows_for(vocab: int, dtype: torch.dtype, num_rows: int, device_type: str = "cpu") -> int:
    """Rows per block: one `[rows, vocab]` tensor within the budget (`TIDE_CHUNK_BYTES` overrides)."""
    budget = env_bytes("TIDE_CHUNK_BYTES") or DEFAULT_CHUNK_BYTES.get(device_type, 2 ** 28)
    element = torch.finfo(dtype).bits // 8
    rows = budget // (element * max(vocab, 1))
    if "TIDE_CHUNK_BYTES" not in os.environ:
        rows = max(rows, MIN_BLOCK_ROWS)
    return max(1, min(max(num_rows, 1), rows))


def compile_requested() -> bool:
    """`TIDE_COMPILE`: "1" compiles each block's elementwise math (torch.compile), "0" or unset: eager."""
    text = os.environ.get("TIDE_COMPILE")
    if text is None or text.strip() in ("", "0"):
        return False
    if text.strip() == "1":
        return True
    raise ValueError(f"TIDE_COMPILE must be 1 (compile the chunked blocks' elementwise math) or 0 (eager), "
                     f"got {text!r}")


@dataclass(frozen=True)
class DistillParams:
    """Non-tensor options of the distillation Function (one object, not a row of Nones)."""
    temperature: float
    shared_vocab: int
    reverse: bool
    reduction: str
    has_targets: bool
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    teacher_target: bool = False          # lambda = 1 on every row (forward KL): the target r is q itself
    grad_enabled: bool = True             # torch.is_grad_enabled() at the call (forward runs without it)

    def scale(self, num_rows: int) -> float:
        return 1.0 / max(num_rows, 1) if self.reduction == "mean" else 1.0


def _no_autocast(device: torch.device):
    """The losses compute in float32 (float64) themselves: autocast must not recast their GEMMs."""
    return torch.autocast(device_type=device.type, enabled=False)


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax in place (one [R, V] buffer fewer than torch.log_softmax).

    On CPU the native kernel writes into its own input (it reads each row before writing it:
    the same values as torch.log_softmax, about 3x faster than logsumexp + sub); elsewhere
    logsumexp + sub.
    """
    if x.device.type == "cpu" and x.is_contiguous():
        return torch.ops.aten._log_softmax.out(x, -1, False, out=x)
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _softmax_(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax in place, `exp(x - lse)` (lse `[R]` the rows' logsumexp); on CPU the native
    kernel writes into its input (same values up to rounding, fewer passes)."""
    if x.device.type == "cpu" and x.is_contiguous():
        return torch.ops.aten._softmax.out(x, -1, False, out=x)
    return x.sub_(lse[:, None]).exp_()


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[i, j] * b[i, j] per row `[R]`, without an [R, V] product buffer."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def _linear(hidden, weight, bias):
    """`hidden @ weight.T + bias` `[R, V]` (one GEMM)."""
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


def _logits_(hidden, weight, bias, softcap, want_derivative=False):
    """`softcap * tanh((hidden @ weight.T + bias) / softcap)` `[R, V]`, and with want_derivative
    its derivative w.r.t. the uncapped logits, `1 - tanh^2` `[R, V]` (None without a softcap)."""
    return _softcap_(_linear(hidden, weight, bias), softcap, want_derivative)


def _softcap_(logits, softcap, want_derivative=False):
    """`_logits_` after the GEMM: the softcap in place in the logits' buffer (and its derivative)."""
    if softcap is None:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    derivative = torch.mul(tanh, tanh).neg_().add_(1.0) if want_derivative else None
    return tanh.mul_(softcap), derivative


def _distill_block(hidden, teacher_block, weight, bias, teacher_weight, teacher_bias, row_lambda, row_weight,
                   targets, ce_weight, params, coef_distill, coef_ce, want_grad, compiled=False):
    """Per-row losses and their logit gradients for one block of rows.

    hidden `[R, d_s]`, teacher_block `[R, d_t]`, weight `[V_s, d_s]`, bias `[V_s]` or None,
    teacher_weight `[V_t, d_t]`, teacher_bias `[V_t]` or None (compute dtype).
    Returns (distill_rows `[R]`, ce_rows `[R]` or None, grad_distill `[R, V_s]` or None,
    grad_ce `[R, V_s]` or None): the gradients of the per-row values w.r.t. the uncapped
    logits, row i multiplied by coef_distill[i] / coef_ce[i] (a float or `[R]`); the caller
    adds the two. Eager: at most four `[R, V]` buffers are alive at once (five with a student
    softcap). `compiled` (TIDE_COMPILE=1): the elementwise math after the two GEMMs is one
    compiled function (`_distill_math`) that returns the summed gradient as grad_distill
    (grad_ce None); three `[R, V]` buffers (the two logits and the gradient).
    """
    T = params.temperature
    V = params.shared_vocab
    s = _linear(hidden, weight, bias)                                # student [R, V_s], uncapped
    u = _linear(teacher_block, teacher_weight[:V], None if teacher_bias is None else teacher_bias[:V])  # [R, V]
    if compiled and s.shape[0] > 1:                                  # TIDE_COMPILE=1 (one row: eager, no recompile)
        out = _distill_block_compiled(s, u, row_lambda, row_weight, targets, ce_weight, params, coef_distill,
                                      coef_ce, want_grad)
        if out is not None:
            return out
    s, derivative = _softcap_(s, params.student_softcap, want_grad)
    u, _ = _softcap_(u, params.teacher_softcap)
    log_p = _log_softmax_(s[:, :V] / T)                              # student at T
    row_weight = row_weight.to(s.dtype)
    grad = None
    if params.reverse:
        log_q = _log_softmax_(u.div_(T))                             # teacher at T, in u's buffer
        p = torch.exp(log_p)
        diff = log_p.sub_(log_q)                                     # log p - log q
        del u, log_q
        kl = _row_dot(p, diff)                                       # KL(p || q) [R]
        if want_grad:
            grad = diff.sub_(kl[:, None]).mul_(p)                    # p (log p - log q - KL)
        del p, diff
    else:
        if params.teacher_target:                                    # forward KL: r = q = softmax(u / T)
            log_r = _log_softmax_(u.div_(T))
        else:   # mixture ((1 - lam) s + lam u) / T = (s + lam (u - s)) / T, in u's buffer
            lam = row_lambda.to(s.dtype)[:, None]
            log_r = _log_softmax_(u.sub_(s[:, :V]).mul_(lam).add_(s[:, :V]).div_(T))
        del u
        r = torch.exp(log_r)
        kl = _row_dot(r, log_r.sub_(log_p))                          # KL(r || p) [R]
        del log_r
        if want_grad:
            grad = log_p.exp_().sub_(r)                              # p - r, in log_p's buffer
        del r
    distill_rows = T * T * row_weight * kl
    if want_grad:
        grad.mul_(_column(T * row_weight * coef_distill))
        if derivative is not None:
            grad.mul_(derivative[:, :V])
        if s.shape[1] > V:                                           # logits outside the shared prefix
            grad = torch.nn.functional.pad(grad, (0, s.shape[1] - V))
    if not params.has_targets:
        return distill_rows, None, grad, None
    ce_rows, grad_ce = _ce_block(s, derivative, targets, ce_weight, coef_ce, want_grad)
    return distill_rows, ce_rows, grad, grad_ce


def _ce_block(s, derivative, targets, ce_weight, coef_ce, want_grad):
    """CE rows `[R]` (`ce_weight_i * CE_i` at T = 1) and, with want_grad, their logit gradient
    `[R, V_s]` times coef_ce, computed in s's buffer (s is consumed)."""
    log_p1 = _log_softmax_(s)                                        # student at T = 1, full V_s, in s
    ce_coef = ce_weight.to(s.dtype) if ce_weight is not None else torch.ones(s.shape[0], dtype=s.dtype,
                                                                                device=s.device)
    ce_rows = -ce_coef * log_p1.gather(1, targets[:, None]).squeeze(1)   # [R]
    grad_ce = None
    if want_grad:
        grad_ce = log_p1.exp_()                                      # softmax(s) - onehot, in place
        grad_ce[torch.arange(grad_ce.shape[0], device=s.device), targets] -= 1.0
        grad_ce.mul_(_column(ce_coef * coef_ce))
        if derivative is not None:
            grad_ce.mul_(derivative)
    return ce_rows, grad_ce


def _column(coef):
    """A per-row coefficient as a column `[R, 1]` (floats stay floats)."""
    return coef[:, None] if isinstance(coef, torch.Tensor) and coef.dim() == 1 else coef


# --------------------------------------------------------------------------- compiled elementwise step
# TIDE_COMPILE=1: each block's elementwise math (everything between the logit GEMMs and the gradient
# GEMMs) is one torch.compile'd function of the block's uncapped logits and per-row tensors, so that
# inductor fuses the softcaps, log-softmaxes, exps, KL / CE row reductions and the gradient into a few
# loops with one [R, V] output, where eager makes a pass (and often a buffer) per op. The GEMMs stay
# eager (outside the compiled region). Python options (temperature, reverse, softcaps, ...) are
# constants of the compiled function (a constant temperature makes a faster kernel than a tensor one:
# ~22 vs ~33 ms per 128 x 32768 block), one compile per configuration, cached for the process; the row
# dimension is dynamic, so the last, smaller block does not recompile (one-row blocks run eager).
_COMPILED = {}                  # (name, options) -> the compiled function
_COMPILE_FAILURE = []           # the reason compilation failed (then eager from there on; warned once)


def _specialized(math, options):
    """`math(*tensors, **options)` as a function with a code object of its own: dynamo keeps its
    compiled graphs per code object (at most `torch._dynamo.config.recompile_limit`, 8), so the
    configurations must not share one."""
    def step(*tensors):
        return math(*tensors, **options)
    code = step.__code__.replace(co_name=f"tide_{math.__name__}_{len(_COMPILED)}")
    return types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)


def _compiled_call(math, options, *tensors):
    """`math(*tensors, **options)` through torch.compile, dim 0 (rows) of every tensor dynamic; None
    when compilation has failed in this process (the caller then runs its eager block). A failure
    (no C++ compiler, an unsupported op or platform) warns once with its reason; never raised."""
    if _COMPILE_FAILURE:
        return None
    key = (math.__name__, tuple(sorted(options.items())))
    try:
        fn = _COMPILED.get(key)
        if fn is None:
            fn = _COMPILED[key] = torch.compile(_specialized(math, options), dynamic=False)
        for tensor in tensors:
            if tensor is not None:
                torch._dynamo.mark_dynamic(tensor, 0)
        return fn(*tensors)
    except Exception as error:                                       # noqa: BLE001 (never fail the loss)
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        _COMPILE_FAILURE.append(reason)
        warnings.warn(f"TIDE_COMPILE=1: torch.compile of the chunked block's elementwise math failed ({reason}); "
                      "using the eager block from here on", RuntimeWarning, stacklevel=2)
        return None


def _capped(a, softcap):
    """(softcap * tanh(a / softcap), its derivative 1 - tanh^2) functionally; (a, None) without a softcap."""
    if softcap is None:
        return a, None
    tanh = torch.tanh(a / softcap)
    return tanh * softcap, 1.0 - tanh * tanh


def _ce_math(s, derivative, targets, coef, want_grad):
    """`_ce_block` functionally (part of `_distill_math`): from the (capped) student logits s
    `[R, V_s]` and ds/da (None without a softcap), the targets' log-probabilities at T = 1 `[R]`
    and, with want_grad, the logit gradient `coef (softmax(s) - onehot) ds/da` `[R, V_s]` (coef `[R]`)."""
    log_p1 = torch.log_softmax(s, dim=-1)
    logprob = log_p1.gather(1, targets[:, None]).squeeze(1)
    if not want_grad:
        return logprob, None
    onehot = torch.arange(s.shape[1], device=s.device)[None, :] == targets[:, None]
    grad = (log_p1.exp() - onehot.to(s.dtype)) * coef[:, None]
    return logprob, grad if derivative is None else grad * derivative


def _distill_math(a, u, lam, targets, coef_distill, coef_ce, *, temperature, reverse, teacher_target,
                  has_targets, want_grad, student_softcap, teacher_softcap):
    """`_distill_block`'s elementwise math as one function (compiled with TIDE_COMPILE=1), the same
    formulas in the same order: from the uncapped student logits a `[R, V_s]` and teacher logits
    u `[R, V]` (V = shared_vocab), lam `[R]` (mixture only), targets `[R]`, coef_distill `[R]`
    (T w_i coef_i) and coef_ce `[R]` (ce_weight_i coef_i): (KL rows `[R]`, the targets' log-probs
    `[R]` or None, d (distill + ce) / d a `[R, V_s]` or None)."""
    T = temperature
    V = u.shape[1]
    s, derivative = _capped(a, student_softcap)
    u, _ = _capped(u, teacher_softcap)
    shared = s[:, :V]
    log_p = torch.log_softmax(shared / T, dim=-1)                   # student at T
    if reverse:
        p = log_p.exp()
        diff = log_p - torch.log_softmax(u / T, dim=-1)             # log p - log q
        kl = (p * diff).sum(-1)                                      # KL(p || q)
        grad = (diff - kl[:, None]) * p if want_grad else None
    else:
        mixed = u if teacher_target else (u - shared) * lam[:, None] + shared
        log_r = torch.log_softmax(mixed / T, dim=-1)
        r = log_r.exp()
        kl = (r * (log_r - log_p)).sum(-1)                           # KL(r || p)
        grad = log_p.exp() - r if want_grad else None
    if want_grad:
        grad = grad * coef_distill[:, None]
        if derivative is not None:
            grad = grad * derivative[:, :V]
        if s.shape[1] > V:
            grad = torch.nn.functional.pad(grad, (0, s.shape[1] - V))
    if not has_targets:
        return kl, None, grad
    logprob, grad_ce = _ce_math(s, derivative, targets, coef_ce, want_grad)
    return kl, logprob, None if grad is None else grad + grad_ce


def _distill_block_compiled(a, u, row_lambda, row_weight, targets, ce_weight, params, coef_distill, coef_ce,
                            want_grad):
    """`_distill_block` from its GEMMs' outputs through `_distill_math` compiled (None if that failed)."""
    T = params.temperature
    dtype = a.dtype
    row_weight = row_weight.to(dtype)
    ce_coef = None
    if params.has_targets:
        ce_coef = ce_weight.to(dtype) if ce_weight is not None else torch.ones(a.shape[0], dtype=dtype,
                                                                                device=a.device)
    mixture = not params.reverse and not params.teacher_target
    out = _compiled_call(
        _distill_math,
        dict(temperature=T, reverse=params.reverse, teacher_target=params.teacher_target,
             has_targets=params.has_targets, want_grad=want_grad, student_softcap=params.student_softcap,
             teacher_softcap=params.teacher_softcap),
        a, u, row_lambda.to(dtype) if mixture else None, targets if params.has_targets else None,
        T * row_weight * coef_distill if want_grad else None,                      # [R] (coef: float or [R])
        ce_coef * coef_ce if want_grad and params.has_targets else None)
    if out is None:
        return None
    kl, logprob, grad = out
    return T * T * row_weight * kl, None if logprob is None else -ce_coef * logprob, grad, None


class _DistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                row_lambda, row_weight, targets, ce_weight, params: DistillParams):
        dtype = _compute_dtype(student_hidden)
        device = student_hidden.device
        num_rows = student_hidden.shape[0]
        scale = params.scale(num_rows)
        per_row = params.reduction == "none"
        # hidden, weight, bias (needs_input_grad ignores grad mode: under torch.no_grad, no gradient GEMMs)
        wants = ctx.needs_input_grad[:3] if params.grad_enabled else (False, False, False)
        grads_now = any(wants) and not per_row                        # "mean" / "sum": gradients in forward
        weight_c = student_weight.to(dtype)                          # [V_s, d_s] (a view for fp32/fp64)
        bias_c = None if student_bias is None else student_bias.detach().to(dtype)
        teacher_weight_c = teacher_weight.detach().to(dtype)         # [V_t, d_t]
        teacher_bias_c = None if teacher_bias is None else teacher_bias.detach().to(dtype)
        shapes = (student_hidden.shape, student_weight.shape, student_weight.shape[:1])
        grads = [torch.zeros(shape, dtype=dtype, device=device) if grads_now and want else None
                 for shape, want in zip(shapes, wants)]
        distill_rows = torch.zeros(num_rows, dtype=dtype, device=device)
        ce_rows = torch.zeros(num_rows, dtype=dtype, device=device) if params.has_targets else None
        block = block_rows_for(max(student_weight.shape[0], teacher_weight.shape[0]), dtype, num_rows, device.type)
        compiled = compile_requested()
        with torch.no_grad(), _no_autocast(device):
            for start in range(0, num_rows, block):
                rows = slice(start, min(start + block, num_rows))
                hidden = student_hidden[rows].to(dtype)              # [R, d_s]
                results = _distill_block(
                    hidden, teacher_hidden[rows].to(dtype), weight_c, bias_c, teacher_weight_c, teacher_bias_c,
                    row_lambda[rows], row_weight[rows],
                    targets[rows] if targets is not None else None,
                    ce_weight[rows] if ce_weight is not None else None, params, scale, scale, grads_now, compiled)
                distill_rows[rows] = results[0]
                if params.has_targets:
                    ce_rows[rows] = results[1]
                if grads_now:                                        # d (distill + ce) / d logits
                    grad_logits = results[2] if results[3] is None else results[2].add_(results[3])
                    _add_logit_grad(grad_logits, rows, hidden, weight_c, *grads)
        ctx.params = params
        ctx.input_dtypes = (student_hidden.dtype, student_weight.dtype,
                            None if student_bias is None else student_bias.dtype)
        if per_row:
            ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, row_lambda, row_weight, targets, ce_weight)
            losses = [distill_rows] + ([ce_rows] if params.has_targets else [])
        else:
            ctx.grads = grads
            if grads_now and params.has_targets:                     # for a CE weight unlike distill's
                ctx.save_for_backward(student_hidden, student_weight, student_bias, targets, ce_weight)
            losses = [distill_rows.sum() * scale] + ([ce_rows.sum() * scale] if params.has_targets else [])
        return tuple(losses) if params.has_targets else losses[0]

    @staticmethod
    def backward(ctx, *grad_outputs):
        params = ctx.params
        if params.reduction == "none":
            grads = _recompute_grads(ctx, grad_outputs)
        else:
            # The forward walk contracted d (distill + ce) / d logits: exact when both outputs get the
            # same upstream gradient (`distill + ce`, the trainer's default weights). Otherwise add
            # (g_ce - g_distill) times the CE gradient alone, from one more walk over the student's
            # logits. Out of place: backward may run again with retain_graph.
            g_distill = grad_outputs[0]
            grads = [None if g is None else g * g_distill for g in ctx.grads]
            if params.has_targets and not torch.equal(grad_outputs[1], g_distill):
                g_extra = grad_outputs[1] - g_distill
                for total, ce_grad in zip(grads, _ce_grads(ctx)):
                    if total is not None:
                        total.addcmul_(ce_grad, g_extra)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes)]
        return (*grads, None, None, None, None, None, None, None, None)


def _add_logit_grad(grad_logits, rows, hidden, weight, grad_hidden, grad_weight, grad_bias):
    """Contract one block's logit gradient `[R, V_s]` into the hidden / weight / bias gradients."""
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T, hidden)
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))


def _ce_grads(ctx):
    """The CE term's gradients alone (hidden, weight, bias; None where not wanted), recomputed by
    the walk of `cross_entropy` over the saved rows."""
    student_hidden, student_weight, student_bias, targets, ce_weight = ctx.saved_tensors
    params = ctx.params
    return _cross_entropy_walk(student_hidden, student_weight, student_bias, targets, ce_weight,
                               params.student_softcap, params.scale(student_hidden.shape[0]),
                               ctx.needs_input_grad[:3])[1]


def _recompute_grads(ctx, grad_outputs):
    """reduction="none": walk the blocks again, each row's logit gradient scaled by its upstream g_i."""
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
     row_lambda, row_weight, targets, ce_weight) = ctx.saved_tensors
    params = ctx.params
    dtype = _compute_dtype(student_hidden)
    device = student_hidden.device
    num_rows = student_hidden.shape[0]
    shapes = (student_hidden.shape, student_weight.shape, student_weight.shape[:1])
    grads = [torch.zeros(shape, dtype=dtype, device=device) if want else None
             for shape, want in zip(shapes, ctx.needs_input_grad[:3])]
    weight_c = student_weight.detach().to(dtype)
    bias_c = None if student_bias is None else student_bias.detach().to(dtype)
    teacher_weight_c = teacher_weight.to(dtype)
    teacher_bias_c = None if teacher_bias is None else teacher_bias.to(dtype)
    grad_distill = grad_outputs[0].to(dtype)
    grad_ce = grad_outputs[1].to(dtype) if params.has_targets else None
    block = block_rows_for(max(student_weight.shape[0], teacher_weight.shape[0]), dtype, num_rows, device.type)
    compiled = compile_requested()
    with torch.no_grad(), _no_autocast(device):
        for start in range(0, num_rows, block):
            rows = slice(start, min(start + block, num_rows))
            hidden = student_hidden[rows].detach().to(dtype)
            _, _, grad, grad_c = _distill_block(
                hidden, teacher_hidden[rows].to(dtype), weight_c, bias_c, teacher_weight_c, teacher_bias_c,
                row_lambda[rows], row_weight[rows], targets[rows] if targets is not None else None,
                ce_weight[rows] if ce_weight is not None else None, params,
                grad_distill[rows], grad_ce[rows] if grad_ce is not None else None, True, compiled)
            if grad_c is not None:
                grad.add_(grad_c)
            _add_logit_grad(grad, rows, hidden, weight_c, *grads)
    return grads


def distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                 row_lambda, row_weight, targets=None, ce_weight=None, *,
                 temperature: float, shared_vocab: int, reverse: bool, reduction: str,
                 student_bias=None, teacher_bias=None, student_softcap=None, teacher_softcap=None):
    """Same contract as `tide.reference.distill_loss` (returns `(distill, ce or None)`), in bounded memory."""
    params = DistillParams(temperature=temperature, shared_vocab=shared_vocab, reverse=reverse,
                           reduction=reduction, has_targets=targets is not None,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                           teacher_target=not reverse and bool((row_lambda == 1).all()),
                           grad_enabled=torch.is_grad_enabled())
    out = _DistillFunction.apply(student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                                 teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
                                 row_lambda, row_weight, targets, ce_weight, params)
    return out if targets is not None else (out, None)


class _TokenLogprobFunction(torch.autograd.Function):
    """log softmax(softcap(hidden @ weight.T + bias))[target] per row; saves only the per-row LSE `[N]`.

    Backward recomputes each block's logits: d logprob_i / d s_i = onehot - softmax, times
    d s / d a = 1 - tanh^2(a / softcap) with a softcap.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap):
        dtype = _compute_dtype(hidden)
        num_rows = hidden.shape[0]
        weight_c = weight.to(dtype)
        bias_c = None if bias is None else bias.to(dtype)
        logprobs = torch.empty(num_rows, dtype=dtype, device=hidden.device)
        lse = torch.empty(num_rows, dtype=dtype, device=hidden.device)
        block = block_rows_for(weight.shape[0], dtype, num_rows, hidden.device.type)
        with torch.no_grad(), _no_autocast(hidden.device):
            for start in range(0, num_rows, block):
                rows = slice(start, min(start + block, num_rows))
                logits, _ = _logits_(hidden[rows].to(dtype), weight_c, bias_c, softcap)   # [R, V]
                target_logits = logits.gather(1, targets[rows, None]).squeeze(1)           # [R]
                logprobs[rows] = _log_softmax_(logits).gather(1, targets[rows, None]).squeeze(1)
                lse[rows] = target_logits - logprobs[rows]
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap = softcap
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = lse.dtype
        weight_c = weight.detach().to(dtype)
        bias_c = None if bias is None else bias.detach().to(dtype)
        shapes = (hidden.shape, weight.shape, weight.shape[:1])
        grads = [torch.zeros(shape, dtype=dtype, device=hidden.device) if want else None
                 for shape, want in zip(shapes, ctx.needs_input_grad[:3])]
        num_rows = hidden.shape[0]
        block = block_rows_for(weight.shape[0], dtype, num_rows, hidden.device.type)
        with torch.no_grad(), _no_autocast(hidden.device):
            for start in range(0, num_rows, block):
                rows = slice(start, min(start + block, num_rows))
                block_hidden = hidden[rows].detach().to(dtype)
                logits, derivative = _logits_(block_hidden, weight_c, bias_c, ctx.softcap, True)
                g = grad_logprobs[rows].to(dtype)                                          # [R]
                grad_logits = _softmax_(logits, lse[rows]).mul_(-g[:, None])               # -g softmax
                grad_logits[torch.arange(grad_logits.shape[0], device=hidden.device), targets[rows]] += g
                if derivative is not None:
                    grad_logits.mul_(derivative)
                _add_logit_grad(grad_logits, rows, block_hidden, weight_c, *grads)
        out_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        grads = [None if g is None else g.to(d) for g, d in zip(grads, out_dtypes)]
        return (*grads, None, None)


def token_logprobs(hidden, weight, targets, bias=None, softcap=None):
    """Same contract as `tide.reference.token_logprobs`, in bounded memory."""
    return _TokenLogprobFunction.apply(hidden, weight, bias, targets, softcap)


# --------------------------------------------------------------------------- cross-entropy
def _cross_entropy_walk(hidden, weight, bias, targets, ce_weight, softcap, scale, wants):
    """One walk over the row blocks: `scale * sum_i ce_weight_i * CE_i` (0-d) and, for the inputs
    in `wants` (hidden, weight, bias), its gradients (None elsewhere; no gradient GEMM without any).

    Per block: the logits (GEMM 1), the CE rows and the logit gradient
    `scale * ce_weight * (softmax - onehot)` in the logits' buffer (`_ce_block`), then d hidden
    (GEMM 2), d weight (GEMM 3) and d bias (`_add_logit_grad`).
    """
    dtype = _compute_dtype(hidden)
    device = hidden.device
    num_rows = hidden.shape[0]
    grads_now = any(wants)
    weight_c = weight.detach().to(dtype)                              # [V, d] (a view for fp32/fp64)
    bias_c = None if bias is None else bias.detach().to(dtype)
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    grads = [torch.zeros(shape, dtype=dtype, device=device) if want else None for shape, want in zip(shapes, wants)]
    ce_rows = torch.zeros(num_rows, dtype=dtype, device=device)
    block = block_rows_for(weight.shape[0], dtype, num_rows, device.type)
    with torch.no_grad(), _no_autocast(device):
        for start in range(0, num_rows, block):
            rows = slice(start, min(start + block, num_rows))
            block_hidden = hidden[rows].detach().to(dtype)                    # [R, d]
            s, derivative = _logits_(block_hidden, weight_c, bias_c, softcap, grads_now)   # [R, V]
            ce_rows[rows], grad_ce = _ce_block(s, derivative, targets[rows],
                                               None if ce_weight is None else ce_weight[rows], scale, grads_now)
            if grads_now:
                _add_logit_grad(grad_ce, rows, block_hidden, weight_c, *grads)
    return ce_rows.sum() * scale, grads


class _CrossEntropyFunction(torch.autograd.Function):
    """Scalar CE ("mean" / "sum") whose gradients are finished in the forward walk.

    Three GEMMs per block over the LM head (logits, d hidden, d weight) instead of
    `token_logprobs`' four (its backward recomputes the logits). Backward only multiplies the
    finished gradients by the scalar upstream gradient, out of place (retain_graph-safe).
    The price: the `[N, d]` and `[V, d]` gradients are held from forward to backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ce_weight, softcap, scale):
        total, ctx.grads = _cross_entropy_walk(hidden, weight, bias, targets, ce_weight, softcap, scale,
                                               ctx.needs_input_grad[:3])
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.input_dtypes)]
        return (*grads, None, None, None, None)


def cross_entropy(hidden, weight, targets, ce_weight=None, bias=None, softcap=None, *, reduction: str):
    """Same contract as `tide.reference.cross_entropy`, in bounded memory.

    "mean" / "sum": one walk computes the CE rows and contracts their logit gradient into the
    hidden / weight / bias gradients during the forward (`_CrossEntropyFunction`); under
    torch.no_grad, or when nothing requires a gradient, the walk computes the value alone.
    "none": `-ce_weight * token_logprobs` (saves the per-row LSE, recomputes the logits in
    backward), exact for any per-row upstream gradient. ce_weight gets no gradient.
    """
    if ce_weight is not None:
        ce_weight = ce_weight.detach()
    if reduction == "none":
        return reference.ce_from_token_logprobs(token_logprobs(hidden, weight, targets, bias, softcap), ce_weight,
                                                reduction="none")
    scale = 1.0 / max(hidden.shape[0], 1) if reduction == "mean" else 1.0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _CrossEntropyFunction.apply(hidden, weight, bias, targets, ce_weight, softcap, scale)
    return _cross_entropy_walk(hidden, weight, bias, targets, ce_weight, softcap, scale, (False, False, False))[0]

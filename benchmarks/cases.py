"""One definition per benchmark case: shapes, inputs, the work timed, and its FLOPs.

Each case's `setup(shape, device, dtype)` builds inputs at a realistic logit scale
(weights scaled by 2 / sqrt(d): logits with std ~2; unit-scale weights would put
exp() in denormals and time nothing real) and returns `make_step(impl)`, a
function giving a zero-argument callable that runs forward + backward once.
Peers (other libraries) are extra "impls" of a case, present only when they
import.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import tide

IMPLS = ("reference", "chunked", "triton", "triton_stream")

# Shapes per size. "cuda" is the issues' GPU shape (Qwen-like vocabulary);
# "cpu" fits 2 cores and 24 GiB; "quick" is a smoke run.
SHAPES = {
    "quick": dict(rows=256, student_vocab=4096, teacher_vocab=4096, d_s=128, d_t=256, chunks=64),
    "cpu": dict(rows=2048, student_vocab=32768, teacher_vocab=32768, d_s=256, d_t=512, chunks=512),
    "cuda": dict(rows=8192, student_vocab=151936, teacher_vocab=151936, d_s=1024, d_t=4096, chunks=2048),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    description: str
    impls: tuple                                   # tide impls that apply
    setup: Callable                                # (shape, device, dtype) -> make_step(impl)
    flops: Callable                                # shape -> useful FLOPs of one step (the floor's count)


def _random(generator, *shape, scale=1.0, dtype, device, requires_grad=False):
    tensor = (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)
    return tensor.requires_grad_(requires_grad)


def _distill_inputs(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, d_s, d_t = shape["rows"], shape["d_s"], shape["d_t"]
    return dict(
        student_hidden=_random(g, rows, d_s, dtype=dtype, device=device, requires_grad=True),
        student_weight=_random(g, shape["student_vocab"], d_s, scale=2 / d_s ** 0.5, dtype=dtype, device=device,
                               requires_grad=True),
        teacher_hidden=_random(g, rows, d_t, dtype=dtype, device=device),
        teacher_weight=_random(g, shape["teacher_vocab"], d_t, scale=2 / d_t ** 0.5, dtype=dtype, device=device),
        mask_ratio=torch.rand(rows, generator=g).to(device),
        targets=torch.randint(0, shape["student_vocab"], (rows,), generator=g).to(device),
    )


def _backward(outputs, *params):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward([o.sum() for o in outputs])
    for p in params:
        p.grad = None


def _tidal_ce_setup(shape, device, dtype):
    x = _distill_inputs(shape, device, dtype)

    def make_step(impl):
        if impl == "liger":
            return _liger_jsd_step(x)

        def step():
            out = tide.tidal_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                  x["teacher_weight"], x["mask_ratio"], 0.37, targets=x["targets"], impl=impl)
            _backward(out, x["student_hidden"], x["student_weight"])
        return step
    return make_step


def _liger_jsd_step(x):
    """Liger-Kernel's fused linear JSD at beta=0 (forward KL), the closest peer to TIDAL + CE:
    it has no timestep mixture and no CE term, so it does less work than the tide impls."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, temperature=2.0)

    def step():
        loss = loss_fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
        _backward(loss, x["student_hidden"], x["student_weight"])
    return step


def _reverse_kl_setup(shape, device, dtype):
    x = _distill_inputs(shape, device, dtype)

    def make_step(impl):
        def step():
            out = tide.kl_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                               reverse=True, impl=impl)
            _backward(out, x["student_hidden"], x["student_weight"])
        return step
    return make_step


def _token_logprobs_setup(shape, device, dtype):
    x = _distill_inputs(shape, device, dtype)

    def make_step(impl):
        def step():
            out = tide.token_logprobs(x["student_hidden"], x["student_weight"], x["targets"], impl=impl)
            _backward(out, x["student_hidden"], x["student_weight"])
        return step
    return make_step


def _reverse_calm_setup(shape, device, dtype):
    x = _distill_inputs(shape, device, dtype)
    g = torch.Generator().manual_seed(1)
    rows, chunks = shape["rows"], shape["chunks"]
    student_chunk = torch.sort(torch.randint(0, chunks, (rows,), generator=g)).values.to(device)
    teacher_chunk = torch.sort(torch.randint(0, chunks, (rows,), generator=g)).values.to(device)
    teacher_targets = torch.randint(0, shape["teacher_vocab"], (rows,), generator=g).to(device)

    def make_step(impl):
        def step():
            out = tide.calm_loss(x["student_hidden"], x["student_weight"], x["targets"], student_chunk,
                                 x["teacher_hidden"], x["teacher_weight"], teacher_targets, teacher_chunk,
                                 num_chunks=chunks, impl=impl)
            _backward(out, x["student_hidden"], x["student_weight"])
        return step
    return make_step


def _gemm_flops(shape, student_passes, teacher_passes):
    return 2 * shape["rows"] * (student_passes * shape["student_vocab"] * shape["d_s"]
                                + teacher_passes * shape["teacher_vocab"] * shape["d_t"])


CASES = {
    case.name: case for case in (
        Case("tidal_ce", "TIDAL + CE, forward + backward", IMPLS + ("liger",), _tidal_ce_setup,
             lambda s: _gemm_flops(s, 3, 1)),
        Case("reverse_kl", "reverse KL, forward + backward", IMPLS, _reverse_kl_setup,
             lambda s: _gemm_flops(s, 3, 1)),
        Case("token_logprobs", "token log-probs, forward + backward", ("reference", "chunked", "triton"),
             _token_logprobs_setup, lambda s: _gemm_flops(s, 3, 0)),
        Case("reverse_calm", "Reverse CALM end to end (student fwd+bwd, teacher fwd)",
             ("reference", "chunked", "triton"), _reverse_calm_setup, lambda s: _gemm_flops(s, 3, 1)),
    )
}


def peer_available(impl: str) -> bool:
    """Peers run only where their package imports (they are never a dependency)."""
    if impl == "liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except Exception:
            return False
    return True

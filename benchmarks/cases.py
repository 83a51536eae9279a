"""One definition per benchmark case: the work, its inputs, its FLOPs, its peers.

Every case defines ONE scalar of equal work that every implementation computes
(tide's impls and the peers alike), so times compare like with like and a
correctness check can hold each implementation to the same float64 answer:

| case            | the scalar timed (forward + backward w.r.t. the student)                    |
|-----------------|------------------------------------------------------------------------------|
| tidal_ce        | 0.5 CE + 0.5 TIDAL / T^2  (T = 2, progress 0.37, mask ratios in (0, 1))      |
| forward_kl_ce   | 0.5 CE + 0.5 KL(q_T || p_T)   (T = 2; q teacher, p student)                  |
| reverse_kl_ce   | 0.5 CE + 0.5 KL(p_T || q_T)   (T = 2)                                        |
| cross_entropy   | mean CE = -mean_i log softmax(h_i W^T)[y_i]   (tide: `tide.cross_entropy`)    |
| token_logprobs  | the same mean CE from per-row `tide.token_logprobs` (no peers)               |
| reverse_calm    | Reverse CALM over random chunks (student fwd + bwd, teacher fwd)             |
| compdemo_split  | CompDemo's complementary split of a [b, l] masked set (forward only)          |

tide's `kl_loss`/`tidal_loss` return `T^2 KL` (SPEC.md) and weight CE per row
with `ce_weight`, so tide computes the KL-family scalars as
`(SOFT / T^2) (distill + ce)` with `ce_weight = HARD T^2 / SOFT`: both outputs
then get the same upstream gradient, which lets the chunked path contract one
logit gradient per block (the way to weight CE against distillation with tide). Peers and their conventions:
- Liger-Kernel `LigerFusedLinearJSDLoss` (chunked PyTorch, `compiled=True` and
  `False`): generalised JSD with `beta=0` = KL(teacher || student) = forward KL,
  `beta=1` = KL(student || teacher) = reverse KL; soft and hard losses are
  combined with `weight_soft_loss` / `weight_hard_loss` (0.5 / 0.5 here), both
  divided by the number of rows, and it applies no T^2 factor. On CUDA also its
  Triton `LigerFusedLinearCrossEntropyLoss` on the CE work.
- Cut-Cross-Entropy `linear_cross_entropy` (`impl="torch_compile"`; on CUDA also
  `impl="cce"`, the Triton kernel) on the CE work (`cross_entropy`): mean
  reduction, its default gradient filtering (`filter_eps="high"`), which the
  correctness column shows.
`chunked_compile` (CPU only) is tide's chunked impl with `TIDE_COMPILE=1` set around each
step: each block's elementwise math compiled by torch.compile (the GEMMs eager), on the
distillation cases; like the compiled peers it pays a compile in its warm-up, so it is left
out of the --quick sweeps and of the micro-benchmarks.
`cross_entropy` and `token_logprobs` time the same scalar: tide's chunked
`cross_entropy` finishes the gradients in its forward walk (3 GEMMs per block),
`-token_logprobs(...).mean()` recomputes the logits in backward (4); the FLOP
count of both is the work's 3 passes.

Inputs have a realistic logit scale (weights scaled by 2 / sqrt(d): logits with
std ~2; unit-scale weights would put exp() in denormals and time nothing real).
`build(case, shape, device, dtype)` returns the inputs; `make_step(case, impl,
inputs)` a zero-argument callable that runs forward + backward once and returns
the scalar; `expected(case, inputs)` the float64 answer (scalar and gradients).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

import torch

import tide

TEMPERATURE = 2.0
PROGRESS = 0.37
HARD, SOFT = 0.5, 0.5            # CE and distillation weights of the KL-family scalars

# Base shapes per size. "cuda" is the issues' GPU shape (Qwen-like vocabulary);
# "cpu" is the CPU shape (fits 2 cores and 24 GiB); "quick" is a smoke run.
SHAPES = {
    "quick": dict(rows=256, vocab=4096, d_s=128, d_t=256, chunks=64),
    "cpu": dict(rows=2048, vocab=32768, d_s=256, d_t=512, chunks=512),
    "cuda": dict(rows=8192, vocab=151936, d_s=1024, d_t=4096, chunks=2048),
}
# Sweeps: (N values, V values) through the base shape, each at the base's other dimension, for
# the cases whose peers make the comparison (the growth exponents are fitted on them).
SWEEP_CASES = ("forward_kl_ce", "cross_entropy")
SWEEPS = {
    "quick": dict(rows=(128, 256, 512), vocab=(2048, 4096, 8192)),
    "cpu": dict(rows=(512, 1024, 2048), vocab=(8192, 16384, 32768)),
    "cuda": dict(rows=(1024, 4096, 16384), vocab=(32768, 131072, 151936)),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    description: str
    impls: tuple                    # tide impls that apply
    peers: tuple                    # peer "impls" (run where their package imports and the device fits)
    student_passes: int             # GEMMs over the student head per step (FLOP count)
    teacher_passes: int

    def flops(self, shape) -> float:
        return 2.0 * shape["rows"] * shape["vocab"] * (self.student_passes * shape["d_s"]
                                                       + self.teacher_passes * shape["d_t"])


CASES = {case.name: case for case in (
    Case("tidal_ce", "0.5 CE + 0.5 TIDAL/T^2, T=2",
         ("reference", "chunked", "chunked_compile", "triton", "triton_stream"), (), 3, 1),
    Case("forward_kl_ce", "0.5 CE + 0.5 forward KL, T=2",
         ("reference", "chunked", "chunked_compile", "triton", "triton_stream"), ("liger", "liger_eager"), 3, 1),
    Case("reverse_kl_ce", "0.5 CE + 0.5 reverse KL, T=2",
         ("reference", "chunked", "chunked_compile", "triton", "triton_stream"), ("liger", "liger_eager"), 3, 1),
    Case("cross_entropy", "mean CE (cross_entropy)", ("reference", "chunked", "triton"),
         ("cce_compile", "cce", "liger_ce"), 3, 0),
    Case("token_logprobs", "mean CE from per-row token log-probs", ("reference", "chunked", "triton"), (), 3, 0),
    Case("reverse_calm", "Reverse CALM end to end", ("reference", "chunked", "triton"), (), 3, 1),
    Case("compdemo_split", "CompDemo split of [64, 2048] masks", ("chunked", "triton"), (), 0, 0),
)}

# Where each peer runs and what it needs.
# `compiled` peers pay a torch.compile per process: --quick keeps them out of the sweeps.
PEERS = {
    "liger": dict(module="liger_kernel.chunked_loss", devices=("cpu", "cuda"), compiled=True),
    "liger_eager": dict(module="liger_kernel.chunked_loss", devices=("cpu", "cuda")),
    "liger_ce": dict(module="liger_kernel.transformers", devices=("cuda",)),
    "cce_compile": dict(module="cut_cross_entropy", devices=("cpu", "cuda"), compiled=True),
    "cce": dict(module="cut_cross_entropy", devices=("cuda",)),
}


# tide impls that are a tide impl under an environment: (the impl passed to tide, the variables
# set around each step), and the CPU-only ones.
TIDE_VARIANTS = {"chunked_compile": ("chunked", {"TIDE_COMPILE": "1"})}
CPU_ONLY = ("chunked_compile",)


def compiled(impl: str) -> bool:
    """Whether impl pays a torch.compile per process (a compiled peer, or chunked_compile)."""
    if impl in TIDE_VARIANTS:
        return TIDE_VARIANTS[impl][1].get("TIDE_COMPILE") == "1"
    return bool(PEERS.get(impl, {}).get("compiled"))


@contextlib.contextmanager
def _environment(variables: dict):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def peer_available(peer: str, device: str) -> bool:
    """Peers run only where their package imports (they are never a dependency)."""
    spec = PEERS[peer]
    if device not in spec["devices"]:
        return False
    try:
        importlib.import_module(spec["module"])
    except Exception:
        return False
    return True


def implementations(case: Case, device: str) -> list:
    """tide impls (Triton only on CUDA: the interpreter is for tests, not timings; chunked_compile
    only on CPU), then peers."""
    chosen = [impl for impl in case.impls
              if (impl not in CPU_ONLY if device == "cuda" else not impl.startswith("triton"))]
    return chosen + [peer for peer in case.peers if peer_available(peer, device)]


def _random(generator, *shape, scale=1.0, dtype, device, requires_grad=False):
    tensor = (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)
    return tensor.requires_grad_(requires_grad)


def build(case_name: str, shape: dict, device, dtype, seed: int = 0) -> dict:
    """The case's inputs (fresh, seeded): student tensors require grad, teacher tensors do not."""
    g = torch.Generator().manual_seed(seed)
    rows, vocab, d_s, d_t = shape["rows"], shape["vocab"], shape["d_s"], shape["d_t"]
    if case_name == "compdemo_split":
        return dict(masked=(torch.rand(64, 2048, generator=g) < 0.5).to(device))
    x = dict(
        student_hidden=_random(g, rows, d_s, dtype=dtype, device=device, requires_grad=True),
        student_weight=_random(g, vocab, d_s, scale=2 / d_s ** 0.5, dtype=dtype, device=device,
                               requires_grad=True),
        teacher_hidden=_random(g, rows, d_t, dtype=dtype, device=device),
        teacher_weight=_random(g, vocab, d_t, scale=2 / d_t ** 0.5, dtype=dtype, device=device),
        mask_ratio=torch.rand(rows, generator=g).clamp_min(1e-3).to(device),
        targets=torch.randint(0, vocab, (rows,), generator=g).to(device),
        ce_weight=torch.full((rows,), HARD * TEMPERATURE ** 2 / SOFT, dtype=dtype, device=device),
    )
    if case_name == "reverse_calm":
        chunks = shape["chunks"]
        x["student_chunk"] = torch.sort(torch.randint(0, chunks, (rows,), generator=g)).values.to(device)
        x["teacher_chunk"] = torch.sort(torch.randint(0, chunks, (rows,), generator=g)).values.to(device)
        x["teacher_targets"] = torch.randint(0, vocab, (rows,), generator=g).to(device)
        x["num_chunks"] = chunks
    return x


def _distill_ce(out):
    """(distill, ce) from a tide loss return value (a tuple or a named tuple)."""
    return out[0], out[1]


def tide_scalar(case_name: str, impl: str, x: dict) -> torch.Tensor:
    """The case's scalar, computed by tide with `impl` (a TIDE_VARIANTS name: its tide impl; the
    caller sets its environment)."""
    impl = TIDE_VARIANTS.get(impl, (impl,))[0]
    student = (x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
    if case_name == "tidal_ce":
        distill, ce = _distill_ce(tide.tidal_loss(*student, x["mask_ratio"], PROGRESS, targets=x["targets"],
                                                  ce_weight=x["ce_weight"], temperature=TEMPERATURE, impl=impl))
        return SOFT / TEMPERATURE ** 2 * (distill + ce)
    if case_name in ("forward_kl_ce", "reverse_kl_ce"):
        distill, ce = _distill_ce(tide.kl_loss(*student, reverse=case_name == "reverse_kl_ce", targets=x["targets"],
                                               ce_weight=x["ce_weight"], temperature=TEMPERATURE, impl=impl))
        return SOFT / TEMPERATURE ** 2 * (distill + ce)
    if case_name == "cross_entropy":
        return tide.cross_entropy(x["student_hidden"], x["student_weight"], x["targets"], impl=impl)
    if case_name == "token_logprobs":
        return -tide.token_logprobs(x["student_hidden"], x["student_weight"], x["targets"], impl=impl).mean()
    if case_name == "reverse_calm":
        out = tide.calm_loss(x["student_hidden"], x["student_weight"], x["targets"], x["student_chunk"],
                             x["teacher_hidden"], x["teacher_weight"], x["teacher_targets"], x["teacher_chunk"],
                             num_chunks=x["num_chunks"], impl=impl)
        return out[0] if isinstance(out, tuple) else out
    raise KeyError(case_name)


def _peer_fn(case_name: str, peer: str):
    """The peer's callable for the case's scalar, built once (outside the timed step)."""
    if peer in ("liger", "liger_eager"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        loss = LigerFusedLinearJSDLoss(weight_hard_loss=HARD, weight_soft_loss=SOFT,
                                       beta=0.0 if case_name == "forward_kl_ce" else 1.0,
                                       temperature=TEMPERATURE, compiled=peer == "liger")
        return lambda x: loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                              x["targets"])
    if peer == "liger_ce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda x: loss(x["student_weight"], x["student_hidden"], x["targets"])
    if peer in ("cce_compile", "cce"):
        from cut_cross_entropy import linear_cross_entropy
        impl = "torch_compile" if peer == "cce_compile" else "cce"
        return lambda x: linear_cross_entropy(x["student_hidden"], x["student_weight"], x["targets"], impl=impl)
    raise KeyError(peer)


def make_step(case_name: str, impl: str, x: dict):
    """A callable running forward + backward once; returns the scalar (detached)."""
    if case_name == "compdemo_split":
        use_triton = impl == "triton"

        def split():
            if use_triton:
                return tide.complementary_split(x["masked"], 0.5)
            return tide.complementary_split(x["masked"].cpu(), 0.5, generator=torch.Generator().manual_seed(0))
        return split

    compute = _peer_fn(case_name, impl) if impl in PEERS else (lambda inputs: tide_scalar(case_name, impl, inputs))
    variables = TIDE_VARIANTS.get(impl, (impl, {}))[1]

    def step():
        x["student_hidden"].grad = None
        x["student_weight"].grad = None
        with _environment(variables):                # chunked_compile: TIDE_COMPILE=1, forward and backward
            value = compute(x)
            value.backward()
        return value.detach()
    return step


def expected(case_name: str, x: dict) -> dict:
    """The float64 answer of the case on the same inputs: scalar and student gradients."""
    if case_name == "compdemo_split":
        return {}
    x64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
               else v) for k, v in x.items()}
    value = tide_scalar(case_name, "reference", x64)
    value.backward()
    return dict(loss=value.detach(), student_hidden=x64["student_hidden"].grad,
                student_weight=x64["student_weight"].grad)


def errors(case_name: str, x: dict, step, reference: dict) -> dict:
    """Max abs error of the scalar and of each student gradient against the float64 answer."""
    if case_name == "compdemo_split":
        out = step()
        masked = x["masked"]
        mask_a, mask_b = out[0], out[1]
        disjoint_cover = bool(((mask_a & mask_b).sum() == 0) and torch.equal(mask_a | mask_b, masked))
        return dict(valid_split=disjoint_cover)
    value = step()
    result = dict(loss=abs(value.double().cpu() - reference["loss"].cpu()).item())
    for name in ("student_hidden", "student_weight"):
        grad = x[name].grad
        result[f"grad_{name}"] = (grad.double().cpu() - reference[name].cpu()).abs().max().item()
    return result

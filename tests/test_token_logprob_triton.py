"""Fused Triton token log-probabilities (tide/kernels/token_logprob.py) against tide.reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py before they are
imported). float64: tight (relative 1e-9); float32: no worse than the eager float32
reference's own error against float64, plus a small tolerance (STYLE.md, CCE)."""

import pytest
import torch

from tide import reference
from tide.kernels import token_logprob
from tide.kernels.token_logprob import TokenLogprobConfig, fused_token_logprobs


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# small tiles so that a few dozen rows already cover several tiles, splits and groups
SMALL = TokenLogprobConfig(block_n=16, block_v=32, block_d=16, group_n=2, num_warps=4, num_stages=1,
                           num_splits=3)


def _inputs(rows, vocab, width, dtype, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = scale if scale is not None else 2.0 / width ** 0.5          # realistic logit scale
    hidden = torch.randn(rows, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64) * scale * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    grad = torch.randn(rows, generator=g, dtype=torch.float64)           # grad_output != 1
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE), grad.to(DEVICE))


def _run(fn, hidden, weight, targets, grad, need=(True, True)):
    h = hidden.detach().clone().requires_grad_(need[0])
    w = weight.detach().clone().requires_grad_(need[1])
    out = fn(h, w, targets)
    out.backward(grad.to(out.dtype))
    return out.detach(), h.grad, w.grad


def _rel_err(x, ref):
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("shape", [(37, 101, 40), (32, 64, 32), (1, 33, 17)])   # odd, aligned, N=1
@pytest.mark.parametrize("num_splits", [1, 3])
def test_float64_matches_reference(shape, num_splits):
    config = TokenLogprobConfig(**{**SMALL.__dict__, "num_splits": num_splits})
    args = _inputs(*shape, torch.float64)
    out, gh, gw = _run(lambda h, w, t: fused_token_logprobs(h, w, t, config=config), *args)
    ref, rh, rw = _run(reference.token_logprobs, *args)
    assert out.dtype == torch.float64 and out.shape == (shape[0],)
    assert _rel_err(out, ref) < 1e-9
    assert _rel_err(gh, rh) < 1e-9
    assert _rel_err(gw, rw) < 1e-9


def test_float32_no_worse_than_eager():
    args64 = _inputs(41, 157, 48, torch.float64, seed=1)
    truth, th, tw = _run(reference.token_logprobs, *args64)
    args32 = (args64[0].float(), args64[1].float(), args64[2], args64[3].float())
    eager, eh, ew = _run(reference.token_logprobs, *args32)
    fused, fh, fw = _run(lambda h, w, t: fused_token_logprobs(h, w, t, config=SMALL), *args32)
    assert fused.dtype == torch.float32
    for got, base, ref in ((fused, eager, truth), (fh, eh, th), (fw, ew, tw)):
        assert _rel_err(got, ref) <= _rel_err(base, ref) + 2e-6


def test_bfloat16_inputs():
    # (was skipped without a GPU: the interpreter's tl.dot misread bf16 tiles, about -3e9 instead of
    # -11.6; tide/kernels/token_logprob.py now upcasts them under TRITON_INTERPRET=1 as tide/kernels/tidal.py does)
    hidden, weight, targets, grad = _inputs(24, 96, 32, torch.bfloat16, seed=2)
    fused, fh, fw = _run(lambda h, w, t: fused_token_logprobs(h, w, t, config=SMALL), hidden, weight, targets, grad)
    ref, rh, rw = _run(reference.token_logprobs, hidden, weight, targets, grad)
    assert fused.dtype == torch.float32 and fh.dtype == torch.bfloat16 and fw.dtype == torch.bfloat16
    assert _rel_err(fused, ref) < 1e-5            # same bf16 inputs, both accumulate in float32
    assert _rel_err(fh, rh) < 2e-2 and _rel_err(fw, rw) < 2e-2    # dx is rounded to bf16 (as CCE)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_partial_requires_grad(need):
    args = _inputs(19, 70, 24, torch.float64, seed=3)
    _, gh, gw = _run(lambda h, w, t: fused_token_logprobs(h, w, t, config=SMALL), *args, need=need)
    _, rh, rw = _run(reference.token_logprobs, *args, need=need)
    assert (gh is None) == (not need[0]) and (gw is None) == (not need[1])
    got, ref = (gh, rh) if need[0] else (gw, rw)
    assert _rel_err(got, ref) < 1e-9


def test_no_grad_saves_nothing():
    hidden, weight, targets, _ = _inputs(10, 50, 16, torch.float64, seed=4)
    hidden.requires_grad_(True)
    with torch.no_grad():
        out = fused_token_logprobs(hidden, weight, targets, config=SMALL)
    assert out.grad_fn is None
    out_plain = fused_token_logprobs(hidden.detach(), weight, targets, config=SMALL)     # nothing requires grad
    assert out_plain.grad_fn is None
    assert _rel_err(out, reference.token_logprobs(hidden.detach(), weight, targets)) < 1e-9


def test_empty_rows():
    hidden, weight, targets, grad = _inputs(0, 40, 16, torch.float64)
    out, gh, gw = _run(lambda h, w, t: fused_token_logprobs(h, w, t, config=SMALL), hidden, weight, targets, grad)
    assert out.shape == (0,) and gh.shape == (0, 16)
    assert torch.equal(gw, torch.zeros_like(gw))


def test_non_contiguous_and_default_config():
    hidden, weight, targets, grad = _inputs(20, 45, 24, torch.float64, seed=5)
    hidden_t = hidden.t().contiguous().t()                               # column-major view
    weight_t = weight.t().contiguous().t()
    assert not hidden_t.is_contiguous()
    out, gh, gw = _run(fused_token_logprobs, hidden_t, weight_t, targets, grad)   # default config
    ref, rh, rw = _run(reference.token_logprobs, hidden, weight, targets, grad)
    assert _rel_err(out, ref) < 1e-9 and _rel_err(gh, rh) < 1e-9 and _rel_err(gw, rw) < 1e-9


def test_extreme_logits_stay_finite():
    # large logits: the streaming LSE must not overflow where exp would
    hidden, weight, targets, grad = _inputs(12, 80, 16, torch.float64, seed=6, scale=30.0)
    out, gh, gw = _run(lambda h, w, t: fused_token_logprobs(h, w, t, config=SMALL), hidden, weight, targets, grad)
    ref, rh, rw = _run(reference.token_logprobs, hidden, weight, targets, grad)
    assert torch.isfinite(out).all() and torch.isfinite(gh).all()
    assert _rel_err(out, ref) < 1e-9 and _rel_err(gh, rh) < 1e-9 and _rel_err(gw, rw) < 1e-9


def test_public_token_logprobs_triton():
    losses = pytest.importorskip("tide.losses")
    args = _inputs(21, 77, 20, torch.float64, seed=7)
    out, gh, gw = _run(lambda h, w, t: losses.token_logprobs(h, w, t, impl="triton"), *args)
    ref, rh, rw = _run(lambda h, w, t: losses.token_logprobs(h, w, t, impl="reference"), *args)
    assert _rel_err(out, ref) < 1e-9 and _rel_err(gh, rh) < 1e-9 and _rel_err(gw, rw) < 1e-9


def test_split_count_is_a_power_of_two_and_nonempty():
    config = TokenLogprobConfig(block_v=32, num_splits=None)
    for rows, vocab in ((1, 1000), (500, 33), (10_000, 151_936)):
        splits, v_split = token_logprob._num_splits(config, rows, vocab, torch.device("cpu"))
        assert splits >= 1 and v_split % 32 == 0
        assert (splits - 1) * v_split < vocab <= splits * v_split          # no empty split


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The token log-prob kernels (plain and with bias + softcap) compile for sm_90a, no GPU needed."""
    import os
    import subprocess
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--compile-only", "--only",
                             "token_logprob"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("_token_logprob_bwd_kernel") == 2

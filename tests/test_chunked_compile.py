"""TIDE_COMPILE=1: the chunked distillation block's elementwise math compiled with torch.compile.

The compiled block against the eager chunked block and the float64 reference (values and
gradients), on ragged shapes whose last row block is smaller (no recompile) or a single row
(eager); the switch's validation; the fallback when compilation fails (one warning, eager
results). Each configuration costs a compile (seconds), so the default tier compiles two; the
matrix of variants is the slow tier (TIDE_SLOW_TESTS=1). Where this machine cannot compile
(no C++ compiler), the compiled comparisons skip with the reason.
"""
import warnings

import pytest
import torch
from allocations import LargestTensor
from test_losses import kl, make_inputs, run, tidal

import tide
from tide import chunked

NUM_ROWS, V_S, V_T, SHARED = 37, 301, 347, 257
BLOCK_ROWS = 4                                    # 37 rows: nine blocks of 4, then one of 1 (eager)


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Blocks of BLOCK_ROWS rows, compilation not marked failed by an earlier test, TIDE_COMPILE unset."""
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(8 * V_T * BLOCK_ROWS))
    monkeypatch.setattr(chunked, "_COMPILE_FAILURE", [])
    monkeypatch.delenv("TIDE_COMPILE", raising=False)


def graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def compiled_and_eager(monkeypatch, loss_fn, inputs, grad_outputs=None, **options):
    """(compiled, eager) results of `run` on the chunked impl, and the number of graphs compiled."""
    before = graphs()
    monkeypatch.setenv("TIDE_COMPILE", "1")
    compiled = run(loss_fn, "chunked", inputs, grad_outputs, **options)
    if chunked._COMPILE_FAILURE:
        pytest.skip(f"torch.compile does not work here: {chunked._COMPILE_FAILURE[0]}")
    new_graphs = graphs() - before
    monkeypatch.setenv("TIDE_COMPILE", "0")
    return compiled, run(loss_fn, "chunked", inputs, grad_outputs, **options), new_graphs


def check(got, want, rtol, atol):
    """Values and gradients close; against a float64 `want`, got keeps its own dtype."""
    values_got, *grads_got = got
    values_want, *grads_want = want
    for a, b in zip(list(values_got) + grads_got, list(values_want) + grads_want):
        assert a.dtype in (b.dtype, torch.float32)
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))


def test_switch_is_validated(monkeypatch):
    for text, on in ((None, False), ("", False), ("0", False), ("1", True), (" 1 ", True)):
        if text is None:
            monkeypatch.delenv("TIDE_COMPILE", raising=False)
        else:
            monkeypatch.setenv("TIDE_COMPILE", text)
        assert chunked.compile_requested() is on
    inputs = make_inputs(5, seed=1)
    for text in ("yes", "2", "true"):
        monkeypatch.setenv("TIDE_COMPILE", text)
        with pytest.raises(ValueError, match=f"TIDE_COMPILE must be 1 .* or 0 .*got '{text}'"):
            tide.kl_loss(*inputs[:4], impl="chunked")


def test_compiled_tidal_every_option_float64(monkeypatch):
    """TIDAL mixture (per-row lambda), targets with ce_weight, both softcaps, a student bias,
    shared_vocab < V_s (the gradient's zero padding), unequal upstream gradients (backward adds
    the CE gradient alone): float64 end to end, same as eager to rounding; one compile."""
    inputs = make_inputs(NUM_ROWS, student_vocab=V_S, teacher_vocab=V_T, seed=3)
    bias = torch.randn(V_S, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    options = dict(use_targets=True, use_ce_weight=True, shared_vocab=SHARED, student_softcap=7.0,
                   teacher_softcap=5.0, student_bias=bias)
    compiled, eager, new_graphs = compiled_and_eager(monkeypatch, tidal, inputs, **options)
    assert new_graphs == 1                     # the 4-row blocks compile once; the 1-row block is eager
    assert compiled[0][0].dtype == torch.float64
    check(compiled, eager, rtol=1e-10, atol=1e-12)
    check(compiled, run(tidal, "reference", inputs, **options), rtol=1e-10, atol=1e-12)


def test_compiled_forward_kl_ce_float32(monkeypatch):
    """The benchmark's work (forward KL + CE, teacher target) in float32: same as eager to float32
    rounding, same as the float64 reference to float32 accuracy; one compile."""
    inputs = make_inputs(NUM_ROWS, student_vocab=V_S, teacher_vocab=V_S, dtype=torch.float32, seed=5)
    options = dict(use_targets=True, use_ce_weight=True, temperature=2.0)
    ups = [torch.tensor(1.0), torch.tensor(1.0)]                      # distill + ce: one gradient walk
    compiled, eager, new_graphs = compiled_and_eager(monkeypatch, kl, inputs, ups, **options)
    assert new_graphs == 1
    check(compiled, eager, rtol=1e-5, atol=1e-6)
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    check(compiled, run(kl, "reference", inputs64, [u.double() for u in ups], **options), rtol=1e-4, atol=1e-5)


def test_compiled_walk_never_allocates_n_by_v(monkeypatch):
    """The compiled walk's tensors are `[block_rows, V]` at most. Under a dispatch mode dynamo runs
    the compiled function's Python (`_distill_math`) as is, so this sees the shapes of every
    intermediate the compiled graph can hold (inductor allocates among those shapes)."""
    num_rows, vocab = 200, 301
    inputs = make_inputs(num_rows, student_vocab=vocab, teacher_vocab=vocab, dtype=torch.float32, seed=6)
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(4 * vocab * 8))
    monkeypatch.setenv("TIDE_COMPILE", "1")
    student_hidden, student_weight = (t.clone().requires_grad_(True) for t in inputs[:2])
    with LargestTensor() as mode:
        distill, ce = tide.tidal_loss(student_hidden, student_weight, *inputs[2:5], 0.5, targets=inputs[5],
                                      student_softcap=9.0, impl="chunked")
        (distill + ce).backward()
    assert mode.largest_numel < num_rows * vocab // 4
    assert not chunked._COMPILE_FAILURE


@pytest.mark.parametrize("where", ["torch.compile", "first call"])
def test_failed_compilation_warns_once_and_runs_eager(monkeypatch, where):
    """No compiler (or an unsupported platform): one warning naming the reason, then the eager
    block for every block and every later call, with eager's results to the bit."""
    def broken_compile(fn, **kwargs):
        if where == "torch.compile":
            raise RuntimeError("no C++ compiler here")

        def call(*args):
            raise RuntimeError("no C++ compiler here")
        return call

    monkeypatch.setattr(chunked, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    inputs = make_inputs(NUM_ROWS, seed=2)
    options = dict(use_targets=True, use_ce_weight=False, reverse=True, temperature=1.5)
    monkeypatch.setenv("TIDE_COMPILE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run(kl, "chunked", inputs, **options)
        second = run(kl, "chunked", inputs, **options)
    messages = [str(w.message) for w in caught if "TIDE_COMPILE" in str(w.message)]
    assert len(messages) == 1 and "RuntimeError: no C++ compiler here" in messages[0], messages
    monkeypatch.setenv("TIDE_COMPILE", "0")
    eager = run(kl, "chunked", inputs, **options)
    for got in (first, second):
        for a, b in zip(list(got[0]) + list(got[1:]), list(eager[0]) + list(eager[1:])):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- slow tier: every variant
VARIANTS = {
    "forward_kl+ce_weight": (kl, dict(use_targets=True, use_ce_weight=True, shared_vocab=SHARED)),
    "forward_kl_softcaps_none": (kl, dict(use_targets=False, use_ce_weight=False, shared_vocab=SHARED,
                                          student_softcap=6.0, teacher_softcap=4.0, reduction="none")),
    "reverse_kl+ce_weight_softcap": (kl, dict(use_targets=True, use_ce_weight=True, reverse=True,
                                              shared_vocab=SHARED, student_softcap=6.0, temperature=3.0)),
    "reverse_kl_none": (kl, dict(use_targets=False, use_ce_weight=False, reverse=True, shared_vocab=SHARED,
                                 reduction="none")),
    "tidal+targets_none": (tidal, dict(use_targets=True, use_ce_weight=False, shared_vocab=SHARED,
                                       teacher_softcap=4.0, reduction="none")),
    "tidal_sum": (tidal, dict(use_targets=False, use_ce_weight=False, shared_vocab=SHARED, reduction="sum",
                              temperature=1.5)),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_matches_eager_every_variant(monkeypatch, variant):
    """Every variant of the block (float64): with / without targets and ce_weight, softcaps,
    shared_vocab padding, reduction "none" (per-row upstream gradients: the backward walk's
    per-row coefficients) and "sum"."""
    loss_fn, options = VARIANTS[variant]
    inputs = make_inputs(NUM_ROWS, student_vocab=V_S, teacher_vocab=V_T, seed=7)
    grad_outputs = None
    if options.get("reduction") == "none":
        g = torch.Generator().manual_seed(4)
        count = 2 if options["use_targets"] else 1
        grad_outputs = [torch.randn(NUM_ROWS, generator=g, dtype=torch.float64) for _ in range(count)]
    compiled, eager, _ = compiled_and_eager(monkeypatch, loss_fn, inputs, grad_outputs, **options)
    check(compiled, eager, rtol=1e-10, atol=1e-12)
    check(compiled, run(loss_fn, "reference", inputs, grad_outputs, **options), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_value_only_under_no_grad(monkeypatch):
    """Under torch.no_grad the compiled block computes the values alone (no gradient output)."""
    inputs = make_inputs(NUM_ROWS, student_vocab=V_S, teacher_vocab=V_T, seed=8)
    args = dict(targets=inputs[5], ce_weight=inputs[6], shared_vocab=SHARED, student_softcap=5.0)
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("TIDE_COMPILE", switch)
        with torch.no_grad():
            results[switch] = tide.tidal_loss(*inputs[:5], 0.6, impl="chunked", **args)
        if chunked._COMPILE_FAILURE:
            pytest.skip(f"torch.compile does not work here: {chunked._COMPILE_FAILURE[0]}")
    for a, b in zip(results["1"], results["0"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

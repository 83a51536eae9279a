"""tide.cross_entropy / tide.CrossEntropyLoss: fused linear (weighted) cross-entropy.

Ground truth: eager float64 `F.cross_entropy` on the `[b, l, V]` logits (ignore_index rows
dropped by hand), so the reference impl is checked too. Every impl on ragged `[b, l, d]` rows
with ignored rows, ce_weight, a bias and a softcap, each reduction, values and the gradients of
hidden, weight and bias under a random upstream gradient. The Triton impl runs under
TRITON_INTERPRET=1 (conftest.py) on small shapes. The chunked path's claim is checked by
counting GEMMs: three per row block for "mean" / "sum" forward + backward (token_logprobs
needs four), one under torch.no_grad.
"""
import pytest
import torch
import torch.nn.functional as F
from allocations import LargestTensor
from torch.utils._python_dispatch import TorchDispatchMode

import tide
from tide import losses, reference

IMPLS = ("reference", "chunked", "triton")
REDUCTIONS = ("mean", "sum", "none")
B, L, V, D = 2, 5, 37, 6                       # 10 rows, ragged against every block
ROWS_PER_BLOCK = 3


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(8 * V * ROWS_PER_BLOCK))      # 3 float64 rows per chunked block


def make(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    targets = torch.randint(0, V, (B, L), generator=g)
    targets[0, 1] = targets[1, 3] = targets[1, 4] = -100                       # ignored rows
    return dict(hidden=randn(B, L, D), weight=randn(V, D, scale=2 / D ** 0.5), bias=randn(V, scale=0.5),
                targets=targets, ce_weight=(torch.rand(B, L, generator=g, dtype=torch.float64) * 2).to(dtype))


def eager(x, reduction, *, bias=True, softcap=None, ce_weight=True, ignore_index=-100):
    """float64 F.cross_entropy on the full [b, l, V] logits, ignored rows dropped by hand."""
    logits = x["hidden"].double() @ x["weight"].double().T
    if bias:
        logits = logits + x["bias"].double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = torch.ones(B, L, dtype=torch.bool) if ignore_index is None else x["targets"] != ignore_index
    rows = F.cross_entropy(logits[keep], x["targets"][keep], reduction="none")
    if ce_weight:
        rows = x["ce_weight"].double()[keep] * rows
    if reduction == "none":
        return torch.zeros(B, L, dtype=torch.float64).masked_scatter(keep, rows)
    total = rows.sum()
    return total if reduction == "sum" else total / max(int(keep.sum()), 1)


def ours(x, reduction, impl, *, bias=True, softcap=None, ce_weight=True, ignore_index=-100):
    return tide.cross_entropy(x["hidden"], x["weight"], x["targets"], ce_weight=x["ce_weight"] if ce_weight else None,
                              bias=x["bias"] if bias else None, softcap=softcap, reduction=reduction,
                              ignore_index=ignore_index, impl=impl)


def grads_of(fn, x, seed=3, names=("hidden", "weight", "bias")):
    """fn(x) and the gradients of `sum(out * g)` for a random upstream g (a scalar != 1 for 0-d outputs)."""
    x = dict(x)
    for name in names:
        x[name] = x[name].detach().clone().requires_grad_(True)
    out = fn(x)
    g = torch.Generator().manual_seed(seed)
    upstream = (torch.rand(out.shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(out.dtype)
    grads = torch.autograd.grad((out * upstream).sum(), [x[n] for n in names], allow_unused=True)
    return out.detach(), list(grads)


def close(got, want, tol=1e-10):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if a is None and b is None:                   # an input that is not used (no bias)
            continue
        assert a is not None and b is not None
        assert a.shape == b.shape, (a.shape, b.shape)
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


# ----------------------------------------------------------------------------- values and gradients
OPTIONS = [dict(), dict(bias=True, softcap=3.0, ce_weight=True), dict(bias=False, softcap=2.5, ce_weight=True),
           dict(bias=True, softcap=None, ce_weight=False)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain+bias+weight", "softcap", "softcap-no-bias", "no-weight"])
def test_matches_eager_float64(impl, reduction, options):
    """[b, l, d] rows with ignore_index, ce_weight, bias, softcap: the value and the hidden / weight /
    bias gradients under a random upstream gradient equal eager F.cross_entropy in float64."""
    x = make(seed=hash((reduction, str(options))) % 1000)
    got = grads_of(lambda x: ours(x, reduction, impl, **options), x)
    want = grads_of(lambda x: eager(x, reduction, **options), x)
    assert got[0].dtype == torch.float64
    assert got[0].shape == ((B, L) if reduction == "none" else ())
    close([got[0]] + got[1], [want[0]] + want[1])
    if reduction == "none":
        assert (got[0][x["targets"] == -100] == 0).all()


@pytest.mark.parametrize("impl", ("reference", "chunked"))
def test_flat_rows_and_more_leading_dims(impl):
    """[N, d] and [a, b, c, d] hidden states give the same values as the [b, l, d] call."""
    x = make(seed=4)
    want = ours(x, "none", impl, softcap=3.0)
    for lead in ((B * L,), (1, B, L)):
        y = dict(x, hidden=x["hidden"].reshape(*lead, D), targets=x["targets"].reshape(lead),
                 ce_weight=x["ce_weight"].reshape(lead))
        close([ours(y, "none", impl, softcap=3.0).reshape(B, L)], [want], 1e-12)
        close([ours(y, "mean", impl, softcap=3.0)], [ours(x, "mean", impl, softcap=3.0)], 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_divides_by_the_rows_that_take_part_like_the_distill_ce_term(impl):
    """"mean" = sum_i ce_weight_i CE_i / (rows whose target is not ignore_index), not / sum(ce_weight):
    the CE term of kl_loss / tidal_loss with the same targets and ce_weight."""
    x = make(seed=5)
    mean, total = ours(x, "mean", impl), ours(x, "sum", impl)
    kept = int((x["targets"] != -100).sum())
    close([mean], [total / kept], 1e-12)
    assert abs(float(mean) - float(total / x["ce_weight"][x["targets"] != -100].sum())) > 1e-3
    g = torch.Generator().manual_seed(0)
    teacher_hidden, teacher_weight = torch.randn(B, L, 4, generator=g, dtype=torch.float64), \
        torch.randn(V, 4, generator=g, dtype=torch.float64)
    for reduction in REDUCTIONS:
        ce = tide.kl_loss(x["hidden"], x["weight"], teacher_hidden, teacher_weight, targets=x["targets"],
                          ce_weight=x["ce_weight"], student_bias=x["bias"], reduction=reduction,
                          impl="chunked" if impl == "triton" else impl).ce
        close([ours(x, reduction, impl)], [ce], 1e-12)


def test_ignore_index_none_and_custom():
    """ignore_index=None: every row takes part (targets must all be ids); another value drops its rows."""
    x = make(seed=6)
    x["targets"] = x["targets"].clamp(min=0)
    close([ours(x, "mean", "chunked", ignore_index=None)], [eager(x, "mean", ignore_index=None)], 1e-12)
    x["targets"][0, 0] = -1
    close([ours(x, "sum", "chunked", ignore_index=-1)], [eager(x, "sum", ignore_index=-1)], 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(impl, reduction, monkeypatch):
    """Finite differences in float64 through the softcap derivative and the bias, with ce_weight and an
    ignored row (the Triton impl in gradcheck's fast mode)."""
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(8 * 11 * 2))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 3), generator=g)
    targets[1, 0] = -100
    ce_weight = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5

    def fn(h, w, b):
        return tide.cross_entropy(h, w, targets, ce_weight=ce_weight, bias=b, softcap=2.0, reduction=reduction,
                                  impl=impl)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_only_some_inputs_require_grad(impl):
    x = make(seed=7)
    for names in (("hidden",), ("weight",), ("bias",), ("weight", "bias")):
        got = grads_of(lambda x: ours(x, "sum", impl, softcap=3.0), x, names=names)
        want = grads_of(lambda x: eager(x, "sum", softcap=3.0), x, names=names)
        close([got[0]] + got[1], [want[0]] + want[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_ce_weight_is_a_constant(impl):
    """No impl passes a gradient to ce_weight (documented), even when it requires one."""
    x = make(seed=14)
    x["ce_weight"] = x["ce_weight"].clone().requires_grad_(True)
    for reduction in REDUCTIONS:
        h = x["hidden"].clone().requires_grad_(True)
        ours(dict(x, hidden=h), reduction, impl).sum().backward()
        assert x["ce_weight"].grad is None and h.grad is not None


def test_chunked_backward_scales_out_of_place_and_retain_graph_is_safe():
    """The chunked scalar's gradients are finished in forward and scaled by the upstream gradient in
    backward, out of place: backward twice with retain_graph (grad_output 2, then -0.5) accumulates
    1.5 times the unit gradients, and a third backward still sees the unscaled ones."""
    x = make(seed=8)
    for reduction in ("mean", "sum"):
        h, w, b = (x[n].clone().requires_grad_(True) for n in ("hidden", "weight", "bias"))
        out = tide.cross_entropy(h, w, x["targets"], ce_weight=x["ce_weight"], bias=b, softcap=3.0,
                                 reduction=reduction, impl="chunked")
        out.backward(torch.tensor(2.0, dtype=torch.float64), retain_graph=True)
        out.backward(torch.tensor(-0.5, dtype=torch.float64), retain_graph=True)
        twice = [t.grad.clone() for t in (h, w, b)]
        for t in (h, w, b):
            t.grad = None
        out.backward()
        once = [t.grad for t in (h, w, b)]
        want = torch.autograd.grad(eager(dict(x, hidden=h, weight=w, bias=b), reduction, softcap=3.0), (h, w, b))
        close(once, want)
        close(twice, [1.5 * g for g in want])


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ("sum", "none"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_accumulates_in_float32(impl, reduction, dtype):
    """16-bit inputs with ignored rows, ce_weight, bias and softcap: the float32 result of the float64
    answer on the same (rounded) values; gradients (hidden, weight, bias) in the input dtype."""
    low = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in make(seed=9).items()}
    rounded = {k: (v.double() if v.is_floating_point() else v) for k, v in low.items()}
    got = grads_of(lambda x: ours(x, reduction, impl, softcap=3.0), low)
    want = grads_of(lambda x: eager(x, reduction, softcap=3.0), rounded)
    assert got[0].dtype == torch.float32 and [g.dtype for g in got[1]] == [dtype] * 3
    close([got[0]], [want[0]], 1e-5)
    close(got[1], want[1], 1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("impl", ("reference", "chunked"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_gives_the_float32_result(impl, dtype):
    x = make(dtype=torch.float32, seed=10)
    for reduction in REDUCTIONS:
        plain = ours(x, reduction, impl, softcap=3.0)
        with torch.autocast("cpu", dtype=dtype):
            inside = ours(x, reduction, impl, softcap=3.0)
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, plain, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_and_zero_gradients(impl, reduction):
    x = make(seed=11)
    x["targets"] = torch.full((B, L), -100)
    out, grads = grads_of(lambda x: ours(x, reduction, impl, softcap=3.0), x)
    assert torch.equal(out, torch.zeros_like(out)) and out.shape == ((B, L) if reduction == "none" else ())
    for grad in grads:
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), grad


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits_stay_finite(impl):
    g = torch.Generator().manual_seed(0)
    hidden = torch.zeros(6, 2)
    hidden[:, 0] = 1.0
    weight = (torch.rand(50, 2, generator=g) * 2 - 1) * 1e4                  # logits up to +-1e4
    targets = torch.randint(0, 50, (6,), generator=g)
    for reduction in REDUCTIONS:
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = tide.cross_entropy(h, w, targets, reduction=reduction, impl=impl)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("call,error,words", [
    (lambda x: tide.cross_entropy(x["hidden"][0, 0], x["weight"], x["targets"]), ValueError, ["hidden", "[N, d]"]),
    (lambda x: tide.cross_entropy(x["hidden"].long(), x["weight"], x["targets"]), TypeError, ["hidden", "floating"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"][:, :4], x["targets"]), ValueError, ["weight", "d=6"]),
    (lambda x: tide.cross_entropy(x["hidden"], torch.zeros(0, D), x["targets"]), ValueError, ["weight", "V >= 1"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"].reshape(-1)), ValueError,
     ["targets", "[2, 5]"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"].double()), TypeError, ["targets", "integer"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"].clamp(min=0) + V), ValueError,
     ["targets", "[0, 37)"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=-1), ValueError,
     ["targets", "ignore_index=-1"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], ce_weight=x["ce_weight"][0]), ValueError,
     ["ce_weight", "[2, 5]"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], ce_weight=x["ce_weight"].long()),
     TypeError, ["ce_weight", "floating"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"],
                                  ce_weight=torch.full((B, L), float("nan"))), ValueError, ["ce_weight", "finite"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], ce_weight=[1.0] * 10), TypeError,
     ["ce_weight", "torch.Tensor"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], bias=x["bias"][:-1]), ValueError,
     ["bias", "V=37"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], softcap=0.0), ValueError,
     ["softcap", "positive"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], softcap=True), ValueError, ["softcap"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="avg"), ValueError,
     ["reduction", "mean", "none"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], impl="triton_stream"), ValueError,
     ["impl", "chunked"]),
    (lambda x: tide.cross_entropy(x["hidden"], x["weight"], x["targets"], ignore_index=True), ValueError,
     ["ignore_index", "int"]),
    (lambda x: tide.CrossEntropyLoss(reduction="avg"), ValueError, ["reduction"]),
    (lambda x: tide.CrossEntropyLoss(softcap=-1.0), ValueError, ["softcap"]),
    (lambda x: tide.CrossEntropyLoss(impl="fast"), ValueError, ["impl"]),
    (lambda x: tide.CrossEntropyLoss(bogus=1), TypeError, ["bogus"]),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call(make())
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_module_checks_options_and_shows_them():
    module = tide.CrossEntropyLoss(reduction="sum", softcap=30.0, impl="chunked")
    text = repr(module)
    for word in ("CrossEntropyLoss(", "reduction='sum'", "softcap=30.0", "impl='chunked'", "ignore_index=-100"):
        assert word in text, text
    x = make(seed=12)
    got = module(x["hidden"], x["weight"], x["targets"], ce_weight=x["ce_weight"], bias=x["bias"])
    close([got], [ours(x, "sum", "chunked", softcap=30.0)], 1e-14)
    assert "CrossEntropyLoss" in tide.__all__ and "cross_entropy" in tide.__all__


# ----------------------------------------------------------------------------- memory and GEMMs
@pytest.mark.parametrize("impl", ("chunked", "triton"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_n_by_v_tensor(impl, reduction, monkeypatch):
    """[b, l, d] rows with ignore_index, ce_weight, softcap and bias: every tensor made in forward and
    backward stays far below [N, V]."""
    b, l, vocab, d = 4, 16, 300, 8
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, l, d, generator=g, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g) / d ** 0.5).requires_grad_(True)
    bias = torch.zeros(vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (b, l), generator=g)
    targets[:, ::3] = -100
    ce_weight = torch.rand(b, l, generator=g)
    monkeypatch.setenv("TIDE_CHUNK_BYTES", str(4 * vocab * 8))
    with LargestTensor() as mode:
        out = tide.cross_entropy(h, w, targets, ce_weight=ce_weight, bias=bias, softcap=3.0, reduction=reduction,
                                 impl=impl)
        (out * torch.linspace(0.5, 1.5, out.numel()).view(out.shape)).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    assert mode.largest < b * l * vocab * 4 // 4, f"{mode.op} made a tensor of {mode.largest} bytes"


class GemmCount(TorchDispatchMode):
    """Counts the matrix products (mm, addmm, addmm_, bmm) the ops run (matmul and @ arrive as these)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                   torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _gemms(fn, x, names, no_grad=False):
    x = dict(x)
    for name in names:
        x[name] = x[name].detach().clone().requires_grad_(True)
    with GemmCount() as mode:
        with torch.set_grad_enabled(not no_grad):
            out = fn(x)
        if out.requires_grad:
            out.sum().backward()
    return mode.count


@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_chunked_scalar_runs_three_gemms_per_block_and_one_without_gradients(reduction):
    """Forward + backward of the chunked scalar: logits, d hidden, d weight per block (token_logprobs:
    4, its backward recomputes the logits); only the gradients asked for; one GEMM per block under
    torch.no_grad or when nothing requires a gradient."""
    x = make(seed=13)
    blocks = -(-int((x["targets"] != -100).sum()) // ROWS_PER_BLOCK)
    assert blocks >= 3

    def ce(x):
        return ours(x, reduction, "chunked", softcap=3.0)

    assert _gemms(ce, x, ("hidden", "weight", "bias")) == 3 * blocks
    assert _gemms(ce, x, ("hidden",)) == 2 * blocks
    assert _gemms(ce, x, ("weight", "bias")) == 2 * blocks
    assert _gemms(ce, x, ("bias",)) == blocks
    assert _gemms(ce, x, ("hidden", "weight", "bias"), no_grad=True) == blocks
    assert _gemms(ce, x, ()) == blocks
    logprobs = _gemms(lambda x: -tide.token_logprobs(x["hidden"], x["weight"], x["targets"], bias=x["bias"],
                                                     softcap=3.0, impl="chunked").sum(), x, ("hidden", "weight"))
    assert logprobs == 4 * blocks
    with torch.no_grad():
        h = x["hidden"].clone().requires_grad_(True)
        out = tide.cross_entropy(h, x["weight"], x["targets"], reduction=reduction, impl="chunked")
    assert out.grad_fn is None and not out.requires_grad


# ----------------------------------------------------------------------------- the trainer
@pytest.mark.parametrize("impl", ("chunked", "reference"))
def test_trainer_ce_only_loss_and_gradients_unchanged(impl):
    """`--method ce` (StudentLoss.forward) now calls cross_entropy(..., reduction="sum"): its loss and
    the student's parameter gradients equal the former `-(ce_row * token_logprobs).sum()` (float64)."""
    from tide.config import Config
    from tide.models import build_config, build_model
    from tide.train import StudentLoss, ce_row_weights, noise_batch

    torch.manual_seed(0)
    student = build_model("bd3lm", build_config("qwen3", 40, 16, 1, 2), block_size=4, mask_token_id=39).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 39, (3, 12), generator=g)
    maskable = torch.ones(3, 12, dtype=torch.bool)
    maskable[:, :3] = False
    batch = {"student_input_ids": ids, "student_maskable": maskable}
    cfg = Config(method="ce", impl=impl)
    noise = noise_batch(batch, cfg, torch.Generator().manual_seed(2))
    assert noise["masked"].sum() > ROWS_PER_BLOCK

    objective = StudentLoss(student, cfg, None)
    loss, logs = objective(batch, noise, None, None, 0.3)
    loss.backward()
    new = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    masked = noise["masked"]
    hidden = student(torch.where(masked, student.mask_token_id, ids), ids, None)
    logp = tide.token_logprobs(hidden[masked], student.lm_head_weight, ids[masked], impl=impl)
    old_loss = cfg.ce_weight * -(ce_row_weights(batch, noise, cfg)[masked] * logp).sum()
    old_loss.backward()
    old = [p.grad for p in student.parameters()]
    close([loss.detach(), logs["ce"]], [old_loss.detach(), old_loss.detach() / cfg.ce_weight])
    assert float(logs["distill"]) == 0.0
    close(new, old)


def test_chunked_distillation_runs_no_gradient_gemms_under_no_grad():
    """tidal_loss / kl_loss, chunked, "mean": the walk contracts gradients in forward; under
    torch.no_grad (a validation loss) only the logit GEMMs run (student and teacher, one each per
    block), although the student's tensors require gradients."""
    torch.manual_seed(0)
    N, V, d = 40, 37, 6
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(N, d + 2, dtype=torch.float64), torch.randn(V, d + 2, dtype=torch.float64)
    targets = torch.randint(0, V, (N,))

    def gemms(grad_enabled):
        with GemmCount() as mode, torch.set_grad_enabled(grad_enabled):
            tide.kl_loss(h, w, th, tw, targets=targets, impl="chunked")
        return mode.count

    # per block: student logits, teacher logits, the KL row-dot (bmm); with gradients also d hidden, d weight
    assert 5 * gemms(False) == 3 * gemms(True)

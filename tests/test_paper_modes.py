"""The official scripts' modes against the math written out here in float64: Reverse CALM +
TIDAL, the cosine alpha schedule and its ELBO weight, CE normalisation by token / sequence /
batch, and the trainer's use of --calm-temperature next to --temperature."""
import math

import pytest
import torch
from test_calm import make_chunks

import tide
from tide import losses, schedules
from tide.config import Config
from tide.reference import CHUNK_PROB_EPS
from tide.train import StudentLoss, ce_row_weights, noise_batch


# --------------------------------------------------------------------------- Reverse CALM + TIDAL
def reverse_calm_tidal_formula(data, lam, weight, temperature, num_chunks):
    """-(a log m + (1 - a) log(1 - m)), m = clamp((1 - lam) a + lam b) detached, averaged over active chunks."""
    s_logp = torch.log_softmax(data["student_hidden"] @ data["student_weight"].T, -1)
    s_logp = s_logp.gather(1, data["student_targets"][:, None]).squeeze(1)
    t_logp = torch.log_softmax(data["teacher_hidden"] @ data["teacher_weight"].T, -1)
    t_logp = t_logp.gather(1, data["teacher_targets"][:, None]).squeeze(1)
    loss, active = 0.0, 0
    for c in range(num_chunks):
        s_rows, t_rows = data["student_chunk"] == c, data["teacher_chunk"] == c
        if not s_rows.any() or not t_rows.any():
            continue
        a = torch.clamp(torch.exp(s_logp[s_rows].sum() / temperature), CHUNK_PROB_EPS, 1 - CHUNK_PROB_EPS)
        b = torch.clamp(torch.exp(t_logp[t_rows].sum() / temperature), CHUNK_PROB_EPS, 1 - CHUNK_PROB_EPS)
        m = torch.clamp((1 - lam[c]) * a + lam[c] * b, CHUNK_PROB_EPS, 1 - CHUNK_PROB_EPS).detach()
        loss = loss - weight[c] * (a * torch.log(m) + (1 - a) * torch.log(1 - m))
        active += 1
    return loss / active


@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("temperature", [2.0, 5.0])
def test_reverse_calm_tidal_matches_formula(impl, temperature):
    num_chunks = 15
    data = make_chunks(seed=5, dtype=torch.float32 if impl == "triton" else torch.float64)
    g = torch.Generator().manual_seed(7)
    lam = torch.rand(num_chunks, generator=g, dtype=torch.float64)
    weight = torch.rand(num_chunks, generator=g, dtype=torch.float64) * 2
    exact = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}
    hidden = exact["student_hidden"].clone().requires_grad_(True)
    head = exact["student_weight"].clone().requires_grad_(True)
    expected = reverse_calm_tidal_formula(dict(exact, student_hidden=hidden, student_weight=head), lam, weight,
                                          temperature, num_chunks)
    expected.backward()
    h = data["student_hidden"].clone().requires_grad_(True)
    w = data["student_weight"].clone().requires_grad_(True)
    dtype = data["student_hidden"].dtype
    loss = tide.calm_loss(h, w, data["student_targets"], data["student_chunk"], data["teacher_hidden"],
                          data["teacher_weight"], data["teacher_targets"], data["teacher_chunk"],
                          num_chunks=num_chunks, reverse=True, lam=lam.to(dtype), weight=weight.to(dtype),
                          temperature=temperature, impl=impl)
    loss.backward()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    assert torch.allclose(loss.double(), expected.detach(), **tol)
    assert torch.allclose(h.grad.double(), hidden.grad, **tol)
    assert torch.allclose(w.grad.double(), head.grad, **tol)


def test_reverse_calm_tidal_lam_zero_is_self_target_and_lam_one_is_reverse_calm():
    data = make_chunks(seed=2)
    ones = torch.ones(15, dtype=torch.float64)
    args = [data[k] for k in ("student_hidden", "student_weight", "student_targets", "student_chunk",
                              "teacher_hidden", "teacher_weight", "teacher_targets", "teacher_chunk")]
    full = tide.calm_loss(*args, num_chunks=15, reverse=True, lam=ones, impl="reference")
    plain = tide.calm_loss(*args, num_chunks=15, reverse=True, impl="reference")
    assert torch.allclose(full, plain, rtol=1e-12)


# --------------------------------------------------------------------------- alpha schedule
def test_cosine_alpha_schedule_and_its_elbo_weight():
    t = torch.linspace(1e-3, 1.0, 301, dtype=torch.float64, requires_grad=True)
    alpha = torch.cos(math.pi / 2 * t)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)
    t = t.detach()
    assert torch.allclose(schedules.mask_ratio(t, "cosine"), 1 - alpha.detach(), rtol=1e-10, atol=1e-14)
    assert torch.allclose(schedules.elbo_weight(t, "cosine"), -d_alpha / (1 - alpha.detach()), rtol=1e-8)
    assert torch.equal(schedules.mask_ratio(t, "linear"), t)
    assert torch.allclose(schedules.elbo_weight(t, "linear"), 1 / t)
    # float32 keeps its precision near t = 0 (1 - cos would lose it)
    small = torch.tensor([1e-3, 1e-2], dtype=torch.float32)
    exact = schedules.mask_ratio(small.double(), "cosine")
    assert torch.allclose(schedules.mask_ratio(small, "cosine").double(), exact, rtol=1e-6)


def tiny_batch(b=3, length=16, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (b, length), generator=g)
    maskable = torch.ones(b, length, dtype=torch.bool)
    maskable[0, :5] = False          # a prompt
    maskable[1, 12:] = False
    maskable[2, :] = False           # a sequence with nothing to mask
    maskable[2, 3] = True
    return {"student_input_ids": ids, "student_maskable": maskable, "teacher_input_ids": ids}


@pytest.mark.parametrize("alpha", ["linear", "cosine"])
def test_noise_masks_with_the_schedules_mask_ratio(alpha):
    cfg = Config(alpha_schedule=alpha, pipeline="shared")
    batch = tiny_batch(b=4, length=4096)
    batch["student_maskable"][:] = True
    noise = noise_batch(batch, cfg, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = cfg.eps + (1 - cfg.eps) * torch.rand(4, generator=g)
    assert torch.equal(noise["t"], t)
    ratio = schedules.mask_ratio(t, alpha)
    assert torch.equal(noise["masked"], torch.rand(4, 4096, generator=g) < ratio[:, None])
    assert torch.allclose(noise["masked"].float().mean(1), ratio, atol=0.03)


# --------------------------------------------------------------------------- CE normalisation
def expected_ce(logits, ids, masked, maskable, t, alpha, norm, weighting):
    """Loop form of SPEC's CE: per sequence b, w_b * sum over masked i of CE_bi, then the normaliser
    of the official loss_norm_type (PKU-YuanGroup/TIDE dllm/core/trainers/bd3lm.py@da47bac): token:
    the micro-batch's maskable tokens; sequence: each sequence's maskable tokens (at least 1) times
    the number of sequences B, empty ones included; batch: B."""
    w = schedules.elbo_weight(t, alpha) if weighting == "elbo" else torch.ones_like(t)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # [b, L]
    B = len(t)
    per_seq = [(w[b] * ce[b][masked[b]]).sum() for b in range(B)]
    if norm == "token":
        return sum(per_seq) / maskable.sum()
    if norm == "sequence":
        return sum(per_seq[b] / (max(int(maskable[b].sum()), 1) * B) for b in range(B))
    return sum(per_seq) / B


@pytest.mark.parametrize("norm", ["token", "sequence", "batch"])
@pytest.mark.parametrize("alpha", ["linear", "cosine"])
@pytest.mark.parametrize("method", ["ce", "kl"])
def test_ce_normalisation_and_schedule_weight(norm, alpha, method):
    from tide.models import build_config, build_model
    torch.manual_seed(0)
    student = build_model("bd3lm", build_config("qwen3", 40, 16, 1, 2), block_size=4, mask_token_id=39).double()
    cfg = Config(method=method, pipeline="shared", alpha_schedule=alpha, ce_normalization=norm, impl="chunked")
    batch = tiny_batch(b=4)
    batch["student_maskable"][3] = False  # a sequence with no maskable token still counts in B (sequence, batch)
    noise = noise_batch(batch, cfg, torch.Generator().manual_seed(1))
    masked, ids = noise["masked"], batch["student_input_ids"]
    t_hidden = torch.randn(4, 16, 16, dtype=torch.float64)
    t_weight = torch.randn(40, 16, dtype=torch.float64)
    objective = StudentLoss(student, cfg, 40)
    _, parts = objective(batch, noise, t_hidden if method == "kl" else None, t_weight if method == "kl" else None, 0.5)
    with torch.no_grad():
        x_t = torch.where(masked, 39, ids)
        logits = student(x_t, ids) @ student.lm_head_weight.T
    want = expected_ce(logits, ids, masked, batch["student_maskable"], noise["t"], alpha, norm, "elbo")
    assert torch.allclose(parts["ce"], want, rtol=1e-6), (parts["ce"], want)
    # the weights alone: uniform weighting
    cfg.ce_schedule_weight = "uniform"
    rows = ce_row_weights(batch, noise, cfg)[masked]
    ce = torch.nn.functional.cross_entropy(logits[masked], ids[masked], reduction="none")
    assert torch.allclose((rows * ce).sum(),
                          expected_ce(logits, ids, masked, batch["student_maskable"], noise["t"], alpha, norm,
                                      "uniform"), rtol=1e-6)


# --------------------------------------------------------------------------- trainer wiring
def test_trainer_passes_calm_temperature_and_reverse_tidal(monkeypatch):
    """--calm-temperature reaches the chunk loss, --temperature the token losses; reverse_calm_tidal
    calls Reverse CALM with lam and the timestep weight of the mask ratio."""
    calls = []
    real = losses.calm_from_logprobs  # the trainer's one token log-prob pass serves CE and the chunk loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "calm_from_logprobs", spy)
    cfg = Config(method="reverse_calm_tidal", pipeline="cross", calm_temperature=5.0, temperature=1.5,
                 alpha_schedule="cosine")
    from tide.models import build_config, build_model
    torch.manual_seed(0)
    student = build_model("bd3lm", build_config("qwen3", 40, 16, 1, 2), block_size=4, mask_token_id=39)
    batch = tiny_batch()
    batch["student_maskable"][:] = True
    chunk_ids = torch.arange(48).view(3, 16)
    batch.update(student_chunk_ids=chunk_ids, teacher_chunk_ids=chunk_ids, num_chunks=48,
                 chunk_batch_index=torch.arange(3).repeat_interleave(16))
    noise = noise_batch(batch, cfg, torch.Generator().manual_seed(1))
    objective = StudentLoss(student, cfg, 40)
    objective(batch, noise, torch.randn(3, 16, 16), torch.randn(40, 16), 0.25)
    (kwargs,) = calls
    assert kwargs["temperature"] == 5.0 and kwargs["reverse"] is True
    ratio = noise["mask_ratio"][batch["chunk_batch_index"]]
    assert torch.allclose(kwargs["lam"], schedules.row_lambda(ratio, 0.25))
    assert torch.allclose(kwargs["weight"], schedules.timestep_weight(ratio))


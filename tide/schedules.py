"""The masking schedule and its ELBO weight (SPEC.md, "Setting"), and TIDAL's two axes and
its timestep weight (SPEC.md, "TIDAL"): shared by the trainer and every loss impl.

Masking schedule alpha(t) (the probability that a token stays clean at time t):
- "linear": alpha = 1 - t, so the mask ratio 1 - alpha is t and the ELBO weight
  -alpha'(t) / (1 - alpha(t)) is 1 / t;
- "cosine": alpha = cos(pi t / 2): mask ratio 1 - cos(pi t / 2) = 2 sin^2(pi t / 4),
  ELBO weight (pi / 2) sin(pi t / 2) / (1 - cos(pi t / 2)) = (pi / 2) / tan(pi t / 4)
  (both written in the forms that keep float32 precision near t = 0).
TIDAL's lambda_b and w_b take the mask ratio (what fraction is masked), the CE takes
the ELBO weight of t.

Every implementation (reference, chunked, Triton) receives the per-row teacher
weight `row_lambda [N]` and the per-row loss weight `row_weight [N]` computed
here, so the schedule logic exists exactly once.
"""
from __future__ import annotations

import math

import torch


def _as_float(mask_ratio: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (exact tests); everything else becomes float32."""
    dtype = torch.float64 if mask_ratio.dtype == torch.float64 else torch.float32
    return mask_ratio.detach().to(dtype)

SCHEDULES = ("cosine", "linear")
ALPHA_SCHEDULES = ("linear", "cosine")
AXES = ("both", "training_only", "timestep_only")
TIMESTEP_WEIGHTS = ("midrange", "uniform")

# "midrange" weight: a Gaussian bump centred at t = 0.5 with this width.
MIDRANGE_CENTER = 0.5
MIDRANGE_WIDTH = 0.15


def mask_ratio(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """1 - alpha(t) `[b]`: the probability that a maskable token is masked at time t `[b]`."""
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 2.0 * torch.sin(math.pi / 4 * t) ** 2
    raise ValueError(f"alpha schedule must be one of {ALPHA_SCHEDULES}, got {schedule!r}")


def elbo_weight(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """-alpha'(t) / (1 - alpha(t)) `[b]`: the diffusion ELBO's per-sequence CE weight at time t `[b]`."""
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        return (math.pi / 2) / torch.tan(math.pi / 4 * t)
    raise ValueError(f"alpha schedule must be one of {ALPHA_SCHEDULES}, got {schedule!r}")


def lambda_train(progress: float, lambda_init: float = 0.1, lambda_max: float = 0.9,
                 schedule: str = "cosine") -> float:
    """Training axis: `lambda_init + (lambda_max - lambda_init) * g(progress)`.

    `g = (1 - cos(pi * progress)) / 2` for "cosine", `g = progress` for "linear";
    progress = step / max_steps in [0, 1].
    """
    if schedule == "cosine":
        g = (1.0 - math.cos(math.pi * progress)) / 2.0
    elif schedule == "linear":
        g = progress
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return lambda_init + (lambda_max - lambda_init) * g


def row_lambda(mask_ratio: torch.Tensor, progress: float, lambda_init: float = 0.1,
               lambda_max: float = 0.9, schedule: str = "cosine",
               axis: str = "both") -> torch.Tensor:
    """Per-row teacher weight lambda_b `[N]` (float32, float64 for float64 input) from each row's mask ratio t `[N]`.

    "both": `lambda_train * (1 - t)`; "training_only": `lambda_train`;
    "timestep_only": `lambda_max * (1 - t)`.
    """
    t = _as_float(mask_ratio)
    lam_train = lambda_train(progress, lambda_init, lambda_max, schedule)
    if axis == "both":
        return lam_train * (1.0 - t)
    if axis == "training_only":
        return torch.full_like(t, lam_train)
    if axis == "timestep_only":
        return lambda_max * (1.0 - t)
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def timestep_weight(mask_ratio: torch.Tensor, kind: str = "midrange") -> torch.Tensor:
    """Per-row loss weight w_b `[N]` (float32, float64 for float64 input).

    "midrange": `exp(-(t - 0.5)^2 / (2 * 0.15^2))`; "uniform": 1.
    """
    t = _as_float(mask_ratio)
    if kind == "midrange":
        return torch.exp(-((t - MIDRANGE_CENTER) ** 2) / (2.0 * MIDRANGE_WIDTH ** 2))
    if kind == "uniform":
        return torch.ones_like(t)
    raise ValueError(f"timestep_weight must be one of {TIMESTEP_WEIGHTS}, got {kind!r}")

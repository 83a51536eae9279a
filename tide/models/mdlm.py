"""Full-bidirectional masked diffusion LM (MDLM / LLaDA style), used as the teacher.

The same Hugging Face decoder as the student, every token attending to every
(non-padding) token. On CUDA with flash-attn installed it runs flash-attention
2 with `is_causal=False`; otherwise SDPA with a boolean key-padding mask (an
all-True `[1, 1, 1, L]` mask when there is no padding, so transformers never
substitutes its causal default).
"""
from __future__ import annotations

import functools

import torch

from .common import DiffusionLM


@functools.lru_cache(maxsize=16)
def _full_mask(length: int, device: str) -> torch.Tensor:
    return torch.ones(1, 1, 1, length, dtype=torch.bool, device=device)


class MDLM(DiffusionLM):
    """`forward(x_t) -> hidden [b, L, d]`; `x_0` is accepted and ignored (same call as BD3LM)."""

    kind = "mdlm"

    def forward(self, x_t: torch.Tensor, x_0: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = x_t.shape[1]
        if self.attn_implementation == "flash_attention_2":
            mask = attention_mask  # 2D padding mask (or None); is_causal=False set on every layer
        elif attention_mask is None:
            mask = _full_mask(length, str(x_t.device))
        else:
            key_ok = attention_mask.bool()[:, None, None, :]
            eye = torch.eye(length, dtype=torch.bool, device=x_t.device)
            mask = key_ok | eye  # [b, 1, L, L]: keys that are tokens, plus each query itself
        out = self.backbone(input_ids=x_t, attention_mask=mask, use_cache=False, is_causal=False)
        return out.last_hidden_state

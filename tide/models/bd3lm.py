"""Block-diffusion student (BD3LM, SPEC.md "Student architecture") around a Hugging Face decoder.

The decoder (Qwen3, Llama, any `AutoModelForCausalLM` whose attention takes a
prepared 4D mask or a flex-attention BlockMask) runs once on the concatenation
`[x_t, x_0]` of length 2L, positions `0..L-1` repeated, under the four-rule
attention mask below. The forward returns the final hidden states of the x_t
half, `[b, L, d]`; the LM head is not applied: losses take
`(hidden, lm_head_weight)` and stream over the vocabulary themselves.

Attention rule, query q and key k with block indices bq, bk (blocks of
`block_size` tokens inside each half):
- x_t -> x_t: same block only (bidirectional within the block);
- x_t -> x_0: strictly earlier blocks (bk < bq);
- x_0 -> x_0: block-causal (bk <= bq);
- x_0 -> x_t: never.

The mask is built once per (length, block size, device) and cached: a boolean
`[1, 1, 2L, 2L]` tensor for SDPA (CPU, or CUDA without flex attention), a
flex-attention BlockMask on CUDA. Batches with padding add a key-padding term
on top (cheap for SDPA; for flex it builds a data-dependent BlockMask).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .common import DiffusionLM


def bd3lm_allowed(q_idx, kv_idx, length: int, block_size: int):
    """The four rules as elementwise tensor ops (also a flex-attention mask_mod body).

    `q_idx`, `kv_idx`: positions in `[0, 2L)`; `< L` is the x_t half.
    """
    q_x0 = q_idx >= length
    k_x0 = kv_idx >= length
    bq = (q_idx % length) // block_size
    bk = (kv_idx % length) // block_size
    xt_xt = ~q_x0 & ~k_x0 & (bq == bk)
    xt_x0 = ~q_x0 & k_x0 & (bk < bq)
    x0_x0 = q_x0 & k_x0 & (bk <= bq)
    return xt_xt | xt_x0 | x0_x0


@functools.lru_cache(maxsize=16)
def bd3lm_sdpa_mask(length: int, block_size: int, device: str = "cpu") -> torch.Tensor:
    """Boolean `[1, 1, 2L, 2L]` mask (True = attend), cached per (length, block, device)."""
    idx = torch.arange(2 * length, device=device)
    return bd3lm_allowed(idx[:, None], idx[None, :], length, block_size)[None, None]


@functools.lru_cache(maxsize=16)
def bd3lm_block_mask(length: int, block_size: int, device: str = "cuda"):
    """flex-attention BlockMask of the same rule, cached per (length, block, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return bd3lm_allowed(q_idx, kv_idx, length, block_size)

    return create_block_mask(mask_mod, None, None, 2 * length, 2 * length, device=device)


class BD3LM(DiffusionLM):
    """Block-diffusion LM: `forward(x_t, x_0) -> hidden [b, L, d]` of the x_t half."""

    kind = "bd3lm"

    def __init__(self, decoder: nn.Module, block_size: int, mask_token_id: int):
        super().__init__(decoder, mask_token_id)
        self.block_size = int(block_size)

    def attention_mask(self, length: int, device: torch.device, padding: torch.Tensor | None = None):
        """The [x_t, x_0] mask for this length; `padding` `[b, L]` (1 = token) adds key padding."""
        if length % self.block_size:
            raise ValueError(f"sequence length {length} is not a multiple of block_size {self.block_size}")
        flex = self.attn_implementation == "flex_attention"
        if padding is None:
            cached = bd3lm_block_mask if flex else bd3lm_sdpa_mask
            return cached(length, self.block_size, str(device))
        key_ok = torch.cat([padding, padding], dim=1).bool()  # [b, 2L]
        if flex:
            from torch.nn.attention.flex_attention import create_block_mask
            block = self.block_size

            def mask_mod(b, h, q_idx, kv_idx):
                return bd3lm_allowed(q_idx, kv_idx, length, block) & (key_ok[b, kv_idx] | (q_idx == kv_idx))

            return create_block_mask(mask_mod, key_ok.shape[0], None, 2 * length, 2 * length, device=device)
        eye = torch.eye(2 * length, dtype=torch.bool, device=device)
        # every query keeps itself, so an all-padding block never yields an empty softmax row
        return bd3lm_sdpa_mask(length, self.block_size, str(device)) & (key_ok[:, None, None, :] | eye)

    def forward(self, x_t: torch.Tensor, x_0: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t `[b, L]` noised ids, x_0 `[b, L]` clean ids -> final hidden states `[b, L, d]` of x_t."""
        if x_0 is None:
            raise ValueError("BD3LM.forward needs the clean sequence x_0 next to x_t")
        length = x_t.shape[1]
        mask = self.attention_mask(length, x_t.device, attention_mask)
        positions = torch.arange(length, device=x_t.device).repeat(2)[None]  # [1, 2L]: 0..L-1 twice
        out = self.backbone(input_ids=torch.cat([x_t, x_0], dim=1), attention_mask=mask,
                            position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, :length]

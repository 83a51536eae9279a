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

`concat_order="x0_xt"` runs `[x_0, x_t]` instead (the WeDLM-style teacher layout):
the same four rules on the swapped halves, so the hidden states of x_t are the
same function of (x_t, x_0) in either order (a test checks it).

The mask is built once per (length, block size, order, device) and cached: a boolean
`[1, 1, 2L, 2L]` tensor for SDPA (CPU, or CUDA without flex attention), a
flex-attention BlockMask on CUDA. Batches with padding add a key-padding term
on top (cheap for SDPA; for flex it builds a data-dependent BlockMask).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .common import DiffusionLM


CONCAT_ORDERS = ("xt_x0", "x0_xt")


def bd3lm_allowed(q_idx, kv_idx, length: int, block_size: int, concat_order: str = "xt_x0"):
    """The four rules as elementwise tensor ops (also a flex-attention mask_mod body).

    `q_idx`, `kv_idx`: positions in `[0, 2L)`; `< L` is the x_t half for "xt_x0",
    the x_0 half for "x0_xt" (the halves are swapped, then the same rules apply).
    """
    if concat_order == "x0_xt":
        q_idx, kv_idx = _swap_halves(q_idx, length), _swap_halves(kv_idx, length)
    q_x0 = q_idx >= length
    k_x0 = kv_idx >= length
    bq = (q_idx % length) // block_size
    bk = (kv_idx % length) // block_size
    xt_xt = ~q_x0 & ~k_x0 & (bq == bk)
    xt_x0 = ~q_x0 & k_x0 & (bk < bq)
    x0_x0 = q_x0 & k_x0 & (bk <= bq)
    return xt_xt | xt_x0 | x0_x0


def _swap_halves(idx, length: int):
    """Position in `[x_0, x_t]` -> the same token's position in `[x_t, x_0]`."""
    return (idx + length) % (2 * length)


def _flex_rule(length: int, block_size: int, concat_order: str):
    """The rule as a flex-attention body of ints only (no string reaches the traced function)."""
    if concat_order == "x0_xt":
        return lambda q_idx, kv_idx: bd3lm_allowed(_swap_halves(q_idx, length), _swap_halves(kv_idx, length),
                                                   length, block_size)
    return lambda q_idx, kv_idx: bd3lm_allowed(q_idx, kv_idx, length, block_size)


@functools.lru_cache(maxsize=16)
def bd3lm_sdpa_mask(length: int, block_size: int, device: str = "cpu", concat_order: str = "xt_x0") -> torch.Tensor:
    """Boolean `[1, 1, 2L, 2L]` mask (True = attend), cached per (length, block, device, order)."""
    idx = torch.arange(2 * length, device=device)
    return bd3lm_allowed(idx[:, None], idx[None, :], length, block_size, concat_order)[None, None]


@functools.lru_cache(maxsize=16)
def bd3lm_block_mask(length: int, block_size: int, device: str = "cuda", concat_order: str = "xt_x0"):
    """flex-attention BlockMask of the same rule, cached per (length, block, device, order)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rule = _flex_rule(length, block_size, concat_order)

    def mask_mod(b, h, q_idx, kv_idx):
        return rule(q_idx, kv_idx)

    return create_block_mask(mask_mod, None, None, 2 * length, 2 * length, device=device)


def bd3lm_attention_mask(length: int, block_size: int, device, padding: torch.Tensor | None = None,
                         concat_order: str = "xt_x0", flex: bool = False):
    """The two-half mask for this length; `padding` `[b, L]` (1 = token) adds key padding.

    Boolean `[1 or b, 1, 2L, 2L]` for SDPA, a BlockMask for flex attention.
    """
    if length % block_size:
        raise ValueError(f"sequence length {length} is not a multiple of block_size {block_size}")
    if padding is None:
        cached = bd3lm_block_mask if flex else bd3lm_sdpa_mask
        return cached(length, block_size, str(device), concat_order)
    key_ok = torch.cat([padding, padding], dim=1).bool()  # [b, 2L] (both halves have the same padding)
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        rule = _flex_rule(length, block_size, concat_order)

        def mask_mod(b, h, q_idx, kv_idx):
            return rule(q_idx, kv_idx) & (key_ok[b, kv_idx] | (q_idx == kv_idx))

        return create_block_mask(mask_mod, key_ok.shape[0], None, 2 * length, 2 * length, device=device)
    eye = torch.eye(2 * length, dtype=torch.bool, device=device)
    # every query keeps itself, so an all-padding block never yields an empty softmax row
    return bd3lm_sdpa_mask(length, block_size, str(device), concat_order) & (key_ok[:, None, None, :] | eye)


def bd3lm_inputs(x_t: torch.Tensor, x_0: torch.Tensor, concat_order: str = "xt_x0"):
    """`(ids [b, 2L], position_ids [1, 2L], x_t slice)` of the two-half input, positions 0..L-1 twice."""
    if concat_order not in CONCAT_ORDERS:
        raise ValueError(f"concat_order must be one of {CONCAT_ORDERS}, got {concat_order!r}")
    length = x_t.shape[1]
    ids = torch.cat([x_t, x_0] if concat_order == "xt_x0" else [x_0, x_t], dim=1)
    positions = torch.arange(length, device=x_t.device).repeat(2)[None]
    return ids, positions, slice(0, length) if concat_order == "xt_x0" else slice(length, 2 * length)


class BD3LM(DiffusionLM):
    """Block-diffusion LM: `forward(x_t, x_0) -> hidden [b, L, d]` of the x_t half."""

    kind = "bd3lm"

    def __init__(self, decoder: nn.Module, block_size: int, mask_token_id: int, concat_order: str = "xt_x0"):
        super().__init__(decoder, mask_token_id)
        if concat_order not in CONCAT_ORDERS:
            raise ValueError(f"concat_order must be one of {CONCAT_ORDERS}, got {concat_order!r}")
        self.block_size = int(block_size)
        self.concat_order = concat_order

    def attention_mask(self, length: int, device: torch.device, padding: torch.Tensor | None = None):
        """The two-half mask for this length; `padding` `[b, L]` (1 = token) adds key padding."""
        return bd3lm_attention_mask(length, self.block_size, device, padding, self.concat_order,
                                    flex=self.attn_implementation == "flex_attention")

    def forward(self, x_t: torch.Tensor, x_0: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t `[b, L]` noised ids, x_0 `[b, L]` clean ids -> final hidden states `[b, L, d]` of x_t."""
        if x_0 is None:
            raise ValueError("BD3LM.forward needs the clean sequence x_0 next to x_t")
        ids, positions, x_t_half = bd3lm_inputs(x_t, x_0, self.concat_order)
        mask = self.attention_mask(x_t.shape[1], x_t.device, attention_mask)
        out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, x_t_half]

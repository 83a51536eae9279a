"""CompDemo's complementary split of the masked set, and the two teacher inputs, in one pass.

Eager equivalent (tide.compdemo on CPU, with torch's generator instead of Philox):

    v = rand(b, l)                                  # one per token, or one per (row, chunk id)
    mask_a = masked & (v < demo_ratio)              # M_A: revealed in pass 1, predicted by pass 2
    mask_b = masked & ~(v < demo_ratio)             # M_B: predicted by pass 1, revealed in pass 2
    pass1_ids = where(mask_b, mask_token_id, input_ids)
    pass2_ids = where(mask_a, mask_token_id, input_ids)

Random numbers: counter-based Philox 4x32 (tl.philox) keyed by a 64-bit seed read
from device memory (so drawing it from a torch.Generator needs no host sync). Each
element's counter is (c0, c1, c2, c3) = (index lo, index hi, row, stream) where

    stream 0, index = column          for tokens without a chunk (or no chunk ids given)
    stream 1, index = chunk id        for tokens of a chunk

so every token of a chunk gets the same draw without a second pass, chunk ids may be
numbered per sequence or globally, and the two streams never collide. Same seed, same
split; but NOT bit-identical to the CPU path (torch.rand), only the same distribution.

Grid: (b, cdiv(l, BLOCK)); each program reads masked (+ ids, + chunk ids) once and
writes mask_a, mask_b (+ pass1_ids, pass2_ids) once: 1 + 8 + 8 bytes read and
2 + 16 bytes written per token with int64 ids, vs ~5 separate eager ops each
reading and writing the full [b, l] tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _complementary_split_kernel(
    # pointers
    masked_ptr,     # [b, l] uint8 (bool) masked set
    ids_ptr,        # [b, l] clean input ids (HAS_IDS)
    chunk_ptr,      # [b, l] chunk id per token, -1 = no chunk (HAS_CHUNKS)
    seed_ptr,       # [1] int64 Philox seed
    mask_a_ptr,     # [b, l] uint8 out, contiguous
    mask_b_ptr,     # [b, l] uint8 out, contiguous
    pass1_ptr,      # [b, l] out ids: only M_B masked (HAS_IDS), contiguous
    pass2_ptr,      # [b, l] out ids: only M_A masked (HAS_IDS), contiguous
    # sizes
    L,
    # strides
    stride_mb, stride_ml, stride_ib, stride_il, stride_cb, stride_cl,
    # scalars
    demo_ratio, mask_token_id,
    # meta-parameters
    HAS_IDS: tl.constexpr, HAS_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < L
    masked = tl.load(masked_ptr + row * stride_mb + cols * stride_ml, mask=ok, other=0) != 0

    # Philox counter: (index lo, index hi, row, stream)
    index = cols.to(tl.int64)
    stream = tl.zeros((BLOCK,), tl.uint32)
    if HAS_CHUNKS:
        chunk = tl.load(chunk_ptr + row * stride_cb + cols * stride_cl, mask=ok, other=-1).to(tl.int64)
        in_chunk = chunk >= 0
        index = tl.where(in_chunk, chunk, index)
        stream = in_chunk.to(tl.uint32)
    seed = tl.load(seed_ptr)
    c0 = (index & 0xFFFFFFFF).to(tl.uint32)
    c1 = (index >> 32).to(tl.uint32)
    c2 = tl.zeros((BLOCK,), tl.uint32) + row.to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, stream)
    in_a = tl.uint_to_uniform_float(r0) < demo_ratio         # v in [0, 1)

    mask_a = masked & in_a
    mask_b = masked & (~in_a)
    out = row * L + cols
    tl.store(mask_a_ptr + out, mask_a.to(tl.uint8), mask=ok)
    tl.store(mask_b_ptr + out, mask_b.to(tl.uint8), mask=ok)
    if HAS_IDS:
        ids = tl.load(ids_ptr + row * stride_ib + cols * stride_il, mask=ok, other=0)
        fill = tl.zeros_like(ids) + mask_token_id
        tl.store(pass1_ptr + out, tl.where(mask_b, fill, ids), mask=ok)
        tl.store(pass2_ptr + out, tl.where(mask_a, fill, ids), mask=ok)


def philox_split(masked, demo_ratio, seed, *, input_ids=None, mask_token_id=None, chunk_ids=None, block=1024):
    """One launch: `(mask_a, mask_b, pass1_ids, pass2_ids)` (ids None without input_ids).

    masked bool `[b, l]`; seed an int or an int64 tensor `[1]` on the same device
    (non-negative, < 2**63); input_ids / chunk_ids `[b, l]` integer or None.
    Arguments are checked by tide.compdemo.
    """
    rows, length = masked.shape
    device = masked.device
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    mask_a = torch.empty(rows, length, dtype=torch.uint8, device=device)
    mask_b = torch.empty_like(mask_a)
    has_ids = input_ids is not None
    pass1 = torch.empty(rows, length, dtype=input_ids.dtype, device=device) if has_ids else None
    pass2 = torch.empty_like(pass1) if has_ids else None
    if masked.numel():
        masked_bytes = masked.view(torch.uint8)
        ids = input_ids if has_ids else masked_bytes
        chunks = chunk_ids if chunk_ids is not None else masked_bytes
        _complementary_split_kernel[(rows, triton.cdiv(length, block))](
            masked_bytes, ids, chunks, seed.reshape(1).to(torch.int64),
            mask_a, mask_b, pass1 if has_ids else mask_a, pass2 if has_ids else mask_b,
            length,
            masked_bytes.stride(0), masked_bytes.stride(1), ids.stride(0), ids.stride(1),
            chunks.stride(0), chunks.stride(1),
            float(demo_ratio), int(mask_token_id) if has_ids else 0,
            HAS_IDS=has_ids, HAS_CHUNKS=chunk_ids is not None, BLOCK=block,
        )
    return mask_a.view(torch.bool), mask_b.view(torch.bool), pass1, pass2

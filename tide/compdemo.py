"""CompDemo (SPEC.md §2.2): what the teacher sees.

The masked set `M` of each sequence is split at random into complementary halves
`M_A = M & (v < rho)`, `M_B = M & ~(v < rho)`, `v ~ U(0, 1)`, `rho = demo_ratio`.
The teacher runs twice on the clean sequence: pass 1 with only `M_B` masked (so
`M_A` is a revealed demonstration), pass 2 with only `M_A` masked. Its prediction
at `M_A` comes from pass 2, at `M_B` from pass 1; `merge_teacher_hidden` merges
the two passes on final hidden states (width d), so the teacher's LM head runs
once, inside the fused loss.

Random numbers, and what "reproducible" means here:
- CPU tensors: `v` comes from `torch.rand` with the given `torch.Generator`
  (the default one when None). A seeded generator gives the same split.
- CUDA tensors: one Triton kernel (`tide.kernels.complementary_split`) draws `v`
  with Philox from a seed in [0, 2**62) that is itself drawn from the generator (one
  `torch.randint`, no host sync), and writes mask_a, mask_b and both teacher
  input id tensors in one pass. A seeded generator gives the same split.
The two paths have the same distribution and semantics but are NOT
bit-identical: the same seed gives different splits on CPU and on CUDA.

Chunks (cross-tokenizer pipeline): with `chunk_ids [b, l]` (-1 = the token is in
no chunk) one `v` is drawn per (sequence, chunk id) and carried to every token
of that chunk, so all tokens of a chunk land on the same side. Chunk ids may be
numbered per sequence or globally unique over the batch: only equality within a
sequence matters. Tokens outside any chunk (id -1) draw their own `v`, one per
token, as without chunk ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class CompDemoInputs:
    """The split and the two teacher inputs, all `[b, l]`.

    mask_a: bool, M_A (revealed in pass 1, predicted by pass 2);
    mask_b: bool, M_B (predicted by pass 1, revealed in pass 2);
    pass1_ids: input ids with only M_B masked; pass2_ids: with only M_A masked.
    """
    mask_a: torch.Tensor
    mask_b: torch.Tensor
    pass1_ids: torch.Tensor
    pass2_ids: torch.Tensor


# --------------------------------------------------------------------------- checks
def _check_masked(masked, name="masked", shape_hint="[b, l] or [b, n_chunks]"):
    if not isinstance(masked, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {shape_hint}, got {type(masked).__name__}")
    if masked.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {masked.dtype}")
    if masked.dim() != 2:
        raise ValueError(f"{name} must be 2-D {shape_hint}, got shape {tuple(masked.shape)}")


def _check_demo_ratio(demo_ratio):
    if isinstance(demo_ratio, bool) or not isinstance(demo_ratio, (int, float)) or not 0.0 <= demo_ratio <= 1.0:
        raise ValueError(f"demo_ratio must be a float in [0, 1], got {demo_ratio!r}")
    return float(demo_ratio)


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_ids(name, ids, shape, device):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape [b, l], got {type(ids).__name__}")
    if ids.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of masked {tuple(shape)}, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} must be on {device} like masked, got {ids.device}")


# --------------------------------------------------------------------------- random numbers
def _uniform_cpu(masked, chunk_ids, generator):
    """`v [b, l]` from torch's generator: one per element, or one per (row, chunk id)."""
    v = torch.rand(masked.shape, generator=generator, device=masked.device)
    if chunk_ids is None or chunk_ids.numel() == 0:
        return v
    chunk_ids = chunk_ids.long()
    in_chunk = chunk_ids >= 0
    rows = torch.arange(masked.shape[0], device=masked.device)[:, None].expand_as(chunk_ids)
    # One key per (row, chunk id): chunk ids may repeat across rows or be unique per batch.
    key = rows * (int(chunk_ids.max().clamp(min=0)) + 1) + chunk_ids.clamp(min=0)
    unique_keys, inverse = torch.unique(key[in_chunk], return_inverse=True)
    chunk_v = torch.rand(unique_keys.shape, generator=generator, device=masked.device)
    return v.masked_scatter(in_chunk, chunk_v[inverse])


def _draw_seed(generator, device):
    """A non-negative int64 seed tensor on `device`, drawn from the generator (no host sync)."""
    seed_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=seed_device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def _split(masked, demo_ratio, input_ids, mask_token_id, chunk_ids, generator, use_triton=None):
    """Returns `(mask_a, mask_b, pass1_ids, pass2_ids)`; the ids are None without input_ids.

    use_triton: None = Triton on CUDA tensors, torch's generator otherwise (True lets the
    tests run the kernel on CPU under TRITON_INTERPRET=1).
    """
    if masked.is_cuda if use_triton is None else use_triton:
        from .kernels import complementary_split as split_kernels
        return split_kernels.philox_split(masked, demo_ratio, _draw_seed(generator, masked.device),
                                          input_ids=input_ids, mask_token_id=mask_token_id,
                                          chunk_ids=chunk_ids)
    in_a = _uniform_cpu(masked, chunk_ids, generator) < demo_ratio
    mask_a = masked & in_a
    mask_b = masked & ~in_a
    if input_ids is None:
        return mask_a, mask_b, None, None
    fill = torch.full_like(input_ids, mask_token_id)
    return mask_a, mask_b, torch.where(mask_b, fill, input_ids), torch.where(mask_a, fill, input_ids)


# --------------------------------------------------------------------------- public
def complementary_split(masked, demo_ratio=0.5, *, generator=None):
    """Split the masked set into complementary halves `(mask_a, mask_b)`.

    masked: bool `[b, l]` (token level) or `[b, n_chunks]` (chunk level).
    `mask_a = masked & (v < demo_ratio)`, `mask_b = masked & ~(v < demo_ratio)`,
    `v ~ U(0, 1)` per element: disjoint, union `masked`, each masked element in
    mask_a with probability demo_ratio. CUDA: Philox kernel; CPU: torch's
    generator (same semantics, not bit-identical; module docstring).
    """
    _check_masked(masked)
    demo_ratio = _check_demo_ratio(demo_ratio)
    _check_generator(generator)
    mask_a, mask_b, _, _ = _split(masked, demo_ratio, None, None, None, generator)
    return mask_a, mask_b


def teacher_inputs(input_ids, masked, mask_token_id, demo_ratio=0.5, *, chunk_ids=None, generator=None):
    """The CompDemo split and the two teacher inputs for one batch.

    input_ids `[b, l]` clean teacher ids, masked bool `[b, l]`, mask_token_id an int,
    chunk_ids `[b, l]` or None (-1 = no chunk; the split is drawn per chunk and carried
    to all its tokens; tokens in no chunk draw per token).
    Returns CompDemoInputs(mask_a, mask_b, pass1_ids (only M_B masked), pass2_ids (only M_A masked)).
    """
    _check_masked(masked, shape_hint="[b, l]")
    _check_ids("input_ids", input_ids, masked.shape, masked.device)
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
    demo_ratio = _check_demo_ratio(demo_ratio)
    _check_generator(generator)
    if chunk_ids is not None:
        _check_ids("chunk_ids", chunk_ids, masked.shape, masked.device)
        if chunk_ids.numel() and int(chunk_ids.min()) < -1:
            raise ValueError(f"chunk_ids must be >= 0 (a chunk) or -1 (no chunk), got min {int(chunk_ids.min())}")
    mask_a, mask_b, pass1_ids, pass2_ids = _split(masked, demo_ratio, input_ids, mask_token_id, chunk_ids,
                                                  generator)
    return CompDemoInputs(mask_a=mask_a, mask_b=mask_b, pass1_ids=pass1_ids, pass2_ids=pass2_ids)


def merge_teacher_hidden(hidden_pass1, hidden_pass2, mask_a):
    """Merged teacher hidden states `[b, l, d]`: pass 2 at M_A, pass 1 everywhere else.

    hidden_pass1 / hidden_pass2 `[b, l, d]` final hidden states of the two passes,
    mask_a bool `[b, l]`.
    """
    for name, hidden in (("hidden_pass1", hidden_pass1), ("hidden_pass2", hidden_pass2)):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"{name} must be a torch.Tensor of shape [b, l, d], got "
                             f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    if hidden_pass1.shape != hidden_pass2.shape:
        raise ValueError(f"hidden_pass1 {tuple(hidden_pass1.shape)} and hidden_pass2 "
                         f"{tuple(hidden_pass2.shape)} must have the same shape")
    if hidden_pass1.dtype != hidden_pass2.dtype:     # torch.where would promote silently
        raise TypeError(f"hidden_pass1 ({hidden_pass1.dtype}) and hidden_pass2 ({hidden_pass2.dtype}) "
                        f"must have the same dtype (the same teacher, run twice)")
    _check_masked(mask_a, name="mask_a", shape_hint="[b, l]")
    if tuple(mask_a.shape) != tuple(hidden_pass1.shape[:2]):
        raise ValueError(f"mask_a must have shape [b, l] = {tuple(hidden_pass1.shape[:2])}, got {tuple(mask_a.shape)}")
    return torch.where(mask_a[..., None], hidden_pass2, hidden_pass1)

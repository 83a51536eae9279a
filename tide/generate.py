"""Sampling from a trained diffusion LM, batched and exact, and its command line.

    python -m tide.generate --checkpoint out/demo/distilled/checkpoint-150 --prompt "def " --prompt "class "
    python -m tide.generate --checkpoint DIR --prompts-file prompts.jsonl --batch-size 8 --threshold 0.9

    from tide.generate import generate, infill
    new_ids = generate(model, [ids_a, ids_b], max_new_tokens=128)   # one list of new token ids per prompt
    spans = infill(model, [before_a, before_b], [5, 3], [after_a, after_b])  # fill spans between known text

BD3LM (block diffusion). The answer grows one block of `block_size` positions
at a time, left to right. A block starts as the mask token wherever it is not
prompt (a prompt that ends inside a block keeps its tokens there, fixed; in the
last block, positions past `max_new_tokens` stay masked and are not written) and
is revealed over denoising steps: at each step the model runs on the current
block, which sees the clean earlier blocks and itself (SPEC.md: x_t -> x_0 of
strictly earlier blocks, x_t -> x_t of the same block), and some masked
positions are written. Later blocks see a finished block's clean x_0 keys and
values (x_0 -> x_0 block-causal). Nothing else of the training layout
`[x_t, x_0]` is needed to sample: a step runs `[x_0 of earlier blocks, x_t of the
current block]` under a block-causal mask.

MDLM: the whole answer (all masks) is appended to the prompt and every position
sees every other; `block_size` there (default: the whole answer) reveals the
answer in left-to-right blocks (LLaDA's semi-autoregressive decoding).

Which masked positions a step writes (`strategy`); the tokens are the argmax,
or sampled at `temperature` after `top_k` / `top_p` filtering:
- "low_confidence" (default): the most probable tokens first, an equal share of
  what is left at each of the `steps` steps of a block (default: one per step);
- "margin": the largest gap between the first and second most probable token first;
- "random": positions in random order;
- "threshold": every masked position whose probability exceeds `threshold`, and
  at least the most probable one (Fast-dLLM's parallel decoding): the number of
  steps follows the model's confidence.
The mask token is never a candidate, so it is never emitted.

Block KV cache (BD3LM, `cache=True`, the default). The keys and values of the
clean blocks are computed once, into per-layer buffers `[b, h_kv, capacity, d]`
allocated for the whole answer, and written in place: the cache is never copied,
cropped or concatenated from step to step (only when finished rows leave the batch
are the remaining rows' entries gathered once). With grouped-query attention (fewer
key/value heads than query heads, as in Qwen3) the `h_kv` heads are read in place,
never repeated per query head: `ragged_sdpa` folds each kv head's query heads into
the query length (tested: every key SDPA reads while decoding is a view of the
buffers). A denoising step runs the current block
(queries: `block_size` positions per row) against them, writing the block's own
keys and values into its slot; the first step of a block also runs the block
finished just before, clean, whose keys and values thereby join the cache (and
the first step of all runs the prompt's whole blocks): no call is spent on
filling the cache. `cache=False` runs every clean block at every step: the same
attention pattern, and the tests check that both give the same tokens.

Ragged batches. Prompts of different lengths share a batch, right-padded: each row
keeps its own positions 0, 1, ... (column = position), its own blocks, its own step
schedule, and stops on its own at `eos_token_id` (finished rows leave the batch).
Attention runs once per group of rows of equal length, over exactly those rows'
keys: padding never enters a softmax. (SDPA's float32 result changes in the last
bits with the number of masked keys, so padding is cut off, not masked.) A row's
numbers then do not depend on its neighbours: on CPU in float32 a prompt decodes to
bit-identical hidden states and the same tokens alone or inside a batch of mixed
lengths (tested; this relies on matrix products whose row results do not depend on
the row count, true for CPU BLAS from 4 rows up; GPU GEMMs choose kernels by shape, so
there it holds only to rounding). Sampling draws from one generator per prompt
(`seed`), so sampled outputs do not depend on the batch either.

Infilling (`infill`). A row is `prefix + n masks + suffix`: the same samplers reveal
the n masked positions, the known text on both sides fixed. An MDLM sees the whole
suffix. A BD3LM sees what its attention allows: the clean earlier blocks, and the
block being denoised, which holds the suffix's first tokens when the span ends inside
a block (fixed, like the unmasked tokens of a noised block in training); suffix tokens
in later blocks are invisible to a block-diffusion model by design (a block never sees
later blocks), so they are dropped, and a span that ends on a block boundary gets no
right context. Tests check both against a slow reference sampler written on the
training forward.

Hugging Face's own `model.generate()` decodes left to right, one token per call,
with a causal mask: it is not a sampler for a diffusion LM. Use this module.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tide.models import load_model

STRATEGIES = ("low_confidence", "margin", "random", "threshold")
RAGGED_ATTENTION = "tide_ragged_sdpa"
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny  # below it 1 / temperature overflows float32


# --------------------------------------------------------------------------- attention over ragged rows
def ragged_sdpa(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """A Hugging Face attention function: one SDPA call per group of rows of equal length.

    query `[b, h, T, d]`, key / value `[b, h_kv, S, d]` -> `[b, T, h, d]`. `kwargs["tide_groups"]`:
    `(start, stop, q_from, q_len, k_from, k_len, mask)` per group of consecutive rows: their queries
    `q_from : q_from + q_len` attend to their keys `k_from : k_from + k_len` under `mask`
    (`[1, 1, q_len, k_len]` bool, True = attend; None = all). Queries outside every group (padding)
    get zeros.

    Grouped-query attention (h_kv < h, query head i reads kv head i // (h / h_kv)): the keys and
    values are never repeated. The `h / h_kv` query heads of each kv head are folded into the query
    length instead (`[rows, h_kv, (h / h_kv) * q_len, d]`, a copy of the queries only, and of the mask
    when there is one), so SDPA reads the cache in place on every backend (SDPA's `enable_gqa` falls
    back to a repeating math kernel on CUDA whenever there is a mask).
    """
    b, h, t, d = query.shape
    h_kv = key.shape[1]
    if h % h_kv:
        raise ValueError(f"ragged_sdpa: {h} query heads is not a multiple of {h_kv} key/value heads")
    repeat = h // h_kv
    out = query.new_zeros(b, t, h, d)
    for start, stop, q_from, q_len, k_from, k_len, mask in kwargs["tide_groups"]:
        k, v = key[start:stop, :, k_from:k_from + k_len], value[start:stop, :, k_from:k_from + k_len]
        q = query[start:stop, :, q_from:q_from + q_len]
        if repeat > 1:  # [rows, h, q_len, d] -> [rows, h_kv, repeat * q_len, d]
            q = q.reshape(stop - start, h_kv, repeat * q_len, d)
            mask = None if mask is None else mask.repeat(1, 1, repeat, 1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        out[start:stop, q_from:q_from + q_len] = att.reshape(stop - start, h, q_len, d).transpose(1, 2)
    return out, None


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(RAGGED_ATTENTION, ragged_sdpa)


@functools.lru_cache(maxsize=256)
def _block_causal(q_start: int, q_len: int, k_len: int, block: int, device: str) -> torch.Tensor | None:
    """`[1, 1, q_len, k_len]` bool for queries at positions `q_start..` and keys at `0..k_len-1`: the
    key's block <= the query's block. None when every query sees every key."""
    q_blocks = torch.arange(q_start, q_start + q_len, device=device) // block
    allowed = (torch.arange(k_len, device=device) // block)[None, :] <= q_blocks[:, None]
    return None if bool(allowed.all()) else allowed[None, None]


def _runs(values: list) -> list[tuple[int, int, object]]:
    """Consecutive equal values -> `(start, stop, value)`."""
    runs = []
    for i, value in enumerate(values):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], i + 1, value)
        else:
            runs.append((i, i + 1, value))
    return runs


class BlockKVCache:
    """Keys and values of the clean blocks, `[b, h_kv, capacity, d]` per layer, written in place.

    Before each forward, `writes` says where each group of rows puts the keys and values of the
    positions it runs: `(start, stop, q_from, offset)`: its queries `q_from:` go to `offset:`.
    `update` (called by every attention layer) copies them into the buffers and hands back the
    whole buffers; `ragged_sdpa` reads each group's first `k_len` entries. Nothing is ever
    concatenated or cropped; `keep(rows)` drops finished rows.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.keys, self.values = [None] * num_layers, [None] * num_layers
        self.capacity = capacity
        self.writes: list[tuple[int, int, int, int]] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:  # zeros: never-written entries are finite (and never read)
            b, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(b, h, self.capacity, d)
            self.values[layer_idx] = value_states.new_zeros(b, h, self.capacity, d)
        keys, values, width = self.keys[layer_idx], self.values[layer_idx], key_states.shape[2]
        for start, stop, q_from, offset in self.writes:
            end = offset + width - q_from
            keys[start:stop, :, offset:end] = key_states[start:stop, :, q_from:]
            values[start:stop, :, offset:end] = value_states[start:stop, :, q_from:]
        return keys, values

    def keep(self, rows: torch.Tensor) -> None:
        self.keys = [k if k is None else k[rows] for k in self.keys]
        self.values = [v if v is None else v[rows] for v in self.values]


def _forward(model, ids, positions, groups, cache=None) -> torch.Tensor:
    """Final hidden states `[b, T, d]` of `ids` `[b, T]` at `positions` (`[b, T]` or `[1, T]`)."""
    out = model.backbone(input_ids=ids, position_ids=positions, cache=cache, use_cache=cache is not None,
                         tide_groups=groups)
    return out.last_hidden_state


# --------------------------------------------------------------------------- which positions, which tokens
class _Reveal:
    """One denoising step's choice: tokens for the open positions, and which of them to write."""

    def __init__(self, head_weight, mask_token_id, strategy, threshold, temperature, top_k, top_p):
        self.weight = head_weight.float()  # [V, d], converted once per generate call
        self.mask_token_id, self.strategy, self.threshold = mask_token_id, strategy, threshold
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, hidden, tokens, open_, quota, generators) -> None:
        """hidden `[b, W, d]`; tokens `[b, W]`, written in place; open_ `[b, W]` bool (masked and
        eligible); quota `[b]` positions to write per row (ignored by "threshold"); generators: one
        per row (or None when nothing is random)."""
        logits = hidden.float() @ self.weight.T                       # [b, W, V]
        logits[..., self.mask_token_id] = float("-inf")
        drawing = open_.any(1).tolist()                               # rows that draw random numbers
        if self.temperature == 0:
            probs = logits.softmax(-1)
            choice = probs.argmax(-1)
        else:
            logits = (logits - logits.amax(-1, keepdim=True)) / self.temperature
            if self.top_k is not None and self.top_k < logits.shape[-1]:
                kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if self.top_p is not None and self.top_p < 1:
                ranked, order = logits.sort(-1, descending=True)
                ranked_probs = ranked.softmax(-1)
                drop = (ranked_probs.cumsum(-1) - ranked_probs) >= self.top_p  # mass before it already >= p
                logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
            probs = logits.softmax(-1)
            gumbel = torch.zeros_like(logits)                         # Gumbel-max: a draw from probs
            for row, draws in enumerate(drawing):
                if draws:
                    u = torch.rand(logits.shape[1:], generator=generators[row], device=logits.device)
                    gumbel[row] = -torch.log(-torch.log(u))
            choice = (logits + gumbel).argmax(-1)
        confidence = probs.gather(-1, choice[..., None])[..., 0]      # [b, W]
        if self.strategy == "margin":
            top2 = probs.topk(2, dim=-1).values
            score = top2[..., 0] - top2[..., 1]
        elif self.strategy == "random":
            score = torch.zeros_like(confidence)
            for row, draws in enumerate(drawing):
                if draws:
                    score[row] = torch.rand(score.shape[1], generator=generators[row], device=score.device)
        else:
            score = confidence
        score = score.masked_fill(~open_, float("-inf"))
        rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        if self.strategy == "threshold":
            write = open_ & ((score > self.threshold) | (rank == 0))
        else:
            write = open_ & (rank < quota[:, None])
        tokens[write] = choice[write]


def _quota(remaining, n_steps, step):
    """Positions to write now per row: an equal share of what is left over the steps left."""
    left = (n_steps - step).clamp(min=1)
    return (remaining + left - 1) // left


# --------------------------------------------------------------------------- the samplers
def _bd3lm(model, prompts, n_new, suffixes, block, steps, reveal, eos, use_cache, generators):
    """Row i writes `n_new[i]` positions after `prompts[i]`; `suffixes[i]`: the clean tokens after
    them (infill), of which the ones inside the last written block are placed there, fixed and seen
    by that block (the rest lies in later blocks: never seen, dropped).

    Each forward runs, per row, `[clean blocks not yet in the cache, the current block]` under the
    block-causal mask: with the cache that is the prompt's whole blocks at the first step, the block
    finished just before at the first step of each later block (its clean keys and values join the
    cache in the same call), and the current block alone otherwise; without the cache it is every
    clean block, at every step. Rows are left-aligned on the current block: it is the last `block`
    columns of every row."""
    device, mask_id = model.lm_head_weight.device, model.mask_token_id
    b = len(prompts)
    n_blocks = [-(-(len(p) + n) // block) for p, n in zip(prompts, n_new)]  # blocks of each row at the end
    seq = torch.full((b, max(n_blocks) * block), mask_id, device=device)  # every row at its positions
    for row, (prompt, n, suffix) in enumerate(zip(prompts, n_new, suffixes)):
        seq[row, :len(prompt)] = torch.tensor(prompt, device=device, dtype=torch.long)
        end = len(prompt) + n
        suffix = suffix[:n_blocks[row] * block - end]              # the part inside the last block
        seq[row, end:end + len(suffix)] = torch.tensor(suffix, device=device, dtype=torch.long)
    current = [len(p) // block for p in prompts]                   # the block each row is writing
    cached = [0] * b                                               # positions in the KV cache per row
    rows = list(range(b))                                          # batch slot -> prompt index
    out = [[] for _ in prompts]
    offsets = torch.arange(block, device=device)
    kv = BlockKVCache(model.config.num_hidden_layers, seq.shape[1]) if use_cache else None

    def run(cur):
        """The hidden states `[b, block, d]` of the current blocks `cur` `[b, block]`."""
        starts = [j * block for j in current]
        firsts = [c for c in cached]                               # first position each row runs
        width = max(s + block - f for s, f in zip(starts, firsts))
        ids = torch.full((len(rows), width), mask_id, device=device)
        positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        groups, writes = [], []
        for a, z, (first, s) in _runs(list(zip(firsts, starts))):
            n = s + block - first
            ids[a:z, width - n:width - block] = seq[a:z, first:s]
            positions[a:z, width - n:] = torch.arange(first, s + block, device=device)
            mask = _block_causal(first, n, s + block, block, str(device))
            groups.append((a, z, width - n, n, 0 if use_cache else width - n, s + block, mask))
            writes.append((a, z, width - n, first))
        ids[:, width - block:] = cur
        if use_cache:
            kv.writes = writes
        hidden = _forward(model, ids, positions, groups, kv)
        if use_cache:
            cached[:] = starts                                     # the clean blocks are in; the current one is not
        return hidden[:, width - block:]

    while rows:
        starts = [j * block for j in current]
        index = torch.tensor(starts, device=device)[:, None] + offsets   # [b, block] positions of the block
        cur = seq.gather(1, index)
        ends = torch.tensor([len(prompts[row]) + n_new[row] for row in rows], device=device)
        wanted = index < ends[:, None]                             # past the answer: stays masked, unwritten
        open_ = (cur == mask_id) & wanted
        n_steps = open_.sum(1) if steps is None else open_.sum(1).clamp(max=steps)
        step = torch.zeros_like(n_steps)
        while True:
            remaining = open_.sum(1)
            if not bool(remaining.any()):
                break
            reveal(run(cur), cur, open_, _quota(remaining, n_steps, step), generators)
            step += remaining > 0
            open_ = (cur == mask_id) & wanted
        seq.scatter_(1, index, cur)
        keep = []
        for slot, (row, values) in enumerate(zip(rows, cur.tolist())):
            out[row] += values[max(len(prompts[row]) - starts[slot], 0):]
            current[slot] += 1
            stopped = eos is not None and eos in out[row][:n_new[row]]
            if current[slot] < n_blocks[row] and not stopped:
                keep.append(slot)
        if len(keep) < len(rows):                                  # finished rows leave the batch
            rows, current, cached = [rows[s] for s in keep], [current[s] for s in keep], [cached[s] for s in keep]
            generators = [generators[s] for s in keep] if generators else None
            index_keep = torch.tensor(keep, device=device, dtype=torch.long)
            seq = seq[index_keep]
            if use_cache:
                kv.keep(index_keep)
    return out


def _mdlm(model, prompts, n_new, suffixes, block, steps, reveal, eos, generators):
    """Row i: `prompts[i]`, `n_new[i]` masks, `suffixes[i]`, every position seeing every other; the
    masks are revealed in blocks of `block` (default: the longest answer, i.e. one block)."""
    device, mask_id = model.lm_head_weight.device, model.mask_token_id
    block = block or max(n_new)
    n_blocks = [-(-n // block) for n in n_new]
    lengths = [len(p) + n + len(s) for p, n, s in zip(prompts, n_new, suffixes)]  # keys each row sees
    width = max(max(len(p) + k * block, total) for p, k, total in zip(prompts, n_blocks, lengths))
    seq = torch.full((len(prompts), width), mask_id, device=device)  # a cut last block's window fits
    for row, (prompt, n, suffix) in enumerate(zip(prompts, n_new, suffixes)):
        seq[row, :len(prompt)] = torch.tensor(prompt, device=device, dtype=torch.long)
        seq[row, len(prompt) + n:lengths[row]] = torch.tensor(suffix, device=device, dtype=torch.long)
    rows = list(range(len(prompts)))
    offsets = torch.arange(block, device=device)
    out = [None] * len(prompts)
    for j in range(max(n_blocks)):
        if not rows:
            break
        groups = [(a, z, 0, n, 0, n, None) for a, z, n in _runs([lengths[row] for row in rows])]
        index = torch.tensor([len(prompts[row]) + j * block for row in rows], device=device)[:, None] + offsets
        left = torch.tensor([n_new[row] - j * block for row in rows], device=device)
        in_answer = offsets[None] < left[:, None]                   # the last block may be cut
        cur = seq.gather(1, index)
        open_ = (cur == mask_id) & in_answer
        n_steps = open_.sum(1) if steps is None else open_.sum(1).clamp(max=steps)
        step = torch.zeros_like(n_steps)
        while True:
            remaining = open_.sum(1)
            if not bool(remaining.any()):
                break
            hidden = _forward(model, seq, torch.arange(width, device=device)[None], groups)
            hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            reveal(hidden, cur, open_, _quota(remaining, n_steps, step), generators)
            seq.scatter_(1, index, cur)
            step += remaining > 0
            open_ = (cur == mask_id) & in_answer
        keep = []
        for slot, row in enumerate(rows):
            out[row] = seq[slot, len(prompts[row]):len(prompts[row]) + n_new[row]].tolist()
            written = out[row][:(j + 1) * block]
            if j + 1 < n_blocks[row] and not (eos is not None and eos in written):
                keep.append(slot)
        if len(keep) < len(rows):
            rows = [rows[s] for s in keep]
            generators = [generators[s] for s in keep] if generators else None
            seq = seq[torch.tensor(keep, device=device, dtype=torch.long)]
    return out


# --------------------------------------------------------------------------- public entry point
def _bad(name: str, expected: str, value) -> ValueError:
    error = ValueError(f"{name} must be {expected}, got {value!r}")
    error.argument = name
    return error


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(max_new_tokens=64, block_size=None, steps=None, strategy="low_confidence", threshold=None,
                  temperature=0.0, top_k=None, top_p=None) -> None:
    """The checks `generate` makes of its options (also run by the CLI before loading a model):
    ValueError naming the argument and its range."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise _bad("max_new_tokens", "an int >= 1", max_new_tokens)
    if block_size is not None and (not _is_int(block_size) or block_size < 1):
        raise _bad("block_size", "None or an int >= 1", block_size)
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise _bad("steps", "None (one token per step) or an int >= 1", steps)
    if strategy not in STRATEGIES:
        raise _bad("strategy", f"one of {STRATEGIES}", strategy)
    if strategy == "threshold":
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
            raise _bad("threshold", "a number in (0, 1] with strategy='threshold'", threshold)
        if steps is not None:
            raise _bad("steps", "None with strategy='threshold' (the threshold decides the steps)", steps)
    elif threshold is not None:
        raise _bad("threshold", f"None unless strategy='threshold' (strategy is {strategy!r})", threshold)
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature)
            or temperature < 0 or 0 < temperature < MIN_TEMPERATURE):
        raise _bad("temperature", f"0 (greedy) or a finite number >= {MIN_TEMPERATURE:.3g}", temperature)
    if top_k is not None and (not _is_int(top_k) or top_k < 1 or temperature == 0):
        raise _bad("top_k", "None, or an int >= 1 with temperature > 0 (greedy has no top-k)", top_k)
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                              or not 0 < top_p <= 1 or temperature == 0):
        raise _bad("top_p", "None, or a number in (0, 1] with temperature > 0 (greedy has no top-p)", top_p)


def _check_model(model) -> None:
    from tide.models import BD3LM, MDLM

    if not isinstance(model, (BD3LM, MDLM)):  # custom-code teachers run their own attention code
        raise TypeError(f"model must be a tide BD3LM or MDLM (tide.models.build_model / load_model over a "
                        f"Hugging Face decoder), got {type(model).__name__}")


def _token_lists(model, lists, name: str, noun: str, allow_empty_list: bool = False) -> list[list[int]]:
    """`lists` (a list of lists of token ids; `name` its plural, `noun` one of them) checked, as lists:
    TypeError / ValueError naming `name`."""
    if isinstance(lists, (str, bytes)) or not isinstance(lists, Sequence) or torch.is_tensor(lists):
        raise TypeError(f"{name} must be a list of {name}, each a list of token ids; got {type(lists).__name__}")
    if len(lists) == 0 and not allow_empty_list:
        raise ValueError(f"{name} must hold at least one {noun}, got an empty list")
    if any(_is_int(x) for x in lists):
        raise TypeError(f"{name} must be a list of {name}, each a list of token ids (for one {noun} pass [ids]); "
                        "got a flat list of ints")
    vocab = model.vocab_size
    lists = [list(x) for x in lists]
    for i, ids in enumerate(lists):
        if not all(_is_int(t) and 0 <= t < vocab for t in ids):
            raise ValueError(f"{name}[{i}] must hold token ids in [0, {vocab}), got {ids}")
        if model.mask_token_id in ids:
            raise ValueError(f"{name}[{i}] holds the mask token id {model.mask_token_id}: a {noun} is clean text")
    return lists


def _seeds(seed, n: int) -> list[int]:
    seeds = [seed + i for i in range(n)] if _is_int(seed) else list(seed) if isinstance(seed, Sequence) else None
    if seeds is None or len(seeds) != n or not all(map(_is_int, seeds)):
        raise _bad("seed", f"an int or one int per row ({n})", seed)
    return seeds


def _sample(model, prefixes, n_new, suffixes, *, block_size, steps, strategy, threshold, temperature, top_k, top_p,
            eos_token_id, seeds, cache) -> list[list[int]]:
    """The checked rows through the sampler of the model's kind, in the caller's order."""
    # rows sorted so that rows attending alike are neighbours, one attention call per group: BD3LM by
    # prefix length (the same blocks), MDLM by the length of the whole row (the same keys)
    if model.kind == "bd3lm":
        block_size = block_size or model.block_size
        lengths = [len(p) for p in prefixes]
    else:
        lengths = [len(p) + n + len(s) for p, n, s in zip(prefixes, n_new, suffixes)]
    order = sorted(range(len(prefixes)), key=lengths.__getitem__)
    device = model.lm_head_weight.device
    generators = None
    if temperature > 0 or strategy == "random":
        generators = [torch.Generator(device=device).manual_seed(seeds[i]) for i in order]
    reveal = _Reveal(model.lm_head_weight, model.mask_token_id, strategy, threshold, temperature, top_k, top_p)
    rows = ([prefixes[i] for i in order], [n_new[i] for i in order], [suffixes[i] for i in order])
    _register_attention()
    previous = model.attn_implementation
    model.decoder.set_attn_implementation(RAGGED_ATTENTION)
    try:
        if model.kind == "bd3lm":
            new = _bd3lm(model, *rows, block_size, steps, reveal, eos_token_id, cache, generators)
        else:
            new = _mdlm(model, *rows, block_size, steps, reveal, eos_token_id, generators)
    finally:
        model.decoder.set_attn_implementation(previous)
    outputs = [None] * len(prefixes)
    for i, ids in zip(order, new):
        outputs[i] = ids[:n_new[i]]
    return outputs


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *, block_size: int | None = None,
             steps: int | None = None, strategy: str = "low_confidence", threshold: float | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, seed: int | Sequence[int] = 0, cache: bool = True) -> list[list[int]]:
    """A batch of prompts (lists of token ids, any lengths) -> one list of new token ids per prompt.

    model: a tide BD3LM or MDLM (`tide.models`). Each output has `max_new_tokens` ids, or stops
    before the first `eos_token_id` (a row stops at the end of the block holding it; the others go on).
    block_size: BD3LM: the decoding block (default: the model's); MDLM: semi-autoregressive blocks
        over the answer (default: the whole answer in one block).
    steps: denoising steps per block (default: one per masked position); not with "threshold".
    strategy: "low_confidence" | "margin" | "random" | "threshold" (see the module docstring);
        threshold: the probability above which "threshold" writes a position, in (0, 1].
    temperature: 0 = greedy; > 0 samples (after `top_k`, `top_p`) from one generator per prompt,
        seeded `seed + i` for prompt i (or `seed[i]` when `seed` is a list).
    cache: BD3LM block KV cache (MDLM has none: every position sees every other).
    To fill a span with text on both sides, see `infill`.
    """
    _check_model(model)
    check_options(max_new_tokens, block_size, steps, strategy, threshold, temperature, top_k, top_p)
    prompts = _token_lists(model, prompts, "prompts", "prompt")
    if eos_token_id is not None and (not _is_int(eos_token_id) or not 0 <= eos_token_id < model.vocab_size):
        raise _bad("eos_token_id", f"None or a token id in [0, {model.vocab_size})", eos_token_id)
    seeds = _seeds(seed, len(prompts))
    outputs = _sample(model, prompts, [max_new_tokens] * len(prompts), [[] for _ in prompts], block_size=block_size,
                      steps=steps, strategy=strategy, threshold=threshold, temperature=temperature, top_k=top_k,
                      top_p=top_p, eos_token_id=eos_token_id, seeds=seeds, cache=cache)
    return [ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids for ids in outputs]


@torch.no_grad()
def infill(model, prefixes: Sequence[Sequence[int]], span_lengths: int | Sequence[int],
           suffixes: Sequence[Sequence[int]] | None = None, *, block_size: int | None = None,
           steps: int | None = None, strategy: str = "low_confidence", threshold: float | None = None,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | Sequence[int] = 0, cache: bool = True) -> list[list[int]]:
    """Fill masked spans between known text: row i is `prefixes[i] + span_lengths[i] masks +
    suffixes[i]` (token ids); returns the `span_lengths[i]` tokens written into each span.

    What the model sees of the right context (`suffixes`):
    - MDLM: all of it (every position sees every other, as in training).
    - BD3LM: only the suffix tokens that fall inside the span's last block (positions counted from
      the prefix's first token, blocks of `block_size`): they sit in the block being denoised, clean
      and fixed, exactly as unmasked tokens of a noised block in training. Tokens in later blocks are
      invisible to a block-diffusion model by design (a block sees only earlier blocks and itself) and
      are dropped. A span that ends on a block boundary sees no right context at all.
    The span's positions are revealed as in `generate` (same `block_size`, `steps`, `strategy`,
    `threshold`, `temperature`, `top_k`, `top_p`, `seed`, `cache`; MDLM's default block is the whole
    span). With no suffixes (or empty ones) and equal span lengths this is `generate` without EOS.
    span_lengths: an int >= 1 for every row, or one per row.
    """
    _check_model(model)
    prefixes = _token_lists(model, prefixes, "prefixes", "prefix")
    lengths = [span_lengths] * len(prefixes) if _is_int(span_lengths) else span_lengths
    if (isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or len(lengths) != len(prefixes)
            or not all(_is_int(n) and n >= 1 for n in lengths)):
        raise _bad("span_lengths", f"an int >= 1 or one int >= 1 per prefix ({len(prefixes)})", span_lengths)
    lengths = list(lengths)
    check_options(max(lengths), block_size, steps, strategy, threshold, temperature, top_k, top_p)
    if suffixes is None:
        suffixes = [[] for _ in prefixes]
    suffixes = _token_lists(model, suffixes, "suffixes", "suffix", allow_empty_list=True)
    if len(suffixes) != len(prefixes):
        raise _bad("suffixes", f"None or one list of token ids per prefix ({len(prefixes)})", f"{len(suffixes)} lists")
    seeds = _seeds(seed, len(prefixes))
    return _sample(model, prefixes, lengths, suffixes, block_size=block_size, steps=steps, strategy=strategy,
                   threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=None,
                   seeds=seeds, cache=cache)


# --------------------------------------------------------------------------- command line
def read_prompts(path: str) -> list:
    """Prompts from a file: one per line (blank lines skipped), or JSONL (`.jsonl`): per line a JSON
    string, or an object with "prompt" (a string) or "messages" (a chat, for the chat template)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts-file: no such file {path!r}")
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if not path.endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--prompts-file {path} line {number}: not JSON ({exc})") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = item["prompt"]
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            item = item["messages"]
        if not isinstance(item, (str, list)):
            raise ValueError(f"--prompts-file {path} line {number}: expected a string or an object with "
                             f"\"prompt\" (string) or \"messages\" (list), got {line[:80]!r}")
        prompts.append(item)
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tide.generate",
                                     description="Sample from a tide checkpoint (BD3LM block diffusion or MDLM).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a local tide checkpoint directory (never a hub id)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--prompts-file", default=None,
                        help="one prompt per line, or .jsonl: a string or {\"prompt\": ...} or {\"messages\": [...]}")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=None,
                        help="BD3LM: decoding block (default: the model's); MDLM: blocks over the answer")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: one per token)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="which positions a step writes (default: low_confidence, or threshold with --threshold)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="threshold decoding: write every position whose probability exceeds this")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i (any batch size)")
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence at every step")
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--device", default="auto")
    return parser


def main(argv: list[str] | None = None) -> list[str]:
    """The CLI: prints each prompt with its completion; returns the completions."""
    parser = build_parser()
    args = parser.parse_args(argv)
    strategy = args.strategy or ("threshold" if args.threshold is not None else "low_confidence")
    try:
        check_options(args.max_new_tokens, args.block_size, args.steps, strategy, args.threshold, args.temperature,
                      args.top_k, args.top_p)
    except ValueError as exc:
        parser.error(f"argument --{exc.argument.replace('_', '-')}: {exc}")
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: must be an int >= 1, got {args.batch_size}")
    if not os.path.isdir(args.checkpoint) or not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        parser.error(f"argument --checkpoint: {args.checkpoint!r} is not a local checkpoint directory "
                     "(no config.json there; hub ids are not looked up)")
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += read_prompts(args.prompts_file)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    if not prompts:
        parser.error("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE (with at least one prompt)")
    from transformers import AutoTokenizer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_model(args.checkpoint, device=device).eval()
    except ValueError as exc:
        parser.error(f"argument --checkpoint: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    if (args.chat or any(isinstance(p, list) for p in prompts)) and not tokenizer.chat_template:
        parser.error(f"--chat / \"messages\" prompts: the tokenizer in {args.checkpoint} has no chat template")
    texts, ids = [], []
    for prompt in prompts:
        if isinstance(prompt, list) or args.chat:
            chat = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        texts.append(prompt)
        ids.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    eos = getattr(model.config, "eos_token_id", None)  # written by tide.train; else the tokenizer's
    eos = eos if isinstance(eos, int) else tokenizer.eos_token_id
    completions = []
    for start in range(0, len(ids), args.batch_size):
        batch = ids[start:start + args.batch_size]
        new = generate(model, batch, args.max_new_tokens, block_size=args.block_size, steps=args.steps,
                       strategy=strategy, threshold=args.threshold, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_token_id=eos, seed=[args.seed + start + i for i in range(len(batch))],
                       cache=not args.no_cache)
        for text, new_ids in zip(texts[start:start + args.batch_size], new):
            completion = tokenizer.decode(new_ids, skip_special_tokens=True)
            completions.append(completion)
            if args.jsonl:
                print(json.dumps({"prompt": text, "completion": completion, "new_tokens": len(new_ids)}), flush=True)
            else:
                print(text + completion, flush=True)
    return completions


if __name__ == "__main__":
    main()

"""Held-out evaluation of tide diffusion LMs: the diffusion ELBO in bits per byte, with error bars.

    python -m tide.evaluate --checkpoint out/demo/distilled/checkpoint-150 --data out/demo/held_out --samples 8
    result = elbo(model, ["some text", ...], tokenizer=tok, samples=8, seed=0)   # -> Result

Bits per UTF-8 byte of the original text compare models with different tokenizers on
the same footing; per token and as a perplexity bound it compares models that share one.

The estimate (SPEC.md: linear schedule, mask ratio t, weight 1/t). For one sequence of
L maskable tokens the MDLM negative ELBO is
`NELBO = int_0^1 (1/t) E[ sum over masked i of -log p(x_i | x_t) ] dt`. Conditioning on
the number n of masked tokens (Binomial(L, t)) and integrating t out gives exactly
`NELBO = E_{n ~ U{1..L}} [ (L/n) E_{|M|=n} sum_{i in M} -log p(x_i | x_M) ]`: n masked
tokens drawn uniformly without replacement, weight L/n (the form LLaDA evaluates with).
No t-floor (eps) is needed and the weight never exceeds L.
BD3LM: the block-diffusion NELBO is the sum over blocks of the same quantity for each
block, its masked positions conditioned on the clean earlier blocks; one forward pass on
`[x_t, x_0]` (the training layout) scores every block at once, each block with its own n.
MDLM is the case of one block spanning the sequence.

Variance reduction and determinism: each text window gets `samples` (K) masks; per block,
the K mask counts are stratified (`n = floor(L * (j + u) / K) + 1` for the strata j = 0..K-1
in a random order, u ~ U[0, 1)), so every sample count spreads the counts evenly over
1..L. All draws for window w come from a CPU generator seeded by (seed, w): the result
does not depend on the batch size or the device. The reported standard error is the Monte
Carlo error of the mean over the K masks, sum over windows of the per-window sample
variance / K (conservative under stratification; needs K >= 2, NaN for K = 1).

Masked rows go through the fused `tide.token_logprobs` (hidden states and LM-head weight,
no `[batch, length, V]` logits), under `torch.no_grad`, in bf16 autocast on CUDA.

Data: a text file, a folder of .txt/.md/.py files (`tide.data.load_texts`), a chat JSON/JSONL
file with a `messages` column (`tide.data.load_chat_dataset`; only assistant content is
scored, conditioned on the rest), or in Python a list of texts / conversations. Long texts
are cut into windows of `seq_len` tokens (each scored independently). The scored tokens are
what `tide.data` trains (maskable): the content, and its closing tokens (the EOS after a
document, the end-of-turn marker after an assistant message); bytes count the UTF-8 bytes of
the content (the whole text; assistant contents as rendered for chat).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
from typing import Sequence

import torch

from tide.losses import token_logprobs

__all__ = ["Result", "InfillResult", "elbo", "sequence_nelbo", "infill", "infill_spans", "load_checkpoint",
           "load_records", "trained_seq_len", "main"]

TEXT_SUFFIXES = (".txt", ".md", ".py")
DEFAULT_MAX_SEQ_LEN = 1024


@dataclasses.dataclass
class Result:
    """An ELBO estimate over a data set (totals over every scored token)."""
    bits_per_byte: float          # negative ELBO in bits / UTF-8 bytes of the scored text
    bits_per_byte_se: float       # its Monte Carlo standard error (NaN when samples == 1)
    bits_per_token: float
    bits_per_token_se: float
    nats_per_token: float
    perplexity_bound: float       # exp(nats_per_token): an upper bound on the perplexity
    tokens: int                   # scored (maskable) tokens
    bytes: int                    # UTF-8 bytes of the scored text
    windows: int                  # sequences of at most seq_len tokens that were scored
    seq_len: int                  # window length in tokens
    samples: int                  # masks per window (K)
    seed: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.bits_per_byte:.4f} ± {self.bits_per_byte_se:.4f} bits/byte, "
                f"{self.bits_per_token:.4f} ± {self.bits_per_token_se:.4f} bits/token, perplexity <= "
                f"{self.perplexity_bound:.3f} ({self.tokens} tokens, {self.bytes} bytes, {self.windows} windows of "
                f"<= {self.seq_len} tokens, {self.samples} samples, seed {self.seed})")


# --------------------------------------------------------------------------- loading
def load_checkpoint(path, *, device="cpu", dtype=None):
    """A tide checkpoint directory (what `tide.train` writes: student or teacher, BD3LM or
    MDLM) -> `(model in eval mode, tokenizer)`. Only local directories: a path that does not
    exist is an error, never a hub lookup. `dtype`: default bf16 on CUDA, float32 otherwise."""
    from transformers import AutoTokenizer

    from tide.models import load_model

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is not a local directory (a missing path is never looked up "
                         "on the Hugging Face hub)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"checkpoint {path!r} has no config.json: not a model directory")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    if config.get("tide_kind") not in ("bd3lm", "mdlm") or config.get("mask_token_id") is None:
        raise ValueError(f"checkpoint {path!r} is not a tide model: its config.json lacks tide_kind "
                         f"('bd3lm' or 'mdlm') and mask_token_id (got tide_kind={config.get('tide_kind')!r}); "
                         "evaluate a directory written by tide.train or DiffusionLM.save_pretrained")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(path, device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def trained_seq_len(path) -> int | None:
    """The `seq_len` a `tide.train` checkpoint was trained with (its trainer_state.json), else None.
    Plain JSON: nothing in a checkpoint is ever unpickled."""
    state_path = os.path.join(os.fspath(path), "trainer_state.json")
    if not os.path.isfile(state_path):
        return None
    with open(state_path, encoding="utf-8") as fh:
        state = json.load(fh)
    return state.get("config", {}).get("seq_len") if isinstance(state, dict) else None


def load_records(path) -> list:
    """Records from `--data`: texts of a file or folder, or the conversations of a chat
    .json/.jsonl file (a `messages` column). Reuses tide.data's readers."""
    from tide.data import load_chat_dataset, load_texts

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"data path {path!r} does not exist")
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        records = list(load_chat_dataset(path)["messages"])
    else:
        records = load_texts(path, suffixes=TEXT_SUFFIXES)
    if not records or all(isinstance(r, str) and not r.strip() for r in records):
        raise ValueError(f"data path {path!r} holds no text (folders are read for {', '.join(TEXT_SUFFIXES)} files)")
    return records


# --------------------------------------------------------------------------- examples -> windows
def _record_bytes(record, tokenizer) -> int:
    """UTF-8 bytes of what a record scores: the text, or the assistant contents as rendered."""
    from tide.data import render_chat

    if isinstance(record, dict):
        record = record.get("messages", record.get("text"))
    if isinstance(record, str):
        return len(record.encode("utf-8"))
    rendered = render_chat(record, tokenizer)
    return sum(len(rendered.text[s[0]:s[1]].encode("utf-8"))
               for m, s in zip(record, rendered.content_spans) if m["role"] == "assistant" and s is not None)


def _windows(records: Sequence, tokenizer, seq_len: int):
    """`[(ids [l], maskable [l])]` windows of at most seq_len tokens with something to score, and the bytes."""
    from tide.data import DistillationDataset

    dataset = DistillationDataset(records, student_tokenizer=tokenizer)
    windows, total_bytes = [], 0
    for index in range(len(dataset)):
        example = dataset[index]
        total_bytes += _record_bytes(dataset.records[index], tokenizer)
        ids = torch.tensor(example.student_input_ids, dtype=torch.long)
        maskable = torch.tensor(example.student_maskable, dtype=torch.bool)
        for start in range(0, len(ids), seq_len):
            if maskable[start:start + seq_len].any():
                windows.append((ids[start:start + seq_len], maskable[start:start + seq_len]))
    return windows, total_bytes


def _masks(maskable: torch.Tensor, block_size: int, samples: int, generator: torch.Generator):
    """K stratified masks for one window: `masked [K, l]` bool and the weight `[K, l]` (L_b / n)."""
    length = maskable.shape[0]
    masked = torch.zeros(samples, length, dtype=torch.bool)
    weight = torch.zeros(samples, length)
    for start in range(0, length, block_size):
        positions = maskable[start:start + block_size].nonzero(as_tuple=True)[0] + start
        count = positions.numel()
        strata = torch.randperm(samples, generator=generator).double()
        u = torch.rand(samples, generator=generator, dtype=torch.float64)
        n = torch.clamp((count * (strata + u) / samples).floor().long() + 1, max=count)  # [K] in 1..L_b
        priority = torch.rand(samples, count, generator=generator)
        if count == 0:
            continue
        rank = priority.argsort(dim=1).argsort(dim=1)                                       # [K, L_b]
        chosen = rank < n[:, None]
        masked[:, positions] = chosen
        weight[:, positions] = torch.where(chosen, count / n[:, None].float(), 0.0)
    return masked, weight


def _default_seq_len(model, seq_len: int | None) -> int:
    """seq_len checked, or the model's max positions (at most DEFAULT_MAX_SEQ_LEN), a whole number of blocks."""
    kind = getattr(model, "kind", None)
    if kind not in ("bd3lm", "mdlm"):
        raise TypeError(f"model must be a tide BD3LM or MDLM (tide.models), got {type(model).__name__}")
    block = model.block_size if kind == "bd3lm" else None
    if seq_len is None:
        seq_len = min(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_SEQ_LEN), DEFAULT_MAX_SEQ_LEN)
        if block:
            seq_len = max(block, seq_len // block * block)
    _check_int("seq_len", seq_len)
    if block and seq_len % block:
        raise ValueError(f"seq_len must be a multiple of the model's block_size {block}, got {seq_len}")
    return seq_len


def _records(data):
    """Records of `data`: a path (load_records) or a non-empty sequence."""
    if isinstance(data, (str, os.PathLike)):
        return load_records(data)
    if isinstance(data, Sequence) or hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError("data is empty: pass texts, conversations or a path")
        return data
    raise TypeError(f"data must be a path or a sequence of texts/conversations, got {type(data).__name__}")


def _check_int(name, value, low=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


# --------------------------------------------------------------------------- the estimate
@torch.no_grad()
def elbo(model, data, *, tokenizer, samples: int = 8, seed: int = 0, batch_size: int = 8,
         seq_len: int | None = None, progress: bool = True, impl: str = "auto") -> Result:
    """Negative ELBO of held-out data under a tide diffusion LM (module docstring): bits per byte
    with its Monte Carlo standard error, per token, and a perplexity bound.

    model: a `tide.models` BD3LM or MDLM (or anything with `kind`, `block_size`, `mask_token_id`,
    `lm_head_weight` and `forward(x_t, x_0, attention_mask) -> hidden [b, l, d]`).
    data: a path (str / PathLike: text file, folder, chat .json/.jsonl), or a sequence of texts,
    conversations (lists of role/content dicts) or dict rows with `messages` / `text`.
    samples: masks per window (K >= 1; the standard error needs K >= 2). seed: the estimate is a
    deterministic function of it. batch_size: rows (window x sample) per forward pass.
    seq_len: window length in tokens (default: the model's max positions, at most 1024, a
    multiple of the block size). progress: a tqdm bar. impl: `token_logprobs`' implementation.
    """
    _check_int("samples", samples)
    _check_int("batch_size", batch_size)
    _check_int("seed", seed, low=0)
    seq_len = _default_seq_len(model, seq_len)                       # also checks the model
    kind = model.kind
    block = model.block_size if kind == "bd3lm" else None
    records = _records(data)

    windows, total_bytes = _windows(records, tokenizer, seq_len)
    tokens = sum(int(m.sum()) for _, m in windows)
    if tokens == 0 or total_bytes == 0:
        raise ValueError("data has nothing to score (no text, or chat data without assistant content)")
    if block and tokens < block:
        raise ValueError(f"data holds {tokens} tokens, shorter than one block (block_size={block}): "
                         "pass more text")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.mask_token_id
    per_sample = sequence_nelbo(model, windows, samples=samples, seed=seed, batch_size=batch_size,
                                pad_id=pad_id, progress=progress, impl=impl)   # [W, K] nats
    nats = per_sample.mean(dim=1).sum().item()
    variance = (per_sample.var(dim=1, unbiased=True).sum().item() / samples) if samples > 1 else float("nan")
    se_nats = math.sqrt(variance) if variance == variance else float("nan")
    ln2 = math.log(2)
    return Result(bits_per_byte=nats / ln2 / total_bytes, bits_per_byte_se=se_nats / ln2 / total_bytes,
                  bits_per_token=nats / ln2 / tokens, bits_per_token_se=se_nats / ln2 / tokens,
                  nats_per_token=nats / tokens, perplexity_bound=math.exp(nats / tokens), tokens=tokens,
                  bytes=total_bytes, windows=len(windows), seq_len=seq_len, samples=samples, seed=seed)


@torch.no_grad()
def sequence_nelbo(model, sequences: Sequence[tuple[torch.Tensor, torch.Tensor]], *, samples: int = 8,
                   seed: int = 0, seeds: Sequence[int] | None = None, batch_size: int = 8, pad_id: int | None = None,
                   progress: bool = False, impl: str = "auto") -> torch.Tensor:
    """Monte Carlo samples of the negative ELBO (nats) of each sequence's maskable tokens, given
    the rest of the sequence (module docstring): `[S, K]` float64, K = samples.

    sequences: `(ids [l] long, maskable [l] bool)` pairs, each at most the model's length
    (BD3LM: padded to whole blocks here). The masks of sequence s come from a CPU generator
    seeded by `seeds[s]` (default `seed * 1_000_003 + s`): the result depends on neither the
    batch size nor the device. pad_id: the id under padding (default: the mask token; padding
    is hidden from attention either way).
    """
    _check_int("samples", samples)
    _check_int("batch_size", batch_size)
    if seeds is not None and len(seeds) != len(sequences):
        raise ValueError(f"seeds must have one seed per sequence ({len(sequences)}), got {len(seeds)}")
    kind = getattr(model, "kind", None)
    if kind not in ("bd3lm", "mdlm"):
        raise TypeError(f"model must be a tide BD3LM or MDLM (tide.models), got {type(model).__name__}")
    for s, (ids, maskable) in enumerate(sequences):
        if ids.dim() != 1 or maskable.shape != ids.shape or maskable.dtype != torch.bool:
            raise ValueError(f"sequences[{s}] must be (ids [l] long, maskable [l] bool), got shapes "
                             f"{tuple(ids.shape)} and {tuple(maskable.shape)} ({maskable.dtype})")
    block = model.block_size if kind == "bd3lm" else None
    device = model.lm_head_weight.device
    head_weight = model.lm_head_weight
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and head_weight.dtype == torch.float32 else contextlib.nullcontext())
    pad_id = model.mask_token_id if pad_id is None else pad_id
    per_sample = torch.zeros(len(sequences), samples, dtype=torch.float64)  # nats of each (sequence, mask)

    def rows():
        for w, (ids, maskable) in enumerate(sequences):
            gen = torch.Generator().manual_seed(seeds[w] if seeds is not None else seed * 1_000_003 + w)
            masked, weight = _masks(maskable, block or len(ids), samples, gen)
            for k in range(samples):
                yield w, k, ids, masked[k], weight[k]

    n_batches = -(-len(sequences) * samples // batch_size)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_batches, desc=f"elbo ({kind}, K={samples})", dynamic_ncols=True, file=sys.stderr)
    batch = []
    for row in rows():
        batch.append(row)
        if len(batch) == batch_size:
            _score(model, batch, block, pad_id, head_weight, autocast, impl, per_sample, device)
            batch = []
            if bar is not None:
                bar.update(1)
    if batch:
        _score(model, batch, block, pad_id, head_weight, autocast, impl, per_sample, device)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return per_sample


def _score(model, batch, block, pad_id, head_weight, autocast, impl, per_sample, device):
    """One forward pass over rows (window, sample, ids, masked, weight): adds each row's
    weighted masked NLL (nats) into per_sample[window, sample]."""
    longest = max(ids.shape[0] for _, _, ids, _, _ in batch)
    length = -(-longest // block) * block if block else longest
    b = len(batch)
    x_0 = torch.full((b, length), pad_id, dtype=torch.long)
    masked = torch.zeros(b, length, dtype=torch.bool)
    weight = torch.zeros(b, length)
    attention = torch.zeros(b, length, dtype=torch.long)
    for i, (_, _, ids, row_masked, row_weight) in enumerate(batch):
        n = ids.shape[0]
        x_0[i, :n], masked[i, :n], weight[i, :n], attention[i, :n] = ids, row_masked, row_weight, 1
    x_0, masked, weight = x_0.to(device), masked.to(device), weight.to(device)
    attention = None if bool(attention.all()) else attention.to(device)
    x_t = torch.where(masked, model.mask_token_id, x_0)
    with autocast:
        hidden = model(x_t, x_0, attention)                                  # [b, l, d]
    rows_b = masked.nonzero(as_tuple=True)[0]
    logp = token_logprobs(hidden[masked].to(head_weight.dtype), head_weight, x_0[masked], impl=impl)  # [N]
    nll = torch.zeros(b, dtype=torch.float64, device=device)
    nll.index_add_(0, rows_b, -(logp.double() * weight[masked].double()))
    nll = nll.cpu()
    for i, (w, k, _, _, _) in enumerate(batch):
        per_sample[w, k] = nll[i]


# --------------------------------------------------------------------------- infill
@dataclasses.dataclass
class InfillResult:
    """Span-infill accuracy (micro-averaged over every span character / token)."""
    char_accuracy: float          # span characters reproduced exactly, at their position
    token_accuracy: float         # span tokens (this model's tokenizer) reproduced exactly
    exact_match: float            # spans reproduced exactly, every character
    spans: int
    chars: int                    # characters over all spans
    tokens: int                   # the spans' tokens (this tokenizer)
    span_chars: int
    seed: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"infill: {self.char_accuracy:.4f} char accuracy, {self.token_accuracy:.4f} token accuracy, "
                f"{self.exact_match:.4f} exact spans ({self.spans} spans of {self.span_chars} characters, "
                f"seed {self.seed})")


def infill_spans(texts: Sequence[str], spans: int, span_chars: int, seed: int, min_context_chars: int = 16):
    """`[(text index, start, end)]`: `spans` spans of `span_chars` characters, each starting at a
    space that ends a word (so a span tokenized on its own starts as it would in context, for
    byte-level BPE and Metaspace tokenizers alike), at least `min_context_chars` into its text. A function
    of the texts and the seed only, so models with different tokenizers get the same spans."""
    import bisect
    import random
    import re

    starts = [[m.start() for m in re.finditer(r"(?<=\S) ", text)
               if min_context_chars <= m.start() <= len(text) - span_chars] for text in texts]
    cumulative = list(itertools.accumulate(len(s) for s in starts))
    total = cumulative[-1] if cumulative else 0
    if total < spans:
        raise ValueError(f"spans={spans}: the data has only {total} places for a span of span_chars={span_chars} "
                         f"characters after {min_context_chars} characters of context: pass fewer or shorter spans "
                         "or more text")
    out = []
    for index in sorted(random.Random(seed).sample(range(total), spans)):
        text = bisect.bisect_right(cumulative, index)
        start = starts[text][index - (cumulative[text - 1] if text else 0)]
        out.append((text, start, start + span_chars))
    return out


def _record_texts(records) -> list[str]:
    """Plain texts of records: texts as they are, the assistant contents of conversations."""
    texts = []
    for record in records:
        if isinstance(record, dict):
            record = record.get("messages", record.get("text"))
        if isinstance(record, str):
            texts.append(record)
        else:
            texts.extend(m["content"] for m in record if m["role"] == "assistant")
    return texts


def _infill_window(kind: str, block: int | None, prefix: list, n: int, suffix: list, seq_len: int):
    """The context of a span of n tokens inside `seq_len` tokens: `(prefix tail, suffix head)`.

    MDLM (sees both sides): the prefix keeps at least half of the `seq_len - n` other tokens when the
    text after is long enough to use the rest, and the suffix takes what the prefix leaves.
    BD3LM: whole blocks are cut off the front of the prefix, so the span sits in its blocks as it does
    in the text read from its start (as in training windows, which start on block boundaries), at the
    cost of at most `block - 1` prefix tokens; the suffix fills the rest of the window (the sampler
    uses only its part inside the span's last block)."""
    room = seq_len - n
    if kind == "mdlm":
        keep = min(len(prefix), max(room // 2, room - len(suffix)))
    else:
        keep = len(prefix) - block * -(-max(0, len(prefix) - room) // block)
        if keep < 0:  # room < the prefix's offset in its block: no aligned cut fits
            keep = min(len(prefix), room)
    return prefix[len(prefix) - keep:], suffix[:room - keep]


@torch.no_grad()
def infill(model, data, *, tokenizer, spans: int = 64, span_chars: int = 24, seed: int = 0,
           steps: int | None = None, seq_len: int | None = None, batch_size: int = 8,
           progress: bool = True) -> InfillResult:
    """Mask random character spans of held-out text and fill them with `tide.generate.infill` (greedy),
    the text on both sides of each span given where the model can see it.

    Each span (`infill_spans`: the same spans for every tokenizer) is tokenized on its own (n tokens),
    as are the text before it and the text after it; the model gets a window of `seq_len` tokens,
    `prefix + n masks + suffix`, and writes the n tokens. What each model kind sees:
    - MDLM (bidirectional): the text before and after the span, the prefix taking at least half of
      the `seq_len - n` other tokens when both sides are long.
    - BD3LM (block diffusion): the clean blocks before the span's blocks, the prefix and suffix tokens
      inside the blocks being denoised, and nothing after the span's last block: later blocks are
      invisible to a block-diffusion model by design, so the right context is the few suffix tokens
      sharing the span's last block (none when the span ends on a block boundary). The window cuts
      whole blocks off the prefix's front, so the span's place in its blocks is the one it has in the
      text read from its start (as in training).
    The fill is decoded as the continuation of the decoded prefix and compared with the span character
    by character (`char_accuracy`, comparable across tokenizers) and token by token against the span's
    own tokens (`token_accuracy`). Chat data: assistant contents.
    steps: denoising steps per block (default one per token); batch_size: spans per sampler call
    (the result does not depend on it).
    """
    import tide.generate

    _check_int("spans", spans)
    _check_int("span_chars", span_chars)
    _check_int("batch_size", batch_size)
    _check_int("seed", seed, low=0)
    if steps is not None:
        _check_int("steps", steps)
    seq_len = _default_seq_len(model, seq_len)
    records = _records(data)
    texts = _record_texts(records)
    chosen = infill_spans(texts, spans, span_chars, seed)
    items = []  # (prefix ids, span ids, suffix ids, span text)
    for text_index, start, end in chosen:
        text = texts[text_index]
        truth_ids = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        if len(truth_ids) >= seq_len:
            raise ValueError(f"span_chars={span_chars} gives spans of {len(truth_ids)} tokens, not less than "
                             f"seq_len={seq_len}")
        before = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
        after = tokenizer(text[end:], add_special_tokens=False)["input_ids"]
        prefix, suffix = _infill_window(model.kind, model.block_size, before, len(truth_ids), after, seq_len)
        items.append((prefix, truth_ids, suffix, text[start:end]))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc=f"infill ({model.kind})", dynamic_ncols=True, file=sys.stderr)
    right_chars = right_tokens = all_tokens = exact = 0
    for first in range(0, len(items), batch_size):  # the sampler is batch-invariant: any chunks give the same
        chunk = items[first:first + batch_size]
        fills = tide.generate.infill(model, [prefix for prefix, _, _, _ in chunk], [len(t) for _, t, _, _ in chunk],
                                     [suffix for _, _, suffix, _ in chunk], steps=steps, temperature=0.0)
        for (prefix, truth_ids, _, truth), filled in zip(chunk, fills):
            context_text = tokenizer.decode(prefix)
            full_text = tokenizer.decode(prefix + list(filled))
            fill_text = (full_text[len(context_text):] if full_text.startswith(context_text)
                         else tokenizer.decode(filled))
            right_chars += sum(a == b for a, b in zip(fill_text, truth))
            right_tokens += sum(a == b for a, b in zip(filled, truth_ids))
            all_tokens += len(truth_ids)
            exact += fill_text[:len(truth)] == truth
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return InfillResult(char_accuracy=right_chars / (spans * span_chars), token_accuracy=right_tokens / all_tokens,
                        exact_match=exact / spans, spans=spans, chars=spans * span_chars, tokens=all_tokens,
                        span_chars=span_chars, seed=seed)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tide.evaluate",
                                     description="Held-out negative ELBO of a tide checkpoint, in bits per byte.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="tide checkpoint directory (written by tide.train)")
    parser.add_argument("--data", required=True, help="text file, folder of .txt/.md/.py, or chat .jsonl")
    parser.add_argument("--samples", type=int, default=8, help="masks per window (K); the SE needs K >= 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="rows (window x sample) per forward pass")
    parser.add_argument("--seq-len", type=int, default=0,
                        help="window length in tokens (0: the checkpoint's training --seq-len, else the model's "
                             f"max positions, at most {DEFAULT_MAX_SEQ_LEN})")
    parser.add_argument("--json", default=None, help="also write the result (and the arguments) to this file")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument("--infill", type=int, default=0, metavar="SPANS",
                        help="also fill this many random spans with tide.generate.infill (the text on both "
                             "sides, as far as the model kind sees it) and report their accuracy")
    parser.add_argument("--span-chars", type=int, default=24, help="characters per infill span")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("samples", "batch_size", "span_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("seq_len", "infill"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer = load_checkpoint(args.checkpoint, device=device)
        seq_len = args.seq_len or trained_seq_len(args.checkpoint)
        result = elbo(model, args.data, tokenizer=tokenizer, samples=args.samples, seed=args.seed,
                      batch_size=args.batch_size, seq_len=seq_len, progress=not args.quiet)
        filled = None
        if args.infill:
            filled = infill(model, args.data, tokenizer=tokenizer, spans=args.infill, span_chars=args.span_chars,
                            seed=args.seed, seq_len=seq_len, batch_size=args.batch_size, progress=not args.quiet)
    except ValueError as error:
        parser.error(str(error))
    print(f"{args.checkpoint} ({model.kind}) on {args.data}: {result}")
    out = {"checkpoint": args.checkpoint, "data": args.data, "kind": model.kind, "elbo": result.to_dict()}
    if filled is not None:
        print(filled)
        out["infill"] = filled.to_dict()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()

"""Distillation data: plain text and chat examples for both tokenizers, and the collator.

One `Example` holds the student's and the teacher's token sequences of the same
text (plain lists), which tokens may be masked, and how the two sequences
correspond. Three modes (`mode=`; inferred when None):

- "shared": teacher and student share the tokenizer (and chat template): one
  tokenization serves both; the teacher fields are copies of the student's; no
  chunks, no pairs. Inferred when `teacher_tokenizer` is None or is
  `student_tokenizer`.
- "aligned" (SPEC.md, "Shared tokenizer, different chat templates"): one
  vocabulary, two renderings. `aligned_pairs` lists `(student position, teacher
  position)` of content tokens (of every message) that cover the same content
  characters with the same token id: the tokens of each `tide.align` chunk whose
  id sequences are equal on both sides (usually one token each; the byte pieces
  of one character pair up in order). Content tokens the two renderings split
  differently (typically a first token merged with template text) stay
  unpaired. The response chunks are filled in as in "cross" too, so a trainer
  can carry masks to teacher tokens that have no pair. Inferred when the two
  vocabularies are equal.
- "cross" (SPEC.md, "Cross-tokenizer chunks"): chunks from `tide.align`, found
  inside the response (assistant) content only; a chunk holding any prompt,
  template or special token is dropped (chunk id -1), so every chunk with an id
  is made of maskable tokens on both sides. Inferred otherwise.

Plain text: the whole text is the response (every non-special token is
maskable); nothing is added around it (no BOS/EOS).

Chat (`messages`: a list of `{"role", "content"}` dicts): each tokenizer
renders the conversation with its own chat template (`apply_chat_template(...,
tokenize=False)`); one without a template uses `PLAIN_CHAT_TEMPLATE`:
`"{Role}: {content}\\n\\n"` per message, role capitalised. The content of each
message is located in each rendered string by character offsets, not by
searching for the text: the template is rendered once more with a unique
marker in place of each content; the template text between the markers must
then be found, in order, in the real rendering, with each message's content
(as is, or with the whitespace at its ends trimmed, as many templates do)
exactly in between. Any other change to contents is an error. Tokens whose characters lie wholly
inside an assistant message's content are maskable (response); everything
else (system and user turns, template text, special tokens, the end-of-turn
marker) is prompt: never maskable.

Truncation (`student_max_length`, `teacher_max_length`): each sequence keeps
its first tokens; chunks the cut passes through are dropped on both sides;
pairs with a cut position are dropped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from tide.align import align_offsets, encode_with_offsets, special_token_ids

__all__ = [
    "Example", "RenderedChat", "PLAIN_CHAT_TEMPLATE", "MODES",
    "render_chat", "text_example", "chat_example", "resolve_mode",
    "load_texts", "load_chat_dataset", "DistillationDataset", "DistillationCollator",
]

MODES = ("shared", "aligned", "cross")
PLAIN_CHAT_TEMPLATE = "{Role}: {content}\n\n"  # per message, for tokenizers without a chat template
_MARKER = "\ue000TIDE-CONTENT-{}\ue001"  # private-use characters: unique in any real conversation


@dataclass
class Example:
    """One example for both models (plain lists; the collator makes tensors).

    student_input_ids, student_maskable, student_chunk_ids: `[L_s]`;
    teacher_input_ids, teacher_maskable, teacher_chunk_ids: `[L_t]`.
    Chunk ids are local to the example, `0..num_chunks-1`, -1 for no chunk.
    aligned_pairs: `(student position, teacher position)` pairs ("aligned" mode).
    """
    student_input_ids: list[int]
    teacher_input_ids: list[int]
    student_maskable: list[bool]
    teacher_maskable: list[bool]
    student_chunk_ids: list[int]
    teacher_chunk_ids: list[int]
    aligned_pairs: list[tuple[int, int]] = field(default_factory=list)
    num_chunks: int = 0

    def __post_init__(self):
        for side in ("student", "teacher"):
            n = len(getattr(self, f"{side}_input_ids"))
            for name in (f"{side}_maskable", f"{side}_chunk_ids"):
                if len(getattr(self, name)) != n:
                    raise ValueError(f"Example.{name} has length {len(getattr(self, name))}, "
                                     f"but {side}_input_ids has length {n}")
        for name in ("student_chunk_ids", "teacher_chunk_ids"):
            values = getattr(self, name)
            if values and (min(values) < -1 or max(values) >= self.num_chunks):
                raise ValueError(f"Example.{name} must lie in [-1, num_chunks={self.num_chunks})")
        n_s, n_t = len(self.student_input_ids), len(self.teacher_input_ids)
        for s, t in self.aligned_pairs:
            if not (0 <= s < n_s and 0 <= t < n_t):
                raise ValueError(f"Example.aligned_pairs holds ({s}, {t}) outside the sequences "
                                 f"(L_s={n_s}, L_t={n_t})")


@dataclass
class RenderedChat:
    """A conversation rendered by one tokenizer's template.

    text: the rendered string. content_spans `[num_messages]`: for each message
    `(start, end, content_start)`: its content occupies `text[start:end]`, which
    equals `content[content_start:content_start + end - start]` (content_start > 0
    only where the template trims); None for a message the template leaves out.
    """
    text: str
    content_spans: list[tuple[int, int, int] | None]


# ------------------------------------------------------------------------------ rendering

def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is an empty conversation")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TypeError(f"messages[{k}] must be a dict with 'role' and 'content', got {message!r:.80}")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise TypeError(f"messages[{k}] role and content must be str, got "
                            f"{type(message['role']).__name__} and {type(message['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages has no assistant message: nothing to learn from")
    return list(messages)


def render_chat(messages, tokenizer, name: str = "tokenizer") -> RenderedChat:
    """Render `messages` with `tokenizer`'s chat template (or PLAIN_CHAT_TEMPLATE)."""
    messages = _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        parts, spans, position = [], [], 0
        for m in messages:
            head = m["role"].capitalize() + ": "
            spans.append((position + len(head), position + len(head) + len(m["content"]), 0))
            piece = head + m["content"] + "\n\n"
            parts.append(piece)
            position += len(piece)
        return RenderedChat("".join(parts), spans)

    def apply(conversation):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        if not isinstance(text, str):
            raise TypeError(f"{name}.apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        return text

    for k, m in enumerate(messages):
        if _MARKER.split("{")[0] in m["content"]:
            raise ValueError(f"messages[{k}]['content'] contains the reserved content marker {_MARKER!r}")
    rendered = apply(messages)
    markers = [_MARKER.format(k) for k in range(len(messages))]
    marked = apply([{**m, "content": marker} for m, marker in zip(messages, markers)])
    places = []  # (position in `marked`, message index)
    for k, marker in enumerate(markers):
        count = marked.count(marker)
        if count > 1:
            raise ValueError(f"the chat template of {name} writes messages[{k}]['content'] {count} times; "
                             "its place in the rendered text is ambiguous")
        if count == 1:
            places.append((marked.index(marker), k))
    places.sort()
    # template text between the contents: pieces[0] + content + pieces[1] + ... + pieces[-1]
    cuts = [0] + [p for position, k in places for p in (position, position + len(markers[k]))] + [len(marked)]
    pieces = [marked[cuts[i]:cuts[i + 1]] for i in range(0, len(cuts), 2)]
    spans: list[tuple[int, int, int] | None] = [None] * len(messages)
    position = len(pieces[0])
    located = rendered.startswith(pieces[0])
    for (_, k), following in zip(places, pieces[1:]):
        if not located:
            break
        located = False
        for kept, content_start in _content_variants(messages[k]["content"]):
            end = position + len(kept)
            if rendered.startswith(kept, position) and rendered.startswith(following, end):
                spans[k] = (position, end, content_start)
                position, located = end + len(following), True
                break
    if not located or position != len(rendered):
        raise ValueError(f"the chat template of {name} changes message contents (beyond trimming "
                         "whitespace at their ends); their character offsets in the rendered text "
                         "cannot be located")
    return RenderedChat(rendered, spans)


def _content_variants(content: str):
    """A content as a template may write it: as is, or with the whitespace at its ends
    trimmed (`| trim`, `.strip()`, `.lstrip()`, `.rstrip()`): `(text, start in content)`."""
    lead = len(content) - len(content.lstrip())
    seen = set()
    for kept, start in ((content, 0), (content.strip(), lead), (content.lstrip(), lead), (content.rstrip(), 0)):
        if (kept, start) not in seen:
            seen.add((kept, start))
            yield kept, start


# ------------------------------------------------------------------------------ examples

def resolve_mode(student_tokenizer, teacher_tokenizer, mode: str | None) -> str:
    """The mode to use: `mode` checked, or inferred (module docstring)."""
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        if mode == "shared" and teacher_tokenizer is not None and teacher_tokenizer is not student_tokenizer:
            if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
                raise ValueError("mode='shared' needs one vocabulary, but teacher_tokenizer and "
                                 "student_tokenizer have different vocabularies")
        return mode
    if teacher_tokenizer is None or teacher_tokenizer is student_tokenizer:
        return "shared"
    if teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab():
        return "aligned"
    return "cross"


@dataclass
class _Side:
    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]
    spans: list[tuple[int, int, int] | None]


def _encode_side(text, spans, tokenizer, name) -> _Side:
    ids, offsets = encode_with_offsets(text, tokenizer, name)
    special_ids = special_token_ids(tokenizer)
    return _Side(ids, offsets, [i in special_ids for i in ids], spans)


def _maskable(side: _Side, response: list[bool]) -> list[bool]:
    ranges = [span[:2] for span, r in zip(side.spans, response) if r and span is not None]
    out = []
    for (s, e), special in zip(side.offsets, side.special):
        out.append(not special and e > s and any(lo <= s and e <= hi for lo, hi in ranges))
    return out


def _local_tokens(side: _Side, span, lo: int, hi: int):
    """Token indices of `side` overlapping one content span, their offsets in
    message-content coordinates (clipped to the span), and excluded flags: tokens
    reaching outside the common content range `[lo, hi)`, or special."""
    start, end, content_start = span
    indices, offsets, excluded = [], [], []
    for k, (s, e) in enumerate(side.offsets):
        if (s < end and e > start) or (s == e and start <= s < end):
            local_s = max(s, start) - start + content_start
            local_e = min(e, end) - start + content_start
            indices.append(k)
            offsets.append((local_s, local_e))
            excluded.append(side.special[k] or s < start or e > end or local_s < lo or local_e > hi)
    return indices, offsets, excluded


def _content_chunks(student: _Side, teacher: _Side, messages_used: list[bool]):
    """Chunks `(t0, t1, s0, s1)` (sequence indices) inside the used messages' contents."""
    chunks = []
    for k, used in enumerate(messages_used):
        s_span, t_span = student.spans[k], teacher.spans[k]
        if not used or s_span is None or t_span is None:
            continue
        lo = max(s_span[2], t_span[2])
        hi = min(s_span[2] + s_span[1] - s_span[0], t_span[2] + t_span[1] - t_span[0])
        s_idx, s_off, s_exc = _local_tokens(student, s_span, lo, hi)
        t_idx, t_off, t_exc = _local_tokens(teacher, t_span, lo, hi)
        for t0, t1, s0, s1 in align_offsets(t_off, s_off, teacher_excluded=t_exc, student_excluded=s_exc):
            t_range, s_range = t_idx[t0:t1], s_idx[s0:s1]
            if t_range[-1] - t_range[0] + 1 == len(t_range) and s_range[-1] - s_range[0] + 1 == len(s_range):
                chunks.append((t_range[0], t_range[-1] + 1, s_range[0], s_range[-1] + 1))
    return chunks


def _chunk_ids(length, spans):
    ids = [-1] * length
    for c, (start, end) in enumerate(spans):
        ids[start:end] = [c] * (end - start)
    return ids


def _build(student: _Side, teacher: _Side | None, response: list[bool], mode: str,
           student_max_length, teacher_max_length) -> Example:
    s_len = _cut_length("student_max_length", student_max_length, len(student.ids))
    s_maskable = _maskable(student, response)
    if mode == "shared":
        ids, maskable = student.ids[:s_len], s_maskable[:s_len]
        return Example(ids, list(ids), maskable, list(maskable), [-1] * s_len, [-1] * s_len)
    t_len = _cut_length("teacher_max_length", teacher_max_length, len(teacher.ids))
    t_maskable = _maskable(teacher, response)
    chunks = [c for c in _content_chunks(student, teacher, response) if c[1] <= t_len and c[3] <= s_len]
    pairs = []
    if mode == "aligned":  # chunks with the same ids on both sides, over every message's content
        for t0, t1, s0, s1 in _content_chunks(student, teacher, [True] * len(response)):
            if t1 - t0 == s1 - s0 and teacher.ids[t0:t1] == student.ids[s0:s1]:
                pairs.extend((s, t) for s, t in zip(range(s0, s1), range(t0, t1)) if s < s_len and t < t_len)
    return Example(student.ids[:s_len], teacher.ids[:t_len], s_maskable[:s_len], t_maskable[:t_len],
                   _chunk_ids(s_len, [(c[2], c[3]) for c in chunks]),
                   _chunk_ids(t_len, [(c[0], c[1]) for c in chunks]),
                   pairs, len(chunks))


def _cut_length(name, value, length):
    if value is None:
        return length
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return min(value, length)


def text_example(text: str, *, student_tokenizer, teacher_tokenizer=None, mode: str | None = None,
                 student_max_length: int | None = None, teacher_max_length: int | None = None) -> Example:
    """An example from plain text: all of it is response (module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    mode = resolve_mode(student_tokenizer, teacher_tokenizer, mode)
    spans = [(0, len(text), 0)]
    student = _encode_side(text, spans, student_tokenizer, "student_tokenizer")
    teacher = None if mode == "shared" else _encode_side(text, spans, teacher_tokenizer, "teacher_tokenizer")
    return _build(student, teacher, [True], mode, student_max_length, teacher_max_length)


def chat_example(messages, *, student_tokenizer, teacher_tokenizer=None, mode: str | None = None,
                 student_max_length: int | None = None, teacher_max_length: int | None = None) -> Example:
    """An example from a conversation: assistant contents are the response."""
    messages = _check_messages(messages)
    mode = resolve_mode(student_tokenizer, teacher_tokenizer, mode)
    response = [m["role"] == "assistant" for m in messages]
    s_render = render_chat(messages, student_tokenizer, "student_tokenizer")
    student = _encode_side(s_render.text, s_render.content_spans, student_tokenizer, "student_tokenizer")
    teacher = None
    if mode != "shared":
        t_render = render_chat(messages, teacher_tokenizer, "teacher_tokenizer")
        teacher = _encode_side(t_render.text, t_render.content_spans, teacher_tokenizer, "teacher_tokenizer")
    return _build(student, teacher, response, mode, student_max_length, teacher_max_length)


# ------------------------------------------------------------------------------ loading

def load_texts(path: str | os.PathLike, *, suffixes: Iterable[str] = (".txt", ".md"),
               max_chars: int | None = None) -> list[str]:
    """Texts of a file, or of the files under a folder (recursively, sorted, by `suffixes`).

    One text per file; with `max_chars`, each file is cut at line ends into
    pieces of at most `max_chars` characters (a longer line is cut anywhere).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        suffixes = tuple(suffixes)
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path)
                       for f in names if f.endswith(suffixes))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ValueError(f"path {path!r} is neither a file nor a folder")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive int or None, got {max_chars!r}")
    texts = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            text = f.read()
        texts.extend(_split_lines(text, max_chars) if max_chars else [text])
    return texts


def _split_lines(text: str, max_chars: int) -> list[str]:
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def load_chat_dataset(source, *, split: str = "train", messages_key: str = "messages", **load_kwargs):
    """A `datasets.Dataset` of conversations, from a JSON/JSONL file or a `datasets` object.

    source: a path to a `.json`/`.jsonl` file (loaded with
    `datasets.load_dataset("json", ...)`; `load_kwargs` go there, e.g. `cache_dir`),
    a `datasets.Dataset`, or a `datasets.DatasetDict` (its `split`). Each row must
    have a `messages_key` column of role/content lists.
    """
    import datasets

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"source {path!r} is not a file")
        dataset = datasets.load_dataset("json", data_files=path, split="train", **load_kwargs)
    elif isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the DatasetDict (has {list(source)})")
        dataset = source[split]
    elif isinstance(source, datasets.Dataset):
        dataset = source
    else:
        raise TypeError(f"source must be a path, datasets.Dataset or DatasetDict, got {type(source).__name__}")
    if messages_key not in dataset.column_names:
        raise ValueError(f"the dataset has no {messages_key!r} column (columns: {dataset.column_names})")
    return dataset


class DistillationDataset(torch.utils.data.Dataset):
    """Map-style dataset of `Example`s, built on access from `records`.

    records: a sequence (list, `datasets.Dataset`, ...) of plain texts (str),
    conversations (lists of messages) or dict rows holding one under
    `messages_key` (chat) or `text_key` (text). Tokenizers, mode and maximum
    lengths as in `text_example` / `chat_example`.
    """

    def __init__(self, records: Sequence[Any], *, student_tokenizer, teacher_tokenizer=None,
                 mode: str | None = None, student_max_length: int | None = None,
                 teacher_max_length: int | None = None, messages_key: str = "messages",
                 text_key: str = "text"):
        self.records = records
        self.mode = resolve_mode(student_tokenizer, teacher_tokenizer, mode)
        self.options = dict(student_tokenizer=student_tokenizer,
                            teacher_tokenizer=None if self.mode == "shared" else teacher_tokenizer,
                            mode=self.mode, student_max_length=student_max_length,
                            teacher_max_length=teacher_max_length)
        self.messages_key, self.text_key = messages_key, text_key

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        record = self.records[index]
        if isinstance(record, dict):
            if self.messages_key in record:
                record = record[self.messages_key]
            elif self.text_key in record:
                record = record[self.text_key]
            else:
                raise ValueError(f"records[{index}] has neither {self.messages_key!r} nor {self.text_key!r}")
        if isinstance(record, str):
            return text_example(record, **self.options)
        return chat_example(_drop_none_keys(record), **self.options)


def _drop_none_keys(messages):
    """`datasets` fills keys missing from some messages with None: drop those."""
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        return [{k: v for k, v in m.items() if v is not None or k in ("role", "content")}
                if isinstance(m, dict) else m for m in messages]
    return messages


# ------------------------------------------------------------------------------ collator

class DistillationCollator:
    """Pads `Example`s into a batch: a dict of tensors (b examples).

    - `student_input_ids [b, L_s]`, `teacher_input_ids [b, L_t]` long, padded with
      the pad ids;
    - `student_attention_mask [b, L_s]`, `teacher_attention_mask [b, L_t]` long,
      1 for tokens, 0 for padding;
    - `student_maskable [b, L_s]`, `teacher_maskable [b, L_t]` bool (response
      tokens; False on padding);
    - `student_chunk_ids [b, L_s]`, `teacher_chunk_ids [b, L_t]` long: chunk ids
      unique across the batch (example i's chunk c is `c + sum of earlier
      examples' num_chunks`), -1 for no chunk and on padding; so the rows of
      `calm_loss` can be gathered flat from both sides;
    - `chunk_batch_index [C]` long: the example each chunk comes from;
    - `num_chunks` 0-d long: C;
    - `aligned_pairs [P, 3]` long: rows `(example index, student position,
      teacher position)` ("aligned" mode; `[0, 3]` otherwise).
    L_s, L_t: the longest sequence on that side, rounded up to `pad_to_multiple_of`.
    """

    def __init__(self, student_pad_id: int, teacher_pad_id: int, *, pad_to_multiple_of: int = 1):
        for name, value in (("student_pad_id", student_pad_id), ("teacher_pad_id", teacher_pad_id),
                            ("pad_to_multiple_of", pad_to_multiple_of)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.student_pad_id, self.teacher_pad_id = student_pad_id, teacher_pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizers(cls, student_tokenizer, teacher_tokenizer=None, **kwargs) -> "DistillationCollator":
        """Pad ids from the tokenizers: pad token, else EOS, else 0."""
        def pad_id(tokenizer):
            for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
                if isinstance(value, int):
                    return value
            return 0
        return cls(pad_id(student_tokenizer), pad_id(teacher_tokenizer or student_tokenizer), **kwargs)

    def _length(self, sequences) -> int:
        longest = max(len(s) for s in sequences)
        multiple = self.pad_to_multiple_of
        return -(-longest // multiple) * multiple

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples is empty: nothing to collate")
        for k, example in enumerate(examples):
            if not isinstance(example, Example):
                raise TypeError(f"examples[{k}] must be a tide.data.Example, got {type(example).__name__}")
        b = len(examples)
        batch = {}
        offsets, total = [], 0
        for example in examples:
            offsets.append(total)
            total += example.num_chunks
        for side, pad_id in (("student", self.student_pad_id), ("teacher", self.teacher_pad_id)):
            ids = [getattr(e, f"{side}_input_ids") for e in examples]
            length = self._length(ids)
            input_ids = torch.full((b, length), pad_id, dtype=torch.long)
            attention = torch.zeros((b, length), dtype=torch.long)
            maskable = torch.zeros((b, length), dtype=torch.bool)
            chunk_ids = torch.full((b, length), -1, dtype=torch.long)
            for i, example in enumerate(examples):
                n = len(ids[i])
                if n == 0:
                    continue
                input_ids[i, :n] = torch.tensor(ids[i], dtype=torch.long)
                attention[i, :n] = 1
                maskable[i, :n] = torch.tensor(getattr(example, f"{side}_maskable"), dtype=torch.bool)
                local = torch.tensor(getattr(example, f"{side}_chunk_ids"), dtype=torch.long)
                chunk_ids[i, :n] = torch.where(local >= 0, local + offsets[i], local)
            batch[f"{side}_input_ids"] = input_ids
            batch[f"{side}_attention_mask"] = attention
            batch[f"{side}_maskable"] = maskable
            batch[f"{side}_chunk_ids"] = chunk_ids
        batch["chunk_batch_index"] = torch.repeat_interleave(
            torch.arange(b), torch.tensor([e.num_chunks for e in examples], dtype=torch.long))
        batch["num_chunks"] = torch.tensor(total, dtype=torch.long)
        pairs = [(i, s, t) for i, e in enumerate(examples) for s, t in e.aligned_pairs]
        batch["aligned_pairs"] = torch.tensor(pairs, dtype=torch.long).reshape(len(pairs), 3)
        return batch

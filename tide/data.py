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
  inside the response (assistant) content only, plus one chunk per response
  for its closing tokens (below); a chunk holding any prompt or template token
  is dropped (chunk id -1), so every chunk with an id is made of maskable
  tokens on both sides. Inferred otherwise.

The mode is inferred once per tokenizer pair (the vocabulary comparison is
cached while both tokenizer objects live and keep their sizes).

Plain text: the whole text is the response (every non-special token is
maskable), followed by the student's (teacher's) EOS token when the tokenizer
has one and the text ends a document (`add_eos=True`): trained, so the student
learns where a document stops.

Chat (`messages`: a list of `{"role", "content"}` dicts): each tokenizer
renders the conversation with its own chat template (`apply_chat_template(...,
tokenize=False)`); one without a template uses `PLAIN_CHAT_TEMPLATE`:
`"{Role}: {content}\\n\\n"` per message, role capitalised, with the tokenizer's
EOS token right after each assistant content (when it has one). The content of each
message is located in each rendered string by character offsets, not by
searching for the text: the template is rendered once more with a unique
marker in place of each content; the template text between the markers must
then be found, in order, in the real rendering, with each message's content
(as is, or with the whitespace at its ends trimmed, as many templates do)
exactly in between. Any other change to contents is an error.

What is maskable (trained), per tokenizer (the response is every assistant
content, or the whole plain text):

- a **content token**: a non-special token with at least one character inside a
  response content and all its other characters whitespace of the template
  (`"Assistant: "` + `"4"` gives the token `" 4"`; Mistral's `"[/INST] "` +
  `"Qu"` gives `"▁Qu"`): the first word of a reply is trained;
- the **closing tokens** of a response: after its last content token, any
  whitespace-only tokens and then the first special token (the end-of-turn
  marker: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>` ...; the EOS after
  plain text), plus EOS tokens right after it. When template text that is not
  whitespace comes first, the response has no closing tokens;
- everything else (system and user turns, template text, the next turn's
  header, other special tokens) is prompt: never maskable.

Chunks ("cross", and "aligned"'s chunks): inside each response content from
`tide.align`, then the response's closing tokens on both sides form one more
chunk of their own (special tokens are otherwise never in a chunk), when both
sides have closing tokens. Content tokens that straddle template whitespace
take part clipped to their content characters.

Truncation (`student_max_length`, `teacher_max_length`): each sequence keeps
its first tokens; chunks the cut passes through are dropped on both sides;
pairs with a cut position are dropped.

Offline: `python -m tide.data prepare --data ... --student-tokenizer DIR
--teacher-tokenizer DIR --out DIR [--num-proc N]` builds every example once (a
`datasets` map) into an Arrow dataset that `PreparedDataset` (and `tide.train
--data DIR`) reads, cut to the trainer's lengths on access.
"""
from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from tide.align import align_offsets, encode_with_offsets, special_token_ids

__all__ = [
    "Example", "RenderedChat", "PLAIN_CHAT_TEMPLATE", "MODES",
    "render_chat", "text_example", "chat_example", "resolve_mode", "record_example",
    "load_texts", "load_text_records", "load_chat_dataset", "check_chat_rows", "check_learnable",
    "DistillationDataset", "DistillationCollator", "prepare", "is_prepared", "PreparedDataset",
    "vocabulary_fingerprint",
]

MODES = ("shared", "aligned", "cross")
PLAIN_CHAT_TEMPLATE = "{Role}: {content}\n\n"  # per message, for tokenizers without a chat template
# (and the tokenizer's EOS token right after each assistant content, when it has one)
#   (an assistant content is followed by the tokenizer's EOS token, when it has one)
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
        self.check()

    def check(self, where: str = "Example") -> None:
        """Lengths, id and chunk ranges (ValueError naming `where` and the field); the
        collator calls it again, since the fields are plain mutable lists."""
        for side in ("student", "teacher"):
            ids = getattr(self, f"{side}_input_ids")
            n = len(ids)
            for name in (f"{side}_maskable", f"{side}_chunk_ids"):
                if len(getattr(self, name)) != n:
                    raise ValueError(f"{where}.{name} has length {len(getattr(self, name))}, "
                                     f"but {side}_input_ids has length {n}")
            if n and min(ids) < 0:
                raise ValueError(f"{where}.{side}_input_ids holds a negative token id {min(ids)}")
        for name in ("student_chunk_ids", "teacher_chunk_ids"):
            values = getattr(self, name)
            if values and (min(values) < -1 or max(values) >= self.num_chunks):
                raise ValueError(f"{where}.{name} must lie in [-1, num_chunks={self.num_chunks})")
        n_s, n_t = len(self.student_input_ids), len(self.teacher_input_ids)
        for s, t in self.aligned_pairs:
            if not (0 <= s < n_s and 0 <= t < n_t):
                raise ValueError(f"{where}.aligned_pairs holds ({s}, {t}) outside the sequences "
                                 f"(L_s={n_s}, L_t={n_t})")

    def truncated(self, student_max_length: int | None = None,
                  teacher_max_length: int | None = None) -> "Example":
        """The first `student_max_length` / `teacher_max_length` tokens (None: all): a chunk
        the cut passes through is dropped on both sides, so are pairs with a cut position."""
        s_len = _cut_length("student_max_length", student_max_length, len(self.student_input_ids))
        t_len = _cut_length("teacher_max_length", teacher_max_length, len(self.teacher_input_ids))
        if s_len == len(self.student_input_ids) and t_len == len(self.teacher_input_ids):
            return self
        # chunks are in text order on both sides: the chunks touching a cut form a suffix
        kept = self.num_chunks
        for ids, length in ((self.student_chunk_ids, s_len), (self.teacher_chunk_ids, t_len)):
            cut = [c for c in ids[length:] if c >= 0]
            if cut:
                kept = min(kept, min(cut))
        def cut_ids(ids, length):
            return [c if c < kept else -1 for c in ids[:length]]
        return Example(self.student_input_ids[:s_len], self.teacher_input_ids[:t_len],
                       self.student_maskable[:s_len], self.teacher_maskable[:t_len],
                       cut_ids(self.student_chunk_ids, s_len), cut_ids(self.teacher_chunk_ids, t_len),
                       [(s, t) for s, t in self.aligned_pairs if s < s_len and t < t_len], kept)


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

def _check_messages(messages, where: str = "messages") -> list[dict]:
    """The conversation, checked: TypeError/ValueError naming `where` (and the message)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"{where} must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError(f"{where} is an empty conversation")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TypeError(f"{where}[{k}] must be a dict with 'role' and 'content', got {message!r:.80}")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise TypeError(f"{where}[{k}] role and content must be str, got "
                            f"{type(message['role']).__name__} and {type(message['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where} has no assistant message: nothing to learn from")
    return list(messages)


def render_chat(messages, tokenizer, name: str = "tokenizer") -> RenderedChat:
    """Render `messages` with `tokenizer`'s chat template (or PLAIN_CHAT_TEMPLATE)."""
    messages = _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        eos = getattr(tokenizer, "eos_token", None) or ""
        parts, spans, position = [], [], 0
        for m in messages:
            head = m["role"].capitalize() + ": "
            spans.append((position + len(head), position + len(head) + len(m["content"]), 0))
            piece = head + m["content"] + (eos if m["role"] == "assistant" else "") + "\n\n"
            parts.append(piece)
            position += len(piece)
        return RenderedChat("".join(parts), spans)

    def apply(conversation):
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception as error:  # the template refuses this conversation (raise_exception, say):
            if not type(error).__module__.startswith("jinja2"):  # a ValueError, so the example is named
                raise
            raise ValueError(f"the chat template of {name} refuses the conversation "
                             f"({type(error).__name__}: {error})") from None
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

_VOCAB_CACHE: dict = {}  # (id(a), id(b)) -> (weakref a, weakref b, sizes, same vocabulary)


def _same_vocabulary(a, b) -> bool:
    """`a.get_vocab() == b.get_vocab()`, computed once per pair of live tokenizer objects
    (again when either one's size changes, e.g. after `add_special_tokens`)."""
    sizes = (_size(a), _size(b))
    key = (id(a), id(b))
    hit = _VOCAB_CACHE.get(key)
    if hit is not None and hit[0]() is a and hit[1]() is b and hit[2] == sizes:
        return hit[3]
    same = (sizes[0] == sizes[1] or None in sizes) and a.get_vocab() == b.get_vocab()
    try:
        _VOCAB_CACHE[key] = (weakref.ref(a), weakref.ref(b), sizes, same)
    except TypeError:  # an object without weak references: not cached
        pass
    return same


def _size(tokenizer):
    try:
        return len(tokenizer)
    except TypeError:
        return None


def resolve_mode(student_tokenizer, teacher_tokenizer, mode: str | None) -> str:
    """The mode to use: `mode` checked, or inferred (module docstring); once per tokenizer pair."""
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        if mode == "shared" and teacher_tokenizer is not None and teacher_tokenizer is not student_tokenizer:
            if not _same_vocabulary(teacher_tokenizer, student_tokenizer):
                raise ValueError("mode='shared' needs one vocabulary, but teacher_tokenizer and "
                                 "student_tokenizer have different vocabularies")
        return mode
    if teacher_tokenizer is None or teacher_tokenizer is student_tokenizer:
        return "shared"
    return "aligned" if _same_vocabulary(teacher_tokenizer, student_tokenizer) else "cross"


@dataclass
class _Side:
    """One tokenizer's view of one example: tokens of `text`, and where each message's
    content lies in it (`RenderedChat.content_spans`)."""
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]
    spans: list[tuple[int, int, int] | None]
    eos_id: int | None


def _encode_side(text, spans, tokenizer, name, add_eos: bool = False) -> _Side:
    ids, offsets = encode_with_offsets(text, tokenizer, name)
    special_ids = special_token_ids(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    eos_id = eos_id if isinstance(eos_id, int) else None
    if add_eos and eos_id is not None:
        ids, offsets = ids + [eos_id], offsets + [(len(text), len(text))]
    return _Side(text, ids, offsets, [i in special_ids or i == eos_id for i in ids], spans, eos_id)


def _blank(text: str) -> bool:
    return not text or text.isspace()


def _content_tokens(side: _Side, span) -> list[int]:
    """Indices of the content tokens of one content span `(start, end, _)`: non-special, at least
    one character inside, every character outside it template whitespace (module docstring)."""
    start, end, _ = span
    return [k for k, (s, e) in enumerate(side.offsets)
            if s < end and e > start and not side.special[k]
            and _blank(side.text[s:start]) and _blank(side.text[end:e])]


def _closing_tokens(side: _Side, after: int, limit: int) -> list[int]:
    """The closing tokens of a response whose content tokens end before index `after`:
    whitespace-only tokens, the first special token, EOS tokens right after it; [] when other
    text comes first. `limit`: where the next message's content starts."""
    out, n = [], len(side.ids)
    j = after
    while j < n and not side.special[j]:
        s, e = side.offsets[j]
        if e > limit or not _blank(side.text[s:e]):
            return []
        out.append(j)
        j += 1
    if j == n:
        return []
    out.append(j)
    j += 1
    while j < n and side.ids[j] == side.eos_id and side.ids[out[-1]] != side.eos_id:
        out.append(j)
        j += 1
    return out


def _response_tokens(side: _Side, response: list[bool]):
    """Per message: `(content token indices, closing token indices)`, both [] for a
    message that is not a response or that the template leaves out."""
    out = []
    starts = [span[0] for span in side.spans if span is not None] + [len(side.text) + 1]
    for k, (span, is_response) in enumerate(zip(side.spans, response)):
        if span is None or not is_response:
            out.append(([], []))
            continue
        content = _content_tokens(side, span)
        after = content[-1] + 1 if content else next(
            (j for j, (s, e) in enumerate(side.offsets) if s >= span[1]), len(side.ids))
        limit = min(p for p in starts if p > span[0])
        out.append((content, _closing_tokens(side, after, limit)))
    return out


def _maskable(side: _Side, tokens) -> list[bool]:
    out = [False] * len(side.ids)
    for content, closing in tokens:
        for k in content + closing:
            out[k] = True
    return out


def _local_tokens(side: _Side, span, content, lo: int, hi: int):
    """Token indices of `side` overlapping one content span, their offsets in
    message-content coordinates (clipped to the span), and excluded flags: tokens
    not among the `content` tokens, or reaching outside the common content range `[lo, hi)`."""
    start, end, content_start = span
    content = set(content)
    indices, offsets, excluded = [], [], []
    for k, (s, e) in enumerate(side.offsets):
        if (s < end and e > start) or (s == e and start <= s < end):
            local_s = max(s, start) - start + content_start
            local_e = min(e, end) - start + content_start
            indices.append(k)
            offsets.append((local_s, local_e))
            excluded.append((k not in content and e > s) or side.special[k] or local_s < lo or local_e > hi)
    return indices, offsets, excluded


def _content_chunks(student: _Side, teacher: _Side, s_tokens, t_tokens, messages_used: list[bool]):
    """Chunks `(t0, t1, s0, s1)` (sequence indices) inside the used messages' contents, each
    message's closing chunk after them."""
    chunks = []
    for k, used in enumerate(messages_used):
        s_span, t_span = student.spans[k], teacher.spans[k]
        if not used or s_span is None or t_span is None:
            continue
        lo = max(s_span[2], t_span[2])
        hi = min(s_span[2] + s_span[1] - s_span[0], t_span[2] + t_span[1] - t_span[0])
        s_idx, s_off, s_exc = _local_tokens(student, s_span, s_tokens[k][0], lo, hi)
        t_idx, t_off, t_exc = _local_tokens(teacher, t_span, t_tokens[k][0], lo, hi)
        for t0, t1, s0, s1 in align_offsets(t_off, s_off, teacher_excluded=t_exc, student_excluded=s_exc):
            t_range, s_range = t_idx[t0:t1], s_idx[s0:s1]
            if t_range[-1] - t_range[0] + 1 == len(t_range) and s_range[-1] - s_range[0] + 1 == len(s_range):
                chunks.append((t_range[0], t_range[-1] + 1, s_range[0], s_range[-1] + 1))
        s_closing, t_closing = s_tokens[k][1], t_tokens[k][1]
        if s_closing and t_closing:
            chunks.append((t_closing[0], t_closing[-1] + 1, s_closing[0], s_closing[-1] + 1))
    return chunks


def _chunk_ids(length, spans):
    ids = [-1] * length
    for c, (start, end) in enumerate(spans):
        ids[start:end] = [c] * (end - start)
    return ids


def _build(student: _Side, teacher: _Side | None, response: list[bool], mode: str,
           student_max_length, teacher_max_length) -> Example:
    s_len = _cut_length("student_max_length", student_max_length, len(student.ids))
    s_tokens = _response_tokens(student, response)
    s_maskable = _maskable(student, s_tokens)
    if mode == "shared":
        ids, maskable = student.ids[:s_len], s_maskable[:s_len]
        return Example(ids, list(ids), maskable, list(maskable), [-1] * s_len, [-1] * s_len)
    t_len = _cut_length("teacher_max_length", teacher_max_length, len(teacher.ids))
    t_tokens = _response_tokens(teacher, response)
    t_maskable = _maskable(teacher, t_tokens)
    chunks = [c for c in _content_chunks(student, teacher, s_tokens, t_tokens, response)
              if c[1] <= t_len and c[3] <= s_len]
    pairs = []
    if mode == "aligned":  # chunks with the same ids on both sides, over every message's content
        every = [True] * len(response)
        s_all, t_all = _response_tokens(student, every), _response_tokens(teacher, every)
        s_all = [(content, closing if r else []) for (content, closing), r in zip(s_all, response)]
        t_all = [(content, closing if r else []) for (content, closing), r in zip(t_all, response)]
        for t0, t1, s0, s1 in _content_chunks(student, teacher, s_all, t_all, every):
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
                 student_max_length: int | None = None, teacher_max_length: int | None = None,
                 add_eos: bool = True) -> Example:
    """An example from plain text: all of it is response, then EOS when `add_eos` (module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    mode = resolve_mode(student_tokenizer, teacher_tokenizer, mode)
    spans = [(0, len(text), 0)]
    student = _encode_side(text, spans, student_tokenizer, "student_tokenizer", add_eos)
    teacher = None if mode == "shared" else _encode_side(text, spans, teacher_tokenizer, "teacher_tokenizer",
                                                         add_eos)
    return _build(student, teacher, [True], mode, student_max_length, teacher_max_length)


def chat_example(messages, *, student_tokenizer, teacher_tokenizer=None, mode: str | None = None,
                 student_max_length: int | None = None, teacher_max_length: int | None = None) -> Example:
    """An example from a conversation: assistant contents (and their closing tokens) are the response."""
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

def load_text_records(path: str | os.PathLike, *, suffixes: Iterable[str] = (".txt", ".md"),
                      max_chars: int | None = None) -> list[dict]:
    """Text records `{"text": str, "eos": bool}` of a file, or of the files under a folder
    (recursively, sorted, by `suffixes`).

    One record per file; with `max_chars`, each file is cut at line ends into
    pieces of at most `max_chars` characters (a longer line is cut anywhere).
    `eos` is True on a file's last piece only (the EOS is trained where a
    document ends, not where it is cut). A file that is not UTF-8 text is a
    ValueError naming it.
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
    records = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as error:
            raise ValueError(f"{file} is not UTF-8 text (byte {error.start}: {error.reason}); "
                             "remove binary files from --data or convert the file to UTF-8") from None
        pieces = _split_lines(text, max_chars) if max_chars else [text]
        records.extend({"text": piece, "eos": k == len(pieces) - 1} for k, piece in enumerate(pieces))
    return records


def load_texts(path: str | os.PathLike, *, suffixes: Iterable[str] = (".txt", ".md"),
               max_chars: int | None = None) -> list[str]:
    """The texts of `load_text_records` (same arguments), without the document-end flags."""
    return [record["text"] for record in load_text_records(path, suffixes=suffixes, max_chars=max_chars)]


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


def _check_utf8_file(path: str, head_bytes: int = 1 << 16) -> None:
    """ValueError naming `path` when its first bytes are not UTF-8 text (a binary file)."""
    import codecs

    with open(path, "rb") as f:
        head = f.read(head_bytes)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < head_bytes)
        binary = b"\x00" in head
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise ValueError(f"{path} is not a UTF-8 JSON/JSONL text file (binary data in its first bytes)")


def _check_not_blank(path: str) -> None:
    """ValueError naming `path` when it holds nothing but whitespace (`datasets` would raise a
    bare StopIteration on an empty JSON/JSONL file)."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                return
    raise ValueError(f"{path} holds no conversations (the file is empty or blank)")


def load_chat_dataset(source, *, split: str = "train", messages_key: str = "messages", validate: bool = True,
                      **load_kwargs):
    """A `datasets.Dataset` of conversations, from a JSON/JSONL file or a `datasets` object.

    source: a path to a `.json`/`.jsonl` file (loaded with
    `datasets.load_dataset("json", ...)`; `load_kwargs` go there, e.g. `cache_dir`),
    a `datasets.Dataset`, or a `datasets.DatasetDict` (its `split`). Each row must
    have a `messages_key` column of role/content lists. With `validate`, every row
    is checked now (`check_chat_rows`), so a bad row fails before training, named.
    """
    import datasets

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"source {path!r} is not a file")
        _check_utf8_file(path)
        _check_not_blank(path)
        bars_were_on = datasets.is_progress_bar_enabled()   # its "Generating train split" bar: off, then restored
        datasets.disable_progress_bars()
        try:
            dataset = datasets.load_dataset("json", data_files=path, split="train", **load_kwargs)
        except datasets.exceptions.DatasetGenerationError as error:   # e.g. a lone surrogate escape
            cause = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ValueError(f"{path} could not be read as JSON/JSONL: {cause} (rows count from 0, "
                             f"non-empty lines)") from error
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        name = path
    elif isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the DatasetDict (has {list(source)})")
        dataset, name = source[split], f"split {split!r}"
    elif isinstance(source, datasets.Dataset):
        dataset, name = source, "the dataset"
    else:
        raise TypeError(f"source must be a path, datasets.Dataset or DatasetDict, got {type(source).__name__}")
    if messages_key not in dataset.column_names:
        raise ValueError(f"the dataset has no {messages_key!r} column (columns: {dataset.column_names})")
    if validate:
        check_chat_rows(dataset, name, messages_key=messages_key)
    return dataset


def check_chat_rows(rows, source: str = "the dataset", *, messages_key: str = "messages") -> None:
    """Check every conversation of `rows` (a `datasets.Dataset` or a sequence of dict rows):
    the first bad one (not a list of messages, a message without a str role / content, no
    assistant message) raises its TypeError/ValueError naming `source` and the row index
    (0-based; in a JSONL file, row k is the k-th non-empty line)."""
    batches = (rows.iter(batch_size=1024) if hasattr(rows, "iter")
               else ({messages_key: [r.get(messages_key) if isinstance(r, dict) else r
                                     for r in rows[i:i + 1024]]} for i in range(0, len(rows), 1024)))
    index = 0
    for batch in batches:
        for messages in batch[messages_key]:
            try:
                _check_messages(_drop_none_keys(messages), f"{messages_key}")
            except (TypeError, ValueError) as error:
                raise type(error)(f"{source}, row {index}: {error}") from None
            index += 1


class DistillationDataset(torch.utils.data.Dataset):
    """Map-style dataset of `Example`s, built on access from `records`.

    records: a sequence (list, `datasets.Dataset`, ...) of plain texts (str, a whole
    document: EOS added), conversations (lists of messages) or dict rows holding one
    under `messages_key` (chat) or `text_key` (text; an optional bool `"eos"`, as
    `load_text_records` writes, says whether the text ends a document). Tokenizers, mode
    and maximum lengths as in `text_example` / `chat_example`; the mode is resolved once.
    An error in one record names its index.
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
        return record_example(self.records[index], index=index, messages_key=self.messages_key,
                              text_key=self.text_key, **self.options)


def record_example(record, *, index: int | None = None, messages_key: str = "messages", text_key: str = "text",
                   **options) -> Example:
    """The `Example` of one record (`DistillationDataset`); `options` go to `text_example` /
    `chat_example`. A bad record raises its error prefixed with `records[index]`."""
    where = f"records[{index}]" if index is not None else "record"
    try:
        add_eos = True
        if isinstance(record, dict):
            if messages_key in record and record[messages_key] is not None:
                record = record[messages_key]
            elif text_key in record and record[text_key] is not None:
                add_eos = bool(record.get("eos", True))
                record = record[text_key]
            else:
                raise ValueError(f"has neither {messages_key!r} nor {text_key!r}")
        if isinstance(record, str):
            return text_example(record, add_eos=add_eos, **options)
        return chat_example(_drop_none_keys(record), **options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None


def _drop_none_keys(messages):
    """`datasets` fills keys missing from some messages with None: drop those."""
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        return [{k: v for k, v in m.items() if v is not None or k in ("role", "content")}
                if isinstance(m, dict) else m for m in messages]
    return messages


def check_learnable(dataset, *, warn_below: float = 0.5, max_examples: int = 20_000) -> float:
    """The fraction of examples with at least one maskable student token, checked before training.

    ValueError when none has one (every loss would be exactly 0: prompts longer than the
    student length, say); a warning with the fraction when it is below `warn_below`.
    Datasets with more than `max_examples` examples are checked on that many, evenly spaced.
    A dataset with `learnable_flags(student_max_length)` (a `PreparedDataset`) is read, not built.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to train on")
    if hasattr(dataset, "learnable_flags"):
        flags, checked = dataset.learnable_flags(), n
    else:
        indices = range(n) if n <= max_examples else [k * n // max_examples for k in range(max_examples)]
        flags, checked = [any(dataset[i].student_maskable) for i in indices], len(indices)
    learnable = sum(flags)
    fraction = learnable / checked
    scope = f"{checked} examples" + ("" if checked == n else f" (evenly spaced, of {n})")
    if learnable == 0:
        raise ValueError(f"none of {scope} has a maskable (trained) student token: every loss would be 0. "
                         "Prompts are probably longer than the student length: raise --seq-len or shorten "
                         "the prompts")
    if fraction < warn_below:
        warnings.warn(f"only {learnable} of {scope} ({fraction:.1%}) have a maskable student token; the "
                      "others train nothing (prompts longer than the student length?)", stacklevel=2)
    return fraction


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
            example.check(f"examples[{k}]")  # fields are mutable lists: nothing broadcast, no negative id
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


# ------------------------------------------------------------------------------ offline preprocessing

PREPARED_META = "tide_data.json"  # written next to the Arrow files by `prepare`


def vocabulary_fingerprint(tokenizer, size: int | None = None) -> str:
    """sha256 of the tokenizer's `(token, id)` pairs with id < `size` (None: all), so tokens
    added later (the trainer's mask token) do not change it."""
    import hashlib
    import json

    items = sorted((i, t) for t, i in tokenizer.get_vocab().items() if size is None or i < size)
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


class _PrepareRows:
    """The `datasets.map` function of `prepare`: records -> `Example` columns. Tokenizers are
    loaded from their folders in each worker process; the mode is resolved once there."""

    def __init__(self, student_path, teacher_path, mode, messages_key, source):
        self.student_path, self.teacher_path, self.mode = student_path, teacher_path, mode
        self.messages_key, self.source = messages_key, source
        self.options = None

    def __call__(self, batch, indices):
        if self.options is None:
            student, teacher = _load_tokenizer(self.student_path), _load_tokenizer(self.teacher_path)
            self.options = dict(student_tokenizer=student, teacher_tokenizer=teacher,
                                mode=resolve_mode(student, teacher, self.mode))
        columns = {name: [] for name in _PREPARED_COLUMNS}
        keys = list(batch)
        for row, index in enumerate(indices):
            record = {k: batch[k][row] for k in keys}
            try:
                example = record_example(record, index=index, messages_key=self.messages_key, **self.options)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{self.source}: {error}") from None
            for name in _PREPARED_COLUMNS[:-2]:
                columns[name].append(getattr(example, name))
            columns["aligned_pairs"].append([list(p) for p in example.aligned_pairs])
            columns["student_first_maskable"].append(
                next((k for k, m in enumerate(example.student_maskable) if m), -1))
        return columns


_PREPARED_COLUMNS = ("student_input_ids", "teacher_input_ids", "student_maskable", "teacher_maskable",
                     "student_chunk_ids", "teacher_chunk_ids", "num_chunks", "aligned_pairs",
                     "student_first_maskable")


def _load_tokenizer(path):
    if path is None:
        return None
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer folder {path!r} does not exist (a local folder is needed; no hub lookup)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def prepare(data: str, out: str, *, student_tokenizer: str, teacher_tokenizer: str | None = None,
            mode: str | None = None, seq_len: int = 128, num_proc: int | None = None,
            messages_key: str = "messages") -> str:
    """Tokenize and align `data` once, offline, into an Arrow dataset at `out`.

    data: what `tide.train --data` takes (a .json/.jsonl chat file, a text file or a
    folder of .txt/.md/.py files, cut into pieces of `4 * seq_len` characters as the
    trainer does). student_tokenizer / teacher_tokenizer: local tokenizer folders (no
    teacher: "shared"). The examples are stored whole (not truncated): `PreparedDataset`
    cuts them to the trainer's lengths. Runs a `datasets` map with `num_proc` processes.
    Writes `out/tide_data.json` (mode, tokenizer fingerprints, source). Returns `out`.
    """
    import json

    import datasets

    student, teacher = _load_tokenizer(student_tokenizer), _load_tokenizer(teacher_tokenizer)
    resolved = resolve_mode(student, teacher, mode)
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"--out {out!r} exists and is not empty: choose a new folder")
    if data.endswith((".jsonl", ".json")):
        records = load_chat_dataset(data, messages_key=messages_key)
        records = records.select_columns([messages_key])
    else:
        records = datasets.Dataset.from_list(
            load_text_records(data, suffixes=(".txt", ".md", ".py"), max_chars=4 * seq_len))
    rows = _PrepareRows(student_tokenizer, teacher_tokenizer if resolved != "shared" else None, resolved,
                        messages_key, data)
    features = datasets.Features({
        **{f"{side}_input_ids": datasets.Sequence(datasets.Value("int32")) for side in ("student", "teacher")},
        **{f"{side}_maskable": datasets.Sequence(datasets.Value("bool")) for side in ("student", "teacher")},
        **{f"{side}_chunk_ids": datasets.Sequence(datasets.Value("int32")) for side in ("student", "teacher")},
        "num_chunks": datasets.Value("int32"),
        "aligned_pairs": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "student_first_maskable": datasets.Value("int32")})
    import time
    start = time.perf_counter()
    prepared = records.map(rows, batched=True, batch_size=64, with_indices=True, num_proc=num_proc,
                           remove_columns=records.column_names, features=features,
                           desc="tide.data prepare", load_from_cache_file=False)
    prepared.save_to_disk(out)
    seconds = time.perf_counter() - start  # map (worker start and tokenizer loading included) + write
    meta = {"mode": resolved, "num_proc": num_proc or 1, "seconds": round(seconds, 3), "source": os.path.abspath(data), "seq_len": seq_len,
            "num_examples": len(prepared), "student_tokenizer": os.path.abspath(student_tokenizer),
            "teacher_tokenizer": os.path.abspath(teacher_tokenizer) if teacher_tokenizer else None,
            "student_vocab_size": len(student), "teacher_vocab_size": len(teacher) if teacher else None,
            "student_fingerprint": vocabulary_fingerprint(student),
            "teacher_fingerprint": vocabulary_fingerprint(teacher) if teacher else None}
    with open(os.path.join(out, PREPARED_META), "w") as f:
        json.dump(meta, f, indent=1)
    return out


def is_prepared(path) -> bool:
    """Whether `path` is a folder written by `prepare`."""
    return os.path.isfile(os.path.join(os.fspath(path), PREPARED_META))


class PreparedDataset(torch.utils.data.Dataset):
    """The `Example`s of a folder written by `prepare`, cut to the given lengths on access.

    Checks that `mode` and the tokenizers are the ones the folder was prepared with
    (ValueError listing the difference). `student_tokenizer` may have tokens appended
    since (a mask token): only the first `student_vocab_size` ids must match.
    """

    def __init__(self, path, *, student_tokenizer, teacher_tokenizer=None, mode: str | None = None,
                 student_max_length: int | None = None, teacher_max_length: int | None = None):
        import json

        import datasets

        path = os.fspath(path)
        if not is_prepared(path):
            raise ValueError(f"{path!r} is not a folder written by `python -m tide.data prepare` "
                             f"(no {PREPARED_META})")
        with open(os.path.join(path, PREPARED_META)) as f:
            self.meta = json.load(f)
        problems = []
        if mode is not None and mode != self.meta["mode"]:
            problems.append(f"mode {self.meta['mode']!r} (asked: {mode!r})")
        for side, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            if self.meta["mode"] == "shared" and side == "teacher":
                continue
            size = self.meta[f"{side}_vocab_size"]
            if tokenizer is None or vocabulary_fingerprint(tokenizer, size) != self.meta[f"{side}_fingerprint"]:
                problems.append(f"another {side} tokenizer (prepared with {self.meta[f'{side}_tokenizer']})")
        if problems:
            raise ValueError(f"{path} was prepared with " + "; ".join(problems) + ": prepare it again")
        self.mode = self.meta["mode"]
        self.rows = datasets.load_from_disk(path)
        self.student_max_length = _cut_length("student_max_length", student_max_length, 1 << 62)
        self.teacher_max_length = _cut_length("teacher_max_length", teacher_max_length, 1 << 62)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        row = self.rows[int(index)]
        example = Example(row["student_input_ids"], row["teacher_input_ids"], row["student_maskable"],
                          row["teacher_maskable"], row["student_chunk_ids"], row["teacher_chunk_ids"],
                          [tuple(p) for p in row["aligned_pairs"]], row["num_chunks"])
        return example.truncated(self.student_max_length, self.teacher_max_length)

    def learnable_flags(self) -> list[bool]:
        """Per example: a maskable student token survives the cut (`check_learnable`)."""
        return [0 <= k < self.student_max_length for k in self.rows["student_first_maskable"]]


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m tide.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize and align --data once into an Arrow dataset at --out "
                                            "(then: python -m tide.train --data OUT)")
    p.add_argument("--data", required=True, help="a .json/.jsonl chat file, a text file or a folder of texts")
    p.add_argument("--student-tokenizer", required=True, help="local tokenizer folder")
    p.add_argument("--teacher-tokenizer", default=None, help="local tokenizer folder (none: shared)")
    p.add_argument("--out", required=True, help="new folder for the Arrow dataset")
    p.add_argument("--mode", choices=MODES, default=None, help="default: inferred from the tokenizers")
    p.add_argument("--seq-len", type=int, default=128, help="text files are cut into 4 * seq_len characters")
    p.add_argument("--num-proc", type=int, default=None, help="processes for the map (default: 1)")
    args = parser.parse_args(argv)
    out = prepare(args.data, args.out, student_tokenizer=args.student_tokenizer,
                  teacher_tokenizer=args.teacher_tokenizer, mode=args.mode, seq_len=args.seq_len,
                  num_proc=args.num_proc)
    with open(os.path.join(out, PREPARED_META)) as f:
        meta = json.load(f)
    print(f"prepared {meta['num_examples']} examples ({meta['mode']}) in {meta['seconds']:.1f} s "
          f"({meta['num_examples'] / meta['seconds']:.1f} examples/s, num_proc={meta['num_proc']}) -> {out}")


if __name__ == "__main__":
    main()

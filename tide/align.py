"""Cross-tokenizer chunk alignment from character offsets (SPEC.md, "Cross-tokenizer chunks").

The same text is tokenized by the teacher's and the student's tokenizers (any
Hugging Face *fast* tokenizer, `return_offsets_mapping`). A **chunk** is a pair
of token spans, teacher `[t0, t1)` and student `[s0, s1)`, that cover the same
characters of the text, as small as possible.

Rules, all from the offsets `(start, end)` of each token (character indices
into the original text, as fast tokenizers report them even after lowercasing,
accent stripping or NFKC):

1. A token *covers* the characters `[start, end)`. A character position `p`
   (between characters `p - 1` and `p`) is a **boundary** of a tokenization when
   no token of it strictly straddles `p` (`start < p < end`). Byte-level pieces
   of one character share that character's offsets, and a token that ends in
   the middle of a character reports the whole character: such tokens straddle
   no position inside the character, so the character is never split.
2. A chunk's character span is a maximal run of positions joined by tokens of
   either side: the connected components of the union of both sides' open
   token intervals `(start, end)`. So the positions where *both* tokenizations
   have a boundary are exactly the chunk boundaries (minimality), and each
   non-empty token lies in exactly one component.
3. Composed characters: a normalizer that composes characters (NFC/NFKC:
   Qwen2/Qwen3, XLM-R; `e` + U+0301 -> `é`, Hangul jamo -> a syllable) reports
   the composed character's offsets as its *first* source character only, so
   the trailing combining marks or jamo look covered by no token.
   `encode_with_offsets` therefore attaches every uncovered non-whitespace
   character to the token(s) covering the character before it (their end
   moves past it; a run of such characters attaches as a whole). Accents that
   a normalizer strips (WordPiece) are attached the same way. Uncovered
   characters with nothing covered before them stay uncovered.
   Characters still covered by no token of a side (whitespace that WordPiece
   drops, text a template stripped) belong
   to no token of that side; they lie between chunks or inside a chunk's span.
   Inside one chunk's span `[lo, hi)` each side covers every character except
   the ones that side covers nowhere: "the same characters" means equal modulo
   the characters the other tokenizer drops.
4. A component with non-empty tokens on only one side (e.g. a whitespace-only
   token the other side drops) is no chunk: its tokens get chunk id -1.
5. A token with an empty span (`start == end`: trimmed whitespace, a zero-width
   piece) joins the component of the next non-empty token of its own side
   (the previous one at the end of the sequence), so chunks stay contiguous.
6. Special tokens (the tokenizer's special ids, except its unknown token, which
   stands for real text) are never in a chunk: the component they belong to is
   dropped on both sides, so the other side's tokens for those characters get
   -1 too. The same holds for any token the caller excludes (prompt/template
   tokens in `tide.data`).
7. Token order must follow the text. If a tokenizer reports offsets out of
   order, the components between the out-of-order tokens are merged so that
   every chunk is a contiguous token span on both sides.
8. Truncation (`teacher_max_length`, `student_max_length`): a chunk that does
   not fit entirely inside both kept prefixes is dropped (its tokens get -1);
   no chunk is ever kept with a missing part.

`align_offsets` works from offsets alone (no tokenization); `chunk_alignment`
tokenizes and calls it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Alignment", "align_offsets", "check_unicode", "chunk_alignment", "encode_with_offsets",
           "special_token_ids"]

Chunk = tuple[int, int, int, int]  # (teacher_start, teacher_end, student_start, student_end)


@dataclass
class Alignment:
    """Both tokenizations of one text and their chunks.

    teacher_ids `[L_t]`, student_ids `[L_s]`: token ids, no special tokens added.
    teacher_offsets `[L_t]`, student_offsets `[L_s]`: `(start, end)` character
    spans in the text. chunks `[C]`: `(teacher_start, teacher_end, student_start,
    student_end)` token spans, in text order, disjoint, each covering the same
    characters on both sides (module docstring), minimal.
    """
    teacher_ids: list[int]
    student_ids: list[int]
    chunks: list[Chunk]
    teacher_offsets: list[tuple[int, int]] = field(default_factory=list)
    student_offsets: list[tuple[int, int]] = field(default_factory=list)

    def teacher_chunk_ids(self) -> list[int]:
        """Chunk index of each teacher token `[L_t]`, -1 for tokens in no chunk."""
        return _chunk_ids(len(self.teacher_ids), ((c[0], c[1]) for c in self.chunks))

    def student_chunk_ids(self) -> list[int]:
        """Chunk index of each student token `[L_s]`, -1 for tokens in no chunk."""
        return _chunk_ids(len(self.student_ids), ((c[2], c[3]) for c in self.chunks))

    def truncated(self, teacher_max_length: int | None = None,
                  student_max_length: int | None = None) -> "Alignment":
        """Keep the first `teacher_max_length` / `student_max_length` tokens (None: all).

        Every chunk the cut passes through (or that lies past the cut on either
        side) is dropped, so its remaining tokens get chunk id -1.
        """
        t_len = _check_max_length("teacher_max_length", teacher_max_length, len(self.teacher_ids))
        s_len = _check_max_length("student_max_length", student_max_length, len(self.student_ids))
        chunks = [c for c in self.chunks if c[1] <= t_len and c[3] <= s_len]
        return Alignment(self.teacher_ids[:t_len], self.student_ids[:s_len], chunks,
                         self.teacher_offsets[:t_len], self.student_offsets[:s_len])


def _check_max_length(name: str, value: int | None, length: int) -> int:
    if value is None:
        return length
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    return min(value, length)


def _chunk_ids(length: int, spans) -> list[int]:
    ids = [-1] * length
    for index, (start, end) in enumerate(spans):
        ids[start:end] = [index] * (end - start)
    return ids


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids that never belong to a chunk: the special tokens, minus the unknown token."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return frozenset(ids)


def encode_with_offsets(text: str, tokenizer, name: str = "tokenizer"):
    """`(ids, offsets)` of `text` with no special tokens added; offsets index `text`.

    Uncovered non-whitespace characters (composed away by NFC/NFKC, stripped
    accents) are attached to the token before them (module docstring, rule 3).
    Raises TypeError naming `name` when the tokenizer is not a fast (offset-giving)
    one, and ValueError when `text` is not valid Unicode (a lone surrogate).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{name} must be a Hugging Face fast tokenizer (PreTrainedTokenizerFast): "
                        f"character offsets (return_offsets_mapping) are needed, got "
                        f"{type(tokenizer).__name__}")
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False, return_token_type_ids=False)
    except TypeError:
        check_unicode(text)
        raise
    ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    return ids, _attach_uncovered(text, offsets)


def check_unicode(text: str, what: str = "text") -> None:
    """Raise ValueError naming `what` when `text` holds a lone surrogate (not valid Unicode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} is not valid Unicode: a lone surrogate {text[error.start]!r} at character "
                         f"{error.start} (decode the source with errors='replace' or drop it)") from None


def _attach_uncovered(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Rule 3: each uncovered non-whitespace character joins the token(s) ending right before it.

    Tokens in text order (the usual case): one sweep; the gap after the tokens that end at
    the furthest position so far starts with the run of characters they take. Otherwise
    `_attach_uncovered_any_order`.
    """
    moved = {}  # token -> its new end
    reach, at_reach, last_start = 0, [], 0
    for k, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        if s < last_start:
            return _attach_uncovered_any_order(text, offsets)
        last_start = s
        if s > reach > 0:
            run = _visible_run(text, reach, s)
            if run:
                moved.update((j, reach + run) for j in at_reach)
        if e > reach:
            reach, at_reach = e, [k]
        elif e == reach:
            at_reach.append(k)
    if 0 < reach < len(text):
        run = _visible_run(text, reach, len(text))
        if run:
            moved.update((j, reach + run) for j in at_reach)
    if not moved:
        return offsets
    return [(s, moved.get(k, e)) for k, (s, e) in enumerate(offsets)]


def _visible_run(text: str, start: int, stop: int) -> int:
    """How many characters of `text[start:stop]` come before its first whitespace."""
    gap = text[start:stop]
    if gap.isspace():
        return 0
    for i, character in enumerate(gap):
        if character.isspace():
            return i
    return len(gap)


def _attach_uncovered_any_order(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`_attach_uncovered` for offsets out of text order: exact coverage per character."""
    covered = bytearray(len(text))
    for s, e in offsets:
        covered[s:e] = b"\x01" * (e - s)
    ending_at, moved = {}, {}  # end -> non-empty tokens ending there; token -> its new end
    for k, (s, e) in enumerate(offsets):
        if e > s:
            ending_at.setdefault(e, []).append(k)
    for p in range(1, len(text)):
        if covered[p] or text[p].isspace() or not covered[p - 1]:
            continue
        before = ending_at.pop(p, None)  # the tokens covering character p - 1 that end exactly at p
        if before:
            ending_at.setdefault(p + 1, []).extend(before)
            moved.update((k, p + 1) for k in before)
            covered[p] = 1
    if not moved:
        return offsets
    return [(s, moved.get(k, e)) for k, (s, e) in enumerate(offsets)]


def chunk_alignment(text: str, teacher_tokenizer, student_tokenizer, *,
                    teacher_max_length: int | None = None,
                    student_max_length: int | None = None) -> Alignment:
    """Tokenize `text` with both tokenizers and cut it into chunks (module docstring).

    teacher_tokenizer, student_tokenizer: Hugging Face fast tokenizers.
    teacher_max_length / student_max_length: truncate that side to so many tokens;
    chunks the cut passes through are dropped (rule 8).
    """
    teacher_ids, teacher_offsets = encode_with_offsets(text, teacher_tokenizer, "teacher_tokenizer")
    student_ids, student_offsets = encode_with_offsets(text, student_tokenizer, "student_tokenizer")
    chunks = align_offsets(teacher_offsets, student_offsets,
                           teacher_excluded=_special_flags(teacher_ids, teacher_tokenizer),
                           student_excluded=_special_flags(student_ids, student_tokenizer))
    alignment = Alignment(teacher_ids, student_ids, chunks, teacher_offsets, student_offsets)
    if teacher_max_length is not None or student_max_length is not None:
        alignment = alignment.truncated(teacher_max_length, student_max_length)
    return alignment


def _special_flags(ids, tokenizer):
    special = special_token_ids(tokenizer)
    if special.isdisjoint(ids):
        return None
    return [i in special for i in ids]


def align_offsets(teacher_offsets, student_offsets, *, teacher_excluded=None,
                  student_excluded=None) -> list[Chunk]:
    """Chunks `(teacher_start, teacher_end, student_start, student_end)` from offsets alone.

    teacher_offsets `[L_t, 2]`, student_offsets `[L_s, 2]`: `(start, end)` character
    spans of each token in one common coordinate system (the same text); lists of
    pairs or integer arrays.
    teacher_excluded `[L_t]`, student_excluded `[L_s]`: optional flags of tokens that
    may not be in a chunk (special, prompt or template tokens): the component
    holding one is dropped on both sides (rule 6).

    Vectorised (numpy): components by a running maximum of interval ends over
    both sides' intervals sorted by start (rule 2), empty tokens by forward and
    backward fill (rule 5), token ranges per component by binary search.
    """
    t_offsets = _checked_offsets("teacher", teacher_offsets, teacher_excluded)
    s_offsets = _checked_offsets("student", student_offsets, student_excluded)
    t_comp, s_comp, num_components = _components(t_offsets, s_offsets)
    t_comp, s_comp = _attach_empty(t_comp), _attach_empty(s_comp)
    if not (_non_decreasing(t_comp) and _non_decreasing(s_comp)):
        t_comp, s_comp, num_components = _merge_out_of_order(t_comp, s_comp, num_components)
    components = np.arange(num_components)
    t_first, t_end = np.searchsorted(t_comp, components, "left"), np.searchsorted(t_comp, components, "right")
    s_first, s_end = np.searchsorted(s_comp, components, "left"), np.searchsorted(s_comp, components, "right")
    keep = (t_end > t_first) & (s_end > s_first)
    for comp, excluded in ((t_comp, teacher_excluded), (s_comp, student_excluded)):
        if excluded is not None:
            flagged = comp[np.asarray(excluded, dtype=bool) & (comp >= 0)]
            keep[flagged] = False
    return list(zip(t_first[keep].tolist(), t_end[keep].tolist(),
                    s_first[keep].tolist(), s_end[keep].tolist()))


def _checked_offsets(name, offsets, excluded) -> np.ndarray:
    """The offsets as an int64 array `[L, 2]`, checked."""
    if isinstance(offsets, np.ndarray):
        array = offsets.astype(np.int64, copy=False).reshape(-1, 2) if offsets.size == 0 else offsets
    else:  # a list of pairs; np.fromiter over the flat values is ~3x faster than np.asarray
        try:
            if sum(map(len, offsets)) != 2 * len(offsets):
                raise ValueError
            flat = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
        except (TypeError, ValueError):
            raise ValueError(f"{name}_offsets must be a sequence of (start, end) integer pairs") from None
        array = flat.reshape(-1, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name}_offsets must be a sequence of (start, end) pairs, got shape {array.shape}")
    bad = (array[:, 0] < 0) | (array[:, 0] > array[:, 1])
    if bad.any():
        raise ValueError(f"{name}_offsets must hold (start, end) pairs with 0 <= start <= end, "
                         f"got {tuple(array[bad.argmax()].tolist())}")
    if excluded is not None and len(excluded) != len(array):
        raise ValueError(f"{name}_excluded has {len(excluded)} flags for {len(array)} "
                         f"{name}_offsets (lengths must match)")
    return array


def _components(t_offsets, s_offsets):
    """Component index of each non-empty token (-1 for empty ones), and the count.

    Both sides' non-empty intervals sorted by start: an interval opens a new
    component when it starts at or after every earlier interval's end (rule 2).
    """
    t_nonempty = t_offsets[:, 1] > t_offsets[:, 0]
    s_nonempty = s_offsets[:, 1] > s_offsets[:, 0]
    starts = np.concatenate([t_offsets[t_nonempty, 0], s_offsets[s_nonempty, 0]])
    ends = np.concatenate([t_offsets[t_nonempty, 1], s_offsets[s_nonempty, 1]])
    order = np.argsort(starts, kind="stable")
    sorted_ends = ends[order]
    previous_end = np.empty_like(sorted_ends)
    previous_end[:1] = -1
    previous_end[1:] = np.maximum.accumulate(sorted_ends)[:-1]
    sorted_comp = np.cumsum(starts[order] >= previous_end) - 1
    comp = np.empty_like(sorted_comp)
    comp[order] = sorted_comp
    t_comp = np.full(len(t_offsets), -1, dtype=np.int64)
    s_comp = np.full(len(s_offsets), -1, dtype=np.int64)
    num_t = int(t_nonempty.sum())
    t_comp[t_nonempty] = comp[:num_t]
    s_comp[s_nonempty] = comp[num_t:]
    return t_comp, s_comp, int(sorted_comp[-1]) + 1 if len(sorted_comp) else 0


def _attach_empty(comp):
    """Empty tokens (-1) take the component of the next non-empty token, else of
    the previous one (rule 5); a side with no non-empty token stays all -1."""
    empty = comp < 0
    if not empty.any() or empty.all():
        return comp
    n = len(comp)
    index = np.arange(n)
    following = np.minimum.accumulate(np.where(empty, n, index)[::-1])[::-1]
    previous = np.maximum.accumulate(np.where(empty, -1, index))
    return comp[np.where(following < n, following, previous)]


def _non_decreasing(comp) -> bool:
    return bool(np.all(comp[1:] >= comp[:-1]))


def _merge_out_of_order(t_comp, s_comp, num_components):
    """Rule 7: merge every component range [c, m] where a token of component c
    follows one of component m > c; afterwards both sides are non-decreasing."""
    coverage = np.zeros(num_components + 1, dtype=np.int64)  # > 0 on k: k joins k + 1
    for comp in (t_comp, s_comp):
        comp = comp[comp >= 0]
        running = np.maximum.accumulate(comp) if len(comp) else comp
        late = comp < running
        np.add.at(coverage, comp[late], 1)
        np.add.at(coverage, running[late], -1)
    joins = np.cumsum(coverage)[:max(num_components - 1, 0)] > 0
    group = np.concatenate([[0], np.cumsum(~joins)])
    merged = [np.where(comp >= 0, group[np.maximum(comp, 0)], -1) for comp in (t_comp, s_comp)]
    return merged[0], merged[1], int(group[-1]) + 1 if num_components else 0

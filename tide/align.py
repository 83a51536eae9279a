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
3. Characters covered by no token of a side (whitespace that WordPiece drops,
   a combining mark that NFKC composed away, text a template stripped) belong
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

from dataclasses import dataclass, field

__all__ = ["Alignment", "align_offsets", "chunk_alignment", "encode_with_offsets", "special_token_ids"]

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

    Raises TypeError naming `name` when the tokenizer is not a fast (offset-giving) one.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{name} must be a Hugging Face fast tokenizer (PreTrainedTokenizerFast): "
                        f"character offsets (return_offsets_mapping) are needed, got "
                        f"{type(tokenizer).__name__}")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                         return_attention_mask=False, return_token_type_ids=False)
    ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    return ids, offsets


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
    t_special, s_special = special_token_ids(teacher_tokenizer), special_token_ids(student_tokenizer)
    chunks = align_offsets(teacher_offsets, student_offsets,
                           teacher_excluded=[i in t_special for i in teacher_ids] if t_special else None,
                           student_excluded=[i in s_special for i in student_ids] if s_special else None)
    alignment = Alignment(teacher_ids, student_ids, chunks, teacher_offsets, student_offsets)
    if teacher_max_length is not None or student_max_length is not None:
        alignment = alignment.truncated(teacher_max_length, student_max_length)
    return alignment


def align_offsets(teacher_offsets, student_offsets, *, teacher_excluded=None,
                  student_excluded=None) -> list[Chunk]:
    """Chunks `(teacher_start, teacher_end, student_start, student_end)` from offsets alone.

    teacher_offsets `[L_t]`, student_offsets `[L_s]`: `(start, end)` character spans
    of each token in one common coordinate system (the same text).
    teacher_excluded `[L_t]`, student_excluded `[L_s]`: optional flags of tokens that
    may not be in a chunk (special, prompt or template tokens): the component
    holding one is dropped on both sides (rule 6).
    """
    teacher_offsets = _checked_offsets("teacher", teacher_offsets, teacher_excluded)
    student_offsets = _checked_offsets("student", student_offsets, student_excluded)
    t_comp, s_comp, num_components = _components(teacher_offsets, student_offsets)
    t_comp, s_comp = _attach_empty(t_comp), _attach_empty(s_comp)
    if not (_non_decreasing(t_comp) and _non_decreasing(s_comp)):
        t_comp, s_comp, num_components = _merge_out_of_order(t_comp, s_comp, num_components)
    t_first, t_last, t_dropped = _spans(t_comp, teacher_excluded, num_components)
    s_first, s_last, s_dropped = _spans(s_comp, student_excluded, num_components)
    return [(t_first[c], t_last[c] + 1, s_first[c], s_last[c] + 1)
            for c in range(num_components)
            if t_first[c] >= 0 and s_first[c] >= 0 and not (t_dropped[c] or s_dropped[c])]


def _checked_offsets(name, offsets, excluded):
    offsets = [tuple(span) for span in offsets]
    for span in offsets:
        if len(span) != 2 or not 0 <= span[0] <= span[1]:
            raise ValueError(f"{name}_offsets must hold (start, end) pairs with 0 <= start <= end, "
                             f"got {span!r}")
    if excluded is not None and len(excluded) != len(offsets):
        raise ValueError(f"{name}_excluded has {len(excluded)} flags for {len(offsets)} "
                         f"{name}_offsets (lengths must match)")
    return offsets


def _components(t_offsets, s_offsets):
    """Component index of each non-empty token (None for empty ones), and the count.

    Sweep both sides' intervals in order of start; an interval starting at or
    after the current component's end opens a new component (rule 2).
    """
    t_comp: list[int | None] = [None] * len(t_offsets)
    s_comp: list[int | None] = [None] * len(s_offsets)
    t_order, s_order = _order_by_start(t_offsets), _order_by_start(s_offsets)
    i = j = 0
    n_t, n_s = len(t_order), len(s_order)
    component, end = -1, -1
    while i < n_t or j < n_s:
        if j >= n_s or (i < n_t and t_offsets[t_order[i]][0] <= s_offsets[s_order[j]][0]):
            index, comp_list = t_order[i], t_comp
            start, stop = t_offsets[index]
            i += 1
        else:
            index, comp_list = s_order[j], s_comp
            start, stop = s_offsets[index]
            j += 1
        if start >= end:
            component += 1
            end = stop
        elif stop > end:
            end = stop
        comp_list[index] = component
    return t_comp, s_comp, component + 1


def _order_by_start(offsets):
    """Indices of the non-empty tokens sorted by start (already so, almost always)."""
    order = [k for k, (start, stop) in enumerate(offsets) if stop > start]
    previous = -1
    for k in order:
        start = offsets[k][0]
        if start < previous:
            return sorted(order, key=lambda k: offsets[k][0])
        previous = start
    return order


def _attach_empty(comp):
    """Empty tokens take the component of the next non-empty token (rule 5)."""
    out = list(comp)
    following = None
    for k in range(len(out) - 1, -1, -1):
        if out[k] is None:
            out[k] = following
        else:
            following = out[k]
    previous = None
    for k in range(len(out)):  # trailing empty tokens: the previous one's component
        if out[k] is None:
            out[k] = previous
        else:
            previous = out[k]
    return out


def _non_decreasing(comp):
    return all(a <= b for a, b in zip(comp, comp[1:]) if a is not None)


def _merge_out_of_order(t_comp, s_comp, num_components):
    """Rule 7: merge every component range [c, m] where a token of component c
    follows one of component m > c; afterwards both sides are non-decreasing."""
    joins = [False] * max(num_components - 1, 0)  # joins[c]: c is merged with c + 1
    for comp in (t_comp, s_comp):
        running = -1
        for c in comp:
            if c is None:
                continue
            for k in range(c, running):
                joins[k] = True
            running = max(running, c)
    group, current = [0] * num_components, 0
    for c in range(1, num_components):
        current += not joins[c - 1]
        group[c] = current
    return ([None if c is None else group[c] for c in t_comp],
            [None if c is None else group[c] for c in s_comp],
            current + 1 if num_components else 0)


def _spans(comp, excluded, num_components):
    """First and last token of each component on one side, and which are dropped."""
    first, last = [-1] * num_components, [-1] * num_components
    dropped = [False] * num_components
    for k, c in enumerate(comp):
        if c is None:  # this side has no non-empty token at all
            continue
        if first[c] < 0:
            first[c] = k
        last[c] = k
        if excluded is not None and excluded[k]:
            dropped[c] = True
    return first, last, dropped

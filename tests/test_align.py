"""tide.align: chunk alignment from character offsets, on tokenizers trained in the tests.

Property tests over random strings mixing ASCII, code, CJK, emoji, combining
marks, whitespace runs and newlines, for every ordered pair of the test
tokenizers (tests/tokenizers_for_tests.py), against an independent
position-by-position reference (boundary sets per character position), plus
direct checks of cover, disjointness, same characters and minimality.
"""
import itertools
import random

import pytest

import tokenizers_for_tests as toks
from tide.align import Alignment, align_offsets, chunk_alignment, special_token_ids

PIECES = [
    "hello", "World", "the", "distillation", "x", "Ünïcödé", "café", "naïve", "İstanbul", "straße", "ﬁne",
    "def f(x):", "    return x ** 2", "{'a': [1, 2]}", "i += 1;", "#include <stdio.h>", "->", "!=", "0x1F",
    "漢字", "かな", "한국어", "中文字符", "😀", "👍🏽", "👩‍💻", "🇺🇸", "e\u0301", "a\u0308\u0301", "\u0301",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u200b", "\u3000", "\ufeff", "\x00",
]


def random_text(rng: random.Random, max_pieces: int = 30) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["", " ", "\n\n", "😀", "e\u0301"] + [random_text(rng) for _ in range(count)]


PAIRS = list(itertools.product(sorted(toks.ALL), repeat=2))


# ----------------------------------------------------------------------------- reference

def reference_chunks(t_offsets, s_offsets, t_excluded, s_excluded):
    """Chunks by boundary sets per character position (independent of tide.align)."""
    n = max([e for _, e in t_offsets + s_offsets], default=0)

    def straddled(offsets):
        out = [False] * (n + 1)
        for s, e in offsets:
            for p in range(s + 1, e):
                out[p] = True
        return out

    t_str, s_str = straddled(t_offsets), straddled(s_offsets)
    common = [p for p in range(n + 1) if not t_str[p] and not s_str[p]]

    def segment_of_tokens(offsets):
        seg = [None if e == s else max(i for i, c in enumerate(common) if c <= s) for s, e in offsets]
        for k in range(len(seg)):  # empty token: next non-empty one's segment, else previous
            if seg[k] is None:
                later = [x for x in seg[k + 1:] if x is not None]
                earlier = [x for x in seg[:k] if x is not None]
                seg[k] = later[0] if later else (earlier[-1] if earlier else None)
        return seg

    t_seg, s_seg = segment_of_tokens(t_offsets), segment_of_tokens(s_offsets)
    chunks = []
    for c in sorted(set(x for x in t_seg + s_seg if x is not None)):
        t_idx = [k for k, x in enumerate(t_seg) if x == c]
        s_idx = [k for k, x in enumerate(s_seg) if x == c]
        if not t_idx or not s_idx:
            continue
        if any(t_excluded[k] for k in t_idx) or any(s_excluded[k] for k in s_idx):
            continue
        chunks.append((t_idx[0], t_idx[-1] + 1, s_idx[0], s_idx[-1] + 1))
    return chunks


def covered(offsets):
    return {p for s, e in offsets for p in range(s, e)}


def check_properties(text: str, al: Alignment, t_special, s_special):
    """Cover, disjointness, order, same characters and minimality, from first principles."""
    t_off, s_off = al.teacher_offsets, al.student_offsets
    assert len(t_off) == len(al.teacher_ids) and len(s_off) == len(al.student_ids)
    # ordered, disjoint, non-empty on both sides
    previous_t = previous_s = 0
    for t0, t1, s0, s1 in al.chunks:
        assert previous_t <= t0 < t1 <= len(t_off) and previous_s <= s0 < s1 <= len(s_off)
        previous_t, previous_s = t1, s1
    t_ids, s_ids = al.teacher_chunk_ids(), al.student_chunk_ids()
    t_dropped_chars, s_dropped_chars = set(range(len(text))) - covered(t_off), set(range(len(text))) - covered(s_off)
    for c, (t0, t1, s0, s1) in enumerate(al.chunks):
        assert t_ids[t0:t1] == [c] * (t1 - t0) and s_ids[s0:s1] == [c] * (s1 - s0)
        assert not any(al.teacher_ids[k] in t_special for k in range(t0, t1))
        assert not any(al.student_ids[k] in s_special for k in range(s0, s1))
        t_chars, s_chars = covered(t_off[t0:t1]), covered(s_off[s0:s1])
        lo, hi = min(t_chars | s_chars), max(t_chars | s_chars) + 1
        # same characters: inside [lo, hi) each side covers all it covers anywhere
        assert t_chars | (t_dropped_chars & set(range(lo, hi))) == set(range(lo, hi))
        assert s_chars | (s_dropped_chars & set(range(lo, hi))) == set(range(lo, hi))
        t_text = "".join(text[p] for p in sorted(t_chars - s_dropped_chars))
        s_text = "".join(text[p] for p in sorted(s_chars - t_dropped_chars))
        assert t_text == s_text
        # minimality: no position strictly inside the chunk is a boundary of both
        for p in range(lo + 1, hi):
            t_straddles = any(s < p < e for s, e in t_off[t0:t1])
            s_straddles = any(s < p < e for s, e in s_off[s0:s1])
            assert t_straddles or s_straddles, (p, text[lo:hi])
    # cover: a character covered by non-special tokens on both sides is in one chunk
    t_chunk_at = {p: t_ids[k] for k, (s, e) in enumerate(t_off) for p in range(s, e)}
    s_chunk_at = {p: s_ids[k] for k, (s, e) in enumerate(s_off) for p in range(s, e)}
    if not (t_special & set(al.teacher_ids)) and not (s_special & set(al.student_ids)):
        for p in set(t_chunk_at) & set(s_chunk_at):
            assert t_chunk_at[p] == s_chunk_at[p] != -1, (p, text)


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_random_strings_match_reference_and_properties(teacher_name, student_name):
    teacher, student = toks.ALL[teacher_name](), toks.ALL[student_name]()
    t_special, s_special = special_token_ids(teacher), special_token_ids(student)
    for text in random_texts(seed=PAIRS.index((teacher_name, student_name)), count=40):
        al = chunk_alignment(text, teacher, student)
        assert al.teacher_ids == teacher(text, add_special_tokens=False)["input_ids"]
        assert al.student_ids == student(text, add_special_tokens=False)["input_ids"]
        assert al.chunks == reference_chunks(al.teacher_offsets, al.student_offsets,
                                             [i in t_special for i in al.teacher_ids],
                                             [i in s_special for i in al.student_ids]), text
        check_properties(text, al, t_special, s_special)


def random_offsets(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """Synthetic offsets over n characters, starts non-decreasing: tokens, dropped
    characters, empty tokens, repeated spans (byte pieces), partial overlaps."""
    out, p = [], 0
    while p < n:
        kind = rng.random()
        k = min(n - p, rng.randint(1, 4))
        if kind < 0.5:
            out.append((p, p + k))
        elif kind < 0.6:
            pass  # dropped characters
        elif kind < 0.7:
            out.append((p, p))
            continue
        elif kind < 0.85:
            out.extend([(p, p + k)] * rng.randint(2, 3))
        else:
            out.extend([(p, p + k), (p + k - 1, p + k)] if k >= 2 else [(p, p + k)])
        p += k
    if rng.random() < 0.3:
        out.append((n, n))
    return out


def test_synthetic_offsets_match_reference():
    rng = random.Random(7)
    for _ in range(400):
        n = rng.randint(0, 30)
        t_off, s_off = random_offsets(rng, n), random_offsets(rng, n)
        t_exc = [rng.random() < 0.05 for _ in t_off]
        s_exc = [rng.random() < 0.05 for _ in s_off]
        assert align_offsets(t_off, s_off, teacher_excluded=t_exc, student_excluded=s_exc) == \
            reference_chunks(t_off, s_off, t_exc, s_exc), (t_off, s_off, t_exc, s_exc)


def test_out_of_order_offsets_still_give_contiguous_disjoint_chunks():
    rng = random.Random(11)
    for _ in range(200):
        n = rng.randint(1, 30)
        t_off, s_off = random_offsets(rng, n), random_offsets(rng, n)
        for off in (t_off, s_off):
            if len(off) >= 2:
                k = rng.randrange(len(off) - 1)
                off[k], off[k + 1] = off[k + 1], off[k]
        chunks = align_offsets(t_off, s_off)
        previous_t = previous_s = 0
        for t0, t1, s0, s1 in chunks:
            assert previous_t <= t0 < t1 and previous_s <= s0 < s1
            previous_t, previous_s = t1, s1
            t_chars, s_chars = covered(t_off[t0:t1]), covered(s_off[s0:s1])
            # no token outside the chunk covers a character the chunk covers
            others = covered(t_off[:t0] + t_off[t1:]) | covered(s_off[:s0] + s_off[s1:])
            assert not (t_chars | s_chars) & others


def test_same_tokenizer_gives_one_chunk_per_token():
    tok = toks.byte_bpe()
    text = "def main():\n    print('hello, world')  # 漢字 😀\n"
    al = chunk_alignment(text, tok, tok)
    singles = [c for c in al.chunks if c[1] - c[0] == 1 and c[3] - c[2] == 1]
    # byte pieces of one character share offsets and go together; all else is 1:1
    assert al.teacher_ids == al.student_ids
    assert len(singles) >= len(al.chunks) - 3
    assert all(c[0] == c[2] and c[1] == c[3] for c in al.chunks)


def test_empty_text():
    al = chunk_alignment("", toks.wordpiece(), toks.unigram())
    assert al.teacher_ids == [] and al.chunks == [] and al.student_chunk_ids() == []


def test_whitespace_dropped_by_one_side_is_in_no_chunk():
    # WordPiece drops the newline run; the byte-level BPE token for it has no partner
    text = "alpha\n\n\nbeta"
    al = chunk_alignment(text, toks.wordpiece(), toks.byte_bpe())
    s_ids = al.student_chunk_ids()
    newline_tokens = [k for k, (s, e) in enumerate(al.student_offsets) if text[s:e].strip() == ""]
    assert newline_tokens and all(s_ids[k] == -1 for k in newline_tokens)
    assert all(x != -1 for x in al.teacher_chunk_ids())


def test_multibyte_character_split_into_byte_pieces_stays_whole():
    text = "x😀y字"
    al = chunk_alignment(text, toks.byte_bpe(), toks.wordpiece())
    for t0, t1, s0, s1 in al.chunks:
        t_chars = covered(al.teacher_offsets[t0:t1])
        s_chars = covered(al.student_offsets[s0:s1])
        assert t_chars == s_chars


def test_special_tokens_are_never_in_a_chunk_on_either_side():
    text = "before <|im_end|> after"
    teacher, student = toks.unigram(), toks.wordpiece()
    al = chunk_alignment(text, teacher, student)
    im_end_t = teacher.convert_tokens_to_ids("<|im_end|>")
    k = al.teacher_ids.index(im_end_t)
    assert al.teacher_chunk_ids()[k] == -1
    start, end = al.teacher_offsets[k]
    # every student token touching the special token's characters is in no chunk
    for s_k, (s, e) in enumerate(al.student_offsets):
        if s < end and e > start:
            assert al.student_chunk_ids()[s_k] == -1
    assert any(x != -1 for x in al.student_chunk_ids())
    # byte_bpe treats <|im_end|> as special too; "[UNK]" is real text for WordPiece
    assert toks.wordpiece().unk_token_id not in special_token_ids(toks.wordpiece())


def test_empty_span_tokens_join_the_next_token():
    # trimmed byte-level offsets give whitespace-only tokens empty spans
    text = "a  b"
    al = chunk_alignment(text, toks.byte_bpe_trimmed(), toks.wordpiece())
    empty = [k for k, (s, e) in enumerate(al.teacher_offsets) if s == e]
    assert empty
    t_ids = al.teacher_chunk_ids()
    for k in empty:
        nxt = next(j for j in range(k + 1, len(t_ids)) if al.teacher_offsets[j][1] > al.teacher_offsets[j][0])
        assert t_ids[k] == t_ids[nxt]


def test_align_offsets_by_hand():
    # text "abcd": teacher "ab"|"cd", student "a"|"bc"|"d": one chunk for all
    assert align_offsets([(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]) == [(0, 2, 0, 3)]
    # teacher "ab"|"cd", student "a"|"b"|"cd": two chunks
    assert align_offsets([(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 4)]) == [(0, 1, 0, 2), (1, 2, 2, 3)]
    # overlapping byte pieces and an empty token at the front
    assert align_offsets([(0, 0), (0, 1), (0, 1), (1, 2)], [(0, 2)]) == [(0, 4, 0, 1)]
    # one-sided component (student's whitespace at 1..2) is no chunk
    assert align_offsets([(0, 1), (2, 3)], [(0, 1), (1, 2), (2, 3)]) == [(0, 1, 0, 1), (1, 2, 2, 3)]
    # excluded token drops its component on both sides
    assert align_offsets([(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)],
                         teacher_excluded=[False, True]) == [(0, 1, 0, 1)]
    # out-of-order offsets: components merged so chunks stay contiguous
    chunks = align_offsets([(0, 1), (2, 3), (1, 2), (3, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert chunks == [(0, 1, 0, 1), (1, 3, 1, 3), (3, 4, 3, 4)]


def test_truncation_drops_every_chunk_the_cut_passes_through():
    text = "internationalization 漢字かな 😀👍🏽 " * 8
    teacher, student = toks.wordpiece(), toks.byte_bpe()
    full = chunk_alignment(text, teacher, student)
    for t_max, s_max in [(7, None), (None, 8), (6, 12), (0, None), (10_000, 10_000)]:
        al = chunk_alignment(text, teacher, student, teacher_max_length=t_max, student_max_length=s_max)
        t_len = len(full.teacher_ids) if t_max is None else min(t_max, len(full.teacher_ids))
        s_len = len(full.student_ids) if s_max is None else min(s_max, len(full.student_ids))
        assert al.teacher_ids == full.teacher_ids[:t_len] and al.student_ids == full.student_ids[:s_len]
        assert al.chunks == [c for c in full.chunks if c[1] <= t_len and c[3] <= s_len]
        # no chunk is ever active with a missing part
        for t0, t1, s0, s1 in al.chunks:
            assert t1 <= t_len and s1 <= s_len
        # a cut chunk: its kept tokens are -1
        cut = [c for c in full.chunks if c[0] < t_len < c[1] or c[2] < s_len < c[3]]
        for t0, t1, s0, s1 in cut:
            assert all(x == -1 for x in al.teacher_chunk_ids()[t0:min(t1, t_len)])
            assert all(x == -1 for x in al.student_chunk_ids()[s0:min(s1, s_len)])
        if (t_max, s_max) in [(7, None), (None, 8), (6, 12)]:
            assert cut, "the cut should pass through a chunk here"


def test_bad_input_gets_clear_errors():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="teacher_tokenizer.*fast"):
        chunk_alignment("text", SlowTokenizer(), toks.byte_bpe())
    with pytest.raises(TypeError, match="student_tokenizer.*fast"):
        chunk_alignment("text", toks.byte_bpe(), SlowTokenizer())
    with pytest.raises(TypeError, match="text"):
        chunk_alignment(b"bytes", toks.byte_bpe(), toks.byte_bpe())
    with pytest.raises(ValueError, match="teacher_excluded"):
        align_offsets([(0, 1)], [(0, 1)], teacher_excluded=[True, False])
    with pytest.raises(ValueError, match="student_offsets"):
        align_offsets([(0, 1)], [(2, 1)])
    with pytest.raises(ValueError, match="teacher_max_length"):
        chunk_alignment("abc", toks.byte_bpe(), toks.byte_bpe(), teacher_max_length=-1)


def test_composed_characters_attach_to_the_token_before():
    """NFKC (the test Unigram; Qwen2's NFC alike) reports a composed character's offsets as its
    first source character only; WordPiece strips accents. The marks and jamo are attached to the
    token before them, so each chunk covers the same characters on both sides, nothing dropped."""
    texts = ["cafe\u0301", "cafe\u0301 au lait", "na\u0131\u0308ve e\u0301e\u0301", "\u1112\u1161\u11ab\uae00 x",
             "a\u0308\u0301b", "x \u0301y"]
    for teacher_name, student_name in PAIRS:
        teacher, student = toks.ALL[teacher_name](), toks.ALL[student_name]()
        for text in texts:
            al = chunk_alignment(text, teacher, student)
            for side in (al.teacher_offsets, al.student_offsets):
                uncovered = set(range(len(text))) - covered(side)
                assert all(text[p].isspace() or not covered(side) & set(range(p)) or text[p - 1].isspace()
                           for p in uncovered), (text, side)
            for t0, t1, s0, s1 in al.chunks:
                t_chars, s_chars = covered(al.teacher_offsets[t0:t1]), covered(al.student_offsets[s0:s1])
                strip = lambda chars: "".join(text[p] for p in sorted(chars) if not text[p].isspace())
                assert strip(t_chars) == strip(s_chars), (text, teacher_name, student_name)
    al = chunk_alignment("cafe\u0301", toks.byte_bpe(), toks.unigram())
    assert covered(al.student_offsets) >= {1, 2, 3, 4}  # the mark joins "é"


def test_lone_surrogate_is_a_value_error():
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at character 2"):
        chunk_alignment("ab\ud800c", toks.byte_bpe(), toks.unigram())


def test_attach_in_text_order_matches_any_order():
    """The one-sweep path (tokens in text order) and the exact-coverage path agree; the latter
    also serves offsets out of order."""
    from tide.align import _attach_uncovered, _attach_uncovered_any_order

    for name in ("wordpiece", "unigram", "byte_bpe"):
        tok = toks.ALL[name]()
        for text in random_texts(seed=11, count=60) + ["cafe\u0301 e\u0301\u0301x", "\u1112\u1161\u11ab"]:
            offsets = [tuple(o) for o in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
            attached = _attach_uncovered(text, offsets)
            assert attached == _attach_uncovered_any_order(text, offsets), (name, text)
            assert _attach_uncovered(text, offsets[::-1]) == attached[::-1], (name, text)

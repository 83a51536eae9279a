"""Slow tier: alignment and chat masking on real vocabularies and real chat templates.

GPT-2, Llama-3, Qwen2 (NFC), Phi-3 and Llama-2 SentencePiece (with Mistral v3's
template) from the GGUF files of the llama-cpp-python source distribution, with
the real templates it ships, and Mistral's Tekken from the mistral-common wheel
(with Mistral Nemo's template) (tests/real_tokenizers.py: fetched into a cache
outside the repository, skipped with the reason when that is impossible).
Run with TIDE_SLOW_TESTS=1.
"""
import itertools
import random

import pytest

import real_tokenizers as real
from test_align import check_properties, covered, random_text
from test_data import check_maskable
from tide.align import chunk_alignment, encode_with_offsets, special_token_ids
from tide.data import chat_example, render_chat

pytestmark = pytest.mark.slow

NAMES = ["gpt2", "llama3", "qwen2", "phi3", "llama2", "tekken"]
END_OF_TURN = {"gpt2": "<|endoftext|>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "phi3": "<|end|>",
               "llama2": "</s>", "tekken": "</s>"}
HARD_TEXTS = [
    "cafe\u0301", "Cafe\u0301 au lait, na\u0131\u0308ve", "e\u0301e\u0301e\u0301 a\u0308\u0301",
    "\u1112\u1161\u11ab\u1100\u1173\u11af \ud55c\uad6d\uc5b4",  # Hangul jamo (NFC composes them) and syllables
    "emoji 👩‍💻 👍🏽 🇺🇸 😀😀", "漢字とかな、中文字符", "def f(x):\n    return x ** 2  # ok\n",
    "  leading spaces\n\n\ttabs\r\n", "\u00a0nbsp\u3000ideographic space",
]


def tok(name):
    return real.tokenizer(name)


def strip(text, chars):
    return "".join(text[p] for p in sorted(chars) if not text[p].isspace())


@pytest.mark.parametrize("teacher_name,student_name", list(itertools.permutations(NAMES, 2)))
def test_alignment_properties(teacher_name, student_name):
    teacher, student = tok(teacher_name), tok(student_name)
    t_special, s_special = special_token_ids(teacher), special_token_ids(student)
    rng = random.Random(NAMES.index(teacher_name) * 7 + NAMES.index(student_name))
    for text in HARD_TEXTS + [random_text(rng) for _ in range(25)]:
        al = chunk_alignment(text, teacher, student)
        check_properties(text, al, t_special, s_special)
        for t0, t1, s0, s1 in al.chunks:  # the same non-whitespace characters, nothing dropped
            t_chars, s_chars = covered(al.teacher_offsets[t0:t1]), covered(al.student_offsets[s0:s1])
            assert strip(text, t_chars) == strip(text, s_chars), (text, t_chars, s_chars)
        for offsets in (al.teacher_offsets, al.student_offsets):  # every visible character is covered
            missing = [p for p in set(range(len(text))) - covered(offsets) if not text[p].isspace()]
            assert not missing, (text, missing)


def test_composed_mark_is_in_the_chunk_gpt2_to_qwen2():
    al = chunk_alignment("cafe\u0301", tok("gpt2"), tok("qwen2"))
    assert al.chunks[-1][1] == len(al.teacher_ids) and al.chunks[-1][3] == len(al.student_ids)
    last = al.chunks[-1]
    assert 4 in covered(al.student_offsets[last[2]:last[3]]) and 4 in covered(al.teacher_offsets[last[0]:last[1]])


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Quick answer: 4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi in Korean"},
     {"role": "assistant", "content": "\ud55c\uad6d\uc5b4: \uc548\ub155 (\u1112\u1161\u11ab) 👋"},
     {"role": "user", "content": "And French?"}, {"role": "assistant", "content": " Cafe\u0301, na\u00efve 👍🏽"}],
    [{"role": "user", "content": "code"}, {"role": "assistant", "content": "def f(x):\n    return x  # 漢字\n"}],
]


@pytest.mark.parametrize("name", NAMES)
def test_chat_masking_on_real_templates(name):
    """Maskable = assistant content (first word included) + the end-of-turn marker; nothing else."""
    tokenizer = tok(name)
    for messages in CONVERSATIONS:
        if name == "llama2" and messages[0]["role"] == "system":  # Mistral v3's template has no system turn
            messages = messages[1:]
        ex = chat_example(messages, student_tokenizer=tokenizer)
        rendered, _ = check_maskable(ex.student_input_ids, ex.student_maskable, messages, tokenizer)
        offsets = encode_with_offsets(rendered.text, tokenizer)[1]  # composed marks attached (tide.align)
        tokens = tokenizer.convert_ids_to_tokens(ex.student_input_ids)
        masked = [k for k, m in enumerate(ex.student_maskable) if m]
        ranges = [span[:2] for span, m in zip(rendered.content_spans, messages) if m["role"] == "assistant"]
        masked_chars = {p for k in masked for p in range(*offsets[k])}
        for lo, hi in ranges:  # every visible character of every answer is trained
            assert all(p in masked_chars for p in range(lo, hi) if not rendered.text[p].isspace()), tokenizer
        outside = [p for p in masked_chars if not any(lo <= p < hi for lo, hi in ranges)
                   and not rendered.text[p].isspace()]
        markers = {p for k in masked if tokens[k] == END_OF_TURN[name] for p in range(*offsets[k])}
        assert set(outside) <= markers, [rendered.text[p] for p in outside]
        assert [tokens[k] for k in masked].count(END_OF_TURN[name]) == len(ranges), [tokens[k] for k in masked]


PAIRS = [("llama3", "qwen2"), ("qwen2", "phi3"), ("gpt2", "llama2"), ("phi3", "llama3"), ("llama2", "qwen2"),
         ("tekken", "qwen2"), ("qwen2", "tekken")]


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_cross_chat_chunks_on_real_pairs(teacher_name, student_name):
    teacher, student = tok(teacher_name), tok(student_name)
    for messages in CONVERSATIONS:
        if "llama2" in (teacher_name, student_name) and messages[0]["role"] == "system":
            messages = messages[1:]
        ex = chat_example(messages, student_tokenizer=student, teacher_tokenizer=teacher)
        s_text, t_text = render_chat(messages, student).text, render_chat(messages, teacher).text
        s_tokens = student.convert_ids_to_tokens(ex.student_input_ids)
        t_tokens = teacher.convert_ids_to_tokens(ex.teacher_input_ids)
        s_off, t_off = encode_with_offsets(s_text, student)[1], encode_with_offsets(t_text, teacher)[1]
        closing = 0
        for c in range(ex.num_chunks):
            s_pos = [k for k, x in enumerate(ex.student_chunk_ids) if x == c]
            t_pos = [k for k, x in enumerate(ex.teacher_chunk_ids) if x == c]
            assert all(ex.student_maskable[k] for k in s_pos) and all(ex.teacher_maskable[k] for k in t_pos)
            if s_tokens[s_pos[-1]] == END_OF_TURN[student_name]:
                assert t_tokens[t_pos[-1]] == END_OF_TURN[teacher_name]
                closing += 1
                continue
            s_chars = strip(s_text, covered([s_off[k] for k in s_pos]))
            t_chars = strip(t_text, covered([t_off[k] for k in t_pos]))
            assert s_chars == t_chars
        assert closing == sum(m["role"] == "assistant" for m in messages)
        # most of each answer is distilled: chunked student tokens / maskable ones
        assert sum(x >= 0 for x in ex.student_chunk_ids) >= 0.7 * sum(ex.student_maskable)


def test_mistral_first_word_after_inst_is_trained():
    """`"[/INST] "` + `"Quick"`: the token `"▁Quick"` straddles the template's space and is trained."""
    tokenizer = tok("llama2")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Quick answer"}]
    ex = chat_example(messages, student_tokenizer=tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(ex.student_input_ids)
    first = tokens.index("▁Quick")
    assert ex.student_maskable[first] and [t for t, m in zip(tokens, ex.student_maskable) if m][0] == "▁Quick"

"""tide.data: chat/text examples for both tokenizers, modes, truncation, loading, collator."""
import json

import pytest
import torch

import tokenizers_for_tests as toks
from tide.align import special_token_ids
from transformers import AutoTokenizer

from tide.data import (DistillationCollator, DistillationDataset, Example, chat_example, check_learnable,
                       load_chat_dataset, load_text_records, load_texts, render_chat, resolve_mode, text_example)

ANSWER = "The answer is 42, because 6 * 7 = 42."
WITH_SYSTEM = [
    {"role": "system", "content": "Be brief. The answer is 42, because 6 * 7 = 42."},
    {"role": "user", "content": ANSWER},  # same text as the answer: a text search would find this first
    {"role": "assistant", "content": ANSWER},
]
WITHOUT_SYSTEM = WITH_SYSTEM[1:]
MULTI_TURN = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Write code."},
    {"role": "assistant", "content": "def f(x):\n    return x * 2  # 漢字 😀"},
]


@pytest.fixture(scope="module")
def chatml_bpe():
    return toks.with_template(toks.byte_bpe(), toks.CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def system_bpe():
    return toks.with_template(toks.byte_bpe(), toks.DEFAULT_SYSTEM_TEMPLATE)


@pytest.fixture(scope="module")
def system_unigram():
    return toks.with_template(toks.unigram(), toks.DEFAULT_SYSTEM_TEMPLATE)


def encode(text, tokenizer):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def assistant_ranges(rendered, messages):
    return [span[:2] for span, m in zip(rendered.content_spans, messages) if m["role"] == "assistant" and span]


def blank(text):
    return text == "" or text.isspace()


def expected_maskable(text, ids, offsets, ranges, special, eos_id):
    """The rule of tide.data's docstring, written out: content tokens (a character inside an
    assistant content, the rest template whitespace), then each response's closing tokens
    (whitespace tokens, the first special token, EOS right after it)."""
    flags = [False] * len(ids)
    for lo, hi in ranges:
        content = [k for k, (s, e) in enumerate(offsets) if ids[k] not in special and s < hi and e > lo
                   and blank(text[s:lo]) and blank(text[hi:e])]
        for k in content:
            flags[k] = True
        j = content[-1] + 1 if content else next((k for k, (s, _) in enumerate(offsets) if s >= hi), len(ids))
        closing = []
        while j < len(ids) and ids[j] not in special and blank(text[offsets[j][0]:offsets[j][1]]):
            closing.append(j)
            j += 1
        if j < len(ids) and ids[j] in special:
            closing.append(j)
            while j + 1 < len(ids) and ids[j + 1] == eos_id != ids[closing[-1]]:
                j += 1
                closing.append(j)
            for k in closing:
                flags[k] = True
    return flags


def check_maskable(example_ids, maskable, messages, tokenizer):
    """Maskable exactly as the rule says: assistant content tokens and their closing tokens."""
    rendered = render_chat(messages, tokenizer)
    assert rendered.text == (tokenizer.apply_chat_template(messages, tokenize=False)
                             if tokenizer.chat_template else rendered.text)
    for span, m in zip(rendered.content_spans, messages):
        if span is None:  # a message the template leaves out
            continue
        start, end, content_start = span
        assert rendered.text[start:end] == m["content"][content_start:content_start + end - start]
    ids, offsets = encode(rendered.text, tokenizer)
    assert example_ids == ids[:len(example_ids)]
    ranges = assistant_ranges(rendered, messages)
    special = special_token_ids(tokenizer) | {tokenizer.eos_token_id}
    expected = expected_maskable(rendered.text, ids, offsets, ranges, special, tokenizer.eos_token_id)
    for k, flag in enumerate(maskable):
        assert flag == expected[k], (k, rendered.text[slice(*offsets[k])])
    # the maskable text is the assistant content, not the identical user text before it
    masked_chars = {p for k, flag in enumerate(maskable) if flag for p in range(*offsets[k])}
    first_answer = rendered.text.index(ANSWER) if ANSWER in rendered.text else None
    if first_answer is not None and ranges and ranges[-1][0] != first_answer:
        assert not masked_chars & set(range(first_answer, first_answer + len(ANSWER)))
    return rendered, offsets


def clipped_text(rendered, offsets, positions, messages):
    ranges = assistant_ranges(rendered, messages)
    start, end = offsets[positions[0]][0], offsets[positions[-1]][1]
    lo, hi = next((lo, hi) for lo, hi in ranges if start < hi and end > lo)
    return rendered.text[max(start, lo):min(end, hi)]


@pytest.mark.parametrize("messages", [WITH_SYSTEM, WITHOUT_SYSTEM, MULTI_TURN], ids=["system", "no_system", "multi"])
def test_cross_chat_marks_prompt_and_response_and_chunks_inside_response(messages, chatml_bpe, system_unigram):
    ex = chat_example(messages, student_tokenizer=chatml_bpe, teacher_tokenizer=system_unigram)
    s_render, s_off = check_maskable(ex.student_input_ids, ex.student_maskable, messages, chatml_bpe)
    t_render, t_off = check_maskable(ex.teacher_input_ids, ex.teacher_maskable, messages, system_unigram)
    assert ex.aligned_pairs == [] and ex.num_chunks > 0
    assert "You are a helpful assistant" in t_render.text if messages[0]["role"] != "system" else True
    for c in range(ex.num_chunks):
        s_pos = [k for k, x in enumerate(ex.student_chunk_ids) if x == c]
        t_pos = [k for k, x in enumerate(ex.teacher_chunk_ids) if x == c]
        assert s_pos and t_pos
        assert s_pos == list(range(s_pos[0], s_pos[-1] + 1)) and t_pos == list(range(t_pos[0], t_pos[-1] + 1))
        # chunks are response only, and cover the same characters (ASCII/CJK/emoji: nothing dropped
        # except NFKC-free text; compare the covered text with whitespace removed for Metaspace)
        assert all(ex.student_maskable[k] for k in s_pos) and all(ex.teacher_maskable[k] for k in t_pos)
        s_special = [ex.student_input_ids[k] in special_token_ids(chatml_bpe) for k in s_pos]
        t_special = [ex.teacher_input_ids[k] in special_token_ids(system_unigram) for k in t_pos]
        if any(s_special) or any(t_special):  # a closing chunk: end-of-turn marker on both sides
            assert s_special[-1] and t_special[-1]
            continue
        # a content chunk: the same content characters (tokens clipped to the assistant contents)
        s_text = clipped_text(s_render, s_off, s_pos, messages)
        t_text = clipped_text(t_render, t_off, t_pos, messages)
        assert s_text == t_text, (s_text, t_text)
    # every assistant turn's end-of-turn marker is trained and chunked
    assert ex.num_chunks >= sum(m["role"] == "assistant" for m in messages)
    # most of the response is chunked (only chunks touching template text are dropped)
    chunked = sum(x >= 0 for x in ex.student_chunk_ids)
    assert chunked >= 0.6 * sum(ex.student_maskable)


def test_aligned_mode_pairs_point_at_equal_ids(chatml_bpe, system_bpe):
    assert resolve_mode(chatml_bpe, system_bpe, None) == "aligned"
    ex = chat_example(MULTI_TURN, student_tokenizer=chatml_bpe, teacher_tokenizer=system_bpe)
    assert ex.aligned_pairs
    # response chunks come too: a paired response token lies in the same chunk on both sides
    assert ex.num_chunks > 0
    for s, t in ex.aligned_pairs:
        if ex.student_maskable[s]:
            c = ex.student_chunk_ids[s]
            assert c >= 0 and ex.teacher_chunk_ids[t] == c
    assert len(ex.student_input_ids) != len(ex.teacher_input_ids)  # different templates
    s_render, t_render = render_chat(MULTI_TURN, chatml_bpe), render_chat(MULTI_TURN, system_bpe)
    _, s_off = encode(s_render.text, chatml_bpe)
    _, t_off = encode(t_render.text, system_bpe)
    for s, t in ex.aligned_pairs:
        assert ex.student_input_ids[s] == ex.teacher_input_ids[t]
        assert ex.student_maskable[s] == ex.teacher_maskable[t]
        assert s_render.text[slice(*s_off[s])] == t_render.text[slice(*t_off[t])]
    # every maskable student token is paired, except where the renderings split the content
    # differently: here the first token of each answer (ChatML "\nHello" vs "### Assistant: Hello")
    paired = {s for s, _ in ex.aligned_pairs}
    unpaired = {k for k, m in enumerate(ex.student_maskable) if m} - paired
    unpaired -= {k for k in unpaired if ex.student_input_ids[k] in special_token_ids(chatml_bpe)}  # <|im_end|>
    starts = {min(k for k in range(len(s_off)) if s_off[k][0] >= span[0])
              for span, m in zip(s_render.content_spans, MULTI_TURN) if m["role"] == "assistant"}
    assert unpaired <= starts
    # pairs are in order on both sides
    assert ex.aligned_pairs == sorted(ex.aligned_pairs)
    assert [t for _, t in ex.aligned_pairs] == sorted(t for _, t in ex.aligned_pairs)


def test_shared_mode_copies_one_tokenization(chatml_bpe):
    ex = chat_example(WITH_SYSTEM, student_tokenizer=chatml_bpe)
    assert ex.teacher_input_ids == ex.student_input_ids and ex.teacher_maskable == ex.student_maskable
    assert ex.num_chunks == 0 and ex.aligned_pairs == []
    check_maskable(ex.student_input_ids, ex.student_maskable, WITH_SYSTEM, chatml_bpe)


def test_plain_template_without_chat_template():
    tok = toks.wordpiece()
    assert not tok.chat_template
    rendered = render_chat(WITHOUT_SYSTEM, tok)
    assert rendered.text == f"User: {ANSWER}\n\nAssistant: {ANSWER}\n\n"
    assert rendered.content_spans[1][:2] == (len(f"User: {ANSWER}\n\nAssistant: "), len(rendered.text) - 2)
    ex = chat_example(WITHOUT_SYSTEM, student_tokenizer=tok, teacher_tokenizer=toks.byte_bpe())
    check_maskable(ex.student_input_ids, ex.student_maskable, WITHOUT_SYSTEM, tok)
    assert ex.num_chunks > 0


def test_template_that_trims_contents_is_located():
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                "{% endfor %}")
    tok = toks.with_template(toks.byte_bpe(), template)
    messages = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "\n  padded answer \n"}]
    rendered = render_chat(messages, tok)
    start, end, content_start = rendered.content_spans[1]
    assert rendered.text[start:end] == "padded answer" and content_start == 3
    ex = chat_example(messages, student_tokenizer=tok, teacher_tokenizer=toks.with_template(
        toks.unigram(), toks.CHATML_TEMPLATE))
    assert ex.num_chunks > 0
    # trimming only some messages (assistant ones, left side only), with a content that
    # also appears as template text ("assistant")
    mixed = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
             "{% if m['role'] == 'assistant' %}{{ m['content'].lstrip() }}{% else %}{{ m['content'] }}{% endif %}"
             "<|im_end|>\n{% endfor %}")
    tok = toks.with_template(toks.byte_bpe(), mixed)
    messages = [{"role": "user", "content": " assistant\n"}, {"role": "assistant", "content": "\n\n assistant "}]
    rendered = render_chat(messages, tok)
    assert [s[2] for s in rendered.content_spans] == [0, 3]
    assert [rendered.text[s:e] for s, e, _ in rendered.content_spans] == [" assistant\n", "assistant "]


def test_truncation_in_chat_drops_cut_chunks(chatml_bpe, system_unigram):
    full = chat_example(MULTI_TURN, student_tokenizer=chatml_bpe, teacher_tokenizer=system_unigram)
    # cut the student inside the last chunk that has two or more student tokens
    long_chunks = [c for c in range(full.num_chunks) if full.student_chunk_ids.count(c) >= 2]
    c = long_chunks[-1]
    cut = full.student_chunk_ids.index(c) + 1
    ex = chat_example(MULTI_TURN, student_tokenizer=chatml_bpe, teacher_tokenizer=system_unigram,
                      student_max_length=cut)
    assert len(ex.student_input_ids) == cut and ex.teacher_input_ids == full.teacher_input_ids
    assert ex.num_chunks == c  # chunk c and every later one dropped, earlier ones intact
    assert ex.student_chunk_ids == full.student_chunk_ids[:cut - 1] + [-1]
    assert ex.teacher_chunk_ids == [x if x < c else -1 for x in full.teacher_chunk_ids]
    assert ex.student_maskable == full.student_maskable[:cut]


def test_text_example_modes():
    text = "Distillation of diffusion language models.\n\n漢字 😀 naïve café\n"
    cross = text_example(text, student_tokenizer=toks.byte_bpe(), teacher_tokenizer=toks.wordpiece())
    assert cross.num_chunks > 0 and all(cross.student_maskable)
    aligned = text_example(text, student_tokenizer=toks.byte_bpe(), teacher_tokenizer=toks.byte_bpe_trimmed())
    assert len(aligned.aligned_pairs) == len(aligned.student_input_ids)  # same tokens, different offsets
    shared = text_example(text, student_tokenizer=toks.unigram(), student_max_length=5)
    assert len(shared.student_input_ids) == 5 and shared.teacher_input_ids == shared.student_input_ids


def test_load_texts_and_collate_a_batch(tmp_path, chatml_bpe, system_unigram):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("line one\nline two\n" * 5, encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text("# Title\n漢字 text\n", encoding="utf-8")
    (tmp_path / "docs" / "skip.bin").write_text("not text", encoding="utf-8")
    texts = load_texts(tmp_path / "docs")
    assert len(texts) == 2 and texts[1].startswith("# Title")
    pieces = load_texts(tmp_path / "docs" / "a.txt", max_chars=20)
    assert "".join(pieces) == texts[0] and all(len(p) <= 20 for p in pieces)

    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps({"messages": m}) for m in (WITH_SYSTEM, MULTI_TURN)), encoding="utf-8")
    chats = load_chat_dataset(jsonl, cache_dir=str(tmp_path / "cache"))
    records = list(chats) + texts
    dataset = DistillationDataset(records, student_tokenizer=chatml_bpe, teacher_tokenizer=system_unigram,
                                  teacher_max_length=40)
    examples = [dataset[i] for i in range(len(dataset))]
    assert examples[0].student_input_ids == chat_example(
        WITH_SYSTEM, student_tokenizer=chatml_bpe, teacher_tokenizer=system_unigram,
        teacher_max_length=40).student_input_ids
    collate = DistillationCollator.for_tokenizers(chatml_bpe, system_unigram, pad_to_multiple_of=8)
    batch = collate(examples)
    b = len(examples)
    L_s = max(len(e.student_input_ids) for e in examples)
    assert batch["student_input_ids"].shape == (b, -(-L_s // 8) * 8)
    assert batch["teacher_input_ids"].shape[1] == 40
    for side in ("student", "teacher"):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        assert ids.dtype == torch.long and mask.dtype == torch.long
        assert batch[f"{side}_maskable"].dtype == torch.bool
        assert not (batch[f"{side}_maskable"] & (mask == 0)).any()
        assert (batch[f"{side}_chunk_ids"][mask == 0] == -1).all()
    pad = chatml_bpe.pad_token_id
    assert (batch["student_input_ids"][batch["student_attention_mask"] == 0] == pad).all()
    # chunk ids unique per batch: each id lives in one example, on both sides
    num_chunks = int(batch["num_chunks"])
    assert num_chunks == sum(e.num_chunks for e in examples)
    assert batch["chunk_batch_index"].shape == (num_chunks,)
    for c in range(num_chunks):
        rows_s = (batch["student_chunk_ids"] == c).any(1).nonzero().flatten().tolist()
        rows_t = (batch["teacher_chunk_ids"] == c).any(1).nonzero().flatten().tolist()
        assert rows_s == rows_t == [int(batch["chunk_batch_index"][c])]
    assert batch["aligned_pairs"].shape == (0, 3)


def test_collator_aligned_pairs(chatml_bpe, system_bpe):
    examples = [chat_example(m, student_tokenizer=chatml_bpe, teacher_tokenizer=system_bpe)
                for m in (WITHOUT_SYSTEM, MULTI_TURN)]
    batch = DistillationCollator.for_tokenizers(chatml_bpe, system_bpe)(examples)
    pairs = batch["aligned_pairs"]
    assert pairs.shape == (sum(len(e.aligned_pairs) for e in examples), 3)
    i, s, t = pairs.unbind(1)
    assert torch.equal(batch["student_input_ids"][i, s], batch["teacher_input_ids"][i, t])


def test_bad_input_gets_clear_errors(chatml_bpe):
    class SlowTokenizer:
        is_fast = False
        chat_template = None

        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(ValueError, match="empty conversation"):
        chat_example([], student_tokenizer=chatml_bpe)
    with pytest.raises(ValueError, match="no assistant"):
        chat_example([{"role": "user", "content": "hi"}], student_tokenizer=chatml_bpe)
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        chat_example([{"role": "user"}], student_tokenizer=chatml_bpe)
    with pytest.raises(TypeError, match="teacher_tokenizer.*fast"):
        chat_example(WITH_SYSTEM, student_tokenizer=chatml_bpe, teacher_tokenizer=SlowTokenizer())
    with pytest.raises(TypeError, match="student_tokenizer.*fast"):
        text_example("abc", student_tokenizer=SlowTokenizer())
    with pytest.raises(ValueError, match="mode"):
        text_example("abc", student_tokenizer=chatml_bpe, mode="same")
    with pytest.raises(ValueError, match="student_maskable"):
        Example([1, 2], [1], [True], [True], [-1, -1], [-1])
    with pytest.raises(ValueError, match="student_chunk_ids"):
        Example([1], [1], [True], [True], [0], [0], num_chunks=0)
    with pytest.raises(ValueError, match="aligned_pairs"):
        Example([1], [1], [True], [True], [-1], [-1], aligned_pairs=[(0, 3)])
    upper = toks.with_template(toks.byte_bpe(), "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(ValueError, match="changes message contents"):
        render_chat(WITH_SYSTEM, upper, "student_tokenizer")
    with pytest.raises(ValueError, match="empty"):
        DistillationCollator(0, 0)([])
    with pytest.raises(ValueError, match="student_max_length"):
        text_example("abc", student_tokenizer=chatml_bpe, student_max_length=0)


@pytest.mark.parametrize("student_name,teacher_name", [("byte_bpe", "wordpiece"), ("unigram", "byte_bpe"),
                                                       ("wordpiece", "unigram"), ("byte_bpe_trimmed", "unigram")])
def test_random_conversations_chunks_cover_the_same_content(student_name, teacher_name):
    import random

    from test_align import random_text

    rng = random.Random(len(student_name) * 31 + len(teacher_name))
    student = toks.with_template(toks.ALL[student_name](), toks.CHATML_TEMPLATE)
    teacher = toks.with_template(toks.ALL[teacher_name](), toks.DEFAULT_SYSTEM_TEMPLATE)
    for _ in range(8):
        roles = (["system"] if rng.random() < 0.5 else []) + ["user", "assistant"] * rng.randint(1, 2)
        messages = [{"role": r, "content": random_text(rng, 12)} for r in roles]
        ex = chat_example(messages, student_tokenizer=student, teacher_tokenizer=teacher)
        sides = {}
        for side, tok, ids, maskable, chunk_ids in (
                ("student", student, ex.student_input_ids, ex.student_maskable, ex.student_chunk_ids),
                ("teacher", teacher, ex.teacher_input_ids, ex.teacher_maskable, ex.teacher_chunk_ids)):
            rendered, offsets = check_maskable(ids, maskable, messages, tok)
            # each token's place in message-content coordinates: (message, start, end)
            place = []
            for s, e in offsets:
                where = None
                for k, span in enumerate(rendered.content_spans):  # clipped to the content
                    if span and (span[0] < e and s < span[1] or span[0] <= s == e < span[1]):
                        where = (k, max(s, span[0]) - span[0] + span[2], min(e, span[1]) - span[0] + span[2])
                place.append(where)
            covered_by_message = {}
            for where in place:
                if where:
                    covered_by_message.setdefault(where[0], set()).update(range(where[1], where[2]))
            sides[side] = (place, chunk_ids, covered_by_message)
        s_special, t_special = special_token_ids(student), special_token_ids(teacher)
        for c in range(ex.num_chunks):
            s_ids = [i for i, x in zip(ex.student_input_ids, ex.student_chunk_ids) if x == c]
            t_ids = [i for i, x in zip(ex.teacher_input_ids, ex.teacher_chunk_ids) if x == c]
            if s_ids[-1] in s_special or t_ids[-1] in t_special:  # a closing chunk: markers on both sides
                assert s_ids[-1] in s_special and t_ids[-1] in t_special
                continue
            chars, message = {}, set()
            for side, (place, chunk_ids, _) in sides.items():
                members = [place[k] for k, x in enumerate(chunk_ids) if x == c]
                assert members and all(members), "chunk tokens lie inside one content"
                message |= {m[0] for m in members}
                chars[side] = {p for _, s, e in members for p in range(s, e)}
            assert len(message) == 1 and messages[message.pop()]["role"] == "assistant"
            k = next(sides["student"][0][i][0] for i, x in enumerate(sides["student"][1]) if x == c)
            content = messages[k]["content"]
            everything = set(range(len(content)))
            dropped = {side: everything - sides[side][2].get(k, set()) for side in sides}
            t_text = "".join(content[p] for p in sorted(chars["teacher"] - dropped["student"]))
            s_text = "".join(content[p] for p in sorted(chars["student"] - dropped["teacher"]))
            assert t_text == s_text, (t_text, s_text)


def test_load_chat_dataset_from_datasets_objects():
    import datasets

    rows = datasets.Dataset.from_list([{"messages": WITHOUT_SYSTEM}, {"messages": MULTI_TURN}])
    assert load_chat_dataset(rows) is rows
    assert len(load_chat_dataset(datasets.DatasetDict({"train": rows}), split="train")) == 2
    with pytest.raises(ValueError, match="split"):
        load_chat_dataset(datasets.DatasetDict({"train": rows}), split="test")
    with pytest.raises(ValueError, match="'conversation' column"):
        load_chat_dataset(rows, messages_key="conversation")
    with pytest.raises(TypeError, match="source"):
        load_chat_dataset(42)
    with pytest.raises(ValueError, match="not a file"):
        load_chat_dataset("/nonexistent/chat.jsonl")
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        load_texts("/nonexistent/folder")


# ------------------------------------------------------------------------------ what the student learns

def test_end_of_turn_and_eos_are_trained_and_chunked(chatml_bpe, system_unigram, system_bpe):
    """The assistant turn's end-of-turn marker is maskable on both sides and forms its own chunk;
    plain text ends with a maskable EOS, chunked across tokenizers too."""
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    for teacher, mode in ((system_unigram, "cross"), (system_bpe, "aligned"), (None, "shared")):
        ex = chat_example(messages, student_tokenizer=chatml_bpe, teacher_tokenizer=teacher)
        s_tokens = chatml_bpe.convert_ids_to_tokens(ex.student_input_ids)
        im_end = len(s_tokens) - 1 - s_tokens[::-1].index("<|im_end|>")
        assert ex.student_maskable[im_end] and sum(ex.student_maskable) == 2  # "4", "<|im_end|>"
        if mode == "shared":
            continue
        t_tokens = teacher.convert_ids_to_tokens(ex.teacher_input_ids)
        eot = len(t_tokens) - 1 - t_tokens[::-1].index("<|eot|>")
        assert ex.teacher_maskable[eot] and t_tokens[eot - 1].endswith("4")
        assert ex.student_chunk_ids[im_end] == ex.teacher_chunk_ids[eot] == ex.num_chunks - 1 >= 1
    for teacher in (toks.unigram(), toks.byte_bpe_trimmed(), None):
        ex = text_example("hello world", student_tokenizer=toks.byte_bpe(), teacher_tokenizer=teacher)
        assert ex.student_input_ids[-1] == toks.byte_bpe().eos_token_id and all(ex.student_maskable)
        if teacher is not None:
            assert ex.teacher_input_ids[-1] == teacher.eos_token_id and all(ex.teacher_maskable)
            assert ex.student_chunk_ids[-1] == ex.teacher_chunk_ids[-1] == ex.num_chunks - 1
    piece = text_example("hello", student_tokenizer=toks.byte_bpe(), add_eos=False)
    assert toks.byte_bpe().eos_token_id not in piece.student_input_ids
    # the plain template (no chat template) writes EOS after assistant contents
    plain = chat_example(messages, student_tokenizer=toks.byte_bpe())
    assert plain.student_input_ids[plain.student_maskable.index(True) + 1] == toks.byte_bpe().eos_token_id


def test_first_word_after_template_space_is_trained():
    """`"Assistant: "` + `"4"` gives `" 4"`; `"[/INST] "` + `"Qu"` gives `"▁Qu"` (Metaspace):
    a token whose characters outside the content are template whitespace belongs to the content."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "return 4"}]
    plain = toks.byte_bpe()
    mistral = toks.with_template(toks.unigram(), (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"))
    for tok, first in ((plain, "Ġreturn"), (mistral, "▁return")):
        ex = chat_example(messages, student_tokenizer=tok, teacher_tokenizer=toks.wordpiece())
        tokens = tok.convert_ids_to_tokens(ex.student_input_ids)
        assert first in tokens and ex.student_maskable[tokens.index(first)], tokens
        # distilled too: the first word is in a chunk with the teacher's "4"
        c = ex.student_chunk_ids[tokens.index(first)]
        assert c >= 0
        t_tokens = toks.wordpiece().convert_ids_to_tokens(ex.teacher_input_ids)
        assert [t for t, x in zip(t_tokens, ex.teacher_chunk_ids) if x == c] == ["return"]
    # template text that is not whitespace still keeps a token out
    glued = toks.with_template(toks.byte_bpe(), "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n"
                                                "{% endfor %}")
    ex = chat_example([{"role": "user", "content": "x"}, {"role": "assistant", "content": "ab"}],
                      student_tokenizer=glued)
    rendered = render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "ab"}], glued)
    ids, offsets = encode(rendered.text, glued)
    start = rendered.content_spans[1][0]
    for k, flag in enumerate(ex.student_maskable):
        if offsets[k][0] < start:
            assert not flag


def test_mode_is_resolved_once_per_tokenizer_pair(monkeypatch):
    student, teacher = toks.byte_bpe(), toks.unigram()
    calls = []
    for tok in (student, teacher):
        original = tok.get_vocab
        monkeypatch.setattr(tok, "get_vocab", lambda original=original: calls.append(1) or original())
    same_size = toks.byte_bpe_trimmed()
    original = same_size.get_vocab
    monkeypatch.setattr(same_size, "get_vocab", lambda: calls.append(1) or original())
    for _ in range(5):
        text_example("abc", student_tokenizer=student, teacher_tokenizer=same_size)
        text_example("abc", student_tokenizer=same_size, teacher_tokenizer=student)
    assert len(calls) <= 4  # two vocabularies, compared once per ordered pair


def test_lone_surrogate_is_a_library_error_naming_the_example():
    dataset = DistillationDataset(["fine", "bad \ud800 text"], student_tokenizer=toks.byte_bpe(),
                                  teacher_tokenizer=toks.unigram())
    dataset[0]
    with pytest.raises(ValueError, match=r"records\[1\].*surrogate"):
        dataset[1]
    with pytest.raises(ValueError, match="surrogate"):
        chat_example([{"role": "assistant", "content": "\udfff"}], student_tokenizer=toks.byte_bpe())


def test_lone_surrogate_escape_in_a_jsonl_file_names_the_file_and_row(tmp_path):
    """JSON allows a lone `\\ud800` escape; datasets failed with a bare DatasetGenerationError."""
    path = tmp_path / "surrogate.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}'
    path.write_text(good + "\n" + good.replace('"hi"', '"x\\ud800"') + "\n")
    with pytest.raises(ValueError, match=r"surrogate\.jsonl could not be read.*surrogate.*row 1"):
        load_chat_dataset(str(path))


def test_loading_a_jsonl_draws_no_datasets_progress_bar(tmp_path, capfd):
    import datasets

    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n')
    assert len(load_chat_dataset(str(path), cache_dir=str(tmp_path / "cache"))) == 1
    captured = capfd.readouterr()
    assert "Generating train split" not in captured.out + captured.err
    assert datasets.is_progress_bar_enabled()                  # the user's setting is restored


def test_example_truncated_matches_building_with_max_lengths(chatml_bpe, system_unigram):
    full = chat_example(MULTI_TURN, student_tokenizer=chatml_bpe, teacher_tokenizer=system_unigram)
    for s_len, t_len in ((None, None), (10, None), (None, 25), (17, 30), (len(full.student_input_ids), 3)):
        cut = chat_example(MULTI_TURN, student_tokenizer=chatml_bpe, teacher_tokenizer=system_unigram,
                           student_max_length=s_len, teacher_max_length=t_len)
        assert full.truncated(s_len, t_len) == cut


# ------------------------------------------------------------------------------ hardening: bad data

def test_bad_chat_rows_are_named_with_file_and_row(tmp_path):
    good = {"messages": WITHOUT_SYSTEM}
    bad_rows = [({"messages": [{"content": "no role"}, {"role": "assistant", "content": "a"}]}, r"role"),
                ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant"),
                ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]},
                 "must be str"),
                ({"messages": "not a list"}, "must be a list")]
    for k, (bad, message) in enumerate(bad_rows):
        path = tmp_path / f"chat{k}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good]) + "\n", encoding="utf-8")
        with pytest.raises((TypeError, ValueError), match=rf"chat{k}\.jsonl, row 2: .*{message}"):
            load_chat_dataset(path, cache_dir=str(tmp_path / "cache"))


def test_binary_file_in_data_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00binary")
    with pytest.raises(ValueError, match=r"b\.txt is not UTF-8"):
        load_texts(tmp_path / "docs")
    (tmp_path / "chat.jsonl").write_bytes(b"\xff\xfe\x00\x01\x02" * 10)
    with pytest.raises(ValueError, match=r"chat\.jsonl is not a UTF-8"):
        load_chat_dataset(tmp_path / "chat.jsonl", cache_dir=str(tmp_path / "cache"))


def test_collator_rejects_a_shortened_maskable_and_negative_ids():
    collate = DistillationCollator(0, 0)
    ex = Example([1, 2, 3], [1, 2, 3], [True] * 3, [True] * 3, [-1] * 3, [-1] * 3)
    ex.student_maskable = [True]  # mutated after construction: would broadcast
    with pytest.raises(ValueError, match=r"examples\[0\]\.student_maskable has length 1"):
        collate([ex])
    ex = Example([1, 2, 3], [1, 2, 3], [True] * 3, [True] * 3, [-1] * 3, [-1] * 3)
    ex.teacher_input_ids[1] = -5
    with pytest.raises(ValueError, match=r"examples\[0\]\.teacher_input_ids holds a negative token id"):
        collate([ex])
    with pytest.raises(ValueError, match="negative token id"):
        Example([-1], [1], [True], [True], [-1], [-1])


def test_check_learnable_fails_when_none_and_warns_when_few():
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    tok = toks.with_template(toks.byte_bpe(), toks.CHATML_TEMPLATE)
    none = DistillationDataset([long_prompt] * 3, student_tokenizer=tok, student_max_length=32)
    with pytest.raises(ValueError, match="none of 3 examples has a maskable"):
        check_learnable(none)
    few = DistillationDataset([long_prompt] * 3 + [short], student_tokenizer=tok, student_max_length=32)
    with pytest.warns(UserWarning, match=r"only 1 of 4 examples \(25\.0%\)"):
        assert check_learnable(few) == 0.25
    assert check_learnable(DistillationDataset([short] * 2, student_tokenizer=tok, student_max_length=32)) == 1.0


# ------------------------------------------------------------------------------ offline preprocessing

def test_prepare_writes_arrow_examples_equal_to_the_dataset(tmp_path, chatml_bpe, system_unigram):
    from tide.data import PreparedDataset, main as data_main

    chatml_bpe.save_pretrained(tmp_path / "student")
    system_unigram.save_pretrained(tmp_path / "teacher")
    student = AutoTokenizer.from_pretrained(tmp_path / "student")
    teacher = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": m}) for m in (WITH_SYSTEM, MULTI_TURN) * 3), encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("line one\nline two\n" * 40, encoding="utf-8")
    for data, out in ((chat, "chat_out"), (tmp_path / "docs", "text_out")):
        data_main(["prepare", "--data", str(data), "--student-tokenizer", str(tmp_path / "student"),
                   "--teacher-tokenizer", str(tmp_path / "teacher"), "--out", str(tmp_path / out),
                   "--seq-len", "32"])
        prepared = PreparedDataset(tmp_path / out, student_tokenizer=student, teacher_tokenizer=teacher,
                                   mode="cross", student_max_length=32, teacher_max_length=40)
        records = (load_chat_dataset(chat, cache_dir=str(tmp_path / "cache")) if out == "chat_out" else
                   load_text_records(tmp_path / "docs", max_chars=128))
        built = DistillationDataset(records, student_tokenizer=student, teacher_tokenizer=teacher,
                                    student_max_length=32, teacher_max_length=40)
        assert len(prepared) == len(built) > 1
        assert [prepared[i] for i in range(len(built))] == [built[i] for i in range(len(built))]
        assert prepared.learnable_flags() == [any(built[i].student_maskable) for i in range(len(built))]
    whole = PreparedDataset(tmp_path / "text_out", student_tokenizer=student, teacher_tokenizer=teacher)
    eos = [whole[i].student_input_ids[-1] == student.eos_token_id for i in range(len(whole))]
    assert eos[-1] and not any(eos[:-1])  # EOS only where the document ends (untruncated pieces)
    with pytest.raises(ValueError, match="another teacher tokenizer"):
        PreparedDataset(tmp_path / "chat_out", student_tokenizer=student, teacher_tokenizer=student)
    with pytest.raises(ValueError, match="mode 'cross'"):
        PreparedDataset(tmp_path / "chat_out", student_tokenizer=student, teacher_tokenizer=teacher, mode="aligned")



# ChatML that refuses conversations whose roles do not alternate (as Mistral's and Llama-2's do)
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
TWO_QUESTIONS = [{"role": "user", "content": "q"}, {"role": "user", "content": "q again"},
                 {"role": "assistant", "content": "a"}]


def test_a_conversation_the_template_refuses_is_a_value_error_naming_the_example():
    """jinja's TemplateError from the template's raise_exception was not a ValueError, so neither
    the dataset nor `prepare` named the row that caused it."""
    tokenizer = toks.with_template(toks.byte_bpe(), ALTERNATING_TEMPLATE)
    assert chat_example(WITHOUT_SYSTEM, student_tokenizer=tokenizer).num_chunks == 0
    with pytest.raises(ValueError, match=r"chat template of student_tokenizer refuses.*must alternate"):
        chat_example(TWO_QUESTIONS, student_tokenizer=tokenizer)
    dataset = DistillationDataset([WITHOUT_SYSTEM, TWO_QUESTIONS], student_tokenizer=tokenizer)
    dataset[0]
    with pytest.raises(ValueError, match=r"records\[1\].*refuses the conversation"):
        dataset[1]


def test_prepare_with_two_processes_writes_the_same_examples_as_one(tmp_path, chatml_bpe, system_unigram):
    """`--num-proc 2` splits the rows between two processes (each loads the tokenizers itself):
    the same rows, in the same order, as one process, over several map batches per process;
    a bad row in the second process's half is named by its index in the whole file."""
    import datasets

    from tide.data import PreparedDataset, main as data_main

    chatml_bpe.save_pretrained(tmp_path / "student")
    system_unigram.save_pretrained(tmp_path / "teacher")
    student = AutoTokenizer.from_pretrained(tmp_path / "student")
    teacher = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    conversations = [WITH_SYSTEM, MULTI_TURN, WITHOUT_SYSTEM,
                     [{"role": "user", "content": "x"}, {"role": "assistant", "content": " café 😀 한국어\n"}]]
    chat = tmp_path / "chat.jsonl"  # 150 rows: more than one batch of 64 in each half
    chat.write_text("\n".join(json.dumps({"messages": conversations[i % 4]}) for i in range(150)),
                    encoding="utf-8")
    (tmp_path / "docs").mkdir()
    for name in ("a.txt", "b.md", "c.py"):
        (tmp_path / "docs" / name).write_text(f"{name}: line one\nline two 漢字\n" * 240, encoding="utf-8")

    def prepare(data, out, num_proc, student_folder="student"):
        data_main(["prepare", "--data", str(data), "--student-tokenizer", str(tmp_path / student_folder),
                   "--teacher-tokenizer", str(tmp_path / "teacher"), "--out", str(tmp_path / out),
                   "--seq-len", "32", "--num-proc", str(num_proc)])
        return tmp_path / out

    for data, minimum in ((chat, 150), (tmp_path / "docs", 150)):
        outs = [prepare(data, f"{data.name}_{num_proc}", num_proc) for num_proc in (1, 2)]
        one, two = (datasets.load_from_disk(str(out)) for out in outs)
        assert one.features == two.features
        assert len(one) == len(two) >= minimum
        assert one.to_list() == two.to_list()
        metas = [json.loads((out / "tide_data.json").read_text()) for out in outs]
        assert [m["num_proc"] for m in metas] == [1, 2]
        assert ({k: v for k, v in metas[0].items() if k not in ("seconds", "num_proc")}
                == {k: v for k, v in metas[1].items() if k not in ("seconds", "num_proc")})
        prepared = [PreparedDataset(out, student_tokenizer=student, teacher_tokenizer=teacher,
                                    student_max_length=32, teacher_max_length=40) for out in outs]
        assert [prepared[0][i] for i in range(len(one))] == [prepared[1][i] for i in range(len(two))]
        assert prepared[0].learnable_flags() == prepared[1].learnable_flags()
    # a row the student's template refuses, in the second half: named by its index in the file
    toks.with_template(chatml_bpe, ALTERNATING_TEMPLATE).save_pretrained(tmp_path / "alternating")
    rows = [WITHOUT_SYSTEM] * 150
    rows[120] = TWO_QUESTIONS
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"messages": m}) for m in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl: records\[120\]: .*refuses the conversation"):
        prepare(bad, "bad_2", 2, student_folder="alternating")

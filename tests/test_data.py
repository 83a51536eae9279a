"""tide.data: chat/text examples for both tokenizers, modes, truncation, loading, collator."""
import json

import pytest
import torch

import tokenizers_for_tests as toks
from tide.align import special_token_ids
from tide.data import (DistillationCollator, DistillationDataset, Example, chat_example, load_chat_dataset,
                       load_texts, render_chat, resolve_mode, text_example)

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
    return [span[:2] for span, m in zip(rendered.content_spans, messages) if m["role"] == "assistant"]


def check_maskable(example_ids, maskable, messages, tokenizer):
    """Maskable exactly where a non-special token lies inside an assistant content."""
    rendered = render_chat(messages, tokenizer)
    assert rendered.text == (tokenizer.apply_chat_template(messages, tokenize=False)
                             if tokenizer.chat_template else rendered.text)
    for span, m in zip(rendered.content_spans, messages):
        start, end, content_start = span
        assert rendered.text[start:end] == m["content"][content_start:content_start + end - start]
    ids, offsets = encode(rendered.text, tokenizer)
    assert example_ids == ids[:len(example_ids)]
    ranges = assistant_ranges(rendered, messages)
    special = special_token_ids(tokenizer)
    for k, flag in enumerate(maskable):
        s, e = offsets[k]
        inside = e > s and any(lo <= s and e <= hi for lo, hi in ranges) and ids[k] not in special
        assert flag == inside, (k, rendered.text[s:e])
    # the maskable text is the assistant content, not the identical user text before it
    masked_chars = {p for k, flag in enumerate(maskable) if flag for p in range(*offsets[k])}
    first_answer = rendered.text.index(ANSWER) if ANSWER in rendered.text else None
    if first_answer is not None and ranges and ranges[-1][0] != first_answer:
        assert not masked_chars & set(range(first_answer, first_answer + len(ANSWER)))
    return rendered, offsets


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
        s_text = s_render.text[s_off[s_pos[0]][0]:s_off[s_pos[-1]][1]]
        t_text = t_render.text[t_off[t_pos[0]][0]:t_off[t_pos[-1]][1]]
        assert s_text == t_text, (s_text, t_text)
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
                for k, span in enumerate(rendered.content_spans):
                    if span and span[0] <= s and e <= span[1]:
                        where = (k, s - span[0] + span[2], e - span[0] + span[2])
                place.append(where)
            covered_by_message = {}
            for where in place:
                if where:
                    covered_by_message.setdefault(where[0], set()).update(range(where[1], where[2]))
            sides[side] = (place, chunk_ids, covered_by_message)
        for c in range(ex.num_chunks):
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

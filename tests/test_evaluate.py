"""tide.evaluate: the ELBO in bits per byte against answers known in closed form, the exact
NELBO by enumeration of every mask, determinism, the CLI and bad input."""
import copy
import itertools
import json
import math

import pytest
import torch
from torch import nn

from tide.evaluate import elbo, load_checkpoint, main
from tide.models import BD3LM, MDLM, build_config, build_model
from tokenizers_for_tests import byte_bpe, training_text

MASK = "<|mask|>"
TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n",
         "class Point:\n    x: int = 0\n    y: int = 0\n", "import os\nprint(os.getcwd())\n"]


@pytest.fixture(scope="module")
def tok():
    tokenizer = copy.deepcopy(byte_bpe())
    tokenizer.add_special_tokens({"additional_special_tokens": [MASK]})
    tokenizer.mask_token = MASK
    return tokenizer


def tiny(tok, kind="bd3lm", block=8, seed=0, layers=1):
    torch.manual_seed(seed)
    config = build_config("qwen3", len(tok), 32, layers, 2, max_position_embeddings=256)
    return build_model(kind, config, block_size=block, mask_token_id=tok.convert_tokens_to_ids(MASK)).eval()


def n_tokens(tok, texts, eos=True):
    """Scored tokens of plain texts: the text's tokens and the EOS after it (what tide.data trains)."""
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + (eos and tok.eos_token_id is not None)
               for t in texts)


class Oracle(nn.Module):
    """A duck-typed tide model with a known answer: hidden = `scale * one_hot(source)` and an
    identity LM head, so the logit of `source`'s token is `scale`, every other logit 0.
    source "x_0": all mass on the true token; "x_t": at masked positions all mass on the mask."""

    def __init__(self, vocab, mask_token_id, source, kind="bd3lm", block_size=8, scale=40.0):
        super().__init__()
        self.kind, self.block_size, self.mask_token_id = kind, block_size if kind == "bd3lm" else None, mask_token_id
        self.source, self.scale = source, scale
        self.head = nn.Parameter(torch.eye(vocab), requires_grad=False)
        self.config = type("Config", (), {"max_position_embeddings": 256})()

    @property
    def lm_head_weight(self):
        return self.head

    def forward(self, x_t, x_0=None, attention_mask=None):
        ids = x_0 if self.source == "x_0" else x_t
        return self.scale * nn.functional.one_hot(ids, self.head.shape[0]).float()


@pytest.mark.parametrize("kind", ["bd3lm", "mdlm"])
def test_uniform_logits_give_log2_vocab_per_token(tok, kind):
    model = tiny(tok, kind)
    with torch.no_grad():
        model.decoder.get_output_embeddings().weight.zero_()      # every logit 0: uniform over V
    result = elbo(model, TEXTS, tokenizer=tok, samples=3, seed=1, progress=False)
    tokens, nbytes = n_tokens(tok, TEXTS), sum(len(t.encode()) for t in TEXTS)
    assert (result.tokens, result.bytes) == (tokens, nbytes)
    assert result.bits_per_byte == pytest.approx(math.log2(model.vocab_size) * tokens / nbytes, rel=1e-6)
    assert result.bits_per_token == pytest.approx(math.log2(model.vocab_size), rel=1e-6)
    assert result.perplexity_bound == pytest.approx(model.vocab_size, rel=1e-5)
    assert result.bits_per_byte_se == pytest.approx(0.0, abs=1e-6)


def test_all_mass_on_the_true_token_gives_zero(tok):
    oracle = Oracle(len(tok), tok.convert_tokens_to_ids(MASK), "x_0")
    result = elbo(oracle, TEXTS, tokenizer=tok, samples=4, progress=False)
    assert result.bits_per_byte < 1e-9 and result.tokens == n_tokens(tok, TEXTS)


def test_masked_inputs_are_hidden_and_weights_sum_to_the_tokens(tok):
    # predicts its input: sure of the mask token at a masked position, so -log p(true) = 40 nats
    # (+ a e^-40 term) at each masked token; the weights L_b / n make every mask count exactly once
    oracle = Oracle(len(tok), tok.convert_tokens_to_ids(MASK), "x_t", block_size=4)
    result = elbo(oracle, TEXTS, tokenizer=tok, samples=5, progress=False)
    assert result.nats_per_token == pytest.approx(40.0, rel=1e-6)
    assert result.bits_per_byte_se == pytest.approx(0.0, abs=1e-6)


def test_bd3lm_with_one_block_equals_mdlm_on_the_same_weights(tok):
    bd3lm = tiny(tok, "bd3lm", block=32, layers=2)
    mdlm = MDLM(copy.deepcopy(bd3lm.decoder), bd3lm.mask_token_id).eval()
    texts = [t[:150] for t in training_text()[1:6]]
    a = elbo(bd3lm, texts, tokenizer=tok, samples=4, seed=3, seq_len=32, progress=False)
    b = elbo(mdlm, texts, tokenizer=tok, samples=4, seed=3, seq_len=32, progress=False)
    assert a.windows == b.windows > len(texts)                  # long texts were cut into windows
    assert a.bits_per_byte == pytest.approx(b.bits_per_byte, rel=1e-5)
    assert a.bits_per_byte_se == pytest.approx(b.bits_per_byte_se, rel=1e-4)


def exact_nelbo(model, ids, block, pad_id):
    """Sum over blocks of sum_{n=1..L_b} (1/n) mean_{|M|=n} sum_{i in M} -log p(x_i | x_M): every mask
    (BD3LM: padded to whole blocks, padding hidden from attention)."""
    padded = -(-len(ids) // block) * block if model.kind == "bd3lm" else len(ids)
    x_0 = torch.tensor([ids + [pad_id] * (padded - len(ids))])
    attention = (torch.arange(padded) < len(ids)).long()[None] if padded > len(ids) else None
    total = 0.0
    for start in range(0, len(ids), block):
        positions = list(range(start, min(start + block, len(ids))))
        for n in range(1, len(positions) + 1):
            subsets = list(itertools.combinations(positions, n))
            for subset in subsets:
                x_t = x_0.clone()
                x_t[0, list(subset)] = model.mask_token_id
                with torch.no_grad():
                    logp = torch.log_softmax(model(x_t, x_0, attention)[0].double() @ model.lm_head_weight.double().T, -1)
                total -= sum(float(logp[i, ids[i]]) for i in subset) / n / len(subsets)
    return total


@pytest.mark.parametrize("kind,block", [("mdlm", None), ("bd3lm", 3)])
def test_estimate_is_unbiased_against_every_mask(tok, kind, block):
    model = tiny(tok, kind, block=block or 8, layers=2)
    text = "x = 1 + 2"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]   # tide.data scores the EOS too
    assert 5 <= len(ids) <= 9
    exact = exact_nelbo(model, ids, block or len(ids), tok.pad_token_id)
    seq_len = -(-len(ids) // block) * block if block else None
    result = elbo(model, [text], tokenizer=tok, samples=400, seed=0, batch_size=100, seq_len=seq_len,
                  progress=False)
    nats, se = result.bits_per_byte * math.log(2) * result.bytes, result.bits_per_byte_se * math.log(2) * result.bytes
    assert 0 < se < 0.05 * exact
    assert abs(nats - exact) < 4 * se, (nats, exact, se)


def test_standard_error_shrinks_like_one_over_sqrt_samples(tok):
    model = tiny(tok, "bd3lm", block=8)
    texts = [t[:400] for t in training_text()[1:9]]
    few = elbo(model, texts, tokenizer=tok, samples=2, seed=0, batch_size=32, seq_len=32, progress=False)
    many = elbo(model, texts, tokenizer=tok, samples=32, seed=0, batch_size=32, seq_len=32, progress=False)
    assert few.windows >= 40
    ratio = few.bits_per_byte_se / many.bits_per_byte_se
    assert 2.5 < ratio < 6.5, ratio                              # sqrt(32 / 2) = 4
    assert abs(few.bits_per_byte - many.bits_per_byte) < 4 * few.bits_per_byte_se
    assert math.isnan(elbo(model, texts[:1], tokenizer=tok, samples=1, progress=False).bits_per_byte_se)


def test_deterministic_in_the_seed_not_the_batch_size(tok):
    model = tiny(tok, "bd3lm", block=8)
    a = elbo(model, TEXTS, tokenizer=tok, samples=3, seed=7, batch_size=2, progress=False)
    b = elbo(model, TEXTS, tokenizer=tok, samples=3, seed=7, batch_size=5, progress=False)
    c = elbo(model, TEXTS, tokenizer=tok, samples=3, seed=8, batch_size=5, progress=False)
    assert a.bits_per_byte == pytest.approx(b.bits_per_byte, rel=1e-6)
    assert a.bits_per_byte != c.bits_per_byte


def test_chat_jsonl_scores_assistant_content_only(tok, tmp_path):
    model = tiny(tok, "bd3lm", block=8)
    rows = [{"messages": [{"role": "user", "content": "What is two plus two?"},
                          {"role": "assistant", "content": "Two plus two is four."}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello! How can I help?"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = elbo(model, str(path), tokenizer=tok, samples=2, progress=False)
    assert result.bytes == len("Two plus two is four.") + len("Hello! How can I help?")
    assert 0 < result.tokens < sum(n_tokens(tok, [m["content"] for m in r["messages"]], eos=False) for r in rows)
    listed = elbo(model, [r["messages"] for r in rows], tokenizer=tok, samples=2, progress=False)
    assert listed.bits_per_byte == pytest.approx(result.bits_per_byte, rel=1e-6)


def test_cli_on_a_saved_checkpoint_writes_json(tok, tmp_path, capsys):
    model = tiny(tok, "bd3lm", block=8)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "trainer_state.json").write_text(json.dumps({"step": 1, "config": {"seq_len": 16}}))  # as tide.train
    (tmp_path / "data").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "data" / f"{i}.py").write_text(text)
    out = main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"), "--samples", "2",
                "--json", str(tmp_path / "r.json"), "--device", "cpu", "--quiet", "--infill", "2", "--span-chars", "8"])
    assert "bits/byte" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(out)) and saved["kind"] == "bd3lm"
    assert saved["elbo"]["seq_len"] == 16                          # the training --seq-len by default
    assert saved["infill"]["spans"] == 2 and 0 <= saved["infill"]["char_accuracy"] <= 1
    direct = elbo(model, TEXTS, tokenizer=tok, samples=2, seq_len=16, progress=False)
    assert saved["elbo"]["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-5)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, BD3LM) and loaded.block_size == 8 and not loaded.training


# --------------------------------------------------------------------------- bad input
def test_bad_checkpoints(tok, tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a local directory"):
        load_checkpoint("Qwen/Qwen3-0.6B")                           # never a hub lookup
    plain = tiny(tok, "bd3lm").decoder                              # a plain HF causal LM
    plain.config.tide_kind = None
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a tide model"):
        load_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_bad_arguments_and_data(tok, tmp_path):
    model = tiny(tok, "bd3lm", block=8)
    with pytest.raises(ValueError, match="samples"):
        elbo(model, TEXTS, tokenizer=tok, samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        elbo(model, TEXTS, tokenizer=tok, batch_size=0)
    with pytest.raises(ValueError, match="seq_len must be a multiple"):
        elbo(model, TEXTS, tokenizer=tok, seq_len=12)
    with pytest.raises(ValueError, match="does not exist"):
        elbo(model, str(tmp_path / "nope.txt"), tokenizer=tok)
    with pytest.raises(ValueError, match="data is empty"):
        elbo(model, [], tokenizer=tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        elbo(model, str(tmp_path / "empty"), tokenizer=tok)
    with pytest.raises(ValueError, match="shorter than one block"):
        elbo(model, ["ab"], tokenizer=tok)
    with pytest.raises(TypeError, match="model must be a tide"):
        elbo(model.decoder, TEXTS, tokenizer=tok)
    (tmp_path / "empty.jsonl").write_text("\n  \n")              # datasets raised a bare StopIteration here
    with pytest.raises(ValueError, match="empty.jsonl holds no conversations"):
        elbo(model, str(tmp_path / "empty.jsonl"), tokenizer=tok)


def test_cli_bad_arguments_name_the_argument(tok, tmp_path, capsys):
    """Each bad command line stops with a message naming the argument (on a valid checkpoint and
    data, so that only the bad argument can be the cause)."""
    model = tiny(tok, "bd3lm", block=8)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "data.txt").write_text("\n".join(TEXTS))
    (tmp_path / "empty.jsonl").write_text("")
    good = {"--checkpoint": str(tmp_path / "ckpt"), "--data": str(tmp_path / "data.txt")}
    for change, message in (({"--samples": "0"}, "--samples must be >= 1"),
                            ({"--checkpoint": str(tmp_path / "missing")}, "not a local directory"),
                            ({"--checkpoint": str(tmp_path)}, "not a model directory"),
                            ({"--data": str(tmp_path / "nope.txt")}, "does not exist"),
                            ({"--data": str(tmp_path / "empty.jsonl")}, "holds no conversations")):
        argv = [x for k, v in dict(good, **change).items() for x in (k, v)] + ["--quiet"]
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code != 0
        assert message in capsys.readouterr().err, (change, message)


# --------------------------------------------------------------------------- infill
def oracle_sampler(texts, span_chars, tokenizer, wrong=False):
    """Stands in for tide.generate.infill: writes the true span (or the mask token: all wrong), after
    checking that the text after the span is given as the right context (`given`: per span, whether any)."""
    given = []

    def fill(model, prefixes, span_lengths, suffixes, **options):
        assert options["temperature"] == 0.0
        out = []
        for context_ids, n, suffix_ids in zip(prefixes, span_lengths, suffixes):
            context = tokenizer.decode(context_ids)
            text = next(t for t in texts if context in t)
            start = text.index(context) + len(context)
            ids = tokenizer(text[start:start + span_chars], add_special_tokens=False)["input_ids"]
            assert len(ids) == n
            assert text[start + span_chars:].lstrip().startswith(tokenizer.decode(suffix_ids).strip())
            given.append(bool(suffix_ids))
            out.append([tokenizer.convert_tokens_to_ids(MASK)] * len(ids) if wrong else ids)
        return out
    fill.given = given
    return fill


@pytest.mark.parametrize("tokenizer_name", ["byte_bpe", "unigram"])
def test_infill_scores_a_perfect_fill_as_one_on_any_tokenizer(tokenizer_name, monkeypatch):
    import tide.generate
    from tokenizers_for_tests import ALL

    from tide.evaluate import infill
    tokenizer = tok_with_mask(ALL[tokenizer_name]())
    texts = [t[:600] for t in training_text()[1:4]]
    model = tiny(tokenizer, "bd3lm")
    oracle = oracle_sampler(texts, 12, tokenizer)
    monkeypatch.setattr(tide.generate, "infill", oracle)
    result = infill(model, texts, tokenizer=tokenizer, spans=10, span_chars=12, progress=False)
    assert len(oracle.given) == 10 and sum(oracle.given) >= 8           # right context (BD3LM: unless aligned out)
    assert (result.char_accuracy, result.token_accuracy, result.exact_match) == (1.0, 1.0, 1.0)
    assert result.chars == 120 and result.tokens >= 10
    monkeypatch.setattr(tide.generate, "infill", oracle_sampler(texts, 12, tokenizer, wrong=True))
    wrong = infill(model, texts, tokenizer=tokenizer, spans=10, span_chars=12, progress=False)
    assert (wrong.token_accuracy, wrong.exact_match) == (0.0, 0.0) and wrong.char_accuracy < 0.2


def tok_with_mask(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [MASK]})
    return tokenizer


def test_infill_spans_are_the_same_for_every_tokenizer_and_start_after_a_word():
    from tide.evaluate import infill_spans
    texts = [t[:500] for t in training_text()[1:5]]
    spans = infill_spans(texts, 20, 16, seed=3)
    assert spans == infill_spans(texts, 20, 16, seed=3) != infill_spans(texts, 20, 16, seed=4)
    assert len(set(spans)) == 20
    for text, start, end in spans:
        assert texts[text][start] == " " and not texts[text][start - 1].isspace()
        assert end - start == 16 and start >= 16 and end <= len(texts[text])


@pytest.mark.parametrize("kind", ["bd3lm", "mdlm"])
def test_infill_with_the_real_sampler(tok, kind):
    from tide.evaluate import infill
    model = tiny(tok, kind)
    texts = [t[:300] for t in training_text()[1:3]]
    a = infill(model, texts, tokenizer=tok, spans=4, span_chars=10, seed=1, progress=False)
    assert 0.0 <= a.char_accuracy <= 1.0 and 0.0 <= a.token_accuracy <= 1.0 and a.spans == 4
    assert a == infill(model, texts, tokenizer=tok, spans=4, span_chars=10, seed=1, batch_size=1, progress=False)


@pytest.mark.parametrize("kind", ["bd3lm", "mdlm"])
def test_infill_gives_each_model_kind_the_context_it_can_see(tok, kind, monkeypatch):
    """The window of seq_len tokens around each span: MDLM gets text on both sides (the prefix at
    least half of what the span leaves when both sides are long); BD3LM keeps the prefix's block
    alignment (whole blocks cut off its front: the span sits in its blocks as in the text read from
    its start), gives up at most block - 1 prefix tokens for it, and gets the suffix after the span."""
    import tide.generate
    from tide.evaluate import infill, infill_spans
    texts = [t[:700] for t in training_text()[1:4]]
    model, seq_len, block = tiny(tok, kind, block=8), 32, 8
    calls = []

    def spy(model, prefixes, span_lengths, suffixes, **options):
        calls.extend(zip(prefixes, span_lengths, suffixes))
        return [[0] * n for n in span_lengths]

    monkeypatch.setattr(tide.generate, "infill", spy)
    infill(model, texts, tokenizer=tok, spans=12, span_chars=10, seed=2, seq_len=seq_len, batch_size=5, progress=False)
    assert len(calls) == 12
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    both_long = 0
    for (text, start, end), (prefix, n, suffix) in zip(infill_spans(texts, 12, 10, 2), calls):
        full_prefix, full_suffix = ids(texts[text][:start]), ids(texts[text][end:])
        assert n == len(ids(texts[text][start:end])) and len(prefix) + n + len(suffix) <= seq_len
        assert prefix == full_prefix[len(full_prefix) - len(prefix):] and suffix == full_suffix[:len(suffix)]
        assert suffix or kind == "bd3lm" and len(prefix) + n == seq_len  # the right context, where it fits
        room = seq_len - n
        if kind == "mdlm":
            assert len(prefix) == len(full_prefix) or len(prefix) >= room // 2
            assert len(prefix) + len(suffix) == min(room, len(full_prefix) + len(full_suffix))
        else:
            assert len(prefix) % block == len(full_prefix) % block
            assert len(prefix) == len(full_prefix) or len(prefix) > room - block
            assert len(suffix) == min(seq_len - len(prefix) - n, len(full_suffix))
        both_long += len(full_prefix) > room and len(full_suffix) > room
    assert both_long                                                    # the cut was exercised


def test_infill_bad_input(tok):
    from tide.evaluate import infill
    model = tiny(tok, "bd3lm")
    with pytest.raises(ValueError, match="spans"):
        infill(model, TEXTS, tokenizer=tok, spans=0)
    with pytest.raises(ValueError, match="spans=1000"):
        infill(model, TEXTS, tokenizer=tok, spans=1000)
    with pytest.raises(ValueError, match="span_chars"):
        infill(model, TEXTS, tokenizer=tok, span_chars=0)


# --------------------------------------------------------------------------- in training
def test_train_eval_data_logs_bits_per_byte_and_writes_a_sample(tok, tmp_path):
    from tide import checkpoint
    from tide.train import main as train

    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "train.txt").write_text("\n".join(t[:2000] for t in training_text()[1:4]))
    (tmp_path / "held_out.txt").write_text(training_text()[5][:1500])
    args = {"output-dir": tmp_path / "run", "max-steps": 4, "device": "cpu", "seq-len": 32, "block-size": 8,
            "batch-size": 4, "student-hidden": 32, "student-layers": 1, "student-heads": 2, "warmup-steps": 1,
            "lr": 1e-3, "progress-bar": "false", "log-interval": 1, "method": "ce", "save-interval": 4,
            "student-tokenizer": tmp_path / "tok", "data": tmp_path / "train.txt",
            "eval-data": tmp_path / "held_out.txt", "eval-interval": 2, "eval-samples": 2}
    result = train([x for k, v in args.items() for x in (f"--{k}", str(v))])
    assert [r["step"] for r in result["eval"]] == [2, 4]
    with open(result["metrics"]) as fh:
        lines = [json.loads(line) for line in fh if "eval_bits_per_byte" in line]
    assert lines == result["eval"] and all(r["eval_bits_per_byte_se"] > 0 for r in lines)
    model, _ = load_checkpoint(result["checkpoint"])
    direct = elbo(model, str(tmp_path / "held_out.txt"), tokenizer=tok, samples=2, seed=0, batch_size=4, seq_len=32,
                  progress=False)
    assert lines[-1]["eval_bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-5)
    sample = (tmp_path / "run" / "checkpoint-4" / "sample.txt").read_text()
    assert "greedy continuation at step 4" in sample
    checkpoint.verify(result["checkpoint"])                       # the sample is under the checksums


def test_train_eval_options_are_checked(tmp_path):
    from tide.config import check, load_config
    out = ["--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match="--eval-samples"):
        check(load_config(out + ["--eval-samples", "0"]))
    with pytest.raises(SystemExit, match="--eval-data .* does not exist"):
        check(load_config(out + ["--eval-data", str(tmp_path / "missing.txt")]))

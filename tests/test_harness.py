"""The lm-evaluation-harness model `tide`: simple_evaluate on local YAML tasks over local JSONL
files (no download), against scores computed by hand for a model with uniform logits."""
import copy
import json
import math
import os

import pytest
import torch

pytest.importorskip("lm_eval")

import tide  # noqa: F401  (registers the lm-eval model "tide")
from tide.models import build_config, build_model
from tokenizers_for_tests import byte_bpe

MASK = "<|mask|>"
QUESTIONS = [  # the answer is the choice with the fewest tokens in the first two, not in the third
    {"question": "Pick one:", "choices": ["the the the", "the", "the the"], "answer": 1},
    {"question": "Again:", "choices": ["x", "x x x x"], "answer": 0},
    {"question": "Last:", "choices": ["a", "a a a"], "answer": 1},
]
TEXTS = [{"text": "def add(a, b):\n    return a + b\n"}, {"text": "print('hello world')\n"}]


@pytest.fixture(scope="module")
def uniform_checkpoint(tmp_path_factory):
    """A BD3LM whose LM head is zero: every logit 0, so log p = -log V for every token."""
    tok = copy.deepcopy(byte_bpe())
    tok.add_special_tokens({"additional_special_tokens": [MASK]})
    torch.manual_seed(0)
    model = build_model("bd3lm", build_config("qwen3", len(tok), 32, 1, 2, max_position_embeddings=64),
                        block_size=8, mask_token_id=tok.convert_tokens_to_ids(MASK))
    with torch.no_grad():
        model.decoder.get_output_embeddings().weight.zero_()
    path = tmp_path_factory.mktemp("uniform")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok, model.vocab_size


def write_tasks(folder):
    for name, rows in (("questions", QUESTIONS), ("texts", TEXTS)):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as fh:
            fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    with open(os.path.join(folder, "tide_toy_mc.yaml"), "w") as fh:
        fh.write(f"task: tide_toy_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder}/questions.jsonl\n"
                 "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                 "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    with open(os.path.join(folder, "tide_toy_text.yaml"), "w") as fh:
        fh.write(f"task: tide_toy_text\n{common}dataset_kwargs:\n  data_files:\n    test: {folder}/texts.jsonl\n"
                 "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                 "metric_list:\n  - metric: bits_per_byte\n")


def test_simple_evaluate_on_local_tasks_matches_the_hand_computed_scores(uniform_checkpoint, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path, tok, vocab = uniform_checkpoint
    write_tasks(str(tmp_path))
    out = lm_eval.simple_evaluate(model="tide", model_args={"checkpoint": path, "samples": 2},
                                  tasks=["tide_toy_mc", "tide_toy_text"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True,
                                  batch_size=4, device="cpu")
    # multiple choice: log p(choice) = -n_tokens * log V exactly, so the shortest choice wins:
    # right on the first two questions, wrong on the third
    assert out["results"]["tide_toy_mc"]["acc,none"] == pytest.approx(2 / 3)
    for sample in out["samples"]["tide_toy_mc"]:
        doc = sample["doc"]
        for choice, (logp, _) in zip(doc["choices"], [r[0] for r in sample["resps"]]):
            whole = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]  # " ": lm-eval's delimiter
            n = len(whole) - len(tok(doc["question"], add_special_tokens=False)["input_ids"])
            assert float(logp) == pytest.approx(-n * math.log(vocab), rel=1e-6)
    # rolling log-likelihood: every token costs log2 V bits
    tokens = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in TEXTS)
    nbytes = sum(len(r["text"].encode()) for r in TEXTS)
    assert out["results"]["tide_toy_text"]["bits_per_byte,none"] == pytest.approx(
        tokens * math.log2(vocab) / nbytes, rel=1e-6)


def test_adapter_generate_until_and_loglikelihood(uniform_checkpoint, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    path, tok, vocab = uniform_checkpoint
    lm = get_model("tide").create_from_arg_string(f"checkpoint={path},samples=3", {"batch_size": 2, "device": "cpu"})
    assert lm.seq_len == 64 and lm.samples == 3
    requests = [Instance("loglikelihood", {}, ("x =", " 1"), 0), Instance("loglikelihood", {}, ("", "y = 2"), 1)]
    (a, greedy_a), (b, _) = lm.loglikelihood(requests, disable_tqdm=True)
    assert a == pytest.approx(-len(tok(" 1", add_special_tokens=False)["input_ids"]) * math.log(vocab), rel=1e-6)
    assert b == pytest.approx(-len(tok("y = 2", add_special_tokens=False)["input_ids"]) * math.log(vocab), rel=1e-6)
    assert greedy_a is False                     # argmax of uniform logits is token 0, not " 1"
    torch.manual_seed(1)
    random_model = build_model("bd3lm", build_config("qwen3", vocab, 32, 1, 2, max_position_embeddings=64),
                               block_size=8, mask_token_id=lm.model.mask_token_id).eval()
    lm.model = random_model
    texts = lm.generate_until([Instance("generate_until", {}, ("def f():", {"until": ["\n"], "max_gen_toks": 10}), 0)],
                              disable_tqdm=True)
    assert isinstance(texts[0], str) and "\n" not in texts[0]
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"max_gen_toks": 64}), 0)], disable_tqdm=True)


def test_adapter_bad_arguments(uniform_checkpoint, tmp_path):
    from tide.harness import TideLM

    path, _, _ = uniform_checkpoint
    with pytest.raises(ValueError, match="samples"):
        TideLM(checkpoint=path, samples=0)
    with pytest.raises(ValueError, match="not a local directory"):
        TideLM(checkpoint=str(tmp_path / "missing"))
    with pytest.raises(TypeError):
        TideLM(checkpoint=path, pretrained="gpt2")


@pytest.mark.slow  # lm-eval's command line indexes all of its ~10k built-in task files first (about a minute)
def test_python_m_tide_harness_is_lm_evals_command_with_tide(uniform_checkpoint, tmp_path, monkeypatch, capsys):
    import sys

    from tide.harness import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path, _, _ = uniform_checkpoint
    write_tasks(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["tide.harness", "--model", "tide", "--model_args", f"checkpoint={path},samples=2",
                                      "--tasks", "tide_toy_mc", "--include_path", str(tmp_path), "--device", "cpu"])
    main()
    assert "0.6667" in capsys.readouterr().out

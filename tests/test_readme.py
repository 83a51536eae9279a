"""The README's training commands, as written: every `python -m tide.train` example of
"One example per pipeline" runs end to end on tiny local stand-ins for its placeholder
directories (plain Hugging Face teachers and students included), with size options
appended; the "Bring your own models" commands (real weights, not here) parse."""
import json
import os
import re
import shlex

import pytest
import torch
from transformers import AutoModelForCausalLM

from tide.config import load_config
from tide.demo import stdlib_text, train_tokenizer
from tide.models import build_config, build_model
from tide.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
SMALL = ["--max-steps", "1", "--seq-len", "32", "--block-size", "8", "--batch-size", "2",
         "--grad-accum", "1", "--student-hidden", "32", "--student-layers", "1", "--student-heads", "2",
         "--device", "cpu", "--progress-bar", "false", "--warmup-steps", "1", "--save-interval", "1",
         "--log-interval", "1"]


def readme_commands(section: str, prefix: str) -> list[list[str]]:
    """Commands starting with `prefix` in the README's code blocks under `section` (joined lines)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    body = text.split(section, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    commands = []
    for block in re.findall(r"```\n(.*?)```", body, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command.startswith(prefix):
                commands.append(shlex.split(command))
    return commands


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Local directories for the README's placeholders."""
    root = tmp_path_factory.mktemp("readme")
    texts = stdlib_text(30_000)
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n".join(texts), encoding="utf-8")
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                     {"role": "assistant", "content": texts[0][i * 120:(i + 1) * 120]}]})
            for i in range(12)]
    (root / "chat.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    bpe = train_tokenizer(texts, "bpe", 300, str(root / "tok"))
    unigram = train_tokenizer(texts, "unigram", 280, str(root / "unigram"))

    def plain_lm(name, tokenizer, arch="llama", template=None):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(build_config(arch, len(tokenizer), 32, 1, 2)).save_pretrained(root / name)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(root / name)
        return str(root / name)

    def tide_teacher(name, template=None):
        torch.manual_seed(0)
        model = build_model("mdlm", build_config("llama", len(bpe), 48, 1, 2), mask_token_id=bpe.mask_token_id)
        model.save_pretrained(root / name)
        bpe.chat_template = template
        bpe.save_pretrained(root / name)
        return str(root / name)

    return {
        "out/teacher/checkpoint-20000": tide_teacher("teacher_ckpt"),
        "big_teacher/": plain_lm("big_teacher", bpe),                     # plain HF causal LM, no tide fields
        "small_lm/": plain_lm("small_lm", unigram, arch="qwen3"),         # another tokenizer
        "teacher/": tide_teacher("teacher", template=TEMPLATE),          # same vocabulary, its own template
        "student/": plain_lm("student", bpe, arch="qwen3"),               # plain-text rendering
        "tok/": str(root / "tok"),
        "corpus/": str(root / "corpus"),
        "chat.jsonl": str(root / "chat.jsonl"),
        "root": root,
    }


PIPELINE_COMMANDS = readme_commands("### One example per pipeline", "python -m tide.train")


def test_the_readme_has_the_pipeline_examples():
    configs = [c[c.index("--config") + 1] for c in PIPELINE_COMMANDS if "--config" in c]
    assert configs == ["configs/shared_tidal.yaml", "configs/cross_reverse_calm.yaml", "configs/aligned_tidal.yaml",
                       "configs/pretrain_teacher.yaml"]
    assert len(PIPELINE_COMMANDS) == 5


@pytest.mark.parametrize("command", PIPELINE_COMMANDS, ids=lambda c: c[c.index("--config") + 1].split("/")[-1]
                         if "--config" in c else "ce")
def test_readme_pipeline_example_runs(stand_ins, tmp_path, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs/ paths are relative to the repository
    args = [stand_ins.get(word, word) for word in command[3:]]   # drop "python -m tide.train"
    for word in args:
        assert not word.endswith("/") or os.path.isdir(word), f"placeholder {word!r} has no stand-in"
    two_lengths = any(name in " ".join(args) for name in ("cross_reverse_calm", "aligned_tidal"))
    result = main(args + SMALL + ["--teacher-seq-len", "48"] * two_lengths + ["--output-dir", str(tmp_path / "out")])
    record = result["history"][-1]
    assert record["step"] == 1 and torch.isfinite(torch.tensor(record["loss"]))
    if "--method" not in args and "pretrain_teacher" not in " ".join(args):
        assert record["distill"] > 0
    assert os.path.exists(os.path.join(result["checkpoint"], "model.safetensors"))


def test_bring_your_own_models_commands_parse(monkeypatch):
    """Real weights are not here: the commands' options and configs must at least load."""
    monkeypatch.chdir(ROOT)
    commands = readme_commands("## Bring your own models", "torchrun")
    assert len(commands) == 2
    for command in commands:
        cfg = load_config(command[command.index("tide.train") + 1:])
        assert cfg.student == "/models/Qwen3-0.6B" and cfg.seq_len == 512 and cfg.block_size == 32
    shared, cross = (load_config(c[c.index("tide.train") + 1:]) for c in commands)
    assert (shared.method, shared.teacher_kind, shared.teacher_concat_order, shared.teacher_seq_len) == \
        ("tidal", "bd3lm", "x0_xt", 768)
    assert (cross.method, cross.pipeline, cross.trust_remote_code, cross.calm_temperature, cross.teacher_seq_len,
            cross.parallel) == ("reverse_calm", "cross", True, 5.0, 1024, "fsdp")

"""The built-in CPU demo of `python -m tide.train` (no arguments): no download needed.

1. Text: the Python standard library's own source files.
2. Two small tokenizers trained on it with different algorithms: a byte-level
   BPE for the teacher, a Unigram (SentencePiece style) for the student, so the
   cross-tokenizer pipeline (chunks from `tide.align`) is exercised.
3. A tiny MDLM teacher pretrained with `--method ce`.
4. A smaller BD3LM student distilled from it with TIDE across tokenizers
   (Reverse CALM with chunk-level CompDemo).
Everything goes under `out/demo/` (or `$TIDE_DEMO_DIR`).
"""
from __future__ import annotations

import json
import os
import time

DEMO_DIR = os.environ.get("TIDE_DEMO_DIR", os.path.join("out", "demo"))
SPECIALS = ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]


def stdlib_text(max_chars: int = 400_000) -> list[str]:
    """Source files of the standard library, sorted by name, up to `max_chars` characters."""
    folder = os.path.dirname(os.__file__)
    texts, total = [], 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
            total += len(texts[-1])
            if total >= max_chars:
                break
    return texts


def train_tokenizer(texts: list[str], kind: str, vocab_size: int, path: str):
    """A Hugging Face fast tokenizer trained locally with `tokenizers`, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                          unk_token="<|endoftext|>", max_piece_length=12)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   mask_token="<|mask|>", unk_token="<|endoftext|>" if kind != "bpe" else None)
    fast.save_pretrained(path)
    return fast


def first_last(metrics_path: str, key: str, window: int = 3) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window` logged steps."""
    with open(metrics_path) as fh:
        rows = [json.loads(line) for line in fh]
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values[:window]) / len(values[:window]), sum(values[-window:]) / len(values[-window:])


def run_demo(out: str = DEMO_DIR) -> dict:
    from tide.train import main

    start = time.time()
    os.makedirs(out, exist_ok=True)
    texts = stdlib_text()
    data = os.path.join(out, "stdlib.txt")
    with open(data, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(texts))
    print(f"[demo] {len(texts)} standard-library files ({sum(map(len, texts)) // 1000} kB) -> {data}")
    teacher_tok, student_tok = os.path.join(out, "tokenizer_teacher"), os.path.join(out, "tokenizer_student")
    train_tokenizer(texts, "bpe", 1024, teacher_tok)
    train_tokenizer(texts, "unigram", 768, student_tok)
    print(f"[demo] tokenizers: byte-level BPE (teacher) {teacher_tok}, Unigram (student) {student_tok}")

    common = ["--data", data, "--device", "cpu", "--block-size", "16", "--log-interval", "5",
              "--warmup-steps", "10", "--weight-decay", "0.0", "--student-arch", "qwen3"]
    print("[demo] 1/2 pretraining a tiny MDLM teacher (--method ce --student-kind mdlm)")
    teacher = main(common + [
        "--output-dir", os.path.join(out, "teacher"), "--method", "ce", "--student-kind", "mdlm",
        "--student-tokenizer", teacher_tok, "--student-hidden", "96", "--student-layers", "2",
        "--student-heads", "4", "--seq-len", "96", "--batch-size", "16", "--max-steps", "150",
        "--lr", "3e-3", "--min-lr", "3e-4", "--save-interval", "1000", "--seed", "0"])
    print("[demo] 2/2 distilling a smaller BD3LM student across tokenizers "
          "(--pipeline cross --method reverse_calm --compdemo)")
    student = main(common + [
        "--output-dir", os.path.join(out, "student"), "--method", "reverse_calm", "--pipeline", "cross",
        "--compdemo", "true", "--teacher", teacher["checkpoint"], "--student-tokenizer", student_tok,
        "--teacher-tokenizer", teacher_tok, "--student-hidden", "64", "--student-layers", "2",
        "--student-heads", "4", "--seq-len", "64", "--teacher-seq-len", "96", "--batch-size", "16",
        "--max-steps", "120", "--lr", "3e-3", "--min-lr", "3e-4", "--save-interval", "1000", "--seed", "1"])
    d0, d1 = first_last(student["metrics"], "distill")
    l0, l1 = first_last(student["metrics"], "loss")
    print(f"[demo] distillation loss (Reverse CALM) {d0:.4f} -> {d1:.4f}; total loss {l0:.3f} -> {l1:.3f}")
    print(f"[demo] metrics:    {student['metrics']}")
    print(f"[demo] checkpoint: {student['checkpoint']}")
    print(f"[demo] try:        python -m tide.generate --checkpoint {student['checkpoint']} --prompt 'def '")
    print(f"[demo] done in {time.time() - start:.0f} s")
    return {"teacher": teacher, "student": student, "distill": (d0, d1), "loss": (l0, l1)}

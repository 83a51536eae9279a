"""The built-in CPU demo of `python -m tide.train` (no arguments): no download needed.

1. Text: the Python standard library's own source files.
2. Two small tokenizers trained on it with different algorithms: a byte-level
   BPE for the teacher, a Unigram (SentencePiece style) for the student, so the
   cross-tokenizer pipeline (chunks from `tide.align`) is exercised.
3. A tiny MDLM teacher pretrained with `--method ce`.
4. A smaller BD3LM student distilled from it with TIDE across tokenizers
   (CALM + TIDAL on chunks, chunk-level CompDemo).
Everything goes under `out/demo/` (or `$TIDE_DEMO_DIR`).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch

DEMO_DIR = os.environ.get("TIDE_DEMO_DIR", os.path.join("out", "demo"))
SPECIALS = ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
TEACHER_STEPS = int(os.environ.get("TIDE_DEMO_TEACHER_STEPS", 1500))
STUDENT_STEPS = int(os.environ.get("TIDE_DEMO_STUDENT_STEPS", 300))
METHOD = os.environ.get("TIDE_DEMO_METHOD", "calm_tidal")
TEXT_CHARS = int(os.environ.get("TIDE_DEMO_CHARS", 60_000))
TEACHER_LR = os.environ.get("TIDE_DEMO_TEACHER_LR", "5e-3")
EVAL_BATCHES = 8  # fixed batches for the before/after distillation loss


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


@torch.no_grad()
def fixed_batch_distill(checkpoint: str | None, args: list[str], batches: int = 8, progress: float = 0.5) -> float:
    """The distillation loss of a student (a checkpoint, or a fresh random one when None) on fixed
    batches with fixed masks, CompDemo splits and lambda: the training log mixes sampled t, new
    data and the lambda schedule, this compares before and after on equal terms."""
    from tide.config import load_config
    from tide.models import load_model
    from tide.train import (StudentLoss, build_data, fixed_length, load_tokenizers, make_student,
                            noise_batch, seeded_generator, teacher_hidden)

    cfg = load_config(args)
    tokenizers = load_tokenizers(cfg)
    dataset, collate = build_data(cfg, tokenizers)
    teacher = load_model(cfg.teacher).eval()
    torch.manual_seed(cfg.seed)
    student = load_model(checkpoint) if checkpoint else make_student(cfg, tokenizers["student"], None, "cpu")
    objective = StudentLoss(student.eval(), cfg, teacher.vocab_size)
    total = 0.0
    for i in range(batches):
        rows = range(len(dataset) - (i + 1) * cfg.batch_size, len(dataset) - i * cfg.batch_size)
        batch = fixed_length(collate([dataset[j] for j in rows]), cfg, collate)
        gen = seeded_generator(12345, i, "cpu")
        noise = noise_batch(batch, cfg, gen)
        hidden = teacher_hidden(teacher, batch, noise, cfg, gen)
        total += float(objective(batch, noise, hidden, teacher.lm_head_weight, progress)[1]["distill"])
    return total / batches


def first_last(metrics_path: str, key: str, window: int = 3) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window` logged steps."""
    with open(metrics_path) as fh:
        rows = [json.loads(line) for line in fh]
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values[:window]) / len(values[:window]), sum(values[-window:]) / len(values[-window:])


def run_demo(out: str = DEMO_DIR) -> dict:
    from transformers.utils import logging as hf_logging

    from tide.train import main

    hf_logging.disable_progress_bar()
    start = time.time()
    for old in ("teacher", "student"):  # a rerun starts over
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    texts = stdlib_text(TEXT_CHARS)
    data = os.path.join(out, "stdlib.txt")
    with open(data, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(texts))
    print(f"[demo] {len(texts)} standard-library files ({sum(map(len, texts)) // 1000} kB) -> {data}")
    teacher_tok, student_tok = os.path.join(out, "tokenizer_teacher"), os.path.join(out, "tokenizer_student")
    train_tokenizer(texts, "bpe", 1024, teacher_tok)
    train_tokenizer(texts, "unigram", 768, student_tok)
    print(f"[demo] tokenizers: byte-level BPE (teacher) {teacher_tok}, Unigram (student) {student_tok}")

    common = ["--data", data, "--device", "cpu", "--block-size", "16", "--log-interval", "10",
              "--warmup-steps", "10", "--weight-decay", "0.0", "--student-arch", "qwen3"]
    print("[demo] 1/2 pretraining a tiny MDLM teacher (--method ce --student-kind mdlm)")
    teacher = main(common + [
        "--output-dir", os.path.join(out, "teacher"), "--method", "ce", "--student-kind", "mdlm",
        "--student-tokenizer", teacher_tok, "--student-hidden", "128", "--student-layers", "2",
        "--student-heads", "4", "--seq-len", "96", "--batch-size", "16", "--max-steps", str(TEACHER_STEPS),
        "--lr", TEACHER_LR, "--min-lr", "3e-4", "--save-interval", "100000", "--seed", "0",
        "--ce-schedule-weight", "uniform"])
    print("[demo] 2/2 distilling a smaller BD3LM student across tokenizers "
          f"(--pipeline cross --method {METHOD} --compdemo)")
    student_args = common + [
        "--output-dir", os.path.join(out, "student"), "--method", METHOD, "--pipeline", "cross",
        "--compdemo", "true", "--teacher", teacher["checkpoint"], "--student-tokenizer", student_tok,
        "--teacher-tokenizer", teacher_tok, "--student-hidden", "64", "--student-layers", "2",
        "--student-heads", "4", "--seq-len", "64", "--teacher-seq-len", "96", "--batch-size", "16",
        "--max-steps", str(STUDENT_STEPS), "--lr", "3e-3", "--min-lr", "3e-4", "--save-interval", "100000", "--seed", "1"]
    student = main(student_args)
    d0, d1 = first_last(student["metrics"], "distill")
    c0, c1 = first_last(student["metrics"], "ce")
    f0 = fixed_batch_distill(None, student_args, EVAL_BATCHES)
    f1 = fixed_batch_distill(student["checkpoint"], student_args, EVAL_BATCHES)
    print(f"[demo] distillation loss ({METHOD}) on fixed batches/masks/lambda: {f0:.4f} before -> {f1:.4f} after")
    print(f"[demo] training log (first -> last 3 logged steps): distill {d0:.4f} -> {d1:.4f} "
          f"(its target moves with the lambda schedule), CE {c0:.3f} -> {c1:.3f}")
    print(f"[demo] metrics:    {student['metrics']}")
    print(f"[demo] checkpoint: {student['checkpoint']}")
    print(f"[demo] try:        python -m tide.generate --checkpoint {student['checkpoint']} --prompt 'def '")
    print(f"[demo] done in {time.time() - start:.0f} s")
    return {"teacher": teacher, "student": student, "fixed_batch_distill": (f0, f1), "distill": (d0, d1),
            "ce": (c0, c1)}

"""The built-in CPU demo: `python -m tide.train` with no arguments (or `python -m tide.demo`).

Does distillation help a student? The demo answers on held-out text, in about
three minutes on two CPU cores, with nothing to download:

1. Text: the Python standard library's own source files, split by file into a
   training part and a held-out part.
2. Tokenizers trained on the training part: a byte-level BPE for the teacher;
   the student shares it (pipeline "shared", the default) or gets a Unigram
   tokenizer of its own (pipeline "cross", `TIDE_DEMO_PIPELINE=cross`).
3. A teacher: an MDLM several times larger than the student, pretrained with
   `--method ce`.
4. One student initialisation (saved, so both students start from the same
   weights), then two students trained from it for the same steps on the same
   batches and masks: one distilled (TIDAL + CompDemo; CALM + TIDAL with
   chunk-level CompDemo across tokenizers), one with CE alone.
5. Held-out bits per byte (`tide.evaluate.elbo`, with its standard error) of
   the teacher, the student before training, the distilled student and the
   CE-only student, one greedy sample from each (`tide.generate`), and a
   verdict that says whether distillation beat CE alone at this scale.

Only public entry points are used: `tide.train.main(argv)`, `tide.models`,
`tide.evaluate`, `tide.generate`.

Threads: torch runs with `TIDE_DEMO_THREADS` threads if set, else
`OMP_NUM_THREADS` if set, else one per idle core (the cores this process may
use minus the 1-minute load average, at least 1, at most 4). These models are
tiny; on a busy machine a second thread mostly waits for a core (measured: 14x
slower with 2 threads than with 1 at a load average of 8 on 2 cores).

Environment (all optional): `TIDE_DEMO_DIR` (output folder, default
`out/demo`), `TIDE_DEMO_PIPELINE` (shared | cross), `TIDE_DEMO_TEACHER_STEPS`,
`TIDE_DEMO_STUDENT_STEPS`, `TIDE_DEMO_THREADS`.
"""
from __future__ import annotations

import math
import os
import shutil
import time

import torch

DEMO_DIR = os.environ.get("TIDE_DEMO_DIR", os.path.join("out", "demo"))
PIPELINE = os.environ.get("TIDE_DEMO_PIPELINE", "shared")
TEACHER_STEPS = int(os.environ.get("TIDE_DEMO_TEACHER_STEPS", 800))
STUDENT_STEPS = int(os.environ.get("TIDE_DEMO_STUDENT_STEPS", 150))
TRAIN_CHARS = 300_000        # characters of standard-library source to train on
HELD_OUT_CHARS = 24_000      # characters of the files after those, never trained on
EVAL_SAMPLES = 4             # masks per held-out window in the ELBO estimate
SEQ_LEN, BLOCK = 64, 16
SPECIALS = ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
MASK_TOKEN = "<|mask|>"


# --------------------------------------------------------------------------- data and tokenizers
def stdlib_text(max_chars: int = 400_000, skip_chars: int = 0) -> list[str]:
    """Source files of the standard library, sorted by name: after the first `skip_chars`
    characters' worth of files, up to `max_chars` characters (the last file cut)."""
    folder = os.path.dirname(os.__file__)
    texts, seen, total = [], 0, 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if seen < skip_chars:  # files wholly or partly before the start
            seen += len(text)
            continue
        texts.append(text[:max_chars - total])
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


def train_tokenizer(texts: list[str], kind: str, vocab_size: int, path: str):
    """A Hugging Face fast tokenizer trained locally with `tokenizers`, saved to `path`.

    "bpe": byte-level BPE (GPT-2 style). "unigram": SentencePiece-style Unigram whose
    pre-tokenizer keeps each run of whitespace, each word and each run of punctuation as
    one piece (spaces written as "▁"), so indentation is one token, not one per space, and
    decoding gives the text back exactly. (A plain Metaspace pre-tokenizer makes every
    space its own piece: on code 40% of the tokens were a single "▁", and an undertrained
    student then predicts "▁" everywhere: it "generates only spaces".)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(r"\s+|\w+|[^\s\w]+", behavior="isolated"),
            pre_tokenizers.Metaspace(prepend_scheme="never", split=False)])
        tok.decoder = decoders.Metaspace(prepend_scheme="never", split=False)
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                          unk_token="<|endoftext|>", max_piece_length=12)
    else:
        raise ValueError(f"kind must be 'bpe' or 'unigram', got {kind!r}")
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   mask_token=MASK_TOKEN, unk_token="<|endoftext|>" if kind != "bpe" else None)
    fast.save_pretrained(path)
    return fast


def demo_threads() -> int:
    """Threads for torch (module docstring)."""
    for name in ("TIDE_DEMO_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(4, cores, round(cores - load)))


# --------------------------------------------------------------------------- the demo
def save_student_init(tokenizer_dir: str, path: str, seed: int) -> str:
    """A fresh BD3LM student (the shape the trainer would build), saved with its tokenizer, so
    the distilled and the CE-only student start from the same weights."""
    from transformers import AutoTokenizer

    from tide.models import build_config, build_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = build_config("qwen3", len(tokenizer), 64, 2, 4, max_position_embeddings=128)
    model = build_model("bd3lm", config, block_size=BLOCK, mask_token_id=tokenizer.convert_tokens_to_ids(MASK_TOKEN))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def evaluate(checkpoint: str, held_out: list[str], prompt: str) -> dict:
    """Held-out bits per byte (mean, standard error) and one sample after `prompt`.

    The sample is drawn at temperature 1 (seed 0), in blocks of 16 for the MDLM too: greedy
    decoding of models this small collapses into one repeated token ("......", or only spaces),
    which says more about greedy decoding than about what the model learned."""
    from tide.evaluate import elbo, load_checkpoint
    from tide.generate import generate

    model, tokenizer = load_checkpoint(checkpoint)
    result = elbo(model, held_out, tokenizer=tokenizer, samples=EVAL_SAMPLES, seed=0, batch_size=16,
                  seq_len=SEQ_LEN, progress=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new_ids = generate(model, [prompt_ids], 40, block_size=BLOCK, temperature=1.0, seed=0,
                       eos_token_id=tokenizer.eos_token_id)[0]
    return {"bits_per_byte": result.bits_per_byte, "se": result.bits_per_byte_se,
            "sample": prompt + tokenizer.decode(new_ids, skip_special_tokens=True)}


def verdict(distilled: dict, ce_only: dict, method: str) -> str:
    """Distillation against CE alone, with the error bars (two standard errors of the difference)."""
    gain = ce_only["bits_per_byte"] - distilled["bits_per_byte"]
    se = math.hypot(distilled["se"], ce_only["se"])  # conservative: both students are scored on the same masks
    if gain > 2 * se:
        return (f"distillation ({method}) beat CE alone by {gain:.3f} bits/byte "
                f"(> 2 standard errors, {2 * se:.3f}). These are the evaluation's error bars, one training "
                f"run each: runs differ too; python -m benchmarks.replication compares methods over seeds")
    if gain < -2 * se:
        head = f"CE alone beat distillation ({method}) by {-gain:.3f} bits/byte (> 2 standard errors, {2 * se:.3f})"
    else:
        head = (f"no clear difference between distillation ({method}) and CE alone at this scale: "
                f"{gain:+.3f} bits/byte, within 2 standard errors ({2 * se:.3f})")
    return (head + ". What would change it: a teacher much further ahead of the student (more teacher steps "
            "or parameters), more student steps (TIDAL's lambda starts at 0.1 and leans on the teacher only late "
            "in the run), more held-out text for smaller error bars; TIDE_DEMO_TEACHER_STEPS and "
            "TIDE_DEMO_STUDENT_STEPS set the first two, and python -m benchmarks.replication runs the full "
            "comparison over methods and seeds")


def run_demo(out: str = DEMO_DIR) -> dict:
    from transformers.utils import logging as hf_logging

    from tide.train import main

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if PIPELINE not in ("shared", "cross"):
        raise SystemExit(f"TIDE_DEMO_PIPELINE must be shared or cross, got {PIPELINE!r}")
    start = time.time()
    threads = demo_threads()
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"[demo] {threads} torch thread(s), load average {load:.2f}; output in {out}")
    for old in ("teacher", "student_init", "distilled", "ce_only"):  # a rerun starts over
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    os.makedirs(out, exist_ok=True)

    train = stdlib_text(TRAIN_CHARS)
    held_out = stdlib_text(HELD_OUT_CHARS, skip_chars=sum(map(len, train)))
    data, held_out_path = os.path.join(out, "train.txt"), os.path.join(out, "held_out")
    with open(data, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(train))
    shutil.rmtree(held_out_path, ignore_errors=True)
    os.makedirs(held_out_path)
    for i, text in enumerate(held_out):  # one file per held-out text, as tide.evaluate reads a folder
        with open(os.path.join(held_out_path, f"{i}.txt"), "w", encoding="utf-8") as fh:
            fh.write(text)
    teacher_tok = os.path.join(out, "tokenizer_teacher")
    train_tokenizer(train, "bpe", 1024, teacher_tok)
    student_tok = teacher_tok
    if PIPELINE == "cross":  # Unigram training is slower than BPE: the first 100 kB are enough for 768 pieces
        student_tok = os.path.join(out, "tokenizer_student")
        train_tokenizer(stdlib_text(min(TRAIN_CHARS, 100_000)), "unigram", 768, student_tok)
    print(f"[demo] text: {len(train)} standard-library files ({sum(map(len, train)) // 1000} kB) to train on, "
          f"{len(held_out)} more ({sum(map(len, held_out)) // 1000} kB) held out; tokenizers: byte-level BPE "
          + ("(teacher and student)" if PIPELINE == "shared" else "(teacher), Unigram (student)"))

    bar = ["--progress-bar", "true" if os.isatty(2) else "false"]
    common = ["--data", data, "--device", "cpu", "--block-size", str(BLOCK), "--seq-len", str(SEQ_LEN),
              "--batch-size", "16", "--log-interval", "25", "--warmup-steps", "10", "--save-interval", "100000",
              "--student-arch", "qwen3"] + bar
    print(f"[demo] 1/3 teacher: an MDLM pretrained with CE ({TEACHER_STEPS} steps)")
    teacher = main(common + [
        "--output-dir", os.path.join(out, "teacher"), "--method", "ce", "--student-kind", "mdlm",
        "--student-tokenizer", teacher_tok, "--student-hidden", "128", "--student-layers", "2",
        "--student-heads", "4", "--max-steps", str(TEACHER_STEPS), "--lr", "5e-3", "--min-lr", "3e-4",
        "--seed", "0", "--ce-schedule-weight", "uniform"])["checkpoint"]

    init = save_student_init(student_tok, os.path.join(out, "student_init"), seed=1)
    if PIPELINE == "shared":
        method, flags = "tidal", ["--method", "tidal", "--compdemo", "true"]
    else:
        method, flags = "calm_tidal", ["--method", "calm_tidal", "--pipeline", "cross", "--compdemo", "true",
                                       "--teacher-tokenizer", teacher_tok, "--teacher-seq-len", str(SEQ_LEN * 3 // 2)]
    student = common + ["--student", init, "--student-tokenizer", student_tok, "--max-steps", str(STUDENT_STEPS),
                        "--lr", "3e-3", "--min-lr", "3e-4", "--seed", "1"]
    print(f"[demo] 2/3 student distilled from the teacher ({method} + CompDemo, pipeline {PIPELINE}, "
          f"{STUDENT_STEPS} steps)")
    distilled = main(student + ["--output-dir", os.path.join(out, "distilled"), "--teacher", teacher] + flags)
    print(f"[demo] 3/3 the same student with CE alone (same start, batches, masks and {STUDENT_STEPS} steps)")
    ce_only = main(student + ["--output-dir", os.path.join(out, "ce_only"), "--method", "ce"])

    lines = [line for text in held_out for line in text.splitlines()]
    prompt = next((line for line in lines if line.startswith("def ")), lines[0]) + "\n"  # a function's first line
    rows = {"teacher": teacher, "student before": init, "distilled": distilled["checkpoint"],
            "CE only": ce_only["checkpoint"]}
    results = {name: evaluate(path, held_out, prompt) for name, path in rows.items()}
    print(f"[demo] held-out bits per byte (lower is better; ± one standard error), and a sample "
          f"(temperature 1) after {prompt!r}:")
    for name, r in results.items():
        sample = r["sample"].replace("\n", "⏎")[:90]
        print(f"[demo]   {name:<15} {r['bits_per_byte']:.3f} ± {r['se']:.3f}   {sample}")
    summary = verdict(results["distilled"], results["CE only"], method)
    print(f"[demo] {summary}")
    print(f"[demo] checkpoints: {', '.join(rows.values())}")
    print(f"[demo] evaluate:    python -m tide.evaluate --checkpoint {rows['distilled']} --data {held_out_path} --seq-len {SEQ_LEN}")
    print(f"[demo] done in {time.time() - start:.0f} s")
    return {"results": results, "verdict": summary, "checkpoints": rows, "threads": threads,
            "metrics": {"distilled": distilled["metrics"], "ce_only": ce_only["metrics"]}}


def main() -> dict:
    """`python -m tide.demo` (and `python -m tide.train` with no arguments)."""
    return run_demo()


if __name__ == "__main__":
    main()

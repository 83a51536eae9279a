"""CPU benchmark: cross-tokenizer chunk alignment, samples per second on one core.

    python -m benchmarks.align [--quick] [--texts 300] [--chars 1024] [--json FILE]

Texts: `--chars`-character slices (1 KB by default) of Python standard library
sources mixed with multilingual prose (CJK, emoji, accents). Tokenizers: the
byte-level BPE, WordPiece (lowercase + strip accents) and Unigram/Metaspace
tokenizers the tests train (tests/tokenizers_for_tests.py; trained here in a
few seconds, no download). For each teacher/student pair:

- "with tokenization": `tide.align.chunk_alignment(text, teacher, student)`,
  i.e. both fast tokenizers' encodes (offsets included) plus the alignment;
- "from offsets": `tide.align.align_offsets` on precomputed offsets (the
  alignment alone; goal >= 1,000 samples/s/core).

One process, one thread (RAYON_NUM_THREADS=1), timed in CPU seconds of this
process (`time.process_time`), so the figure is samples per second per core
and holds on a machine shared with other work. The median of `--repeats`
timed passes over all texts is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROSE = ("Distillation moves knowledge from a large teacher into a small student. "
         "漢字とかなの文章、한국어 문장도 있습니다。 Emoji 😀👍🏽👩‍💻 and accents: café, naïve, Ünïcödé, "
         "e\u0301 combining marks.\n\n\tTabs,   runs of spaces,\r\nand newlines.\n")


def _tokenizers():
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(here), "tests"))
    try:
        import tokenizers_for_tests as toks
    except ImportError as error:  # pragma: no cover
        raise SystemExit(f"benchmarks.align needs the repository's tests/tokenizers_for_tests.py: {error}")
    finally:
        sys.path.pop(0)
    return {"byte_bpe": toks.byte_bpe(), "wordpiece": toks.wordpiece(), "unigram": toks.unigram()}


def make_texts(count: int, chars: int, seed: int = 0) -> list[str]:
    """`count` texts of `chars` characters: standard-library code mixed with prose."""
    folder = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py"))[-40:]  # not the training files
    source = "".join(open(os.path.join(folder, n), encoding="utf-8", errors="replace").read() for n in names)
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        start = rng.randrange(0, len(source) - chars)
        code = source[start:start + chars * 3 // 4]
        texts.append((code + PROSE * (chars // len(PROSE) + 1))[:chars])
    return texts


def _rate(fn, items, repeats: int) -> float:
    """Samples per CPU second: median over `repeats` passes of fn over all items."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        times.append(time.process_time() - start)
    return len(items) / statistics.median(times)


def run(texts: int = 300, chars: int = 1024, repeats: int = 3) -> list[dict]:
    from tide.align import align_offsets, chunk_alignment, encode_with_offsets, special_token_ids

    tokenizers = _tokenizers()
    samples = make_texts(texts, chars)
    rows = []
    for teacher_name, student_name in [("wordpiece", "byte_bpe"), ("byte_bpe", "unigram"), ("unigram", "wordpiece")]:
        teacher, student = tokenizers[teacher_name], tokenizers[student_name]
        t_special, s_special = special_token_ids(teacher), special_token_ids(student)
        prepared = []
        for text in samples:
            t_ids, t_off = encode_with_offsets(text, teacher)
            s_ids, s_off = encode_with_offsets(text, student)
            prepared.append((t_off, s_off, [i in t_special for i in t_ids], [i in s_special for i in s_ids]))
        chunks = [len(align_offsets(t, s, teacher_excluded=te, student_excluded=se)) for t, s, te, se in prepared]
        tokens = [(len(p[0]), len(p[1])) for p in prepared]
        with_tokenization = _rate(lambda text: chunk_alignment(text, teacher, student), samples, repeats)
        from_offsets = _rate(lambda p: align_offsets(p[0], p[1], teacher_excluded=p[2], student_excluded=p[3]),
                             prepared, repeats)
        rows.append({
            "teacher": teacher_name, "student": student_name, "chars": chars, "texts": len(samples),
            "teacher_tokens_mean": statistics.mean(t for t, _ in tokens),
            "student_tokens_mean": statistics.mean(s for _, s in tokens),
            "chunks_mean": statistics.mean(chunks),
            "samples_per_s_with_tokenization": with_tokenization,
            "samples_per_s_from_offsets": from_offsets,
        })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--chars", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50 texts, 1 repeat")
    parser.add_argument("--json", help="write the rows (with machine info) to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.repeats = 50, 1
    rows = run(args.texts, args.chars, args.repeats)
    print(f"chunk alignment, {args.chars}-character texts, one core ({platform.processor() or platform.machine()})")
    print(f"{'teacher':>10} {'student':>10} {'tok t/s':>8} {'chunks':>7} "
          f"{'with tokenization/s':>20} {'from offsets/s':>15}")
    for r in rows:
        print(f"{r['teacher']:>10} {r['student']:>10} "
              f"{r['teacher_tokens_mean']:>4.0f}/{r['student_tokens_mean']:<4.0f}{r['chunks_mean']:>7.0f} "
              f"{r['samples_per_s_with_tokenization']:>20.0f} {r['samples_per_s_from_offsets']:>15.0f}")
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
                "python": platform.python_version(), "benchmark": "align"}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

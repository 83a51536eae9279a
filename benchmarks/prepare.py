"""CPU benchmark: offline preprocessing (`python -m tide.data prepare`), examples per second.

    python -m benchmarks.prepare --student-tokenizer DIR --teacher-tokenizer DIR
                                 [--examples 500 2000] [--num-proc 1 2] [--json FILE]

Writes chat JSONL files of `--examples` conversations (a user line, then a
~1 KB assistant answer: Python standard-library code mixed with multilingual
prose, as benchmarks/align.py), then runs `python -m tide.data prepare` once per
(`--num-proc`, size), each in its own process, timing its map and write (worker
start-up and tokenizer loading in the workers included; the parent's own
tokenizer loading not). Reported: examples/s of each run, and the marginal rate
between the smallest and the largest size, (n2 - n1) / (t2 - t1), from which
the fixed costs (process start, tokenizer loading) cancel. Any local tokenizer folders
work; the README's numbers use real vocabularies (tests/real_tokenizers.py
converts them into ~/.cache/tide-test-tokenizers/converted/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.align import make_texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-tokenizer", required=True)
    parser.add_argument("--teacher-tokenizer", required=True)
    parser.add_argument("--examples", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        answers = make_texts(max(args.examples), 1024)
        for num_proc in args.num_proc:
            timed = []
            for n in sorted(args.examples):
                chat = os.path.join(folder, f"chat{n}.jsonl")
                with open(chat, "w", encoding="utf-8") as f:
                    for k, answer in enumerate(answers[:n]):
                        f.write(json.dumps({"messages": [
                            {"role": "user", "content": f"Question {k}: explain this."},
                            {"role": "assistant", "content": answer}]}) + "\n")
                out = os.path.join(folder, f"out{num_proc}_{n}")
                env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
                subprocess.run([sys.executable, "-m", "tide.data", "prepare", "--data", chat, "--out", out,
                                "--student-tokenizer", args.student_tokenizer,
                                "--teacher-tokenizer", args.teacher_tokenizer, "--num-proc", str(num_proc)],
                               check=True, env=env, capture_output=True)
                with open(os.path.join(out, "tide_data.json")) as f:
                    meta = json.load(f)
                timed.append((meta["num_examples"], meta["seconds"]))
                print(f"num_proc={num_proc}: {meta['num_examples']} examples ({meta['mode']}) in "
                      f"{meta['seconds']:.1f} s = {meta['num_examples'] / meta['seconds']:.1f} examples/s "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
            (n1, t1), (n2, t2) = timed[0], timed[-1]
            marginal = (n2 - n1) / (t2 - t1) if len(timed) > 1 and t2 > t1 else None
            rows.append({"num_proc": num_proc, "runs": timed, "marginal_examples_per_s": marginal})
            if marginal:
                print(f"num_proc={num_proc}: marginal {marginal:.1f} examples/s ({n1} -> {n2} examples)", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "loadavg": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()

"""Does it distil? The paper's comparison (TIDE against CE-only, KL and CALM) at CPU scale.

    python -m benchmarks.replication              # full run: about 35 min on 2 quiet CPU cores
    python -m benchmarks.replication --quick      # the same protocol, smaller: under 10 min
    python -m benchmarks.replication --device cuda --seeds 5 --student-hidden 256 --teacher-hidden 768 \\
        --steps 5000 --seq-len 256 --train-chars 4000000      # a GPU user scales it with flags

Protocol (every step a `python -m tide.train` / `python -m tide.evaluate` subprocess):
1. Corpus: the running interpreter's standard-library `.py` files, split by file into
   train and held-out (a file is held out when sha256(name) mod 10 == 0); the Python
   version and a hash of both file lists are recorded.
2. Tokenizers (trained on the train split): the student's byte-level BPE, which the
   shared teacher uses too; the cross teacher's Unigram with another vocabulary size.
3. Teachers: bidirectional MDLMs several times larger than the student, pretrained
   with `--method ce`, one per tokenizer, cached under the work folder and reused.
4. Student start: a BD3LM CE-pretrained briefly from scratch, one common checkpoint.
5. Every method continues from that start for the same steps and tokens, one seed
   per run (data order and masks), with the hyper-parameters of `TRAIN_ARGS` for all.
6. `tide.evaluate` on the held-out split: bits per byte (negative ELBO, Monte-Carlo
   standard error; the same evaluation seed, hence the same masks, for every model).
7. Teacher sanity: a teacher that is not clearly better than the CE-only student
   makes the comparison meaningless: the run stops (exit status 1) and says so.
8. Table (markdown), JSON and plot under benchmarks/results/; each method's delta
   against `ce` with a paired t-test over seeds.

Runs are cached: a run folder whose recorded command equals the new one is reused
(`--fresh` reruns the students; teachers are reused unless their command changes).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


# --------------------------------------------------------------------------- the experiment's sizes
@dataclasses.dataclass
class Scale:
    """Everything that sizes the experiment (each field is a `--flag`); the methods' hyper-parameters
    are not here: they are `TRAIN_ARGS`, one set for all."""
    seeds: int = 3                 # student runs per method (seeds 1..n; paired across methods)
    train_chars: int = 3_000_000   # characters of the train split (whole files, the last one cut at a line end)
    heldout_chars: int = 40_000    # characters of the held-out split (evaluation)
    curve_chars: int = 8_000       # held-out characters for the curve during training (--eval-data)
    tokenizer_chars: int = 400_000  # train characters the tokenizers are trained on
    student_vocab: int = 1024      # byte-level BPE: the student's and the shared teacher's
    cross_vocab: int = 1536        # Unigram: the cross teacher's
    student_hidden: int = 64
    student_layers: int = 2
    student_heads: int = 4
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_heads: int = 4
    seq_len: int = 64              # student tokens per sequence (and the shared teacher's)
    cross_seq_len: int = 128       # the cross teacher's tokens for the same text (its tokens are shorter)
    block_size: int = 16
    batch_size: int = 16
    teacher_steps: int = 1500
    start_steps: int = 400         # CE pretraining of the common student start
    steps: int = 300               # every method, from the start
    eval_samples: int = 4          # masks per held-out window (tide.evaluate --samples)
    eval_interval: int = 50        # steps between held-out points of the training curve
    infill_spans: int = 64         # masked spans for the infill accuracy


FULL = Scale()
QUICK = Scale(seeds=2, train_chars=600_000, heldout_chars=12_000, curve_chars=3_000, tokenizer_chars=150_000,
              student_vocab=512, cross_vocab=768, student_hidden=48, teacher_hidden=96, teacher_layers=3,
              teacher_steps=1000, start_steps=100, steps=50, eval_samples=2, eval_interval=25, infill_spans=16)
SMOKE = Scale(seeds=2, train_chars=20_000, heldout_chars=2_000, curve_chars=1_000, tokenizer_chars=20_000,
              student_vocab=300, cross_vocab=400, student_hidden=16, student_layers=1, student_heads=2,
              teacher_hidden=32, teacher_layers=1, teacher_heads=2, seq_len=32, cross_seq_len=64, block_size=16,
              batch_size=4, teacher_steps=3, start_steps=3, steps=2, eval_samples=2, eval_interval=1,
              infill_spans=2)
PRESETS = {"full": FULL, "quick": QUICK, "smoke": SMOKE}

# One set of hyper-parameters for every method (SPEC.md defaults where the paper gives them;
# learning rates sized for tiny models trained from scratch). Nothing is tuned per method.
TEACHER_LR = ["--lr", "3e-3", "--min-lr", "3e-4"]
START_LR = ["--lr", "3e-3", "--min-lr", "3e-4"]
TRAIN_ARGS = ["--lr", "1e-3", "--min-lr", "1e-4", "--weight-decay", "0.0", "--grad-clip", "1.0",
              "--temperature", "2.0", "--ce-weight", "1.0", "--distill-weight", "1.0",
              "--lambda-init", "0.1", "--lambda-max", "0.9", "--lambda-schedule", "cosine",
              "--timestep-weight", "midrange", "--ce-schedule-weight", "linear", "--demo-ratio", "0.5"]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str          # row label
    pipeline: str      # control | shared | cross | ablation
    args: tuple        # trainer flags beyond the common ones
    reference: str = "ce"  # the row its delta is taken against (ablations: their full variant)

    @property
    def teacher(self) -> str | None:
        if self.pipeline == "control":
            return None
        return "cross" if "--pipeline" in self.args else "shared"


CROSS = ("--pipeline", "cross")
METHODS = (
    Method("ce", "control", ("--method", "ce")),
    Method("kl", "shared", ("--method", "kl")),
    Method("reverse_kl", "shared", ("--method", "reverse_kl")),
    Method("tidal", "shared", ("--method", "tidal")),
    Method("tidal + compdemo (TIDE-Shared)", "shared", ("--method", "tidal", "--compdemo", "true")),
    Method("calm", "cross", ("--method", "calm") + CROSS),
    Method("reverse_calm", "cross", ("--method", "reverse_calm") + CROSS),
    Method("reverse_calm + compdemo (TIDE-Cross)", "cross", ("--method", "reverse_calm", "--compdemo", "true") + CROSS),
    Method("calm_tidal", "cross", ("--method", "calm_tidal") + CROSS),
    Method("tidal, training_only axis", "ablation", ("--method", "tidal", "--lambda-axis", "training_only"), "tidal"),
    Method("tidal, timestep_only axis", "ablation", ("--method", "tidal", "--lambda-axis", "timestep_only"), "tidal"),
)
# CompDemo (demo_ratio 0.5) against off, on each pipeline: (variant, reference) pairs of the rows above
COMPDEMO_PAIRS = (("tidal + compdemo (TIDE-Shared)", "tidal"), ("reverse_calm + compdemo (TIDE-Cross)", "reverse_calm"))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


# --------------------------------------------------------------------------- corpus and tokenizers
def stdlib_files() -> list[str]:
    folder = os.path.dirname(os.__file__)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))


def is_heldout(path: str) -> bool:
    return int(hashlib.sha256(os.path.basename(path).encode()).hexdigest(), 16) % 10 == 0


def _cut_at_line(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[:cut + 1 if cut > 0 else limit]


def write_split(files: list[str], folder: str, max_chars: int) -> list[dict]:
    """Copy whole files (in name-hash order) into `folder` until `max_chars`; the last one is cut at a line end."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    chosen, total = [], 0
    for path in sorted(files, key=lambda p: hashlib.sha256(os.path.basename(p).encode()).hexdigest()):
        if total >= max_chars:
            break
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = _cut_at_line(fh.read(), max_chars - total)
        if not text.strip():
            continue
        with open(os.path.join(folder, os.path.basename(path)), "w", encoding="utf-8") as fh:
            fh.write(text)
        chosen.append({"file": os.path.basename(path), "chars": len(text)})
        total += len(text)
    return chosen


def build_corpus(work: str, scale: Scale) -> dict:
    files = stdlib_files()
    held = [f for f in files if is_heldout(f)]
    train = [f for f in files if not is_heldout(f)]
    info = {"python": platform.python_version(), "stdlib": os.path.dirname(os.__file__),
            "files": len(files), "train_files_available": len(train), "heldout_files_available": len(held)}
    for name, pool, chars in (("train", train, scale.train_chars), ("heldout", held, scale.heldout_chars),
                              ("curve", held, scale.curve_chars)):
        chosen = write_split(pool, os.path.join(work, "corpus", name), chars)
        listing = "\n".join(f"{c['file']}:{c['chars']}" for c in chosen)
        info[name] = {"files": len(chosen), "chars": sum(c["chars"] for c in chosen),
                      "list_sha256": hashlib.sha256(listing.encode()).hexdigest()[:16],
                      "content_sha256": _folder_hash(os.path.join(work, "corpus", name))}
    if not info["heldout"]["chars"] or not info["train"]["chars"]:
        raise SystemExit("the standard library gave an empty train or held-out split")
    info["all_files_sha256"] = hashlib.sha256("\n".join(os.path.basename(f) for f in files).encode()).hexdigest()[:16]
    return info


def _folder_hash(folder: str) -> str:
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            digest.update(name.encode())
            with open(os.path.join(root, name), "rb") as fh:
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def build_tokenizers(work: str, scale: Scale) -> dict:
    """Student (and shared teacher): byte-level BPE; cross teacher: Unigram of another size."""
    from tide.data import load_texts
    from tide.demo import train_tokenizer

    texts, total = [], 0
    for text in load_texts(os.path.join(work, "corpus", "train"), suffixes=(".py",)):
        texts.append(text[:scale.tokenizer_chars - total])
        total += len(texts[-1])
        if total >= scale.tokenizer_chars:
            break
    paths = {"student": os.path.join(work, "tokenizers", "student_bpe"),
             "cross": os.path.join(work, "tokenizers", "cross_unigram")}
    key = {"text": hashlib.sha256("".join(texts).encode()).hexdigest(), "student_vocab": scale.student_vocab,
           "cross_vocab": scale.cross_vocab}
    stamp = os.path.join(work, "tokenizers", "done.json")
    if not (os.path.exists(stamp) and read_json(stamp) == key):  # trained once per text and sizes
        train_tokenizer(texts, "bpe", scale.student_vocab, paths["student"])
        train_tokenizer(texts, "unigram", scale.cross_vocab, paths["cross"])
        with open(stamp, "w") as fh:
            json.dump(key, fh)
    return {k: {"path": p, "sha256": _folder_hash(p)} for k, p in paths.items()}


# --------------------------------------------------------------------------- commands
def teacher_command(scale: Scale, which: str, tokenizer: str, train: str, out: str, device: str) -> list[str]:
    seq_len = scale.seq_len if which == "shared" else scale.cross_seq_len
    return ["tide.train", "--method", "ce", "--student-kind", "mdlm", "--student-tokenizer", tokenizer,
            "--data", train, "--output-dir", out, "--device", device, "--seed", "0",
            "--student-hidden", str(scale.teacher_hidden), "--student-layers", str(scale.teacher_layers),
            "--student-heads", str(scale.teacher_heads), "--seq-len", str(seq_len),
            "--batch-size", str(scale.batch_size), "--max-steps", str(scale.teacher_steps),
            "--warmup-steps", str(max(1, scale.teacher_steps // 20)), *TEACHER_LR, "--weight-decay", "0.0",
            "--save-interval", str(10 ** 9), "--keep-last", "1", "--progress-bar", "false", "--log-interval", "25"]


def start_command(scale: Scale, tokenizer: str, train: str, out: str, device: str) -> list[str]:
    return ["tide.train", "--method", "ce", "--student-kind", "bd3lm", "--student-tokenizer", tokenizer,
            "--data", train, "--output-dir", out, "--device", device, "--seed", "0",
            "--student-hidden", str(scale.student_hidden), "--student-layers", str(scale.student_layers),
            "--student-heads", str(scale.student_heads), "--seq-len", str(scale.seq_len),
            "--block-size", str(scale.block_size), "--batch-size", str(scale.batch_size),
            "--max-steps", str(scale.start_steps), "--warmup-steps", str(max(1, scale.start_steps // 20)),
            *START_LR, "--weight-decay", "0.0", "--save-interval", str(10 ** 9), "--keep-last", "1",
            "--progress-bar", "false", "--log-interval", "25"]


def method_command(scale: Scale, method: Method, seed: int, start: str, teachers: dict, tokenizers: dict,
                   train: str, curve: str, out: str, device: str) -> list[str]:
    cmd = ["tide.train", *method.args, "--student", start, "--data", train, "--output-dir", out,
           "--device", device, "--seed", str(seed), "--seq-len", str(scale.seq_len),
           "--block-size", str(scale.block_size), "--batch-size", str(scale.batch_size),
           "--max-steps", str(scale.steps), "--warmup-steps", str(max(1, scale.steps // 15)), *TRAIN_ARGS,
           "--save-interval", str(10 ** 9), "--keep-last", "1", "--progress-bar", "false",
           "--log-interval", str(max(1, scale.eval_interval // 2))]
    if method.teacher == "shared":
        cmd += ["--teacher", teachers["shared"]]
    elif method.teacher == "cross":
        cmd += ["--teacher", teachers["cross"], "--teacher-tokenizer", tokenizers["cross"]["path"],
                "--teacher-seq-len", str(scale.cross_seq_len)]
    return cmd + ["--eval-data", curve, "--eval-interval", str(scale.eval_interval),
                  "--eval-samples", str(scale.eval_samples)]  # the held-out curve during training


def evaluate_command(checkpoint: str, heldout: str, scale: Scale, seq_len: int, out_json: str,
                     device: str) -> list[str]:
    """Windows of the model's own training length; the same evaluation seed (masks, spans) for all."""
    return ["tide.evaluate", "--checkpoint", checkpoint, "--data", heldout, "--samples", str(scale.eval_samples),
            "--seed", "0", "--batch-size", "32", "--seq-len", str(seq_len), "--infill", str(scale.infill_spans), "--json", out_json,
            "--device", device, "--quiet"]


# --------------------------------------------------------------------------- running
class Runner:
    """Runs `python -m MODULE ARGS` commands: subprocesses (1 torch thread each, `jobs` at once),
    or in this process through the module's `main(argv)` (`in_process`, for tests)."""

    def __init__(self, jobs: int, in_process: bool, log=print):
        self.jobs, self.in_process, self.log = jobs, in_process, log
        self.lock = threading.Lock()

    def __call__(self, cmd: list[str], log_path: str) -> None:
        module, argv = cmd[0], cmd[1:]
        started = time.time()
        if self.in_process:
            import importlib
            with self.lock:
                importlib.import_module(module).main(argv)
        else:
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                       PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
            with open(log_path, "a") as fh:
                fh.write("$ python -m " + " ".join(cmd) + "\n")
                fh.flush()
                done = subprocess.run([sys.executable, "-m", *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                      cwd=ROOT)
            if done.returncode:
                with open(log_path) as fh:
                    tail = fh.read()[-3000:]
                raise RuntimeError(f"`python -m {' '.join(cmd)}` failed (exit {done.returncode}); "
                                   f"log {log_path}:\n{tail}")
        self.log(f"  {time.time() - started:6.0f} s  python -m {module} ... {os.path.dirname(log_path)}")


def in_parallel(tasks: list, jobs: int) -> list:
    """Call the tasks, `jobs` at a time, in order; the first failure cancels the rest and is raised."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = [pool.submit(task) for task in tasks]
    try:
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def cached_run(runner: Runner, folder: str, cmd: list[str], inputs: dict, fresh: bool) -> bool:
    """Run `cmd` into `folder` unless a finished run of the same command on the same inputs (hashes of
    the data, tokenizers and the runs it starts from) is there. True if it ran."""
    stamp = os.path.join(folder, "done.json")
    key = {"command": cmd, "inputs": inputs}
    if not fresh and os.path.exists(stamp) and read_json(stamp)["key"] == key:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    runner(cmd, os.path.join(folder, "log.txt"))
    with open(stamp, "w") as fh:
        json.dump({"key": key, "finished": datetime.datetime.now().isoformat(timespec="seconds")}, fh)
    return True


def finished_at(folder: str) -> str:
    """When the cached run in `folder` finished: an input of every run that starts from it."""
    return read_json(os.path.join(folder, "done.json"))["finished"]


def output_of(folder: str) -> str:
    """The trainer's --output-dir inside a run folder (next to the run's log, stamp and evaluations)."""
    return os.path.join(folder, "train")


def checkpoint_of(folder: str) -> str:
    out = output_of(folder)
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-") and n[11:].isdigit()] if os.path.isdir(out) else []
    if not names:
        raise RuntimeError(f"{out} holds no checkpoint")
    return os.path.join(out, max(names, key=lambda n: int(n[11:])))


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def read_curve(folder: str) -> list[tuple[int, float]]:
    """Held-out bits per byte logged during training (`--eval-data`), as (step, value)."""
    path = os.path.join(output_of(folder), "metrics.jsonl")
    points = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                row = json.loads(line)
                value = row.get("eval_bits_per_byte")
                if value is not None:
                    points.append((row["step"], value))
    return points


# --------------------------------------------------------------------------- statistics
def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with integer `df` (closed form, Abramowitz & Stegun 26.7.3-4)."""
    if df < 1 or t != t:
        return float("nan")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + ...))
        term, acc = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            acc += term
        inside = (2 / math.pi) * (theta + s * math.cos(theta) * acc)
    else:       # even: sin (1 + 1/2 cos^2 + 1.3/2.4 cos^4 + ...)
        term, acc = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            acc += term
        inside = s * acc
    return max(0.0, min(1.0, 1.0 - inside))


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


def paired(values: dict[int, float], reference: dict[int, float]) -> dict:
    """Paired t-test of `values - reference` over the seeds both have."""
    seeds = sorted(set(values) & set(reference))
    deltas = [values[s] - reference[s] for s in seeds]
    if not deltas:
        return {"n": 0}
    mean, sd = mean_sd(deltas)
    n = len(deltas)
    t = mean / (sd / math.sqrt(n)) if n > 1 and sd > 0 else (float("nan") if n < 2 else math.copysign(math.inf, mean))
    return {"n": n, "delta": mean, "delta_sd": sd, "t": t, "p": t_two_sided_p(t, n - 1),
            "better_seeds": sum(d < 0 for d in deltas), "deltas": deltas}


def teacher_check(teacher: dict, student: dict, name: str) -> str | None:
    """None when the teacher is clearly better than the CE-only student: at least 5% fewer bits per
    byte and a gap above 3 combined standard errors; else the reason."""
    gap = student["bits_per_byte"] - teacher["bits_per_byte"]
    se = math.hypot(teacher.get("bits_per_byte_se") or 0.0, student.get("bits_per_byte_se") or 0.0)
    if gap >= 0.05 * student["bits_per_byte"] and gap > 3 * se:
        return None
    return (f"the {name} teacher ({teacher['bits_per_byte']:.4f} bits/byte) is not clearly better than the CE-only "
            f"student ({student['bits_per_byte']:.4f} ± {se:.4f}): distilling from it cannot test the paper's "
            f"claim. Train the teachers longer or larger (--teacher-steps, --teacher-hidden, --teacher-layers).")


# --------------------------------------------------------------------------- report
def summarise(runs: dict, methods) -> list[dict]:
    """One row per method: bits/byte over seeds, MC SE, infill, delta against its reference."""
    by_name = {m.name: m for m in methods}
    rows = []
    for method in methods:
        per_seed = {s: r["bits_per_byte"] for s, r in runs.get(method.name, {}).items()}
        if not per_seed:
            continue
        values = list(per_seed.values())
        mean, sd = mean_sd(values)
        ses = [r.get("bits_per_byte_se", float("nan")) for r in runs[method.name].values()]
        infill = [r["infill_char_accuracy"] for r in runs[method.name].values() if "infill_char_accuracy" in r]
        row = {"method": method.name, "pipeline": method.pipeline, "teacher": method.teacher, "seeds": sorted(per_seed),
               "bits_per_byte": mean, "bits_per_byte_sd": sd, "mc_se": sum(ses) / len(ses),
               "infill_char_accuracy": sum(infill) / len(infill) if infill else None,
               "per_seed": {str(s): v for s, v in sorted(per_seed.items())}}
        for key, ref in (("vs_ce", "ce"), ("vs_reference", method.reference)):
            if method.name != ref and ref in by_name and runs.get(ref):
                row[key] = dict(reference=ref, **paired(per_seed, {s: r["bits_per_byte"] for s, r in runs[ref].items()}))
        rows.append(row)
    return rows


def _fmt(value, digits=4):
    return "—" if value is None or value != value else f"{value:.{digits}f}"


def _delta_cell(test: dict | None) -> str:
    if not test or not test.get("n"):
        return "—"
    return (f"{test['delta']:+.4f} ± {_fmt(test['delta_sd'])} (p={_fmt(test['p'], 3)}, "
            f"better {test['better_seeds']}/{test['n']})")


def markdown(report: dict) -> str:
    info, scale = report["info"], report["scale"]
    lines = [f"# Does it distil? {report['title']}", "",
             f"`{report['command']}`", "",
             f"Date {info['date']}, commit {info['commit']}, {info['machine']}; Python {info['python']}, "
             f"torch {info['torch']}, transformers {info['transformers']}, tokenizers {info['tokenizers']}; "
             f"{report['jobs']} run(s) at a time, 1 torch thread each; wall time {report['wall_s'] / 60:.1f} min; "
             f"load average {info['load_start']} at the start, {info.get('load_end', '?')} at the end "
             "(a shared machine).", ""]
    if report.get("warnings"):
        lines += ["**" + w + "**" for w in report["warnings"]] + [""]
    corpus = report["corpus"]
    lines += [f"Corpus: the standard library of Python {corpus['python']} ({corpus['files']} top-level files), "
              f"split by file: train {corpus['train']['files']} files / {corpus['train']['chars']} chars "
              f"(list {corpus['train']['list_sha256']}), held-out {corpus['heldout']['files']} files / "
              f"{corpus['heldout']['chars']} chars (list {corpus['heldout']['list_sha256']}).",
              f"Student: BD3LM {scale['student_hidden']}x{scale['student_layers']} ({report['params']['student']:,} "
              f"parameters), byte-level BPE {scale['student_vocab']}, {scale['seq_len']} tokens, block "
              f"{scale['block_size']}; CE start {scale['start_steps']} steps; every method {scale['steps']} steps x "
              f"{scale['batch_size']} x {scale['seq_len']} tokens from it, seeds 1..{scale['seeds']}.",
              f"Teachers: MDLM {scale['teacher_hidden']}x{scale['teacher_layers']}, {scale['teacher_steps']} CE steps: "
              f"shared (student's tokenizer, {report['params']['teacher_shared']:,} parameters) and cross (Unigram "
              f"{scale['cross_vocab']}, {scale['cross_seq_len']} tokens, {report['params']['teacher_cross']:,} parameters).",
              f"Hyper-parameters (all methods): `{' '.join(TRAIN_ARGS)}`, warmup steps/15.",
              f"Measure: `tide.evaluate` negative ELBO on the held-out split in bits per UTF-8 byte, "
              f"{scale['eval_samples']} masks per window, one evaluation seed for every model; ± is the standard "
              "deviation over seeds, MC SE the mean Monte-Carlo standard error of one evaluation; delta: paired over "
              "seeds, two-sided paired t-test, no correction for the many comparisons.", "",
              "| reference model | bits/byte | MC SE |", "|---|---|---|"]
    for name, res in report["references"].items():
        lines.append(f"| {name} | {_fmt(res['bits_per_byte'])} | {_fmt(res.get('bits_per_byte_se'))} |")
    lines += ["", "| method | pipeline | bits/byte (mean ± sd) | MC SE | infill (char acc.) | delta vs ce |",
              "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | {row['pipeline']}{' (' + row['teacher'] + ' teacher)' if row['teacher'] else ''} | "
                     f"{_fmt(row['bits_per_byte'])} ± {_fmt(row['bits_per_byte_sd'])} | {_fmt(row['mc_se'])} | "
                     f"{_fmt(row['infill_char_accuracy'], 3)} | {_delta_cell(row.get('vs_ce'))} |")
    ablation = [(r, r.get("vs_reference")) for r in report["rows"] if r["pipeline"] == "ablation"]
    by_name = {r["method"]: r for r in report["rows"]}
    pairs = [(by_name[a], paired({int(s): v for s, v in by_name[a]["per_seed"].items()},
                                 {int(s): v for s, v in by_name[b]["per_seed"].items()}), b)
             for a, b in COMPDEMO_PAIRS if a in by_name and b in by_name]
    if ablation or pairs:
        lines += ["", "Ablations (delta against the full variant, paired over seeds):", "",
                  "| variant | against | delta |", "|---|---|---|"]
        lines += [f"| {r['method']} | {t['reference']} | {_delta_cell(t)} |" for r, t in ablation if t]
        lines += [f"| {r['method']} (demo_ratio 0.5) | {b} (CompDemo off) | {_delta_cell(t)} |" for r, t, b in pairs]
    lines += ["", "Result, as measured: " + verdict(report["rows"]), ""]
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    better = [r["method"] for r in rows if r.get("vs_ce", {}).get("n", 0) > 1 and r["vs_ce"]["p"] < 0.05
              and r["vs_ce"]["delta"] < 0]
    worse = [r["method"] for r in rows if r.get("vs_ce", {}).get("n", 0) > 1 and r["vs_ce"]["p"] < 0.05
             and r["vs_ce"]["delta"] > 0]
    tested = [r["vs_ce"]["n"] for r in rows if r.get("vs_ce", {}).get("n", 0) > 1]
    text = (f"fewer held-out bits/byte than ce at p < 0.05: {', '.join(better) or 'none'}; "
            f"more: {', '.join(worse) or 'none'}; the other differences are within the seed-to-seed spread.")
    if tested:
        text += (f" With {min(tested)} seeds (df = {min(tested) - 1}) and {len(tested)} comparisons at 0.05, about "
                 f"{len(tested) / 20:.1f} would fall below it by chance alone.")
    return text


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[bench]"): no plot written')
        return False
    rows = report["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    colours = {"control": "black", "shared": "tab:blue", "cross": "tab:orange", "ablation": "tab:green"}
    ys = list(range(len(rows)))[::-1]
    for y, row in zip(ys, rows):
        left.errorbar(row["bits_per_byte"], y, xerr=row["bits_per_byte_sd"] if row["bits_per_byte_sd"] == row["bits_per_byte_sd"] else 0,
                      fmt="o", color=colours[row["pipeline"]], capsize=4)
        for value in row["per_seed"].values():
            left.plot(value, y, ".", color=colours[row["pipeline"]], alpha=0.4)
    if rows and rows[0]["method"] == "ce":
        left.axvline(rows[0]["bits_per_byte"], color="grey", lw=0.8, ls="--")
    left.set_yticks(ys, [r["method"] for r in rows])
    left.set_xlabel("held-out bits per byte (mean ± sd over seeds; dots: seeds)")
    left.set_title("after distillation (lower is better)")
    for name, curve in report["curves"].items():
        if curve:
            steps, values = zip(*curve)
            method = next((r for r in rows if r["method"] == name), None)
            right.plot(steps, values, label=name, color=colours[method["pipeline"]] if method else None,
                       ls="-" if not method or method["pipeline"] != "ablation" else ":")
    right.set_xlabel("step (from the CE start)")
    right.set_ylabel("held-out bits per byte (curve subset, mean over seeds)")
    right.set_title("during training")
    if right.get_lines():
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, "no held-out curve in these runs", ha="center",
                   transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parameters(checkpoint: str) -> int:
    from tide.models import load_model
    return sum(p.numel() for p in load_model(checkpoint).parameters())


def environment() -> dict:
    """Date, commit, machine and versions (benchmarks.run's record, plus the libraries used here)."""
    import tokenizers
    import torch
    import transformers

    from benchmarks.run import machine
    info = machine(threads=1)  # every run here uses one torch thread
    return {"date": info["date"], "commit": info["commit"], "python": platform.python_version(),
            "machine": f"{info.get('cpu') or platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replication", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small preset (under 10 minutes on 2 cores)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="full | quick | smoke (tests)")
    parser.add_argument("--methods", default="", help="comma-separated subset of the method names (default: all)")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "out", "replication"),
                        help="corpus, tokenizers, cached teachers and runs (a folder per preset)")
    parser.add_argument("--results", default=None, help="output prefix (default benchmarks/results/replication[_quick])")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (1 torch thread each on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--fresh", action="store_true", help="rerun the students even when cached")
    parser.add_argument("--in-process", action="store_true", help="run every step in this process (tests)")
    parser.add_argument("--allow-weak-teacher", action="store_true",
                        help="report instead of stopping when a teacher is not clearly better (smoke tests)")
    for f in dataclasses.fields(Scale):
        parser.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                            help=f"(default: the preset's; full: {getattr(FULL, f.name)})")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    preset = args.preset or ("quick" if args.quick else "full")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Scale) if getattr(args, f.name) is not None}
    scale = dataclasses.replace(PRESETS[preset], **overrides)
    if scale.seeds < 1 or scale.steps < 1:
        raise SystemExit("--seeds and --steps must be >= 1")
    methods = METHODS
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [w for w in wanted if w not in {m.name for m in METHODS}]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; choose from {[m.name for m in METHODS]}")
        methods = tuple(m for m in METHODS if m.name in wanted or m.name == "ce")
    results = args.results or os.path.join(RESULTS, "replication" + ("" if preset == "full" else f"_{preset}"))
    work = os.path.join(args.work_dir, preset)  # runs are cached by command and inputs, not by folder
    os.makedirs(work, exist_ok=True)
    command = "python -m benchmarks.replication " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.time()
    info = environment()
    log_lines = []

    def log(message: str) -> None:
        line = f"[replication {time.time() - started:6.0f} s] {message}"
        log_lines.append(line)
        print(line, flush=True)

    runner = Runner(args.jobs, args.in_process, log=log)
    log(f"preset {preset}, work folder {work}, {args.jobs} job(s); {len(methods)} methods x {scale.seeds} seeds")
    corpus = build_corpus(work, scale)
    tokenizers = build_tokenizers(work, scale)
    log(f"corpus: train {corpus['train']['chars']} chars / held-out {corpus['heldout']['chars']} chars; tokenizers trained")
    train, heldout, curve = (os.path.join(work, "corpus", k) for k in ("train", "heldout", "curve"))

    def evaluate(folder: str, seq_len: int = scale.seq_len) -> dict:
        """Held-out result of the run in `folder`, cached per evaluation command (a rerun of the
        training empties the folder)."""
        cmd = evaluate_command(checkpoint_of(folder), heldout, scale, seq_len, "OUT", args.device)
        out = os.path.join(folder, "heldout-" + hashlib.sha256(json.dumps(cmd).encode()).hexdigest()[:8] + ".json")
        if not os.path.exists(out):
            runner([out if c == "OUT" else c for c in cmd], os.path.join(folder, "log.txt"))
        written = read_json(out)
        flat = dict(written["elbo"])
        flat.update({f"infill_{k}": v for k, v in written.get("infill", {}).items()})
        return flat

    # 1. teachers and the common student start (independent: in parallel)
    inputs = {"train": corpus["train"]["content_sha256"], "student_tokenizer": tokenizers["student"]["sha256"],
              "cross_tokenizer": tokenizers["cross"]["sha256"]}
    teacher_dirs = {w: os.path.join(work, "teachers", w) for w in ("shared", "cross")}
    start_dir = os.path.join(work, "start")
    stages = {
        "shared": (teacher_dirs["shared"], teacher_command(scale, "shared", tokenizers["student"]["path"], train,
                                                           output_of(teacher_dirs["shared"]), args.device), False),
        "cross": (teacher_dirs["cross"], teacher_command(scale, "cross", tokenizers["cross"]["path"], train,
                                                         output_of(teacher_dirs["cross"]), args.device), False),
        "start": (start_dir, start_command(scale, tokenizers["student"]["path"], train, output_of(start_dir), args.device),
                  args.fresh),
    }
    needed = {"start"} | {m.teacher for m in methods if m.teacher}

    def stage(key):
        folder, cmd, fresh = stages[key]
        cached_run(runner, folder, cmd, inputs, fresh)
        return evaluate(folder, scale.cross_seq_len if key == "cross" else scale.seq_len)

    order = [k for k in ("cross", "start", "shared") if k in needed]  # the longest first
    references = dict(zip(order, in_parallel([lambda k=k: stage(k) for k in order], args.jobs)))
    teachers = {w: checkpoint_of(teacher_dirs[w]) for w in ("shared", "cross") if w in needed}
    start = checkpoint_of(start_dir)
    names = {"start": "student CE start (step 0 of every method)", "shared": "shared teacher (MDLM, student's tokenizer)",
             "cross": "cross teacher (MDLM, Unigram tokenizer)"}
    references = {names[k]: v for k, v in references.items()}
    for name, res in references.items():
        log(f"{name}: {res['bits_per_byte']:.4f} ± {res['bits_per_byte_se']:.4f} bits/byte")
    warnings = []
    for which in teachers:
        problem = teacher_check(references[names[which]], references[names["start"]], which)
        if problem:
            if not args.allow_weak_teacher:
                raise SystemExit("TEACHER SANITY CHECK FAILED: " + problem)
            warnings.append("Teacher sanity check failed (--allow-weak-teacher): " + problem)
            log(warnings[-1])

    # 2. every method from the start, seed-major (a cut-short run still has whole seeds)
    run_inputs = dict(inputs, **{k: finished_at(stages[k][0]) for k in needed})

    def one_run(method: Method, seed: int) -> tuple[str, int, dict, list]:
        folder = os.path.join(work, "runs", f"{slug(method.name)}-seed{seed}")
        cmd = method_command(scale, method, seed, start, teachers, tokenizers, train, curve, output_of(folder),
                             args.device)
        cached_run(runner, folder, cmd, run_inputs, args.fresh)
        return method.name, seed, evaluate(folder), read_curve(folder)

    runs, curves = {}, {}
    tasks = [lambda m=m, s=s: one_run(m, s) for s in range(1, scale.seeds + 1) for m in methods]
    for name, seed, result, curve_points in in_parallel(tasks, args.jobs):
        runs.setdefault(name, {})[seed] = result
        curves.setdefault(name, []).append(curve_points)
    mean_curves = {name: _mean_curve(c) for name, c in curves.items()}
    start_curve = references[names["start"]]["bits_per_byte"]

    rows = summarise(runs, methods)
    ce = next(r for r in rows if r["method"] == "ce")
    for which in teachers:  # and against the CE-only control after the same steps
        problem = teacher_check(references[names[which]], {"bits_per_byte": ce["bits_per_byte"],
                                                           "bits_per_byte_se": ce["mc_se"]}, which)
        if problem:
            warnings.append("Teacher sanity check against the ce control failed: " + problem)
            log(warnings[-1])
    info["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = {"title": {"full": "the paper's comparison at CPU scale",
                        "quick": "QUICK run (--quick): a smoke-sized check, not the result",
                        "smoke": "SMOKE run (tests): not a result"}[preset],
              "command": command, "preset": preset, "scale": dataclasses.asdict(scale), "jobs": args.jobs,
              "info": info, "corpus": corpus, "tokenizers": tokenizers, "train_args": TRAIN_ARGS,
              "references": references, "rows": rows, "runs": {k: {str(s): v for s, v in r.items()} for k, r in runs.items()},
              "curves": mean_curves, "start_bits_per_byte": start_curve, "warnings": warnings,
              "params": {"student": parameters(start), **{f"teacher_{w}": parameters(p) for w, p in teachers.items()}},
              "wall_s": time.time() - started, "log": log_lines}
    for w in ("shared", "cross"):
        report["params"].setdefault(f"teacher_{w}", 0)
    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    with open(results + ".json", "w") as fh:
        json.dump(report, fh, indent=1)
    with open(results + ".md", "w") as fh:
        fh.write(markdown(report))
    plotted = plot(report, results + ".png")
    log(f"wrote {results}.md, .json{', .png' if plotted else ''}")
    print(markdown(report))
    if any(w.startswith("Teacher sanity check against") for w in warnings) and not args.allow_weak_teacher:
        raise SystemExit("TEACHER SANITY CHECK FAILED after training: " + warnings[-1])
    return report


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves and all(curves) else []
    return [(s, sum(dict(c)[s] for c in curves) / len(curves)) for s in steps]


if __name__ == "__main__":
    main()

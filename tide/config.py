"""The trainer's configuration: one dataclass, filled from defaults < YAML file < `--key value`.

    python -m tide.train --config configs/shared_tidal.yaml --max-steps 200 --lr 1e-4

`--help` lists every field with its default. `check()` rejects bad combinations
before any model is built, with a message that says what to change.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import typing
from dataclasses import dataclass

import yaml

METHODS = ("ce", "kl", "reverse_kl", "tidal", "calm", "reverse_calm", "calm_tidal")
TOKEN_METHODS = ("kl", "reverse_kl", "tidal")          # token-level, need one vocabulary
CHUNK_METHODS = ("calm", "reverse_calm", "calm_tidal")  # chunk-level, cross-tokenizer
PIPELINES = ("shared", "aligned", "cross")
ARCHITECTURES = ("qwen3", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass
class Config:
    # --- run
    output_dir: str = "out/tide"          # metrics.jsonl and checkpoint-<step>/ go here
    max_steps: int = 1000                 # optimizer steps
    resume: bool = False                  # continue from the newest valid checkpoint in output_dir
    overwrite: bool = False               # start afresh in a used output_dir (deletes its checkpoints, metrics)
    allow_config_change: bool = False     # --resume even though options differ from the checkpoint's
    seed: int = 0                         # initialisation, data order and masks
    device: str = "auto"                  # auto | cpu | cuda
    dtype: str = "bf16"                   # autocast dtype on CUDA: bf16 | fp32 (CPU always fp32)
    parallel: str = "ddp"                 # under torchrun: ddp | fsdp (FSDP2 fully_shard)
    log_interval: int = 10                # steps between metrics.jsonl lines
    save_interval: int = 500              # steps between checkpoints (and one at the end)
    keep_last: int = 2                    # newest checkpoints kept on disk (0 keeps all)
    progress_bar: bool = True             # tqdm bar with loss and tokens/s

    # --- method (SPEC.md)
    method: str = "tidal"                 # ce | kl | reverse_kl | tidal | calm | reverse_calm | calm_tidal
    pipeline: str = "shared"              # shared | aligned | cross (tokenizers / templates of the pair)
    compdemo: bool = False                # teacher sees complementary demonstrations (2 passes)
    demo_ratio: float = 0.5               # P(masked token/chunk in M_A)
    temperature: float = 2.0              # T of every distillation loss
    lambda_init: float = 0.1              # TIDAL lambda at the start of training
    lambda_max: float = 0.9               # TIDAL lambda at the end of training
    lambda_schedule: str = "cosine"       # cosine | linear (training axis)
    lambda_axis: str = "both"             # both | training_only | timestep_only
    timestep_weight: str = "midrange"     # midrange | uniform (TIDAL and CALM+TIDAL w_b)
    eps: float = 1e-3                     # t = eps + (1 - eps) U(0, 1)
    ce_schedule_weight: str = "linear"    # per-sequence CE weight: linear (1/t) | uniform (1)
    ce_weight: float = 1.0                # loss = ce_weight * CE + distill_weight * L_distill
    distill_weight: float = 1.0
    impl: str = "auto"                    # loss implementation: auto | chunked | triton | ...

    # --- models
    student: str = ""                     # HF directory (tide checkpoint or causal LM); "" = build new
    student_kind: str = "bd3lm"           # bd3lm | mdlm (mdlm: pretrain a teacher with --method ce)
    student_arch: str = "qwen3"           # architecture of a new student: qwen3 | llama
    student_hidden: int = 128             # width of a new student
    student_layers: int = 2               # layers of a new student
    student_heads: int = 4                # attention heads of a new student
    block_size: int = 32                  # BD3LM block; must divide seq_len
    teacher: str = ""                     # HF directory of the teacher (MDLM or BD3LM)
    teacher_kind: str = ""                # mdlm | bd3lm, when the directory does not say
    student_tokenizer: str = ""           # default: the student directory, else the teacher's
    teacher_tokenizer: str = ""           # default: the teacher directory

    # --- data
    data: str = ""                        # a text file, a folder of .txt/.md/.py files, or a .jsonl chat file
    seq_len: int = 128                    # student length L
    teacher_seq_len: int = 0              # teacher length (0 = same as seq_len)
    batch_size: int = 8                   # micro-batch per process
    grad_accum: int = 1                   # micro-batches per optimizer step

    # --- optimizer
    lr: float = 5e-5                      # peak AdamW learning rate (paper: 5e-5)
    min_lr: float = 5e-6                  # end of the cosine decay
    warmup_steps: int = 100               # linear warmup, then cosine to min_lr
    weight_decay: float = 0.0             # AdamW, on matrices only
    beta1: float = 0.9                    # AdamW betas
    beta2: float = 0.95
    grad_clip: float = 1.0                # 0 disables clipping

    @property
    def needs_teacher(self) -> bool:
        return self.method != "ce"


def _field_type(f):
    hints = typing.get_type_hints(Config)
    return hints[f.name]


def _field_help() -> dict[str, str]:
    """The comment after each field in the source of `Config` becomes its `--help` text."""
    helps = {}
    for line in inspect.getsource(Config).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.*)", line)
        if match:
            helps[match.group(1)] = match.group(2)
    return helps


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tide.train",
        description="Distil a diffusion LM teacher into a BD3LM student with TIDE. "
                    "With no arguments: a built-in CPU demo (no download).",
    )
    parser.add_argument("--config", default=None, help="YAML file of fields below")
    defaults, helps = Config(), _field_help()
    for f in dataclasses.fields(Config):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if kind is bool:
            # `--resume` alone means true; `--resume false` is accepted too
            parser.add_argument(flag, dest=f.name, type=_parse_bool, nargs="?", const=True,
                                default=argparse.SUPPRESS, help=f"{helps.get(f.name, '')} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                                help=f"{helps.get(f.name, '')} (default: {default!r})")
    return parser


def load_config(argv: list[str] | None = None) -> Config:
    """defaults < YAML (`--config`) < command-line options."""
    args = vars(build_parser().parse_args(argv))
    values = {}
    path = args.pop("config")
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"config file {path!r} not found")
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
        names = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(k.replace("-", "_") for k in values) - names)
        if unknown:
            raise SystemExit(f"{path}: unknown option(s) {unknown}; see `python -m tide.train --help`")
        values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update(args)
    return Config(**values)


def check(cfg: Config) -> None:
    """Fail before training with a message that says what to change."""
    def fail(message):
        raise SystemExit(f"config error: {message}")

    if cfg.resume and cfg.overwrite:
        fail("--resume and --overwrite contradict each other: continue the run in --output-dir, or replace it")
    if cfg.allow_config_change and not cfg.resume:
        fail("--allow-config-change only applies with --resume")
    if not cfg.resume and not cfg.overwrite and os.path.isdir(cfg.output_dir) and os.listdir(cfg.output_dir):
        fail(f"--output-dir {cfg.output_dir!r} is not empty: pass --resume to continue the run there, "
             f"--overwrite to replace it, or another --output-dir")
    if cfg.method not in METHODS:
        fail(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.pipeline not in PIPELINES:
        fail(f"unknown --pipeline {cfg.pipeline!r}; choose one of {', '.join(PIPELINES)}")
    if cfg.method in CHUNK_METHODS and cfg.pipeline != "cross":
        fail(f"--method {cfg.method} is chunk-level: use --pipeline cross (or a token-level method "
             f"{', '.join(TOKEN_METHODS)} with --pipeline {cfg.pipeline})")
    if cfg.method in TOKEN_METHODS and cfg.pipeline == "cross":
        fail(f"--method {cfg.method} compares token distributions and needs one vocabulary: "
             f"use --pipeline shared/aligned, or a chunk-level method ({', '.join(CHUNK_METHODS)}) across tokenizers")
    if cfg.compdemo and cfg.method == "ce":
        fail("--compdemo shapes what the teacher sees; --method ce has no teacher")
    if cfg.block_size <= 0 or cfg.seq_len % cfg.block_size:
        fail(f"--block-size {cfg.block_size} must divide --seq-len {cfg.seq_len}: "
             f"use a --seq-len that is a multiple of {cfg.block_size}, or another --block-size")
    if not 0.0 < cfg.demo_ratio < 1.0:
        fail(f"--demo-ratio must be in (0, 1), got {cfg.demo_ratio}")
    if not 0.0 <= cfg.eps < 1.0:
        fail(f"--eps must be in [0, 1), got {cfg.eps}")
    if cfg.temperature <= 0:
        fail(f"--temperature must be > 0, got {cfg.temperature}")
    for name in ("lambda_init", "lambda_max"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1]")
    if cfg.lambda_schedule not in ("cosine", "linear"):
        fail("--lambda-schedule must be cosine or linear")
    if cfg.lambda_axis not in ("both", "training_only", "timestep_only"):
        fail("--lambda-axis must be both, training_only or timestep_only")
    if cfg.timestep_weight not in ("midrange", "uniform"):
        fail("--timestep-weight must be midrange or uniform")
    if cfg.ce_schedule_weight not in ("linear", "uniform"):
        fail("--ce-schedule-weight must be linear or uniform")
    if cfg.student_kind not in ("bd3lm", "mdlm"):
        fail("--student-kind must be bd3lm or mdlm")
    if cfg.student_kind == "mdlm" and cfg.method != "ce":
        fail("--student-kind mdlm is for pretraining a teacher: use it with --method ce")
    if cfg.student_arch not in ARCHITECTURES:
        fail(f"--student-arch must be one of {ARCHITECTURES}")
    if cfg.parallel not in ("ddp", "fsdp"):
        fail("--parallel must be ddp or fsdp")
    if cfg.dtype not in ("bf16", "fp32"):
        fail("--dtype must be bf16 or fp32")
    if cfg.keep_last < 0:
        fail(f"--keep-last must be >= 0 (0 keeps all checkpoints), got {cfg.keep_last}")
    if cfg.max_steps <= 0 or cfg.batch_size <= 0 or cfg.grad_accum <= 0:
        fail("--max-steps, --batch-size and --grad-accum must be positive")
    if cfg.needs_teacher and not cfg.teacher:
        fail(f"--method {cfg.method} distils from a teacher: pass --teacher DIR (or --method ce)")
    # local directories only: a path that does not exist is an error, never a Hugging Face hub id
    for name in ("teacher", "student"):
        path = getattr(cfg, name)
        if path and not os.path.isdir(path):
            fail(f"--{name} {path!r} is not a directory (models are loaded from local directories only)")
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            fail(f"--{name} {path!r} has no config.json: not a model directory")
    for name in ("student_tokenizer", "teacher_tokenizer"):
        path = getattr(cfg, name)
        if path and not os.path.isdir(path):
            fail(f"--{name.replace('_', '-')} {path!r} not found (a local tokenizer directory is needed)")
    if not cfg.student and not cfg.student_tokenizer and not cfg.teacher:
        fail("no tokenizer for the student: pass --student DIR, --student-tokenizer DIR or --teacher DIR")
    sources = [("student_tokenizer", cfg.student_tokenizer) if cfg.student_tokenizer else
               ("student", cfg.student) if cfg.student else ("teacher", cfg.teacher)]
    if cfg.needs_teacher:
        sources.append(("teacher_tokenizer", cfg.teacher_tokenizer) if cfg.teacher_tokenizer else ("teacher", cfg.teacher))
    for name, path in sources:
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            fail(f"--{name.replace('_', '-')} {path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                 f"pass a tokenizer directory")
    if not cfg.data:
        fail("--data is empty: pass a text file, a folder of text files, or a .jsonl chat file")
    if not os.path.exists(cfg.data):
        fail(f"--data {cfg.data!r} not found: pass a text file, a folder of text files, or a .jsonl chat file")

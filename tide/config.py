"""The trainer's configuration: one dataclass, filled from defaults < YAML file < `--key value`.

    python -m tide.train --config configs/shared_tidal.yaml --max-steps 200 --lr 1e-4

`--help` lists every field with its default. `check()` rejects bad combinations
before any model is built, with a message that says what to change.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass

import yaml

from tide.tracking import REPORT_TO, missing_library

METHODS = ("ce", "kl", "reverse_kl", "tidal", "calm", "reverse_calm", "calm_tidal", "reverse_calm_tidal")
TOKEN_METHODS = ("kl", "reverse_kl", "tidal")          # token-level, need one vocabulary
CHUNK_METHODS = ("calm", "reverse_calm", "calm_tidal", "reverse_calm_tidal")  # chunk-level, cross-tokenizer
TIDAL_METHODS = ("tidal", "calm_tidal", "reverse_calm_tidal")  # use the lambda schedule
PIPELINES = ("shared", "aligned", "cross")
ARCHITECTURES = ("qwen3", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
ALPHA_SCHEDULES = ("linear", "cosine")
CE_NORMALIZATIONS = ("token", "sequence", "batch")
CONCAT_ORDERS = ("xt_x0", "x0_xt")


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
    progress_bar: bool = True             # tqdm bar: loss, ce, distill, lambda, lr, real tokens/s
    report_to: str = "none"               # experiment tracker: none | tensorboard | wandb | trackio

    # --- method (SPEC.md)
    method: str = "tidal"                 # ce | kl | reverse_kl | tidal | calm | reverse_calm | calm_tidal | reverse_calm_tidal
    pipeline: str = "shared"              # shared | aligned | cross (tokenizers / templates of the pair)
    compdemo: bool = False                # teacher sees complementary demonstrations (2 passes)
    demo_ratio: float = 0.5               # P(masked token/chunk in M_A)
    temperature: float = 2.0              # T of the token-level losses (kl, reverse_kl, tidal)
    calm_temperature: float = 2.0         # T of the chunk-level losses (calm, reverse_calm, calm_tidal, reverse_calm_tidal)
    lambda_init: float = 0.1              # TIDAL lambda at the start of training
    lambda_max: float = 0.9               # TIDAL lambda at the end of training
    lambda_schedule: str = "cosine"       # cosine | linear (training axis)
    lambda_axis: str = "both"             # both | training_only | timestep_only
    timestep_weight: str = "midrange"     # midrange | uniform (TIDAL and CALM+TIDAL w_b)
    eps: float = 1e-3                     # t = eps + (1 - eps) U(0, 1)
    alpha_schedule: str = "linear"        # masking schedule: linear (alpha = 1 - t) | cosine (alpha = cos(pi t / 2)); mask ratio 1 - alpha(t)
    ce_schedule_weight: str = "elbo"      # per-sequence CE weight: elbo (-alpha'(t) / (1 - alpha(t)), 1/t if linear; old name: linear) | uniform (1)
    ce_normalization: str = "token"       # CE divided by (b = sequences in the micro-batch): token (its maskable tokens) | sequence (each sequence's maskable tokens x b) | batch (b)
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
    student_kv_heads: int = 0             # key/value heads of a new student (0 = student_heads; must divide it)
    student_intermediate: int = 0         # MLP width of a new student (0 = 4 x student_hidden)
    gradient_checkpointing: bool = False  # recompute the student's layer activations in backward (less memory)
    block_size: int = 32                  # BD3LM block; must divide seq_len
    teacher: str = ""                     # HF directory of the teacher (MDLM or BD3LM)
    teacher_kind: str = ""                # mdlm | bd3lm, when the directory does not say
    teacher_mask_token_id: int = -1       # -1: config.json's mask_token_id, else the teacher tokenizer's mask token
    teacher_block_size: int = 0           # BD3LM teacher block (0: config.json's block_size)
    teacher_concat_order: str = ""        # BD3LM teacher input: xt_x0 | x0_xt (WeDLM style); "": config.json, else xt_x0
    teacher_lm_head: str = ""             # custom-code teacher: dotted name of its LM head module ("": found)
    trust_remote_code: bool = False       # run the modeling code a teacher directory ships (auto_map): only if you trust it
    student_tokenizer: str = ""           # default: the student directory, else the teacher's
    teacher_tokenizer: str = ""           # default: the teacher directory

    # --- data
    data: str = ""                        # a text file, a folder of .txt/.md/.py files, or a .jsonl chat file
    seq_len: int = 128                    # student length L
    teacher_seq_len: int = 0              # teacher length (0 = same as seq_len)
    batch_size: int = 8                   # micro-batch per process
    grad_accum: int = 1                   # micro-batches per optimizer step
    eval_data: str = ""                   # held-out text/folder/.jsonl: bits per byte (tide.evaluate) logged
    eval_interval: int = 0                # steps between held-out evaluations (0 = at every checkpoint)
    eval_samples: int = 4                 # masks per held-out window (the standard error needs >= 2)

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


_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in _BOOL_WORDS[:4]:
        return True
    if low in _BOOL_WORDS[4:]:
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


def coerce(key: str, kind, value):
    """A YAML value as the field's type, read the way the command line reads it
    (`"false"` -> False, `"1e-4"` -> 1e-4, `4.0` -> 4); anything else is a SystemExit naming the key."""
    options = [k for k in typing.get_args(kind) if k is not type(None)]
    if options and len(options) < len(typing.get_args(kind)):  # `X | None`
        return None if value is None else coerce(key, options[0], value)
    if kind not in (bool, int, float, str):
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _parse_bool(value)
        expected = "true or false"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value.strip())
        expected = "an integer"
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value.strip())
        expected = "a number"
    else:
        if isinstance(value, str):
            return value
        expected = "a string"
    raise SystemExit(f"config error: {key}: expected {expected}, got {value!r}")


def load_config(argv: list[str] | None = None) -> Config:
    """defaults < YAML (`--config`) < command-line options."""
    args = vars(build_parser().parse_args(argv))
    values = {}
    path = args.pop("config")
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"config file {path!r} not found")
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"config error: {path} must be a mapping of option: value, got {type(loaded).__name__} "
                             f"{loaded!r}"[:300])
        fields = {f.name: _field_type(f) for f in dataclasses.fields(Config)}
        values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SystemExit(f"{path}: unknown option(s) {unknown}; see `python -m tide.train --help`")
        values = {k: coerce(f"{path}: {k}", fields[k], v) for k, v in values.items()}
    values.update(args)
    return Config(**values)


def check(cfg: Config) -> None:
    """Fail before anything is built, with a message that says what to change. Every field has a
    range here (NaN fails every comparison, so ranges are written as `not low <= x <= high`)."""
    def fail(message):
        raise SystemExit(f"config error: {message}")

    def number(name, low=None, high=None, *, low_open=False, high_open=False, finite=True):
        """`--name` within [low, high] (open ends where asked) and finite."""
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        inside = (low is None or (value > low if low_open else value >= low)) and \
                 (high is None or (value < high if high_open else value <= high))
        if not inside or (finite and not math.isfinite(value)):
            span = f"{'(' if low_open else '['}{'-inf' if low is None else low}, " \
                   f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}"
            fail(f"{flag} must be {'finite and ' if finite else ''}in {span}, got {value}")

    def choice(name, choices):
        value = getattr(cfg, name)
        if value not in choices:
            fail(f"unknown --{name.replace('_', '-')} {value!r}; choose one of {', '.join(map(repr, choices))}")

    # --- run
    if not cfg.output_dir:
        fail("--output-dir is empty: pass a directory for metrics.jsonl and the checkpoints")
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        fail(f"--output-dir {cfg.output_dir!r} is a file, not a directory")
    if cfg.resume and cfg.overwrite:
        fail("--resume and --overwrite contradict each other: continue the run in --output-dir, or replace it")
    if cfg.allow_config_change and not cfg.resume:
        fail("--allow-config-change only applies with --resume")
    if not cfg.resume and not cfg.overwrite and os.path.isdir(cfg.output_dir) and os.listdir(cfg.output_dir):
        fail(f"--output-dir {cfg.output_dir!r} is not empty: pass --resume to continue the run there, "
             f"--overwrite to replace it, or another --output-dir")
    for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "student_hidden", "student_layers",
                 "student_heads"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("log_interval", "save_interval"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1 (steps), got {getattr(cfg, name)}")
    if cfg.keep_last < 0:
        fail(f"--keep-last must be >= 0 (0 keeps all checkpoints), got {cfg.keep_last}")
    number("seed", 0, 2**32 - 1)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        fail(f"--device must be auto, cpu, cuda or cuda:<index>, got {cfg.device!r}")
    choice("dtype", ("bf16", "fp32"))
    choice("parallel", ("ddp", "fsdp"))
    choice("report_to", REPORT_TO)
    if missing_library(cfg.report_to):
        fail(missing_library(cfg.report_to))

    # --- method
    choice("method", METHODS)
    choice("pipeline", PIPELINES)
    if cfg.method in CHUNK_METHODS and cfg.pipeline != "cross":
        fail(f"--method {cfg.method} is chunk-level: use --pipeline cross (or a token-level method "
             f"{', '.join(TOKEN_METHODS)} with --pipeline {cfg.pipeline})")
    if cfg.method in TOKEN_METHODS and cfg.pipeline == "cross":
        fail(f"--method {cfg.method} compares token distributions and needs one vocabulary: "
             f"use --pipeline shared/aligned, or a chunk-level method ({', '.join(CHUNK_METHODS)}) across tokenizers")
    if cfg.compdemo and cfg.method == "ce":
        fail("--compdemo shapes what the teacher sees; --method ce has no teacher")
    number("demo_ratio", 0.0, 1.0, low_open=True, high_open=True)
    number("temperature", 0.0, low_open=True)
    number("calm_temperature", 0.0, low_open=True)
    number("lambda_init", 0.0, 1.0)
    number("lambda_max", 0.0, 1.0)
    choice("lambda_schedule", ("cosine", "linear"))
    choice("lambda_axis", ("both", "training_only", "timestep_only"))
    choice("timestep_weight", ("midrange", "uniform"))
    number("eps", 0.0, 1.0, high_open=True)
    choice("alpha_schedule", ALPHA_SCHEDULES)
    choice("ce_schedule_weight", ("elbo", "uniform", "linear"))
    if cfg.ce_schedule_weight == "linear" and cfg.alpha_schedule != "linear":
        fail("--ce-schedule-weight linear (1/t) is the ELBO weight of the linear schedule only: "
             f"use --ce-schedule-weight elbo with --alpha-schedule {cfg.alpha_schedule}")
    choice("ce_normalization", CE_NORMALIZATIONS)
    number("ce_weight", 0.0)
    number("distill_weight", 0.0)
    if cfg.ce_weight == 0 and (cfg.method == "ce" or cfg.distill_weight == 0):
        fail(f"--ce-weight 0 with --method {cfg.method} and --distill-weight {cfg.distill_weight}: "
             f"the loss is 0, nothing to learn")
    from tide.losses import IMPLS
    choice("impl", IMPLS)
    if cfg.impl == "triton_stream" and not (cfg.method in TOKEN_METHODS and cfg.pipeline == "shared"):
        fail(f"--impl triton_stream exists for the token-level losses only (--method {'/'.join(TOKEN_METHODS)} "
             f"with --pipeline shared); use --impl triton or auto")
    if cfg.impl in ("triton", "triton_stream"):
        import torch
        on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            fail(f"--impl {cfg.impl} needs CUDA (or TRITON_INTERPRET=1); use --impl chunked or auto on CPU")
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            fail(f"--device {cfg.device}, but CUDA is not available here: use --device cpu or auto")

    # --- models
    choice("student_kind", ("bd3lm", "mdlm"))
    if cfg.student_kind == "mdlm" and cfg.method != "ce":
        fail("--student-kind mdlm is for pretraining a teacher: use it with --method ce")
    choice("student_arch", ARCHITECTURES)
    if not cfg.student and (cfg.student_hidden % cfg.student_heads or (cfg.student_hidden // cfg.student_heads) % 2):
        fail(f"--student-hidden {cfg.student_hidden} must be --student-heads {cfg.student_heads} times an even "
             f"head width (rotary embeddings)")
    for name in ("student_kv_heads", "student_intermediate", "teacher_block_size"):
        if getattr(cfg, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0 (0 = default), got {getattr(cfg, name)}")
    if cfg.student_kv_heads and cfg.student_heads % cfg.student_kv_heads:
        fail(f"--student-kv-heads {cfg.student_kv_heads} must divide --student-heads {cfg.student_heads}")
    choice("teacher_kind", ("", "mdlm", "bd3lm"))
    if cfg.teacher_mask_token_id < -1:
        fail(f"--teacher-mask-token-id must be >= 0 (or -1: from the teacher), got {cfg.teacher_mask_token_id}")
    choice("teacher_concat_order", ("",) + CONCAT_ORDERS)
    if cfg.trust_remote_code and not cfg.needs_teacher:
        fail(f"--trust-remote-code runs a teacher directory's own modeling code; --method {cfg.method} has no teacher")
    if cfg.teacher_lm_head and not cfg.trust_remote_code:
        fail("--teacher-lm-head names the LM head module of a custom-code teacher: it goes with --trust-remote-code")
    if cfg.block_size <= 0 or cfg.seq_len % cfg.block_size:
        fail(f"--block-size {cfg.block_size} must divide --seq-len {cfg.seq_len}: "
             f"use a --seq-len that is a multiple of {cfg.block_size}, or another --block-size")

    # --- data and optimizer
    if cfg.teacher_seq_len < 0:
        fail(f"--teacher-seq-len must be >= 0 (0 = --seq-len), got {cfg.teacher_seq_len}")
    if cfg.teacher_seq_len and cfg.pipeline == "shared":
        warnings.warn("--teacher-seq-len applies to --pipeline aligned/cross; the shared pipeline uses --seq-len "
                      "for both", stacklevel=2)
    number("lr", 0.0, low_open=True)
    number("min_lr", 0.0)
    if cfg.min_lr > cfg.lr:
        fail(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}: the cosine decay ends at --min-lr")
    if cfg.warmup_steps < 0:
        fail(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    number("weight_decay", 0.0)
    number("beta1", 0.0, 1.0, high_open=True)
    number("beta2", 0.0, 1.0, high_open=True)
    number("grad_clip", 0.0)
    if cfg.eval_interval < 0:
        fail(f"--eval-interval must be >= 0 (0 = at every checkpoint), got {cfg.eval_interval}")
    if cfg.eval_samples < 1:
        fail(f"--eval-samples must be >= 1, got {cfg.eval_samples}")
    if cfg.eval_data and not os.path.exists(cfg.eval_data):
        fail(f"--eval-data {cfg.eval_data!r} does not exist")
    if cfg.eval_data and cfg.parallel == "fsdp" and "WORLD_SIZE" in os.environ:
        fail("--eval-data is not supported with --parallel fsdp yet (the sharded student has no plain forward); "
             "evaluate the checkpoints afterwards with python -m tide.evaluate")

    # --- paths
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

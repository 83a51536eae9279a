"""Trainer checkpoints: written atomically, verified before use, never unpickled.

    checkpoint-<step>/
        config.json, model.safetensors, tokenizer files   the student (Hugging Face `save_pretrained`)
        teacher_tokenizer/                                 cross / aligned pipelines
        trainer_state.json       format, step, data position, the run's options, the optimizer's
                                 structure (param groups, hyper-parameters) as plain JSON
        optimizer.safetensors    the optimizer's tensors (AdamW `exp_avg`, `exp_avg_sq`, `step`)
        rng_rank<r>.safetensors  RNG states of rank r as tensors (torch CPU and CUDA generators,
                                 Python's Mersenne Twister)
        checksums.sha256         SHA-256 of every other file, `sha256sum -c checksums.sha256` format;
                                 written last

A checkpoint is written to `checkpoint-<step>.tmp` and renamed. On `--resume` the newest
checkpoint whose files all match their checksums (no file missing, none added) and whose
trainer state is for its own step is used; newer ones that fail are skipped with a warning
saying why. Loading reads JSON and safetensors only, so a planted pickle is never executed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import warnings

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "tide-checkpoint-1"
CHECKSUMS = "checksums.sha256"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"

# Options that only say where and how often things are written or shown: they may differ on
# `--resume`. Any other difference changes the run (data order, masks, schedules, the model)
# and is refused unless `--allow-config-change`.
BOOKKEEPING = ("output_dir", "resume", "overwrite", "allow_config_change", "log_interval", "save_interval",
               "keep_last", "progress_bar", "eval_data", "eval_interval", "eval_samples")


class InvalidCheckpoint(Exception):
    """A checkpoint directory that must not be resumed from (the message says why)."""


# --------------------------------------------------------------------------- listing
def step_of(path: str) -> int:
    return int(os.path.basename(path)[len("checkpoint-"):])


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` directories, oldest first (a `.tmp` directory is an interrupted write)."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n[11:].isdigit()]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n[11:]))]


def remove_run(output_dir: str) -> None:
    """`--overwrite`: delete a previous run's checkpoints and metrics (other files are left alone)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and os.path.isdir(path):
            shutil.rmtree(path)
        elif name == "metrics.jsonl":
            os.remove(path)


# --------------------------------------------------------------------------- nested state <-> JSON + tensors
def to_json_and_tensors(obj, tensors: dict, path: str = "state"):
    """A nested state (dicts, lists, tuples, tensors, numbers, strings) as a JSON tree whose
    tensors are moved into `tensors` (name -> tensor) and replaced by {"tensor": name}.
    Every dict and tuple is tagged, so decoding restores int keys and tuples exactly."""
    if torch.is_tensor(obj):
        if path in tensors:
            raise ValueError(f"two tensors of the state would be saved as {path!r}")
        tensors[path] = obj.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{path}: only str and int keys can be saved, got {key!r}")
        return {"dict": [[k, to_json_and_tensors(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [to_json_and_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: {type(obj).__name__} cannot be saved in a checkpoint (tensors and plain values only)")


def from_json_and_tensors(tree, tensors: dict):
    """The inverse of `to_json_and_tensors`."""
    if isinstance(tree, list):
        return [from_json_and_tensors(v, tensors) for v in tree]
    if isinstance(tree, dict):
        (tag, value), = tree.items()
        if tag == "tensor":
            return tensors[value]
        if tag == "tuple":
            return tuple(from_json_and_tensors(v, tensors) for v in value)
        if tag == "dict":
            return {k: from_json_and_tensors(v, tensors) for k, v in value}
        raise InvalidCheckpoint(f"unknown entry {tag!r} in the trainer state")
    return tree


# --------------------------------------------------------------------------- RNG states as tensors
def rng_tensors() -> tuple[dict, dict]:
    """This process's RNG states: (tensors, safetensors metadata)."""
    version, mt_state, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "python_mt": torch.tensor(mt_state, dtype=torch.int64)}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    return tensors, {"python_version": str(version), "python_gauss_next": json.dumps(gauss_next)}


def set_rng(path: str) -> None:
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    torch.set_rng_state(tensors["torch"])
    random.setstate((int(meta["python_version"]), tuple(tensors["python_mt"].tolist()),
                     json.loads(meta["python_gauss_next"])))
    cuda = [tensors[f"cuda_{i}"] for i in range(len([k for k in tensors if k.startswith("cuda_")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


# --------------------------------------------------------------------------- checksums
def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_of(directory: str) -> list[str]:
    """Every file under `directory` (relative paths), except the checksum list."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != CHECKSUMS:
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def write_checksums(directory: str) -> None:
    lines = [f"{sha256(os.path.join(directory, rel))}  {rel}\n" for rel in files_of(directory)]
    with open(os.path.join(directory, CHECKSUMS), "w") as fh:
        fh.writelines(lines)


def verify(path: str, rank: int = 0) -> dict:
    """The trainer state of a checkpoint whose files all match their checksums; else InvalidCheckpoint."""
    listing = os.path.join(path, CHECKSUMS)
    if not os.path.isfile(listing):
        raise InvalidCheckpoint(f"no {CHECKSUMS} (empty, interrupted, written by an older tide, or not a tide "
                                f"checkpoint)")
    expected = {}
    with open(listing, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            digest, sep, rel = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64:
                raise InvalidCheckpoint(f"{CHECKSUMS} line {number} is not '<sha256>  <file>'")
            expected[rel] = digest
    present = set(files_of(path))
    missing, added = sorted(set(expected) - present), sorted(present - set(expected))
    if missing:
        raise InvalidCheckpoint(f"missing file(s) {missing}")
    if added:
        raise InvalidCheckpoint(f"file(s) not written by the trainer: {added}")
    changed = [rel for rel in sorted(expected) if sha256(os.path.join(path, rel)) != expected[rel]]
    if changed:
        raise InvalidCheckpoint(f"checksum mismatch (corrupt or replaced): {changed}")
    for name in (STATE, OPTIMIZER, f"rng_rank{rank}.safetensors"):
        if name not in expected:
            raise InvalidCheckpoint(f"no {name}")
    for name in [rel for rel in expected if rel.endswith(".safetensors")]:
        try:
            with safe_open(os.path.join(path, name), framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 (safetensors raises its own error types)
            raise InvalidCheckpoint(f"{name} is not a safetensors file ({error})") from None
    try:
        with open(os.path.join(path, STATE), encoding="utf-8") as fh:
            state = json.load(fh)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidCheckpoint(f"{STATE} is not JSON ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InvalidCheckpoint(f"{STATE} is not a {FORMAT} trainer state")
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("data_position"), dict):
        raise InvalidCheckpoint(f"{STATE} lacks the run's config or data position")
    if state.get("step") != step_of(path):
        raise InvalidCheckpoint(f"{STATE} is for step {state.get('step')}, not {step_of(path)}")
    return state


def latest_valid(output_dir: str, rank: int = 0) -> tuple[str, dict]:
    """The newest checkpoint that passes `verify`; newer ones that fail are skipped with a warning."""
    found = checkpoints(output_dir)
    if not found:
        raise SystemExit(f"--resume: no checkpoint-<step> directory in {output_dir!r}")
    reasons = []
    for path in reversed(found):
        try:
            return path, verify(path, rank)
        except InvalidCheckpoint as why:
            reasons.append(f"{path}: {why}")
            warnings.warn(f"--resume: skipping {path}: {why}", stacklevel=2)
    raise SystemExit(f"--resume: no valid checkpoint in {output_dir!r}:\n  " + "\n  ".join(reasons))


def config_differences(saved: dict, cfg) -> list[str]:
    """`name: saved -> now` for every option (except BOOKKEEPING) that differs from the checkpoint's."""
    now, defaults = dataclasses.asdict(cfg), dataclasses.asdict(type(cfg)())
    return [f"{name}: {saved.get(name, defaults[name])!r} -> {value!r}" for name, value in now.items()
            if name not in BOOKKEEPING and saved.get(name, defaults[name]) != value]


# --------------------------------------------------------------------------- save / load
def save(cfg, step, wrapped, student, optimizer, tokenizers, fsdp, rank, extra_files: dict | None = None) -> str:
    """HF-format student + tokenizers + trainer state (+ `extra_files`: name -> text, e.g. a sample),
    written to a temp dir, then renamed."""
    if fsdp:  # gather the full state on rank 0 (collective: every rank calls it)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(wrapped, options=options)
        prefix = "student.decoder."
        model_state = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
        if getattr(student.config, "tie_word_embeddings", False):  # saved once, as the embedding
            model_state.pop("lm_head.weight", None)
        optim_state = get_optimizer_state_dict(wrapped, optimizer, options=options)
    else:
        model_state, optim_state = None, optimizer.state_dict()
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    rng, rng_meta = rng_tensors()
    save_file(rng, os.path.join(tmp, f"rng_rank{rank}.safetensors"), metadata=rng_meta)
    if rank == 0:
        student.save_pretrained(tmp, state_dict=model_state) if model_state is not None else student.save_pretrained(tmp)
        tokenizers["student"].save_pretrained(tmp)
        if tokenizers.get("teacher") is not None and cfg.pipeline != "shared":
            tokenizers["teacher"].save_pretrained(os.path.join(tmp, "teacher_tokenizer"))
        # the LR schedule is a function of the step; data order and masks are functions of the seed and
        # the global micro-batch index, so (step, batch geometry) is the whole data position
        world = dist.get_world_size() if dist.is_initialized() else 1
        position = {"micro_batches": step * cfg.grad_accum, "batch_size": cfg.batch_size, "world_size": world}
        tensors = {}
        optimizer_tree = to_json_and_tensors(optim_state, tensors, "optimizer")
        save_file(tensors, os.path.join(tmp, OPTIMIZER))
        state = {"format": FORMAT, "step": step, "data_position": position, "config": dataclasses.asdict(cfg),
                 "optimizer": optimizer_tree}
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=1)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                fh.write(text)
    if dist.is_initialized():
        dist.barrier()  # every rank's RNG file is in place
    if rank == 0:
        write_checksums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune(cfg.output_dir, step, cfg.keep_last)
    if dist.is_initialized():
        dist.barrier()
    return final


def prune(output_dir: str, step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step` (0 keeps all). Newer directories are
    ones `--resume` skipped as invalid; they are replaced when the run reaches their step."""
    if keep_last == 0:
        return
    for old in [c for c in checkpoints(output_dir) if step_of(c) <= step][:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_optimizer_state(path: str, state: dict) -> dict:
    """The optimizer state dict of a verified checkpoint (`state` from `verify`)."""
    return from_json_and_tensors(state["optimizer"], load_file(os.path.join(path, OPTIMIZER)))

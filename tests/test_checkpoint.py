"""Checkpoints and `--resume` under faults: nothing is ever unpickled, a missing local path is
an error, an output directory of another run is never silently reused, a resume with other
options is refused, flipped bytes are caught, an empty / foreign / corrupt newest checkpoint is
skipped for the newest valid one, a torn metrics.jsonl line is tolerated, --keep-last is checked.

Tiny CE-only runs (no teacher), a few steps each."""
import io
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tide.demo import stdlib_text, train_tokenizer
from tide.train import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint_assets")
    texts = stdlib_text(30_000)
    data = root / "text.txt"
    data.write_text("\n".join(texts), encoding="utf-8")
    train_tokenizer(texts, "bpe", 300, str(root / "tok"))
    return {"root": root, "data": str(data), "tok": str(root / "tok")}


def argv(assets, out, **kw):
    args = {"output-dir": str(out), "method": "ce", "data": assets["data"], "student-tokenizer": assets["tok"],
            "max-steps": 2, "save-interval": 1, "keep-last": 0, "device": "cpu", "seq-len": 16, "block-size": 8,
            "batch-size": 2, "student-hidden": 16, "student-layers": 1, "student-heads": 2, "warmup-steps": 0,
            "lr": 1e-3, "progress-bar": "false", "log-interval": 1}
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run(assets, out, *flags, **kw):
    return main(argv(assets, out, **kw) + list(flags))


@pytest.fixture
def two_steps(assets, tmp_path):
    """A finished 2-step run with checkpoint-1 and checkpoint-2."""
    out = tmp_path / "run"
    run(assets, out)
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2", "metrics.jsonl"]
    return out


class WritesAFile:
    """Unpickling this creates `path`: the stand-in for arbitrary code in a planted pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# --------------------------------------------------------------------------- security
def test_resume_never_unpickles(assets, two_steps, tmp_path, capsys):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()  # what torch.save(..., weights_only=False) files are: a pickle in a zip
    torch.save({"step": 2, "optimizer": WritesAFile(marker)}, buffer)
    payload = buffer.getvalue()
    # 1) the old format's names, planted into the newest checkpoint: foreign files, skipped
    for name in ("trainer_state.pt", "rng_rank0.pt", "optimizer.pt"):
        (two_steps / "checkpoint-2" / name).write_bytes(payload)
    # 2) a newer checkpoint in the old (pickle) format only
    shutil.copytree(two_steps / "checkpoint-1", two_steps / "checkpoint-3")
    for name in os.listdir(two_steps / "checkpoint-3"):
        if not name.endswith((".json", ".safetensors")) or name.startswith(("trainer_state", "optimizer", "rng")):
            os.remove(two_steps / "checkpoint-3" / name)
    (two_steps / "checkpoint-3" / "trainer_state.pt").write_bytes(payload)
    (two_steps / "checkpoint-3" / "rng_rank0.pt").write_bytes(payload)
    with pytest.warns(UserWarning) as caught:
        run(assets, two_steps, "--resume", **{"max-steps": 2})
    warned = " ".join(str(w.message) for w in caught)
    assert "checkpoint-3" in warned and "checkpoint-2" in warned
    assert "resumed from" in capsys.readouterr().out and not marker.exists()

    # 3) a pickle under the new format's own names, with a checksum file that matches it
    only = tmp_path / "only"
    run(assets, only, **{"max-steps": 1})
    ckpt = only / "checkpoint-1"
    for name in ("optimizer.safetensors", "rng_rank0.safetensors", "trainer_state.json"):
        (ckpt / name).write_bytes(payload)
    rewrite_checksums(ckpt)
    with pytest.raises(SystemExit, match="no valid checkpoint"), pytest.warns(UserWarning):
        run(assets, only, "--resume", **{"max-steps": 1})
    assert not marker.exists()


def rewrite_checksums(ckpt):
    """What a forger would do: make checksums.sha256 match the planted files."""
    import hashlib
    lines = []
    for root, _, files in os.walk(ckpt):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), ckpt)
            if rel != "checksums.sha256":
                lines.append(f"{hashlib.sha256(open(os.path.join(root, name), 'rb').read()).hexdigest()}  {rel}")
    (ckpt / "checksums.sha256").write_text("\n".join(sorted(lines, key=lambda l: l[66:])) + "\n")


@pytest.mark.parametrize("flag", ["teacher", "student", "student-tokenizer", "teacher-tokenizer"])
def test_missing_local_path_is_an_error_not_a_hub_id(assets, tmp_path, flag, monkeypatch):
    """A hub-style id that is not a local path, and an empty directory, fail before anything is built."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kw = {}
    if flag.startswith("teacher"):  # a real teacher directory next to the bad path
        run(assets, tmp_path / "pretrain", **{"student-kind": "mdlm", "max-steps": 1})
        kw = {"method": "kl", "teacher": tmp_path / "pretrain" / "checkpoint-1"}
    empty = tmp_path / "empty"
    empty.mkdir()
    for value in ("Qwen/Qwen3-0.6B", empty):
        with pytest.raises(SystemExit, match=f"--{flag} "):
            run(assets, tmp_path / "a", **dict(kw, **{flag: value}))
    assert not os.path.exists(tmp_path / "a")


# --------------------------------------------------------------------------- runs silently lost or wrong
def test_fresh_run_refuses_a_non_empty_output_dir(assets, two_steps):
    with pytest.raises(SystemExit, match="--overwrite"):
        run(assets, two_steps, **{"max-steps": 1})
    assert sorted(os.listdir(two_steps)) == ["checkpoint-1", "checkpoint-2", "metrics.jsonl"]
    with pytest.raises(SystemExit, match="--resume and --overwrite"):
        run(assets, two_steps, "--resume", "--overwrite")
    (two_steps / "notes.txt").write_text("mine")
    run(assets, two_steps, "--overwrite", **{"max-steps": 1, "seed": 7})
    assert sorted(os.listdir(two_steps)) == ["checkpoint-1", "metrics.jsonl", "notes.txt"]
    state = json.loads((two_steps / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["config"]["seed"] == 7
    with open(two_steps / "metrics.jsonl") as fh:
        assert [json.loads(line)["step"] for line in fh] == [1]


def test_resume_refuses_changed_options(assets, two_steps):
    changes = {"seed": 1, "grad-accum": 2, "max-steps": 5, "block-size": 16, "lr": 2e-3}
    for flag, value in changes.items():
        with pytest.raises(SystemExit, match=f"{flag.replace('-', '_')}: .* -> {value}") as error:
            run(assets, two_steps, "--resume", **{flag: value})
        assert "--allow-config-change" in str(error.value)
    with pytest.raises(SystemExit) as error:
        run(assets, two_steps, "--resume", **{"seed": 3, "max-steps": 4})
    assert "seed: 0 -> 3" in str(error.value) and "max_steps: 2 -> 4" in str(error.value)
    # bookkeeping options may change; with the flag, so may the others
    run(assets, two_steps, "--resume", **{"log-interval": 5, "keep-last": 3, "save-interval": 7})
    result = run(assets, two_steps, "--resume", "--allow-config-change", **{"max-steps": 3})
    assert result["history"][-1]["step"] == 3


def test_resume_refuses_a_changed_method(assets, two_steps):
    """--method on --resume: a CE run resumed as a distillation run (its own first checkpoint as the
    teacher) is refused, naming the method, not continued under the other objective."""
    with pytest.raises(SystemExit, match="method: 'ce' -> 'kl'") as error:
        run(assets, two_steps, "--resume", **{"method": "kl", "teacher": str(two_steps / "checkpoint-1")})
    assert "--allow-config-change" in str(error.value)


def test_checksums_catch_flipped_bytes(assets, two_steps, capsys):
    model = two_steps / "checkpoint-2" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0x10                                        # one bit of one weight
    model.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checkpoint-2.*model.safetensors"):
        run(assets, two_steps, "--resume", **{"max-steps": 2})
    assert f"resumed from {two_steps / 'checkpoint-1'} at step 1" in capsys.readouterr().out
    # step 2 was redone from checkpoint-1: the new checkpoint-2 is valid again
    run(assets, two_steps, "--resume", **{"max-steps": 2})
    assert "at step 2" in capsys.readouterr().out
    # a trainer state copied from another step: refused too
    shutil.copy(two_steps / "checkpoint-1" / "trainer_state.json", two_steps / "checkpoint-2" / "trainer_state.json")
    with pytest.warns(UserWarning, match="checkpoint-2.*trainer_state.json"):
        run(assets, two_steps, "--resume", **{"max-steps": 2})
    assert "at step 1" in capsys.readouterr().out


def test_invalid_newest_checkpoint_is_skipped(assets, two_steps, capsys):
    (two_steps / "checkpoint-7").mkdir()                   # empty
    (two_steps / "checkpoint-9").mkdir()                   # foreign
    (two_steps / "checkpoint-9" / "config.json").write_text("{}")
    (two_steps / "checkpoint-8.tmp").mkdir()               # an interrupted write: not a checkpoint at all
    with pytest.warns(UserWarning) as caught:
        run(assets, two_steps, "--resume", "--allow-config-change", **{"max-steps": 3})
    warned = [str(w.message) for w in caught]
    assert any("checkpoint-9" in w for w in warned) and any("checkpoint-7" in w for w in warned)
    assert f"resumed from {two_steps / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert os.path.isdir(two_steps / "checkpoint-3") and os.path.isdir(two_steps / "checkpoint-1")
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-7", "checkpoint-9"):
        assert os.path.isdir(two_steps / name)              # keep-last 0: nothing pruned
    for step in (7, 9):
        shutil.rmtree(two_steps / f"checkpoint-{step}")
    for step in (1, 2, 3):
        os.remove(two_steps / f"checkpoint-{step}" / "tokenizer.json")
    with pytest.raises(SystemExit, match="(?s)no valid checkpoint.*checkpoint-3.*tokenizer.json"), \
            pytest.warns(UserWarning):
        run(assets, two_steps, "--resume", **{"max-steps": 3})  # (checked before the options)


def test_resume_tolerates_a_torn_metrics_line(assets, two_steps):
    with open(two_steps / "metrics.jsonl", "a") as fh:
        fh.write("\n")
        fh.write('{"step": 3, "loss": 1.2')                # killed in the middle of a write
    with pytest.warns(UserWarning, match="metrics.jsonl"):
        run(assets, two_steps, "--resume", **{"max-steps": 3, "allow-config-change": "true"})
    with open(two_steps / "metrics.jsonl") as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 2, 3]


@pytest.mark.parametrize("keep_last,kept", [(0, [1, 2, 3]), (1, [3]), (2, [2, 3])])
def test_keep_last(assets, tmp_path, keep_last, kept):
    run(assets, tmp_path / "run", **{"max-steps": 3, "keep-last": keep_last})
    names = sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint-"))
    assert names == [f"checkpoint-{s}" for s in kept]


def test_keep_last_negative_is_rejected(assets, tmp_path):
    with pytest.raises(SystemExit, match="--keep-last"):
        run(assets, tmp_path / "run", **{"keep-last": -1})
    assert not os.path.exists(tmp_path / "run")


def test_checkpoint_files_are_json_and_safetensors(assets, tmp_path):
    """The format: no pickle anywhere; checksums.sha256 lists every other file."""
    run(assets, tmp_path / "run", **{"max-steps": 1})
    ckpt = tmp_path / "run" / "checkpoint-1"
    names = set(os.listdir(ckpt))
    assert {"trainer_state.json", "optimizer.safetensors", "rng_rank0.safetensors", "checksums.sha256",
            "model.safetensors", "config.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl"))]
    listed = {line.split("  ", 1)[1] for line in (ckpt / "checksums.sha256").read_text().splitlines()}
    assert listed == names - {"checksums.sha256"}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["config"]["seed"] == 0
    assert load_file(ckpt / "optimizer.safetensors") and load_file(ckpt / "rng_rank0.safetensors")


def test_config_differences_fill_missing_saved_options_with_defaults():
    """A checkpoint written before an option existed compares as if it had the option's default."""
    import dataclasses

    from tide.checkpoint import config_differences
    from tide.config import Config
    saved = dataclasses.asdict(Config())
    del saved["seed"]
    assert config_differences(saved, Config(seed=0, keep_last=5, output_dir="elsewhere")) == []
    assert config_differences(saved, Config(seed=3)) == ["seed: 0 -> 3"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_resume_redoes_the_same_step(assets, tmp_path, parallel):
    """torchrun, 2 CPU processes: resuming from checkpoint-2 rewrites checkpoint-3 with the same weights
    (the FSDP optimizer state goes through JSON + safetensors keyed by parameter names)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tide.train"]
    args = argv(assets, tmp_path / "run", **{"max-steps": 3, "parallel": parallel})
    for extra in ([], ["--resume"]):
        out = subprocess.run(cmd + args + extra, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        if not extra:
            shutil.move(tmp_path / "run" / "checkpoint-3", tmp_path / "first-3")
    assert "resumed from" in out.stdout + out.stderr
    first = load_file(tmp_path / "first-3" / "model.safetensors")
    again = load_file(tmp_path / "run" / "checkpoint-3" / "model.safetensors")
    assert first.keys() == again.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name

"""What a training run says: the start-up summary, metrics.jsonl (wall time, elapsed
seconds, real-token counts), and `--report-to` (TensorBoard event files read back by
TensorBoard's own reader; wandb and trackio through stand-in modules)."""
import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import pytest

from tide.data import text_example
from tide.demo import stdlib_text, train_tokenizer
from tide.train import main

SNIPPET = "x = 1\n"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tokenizer and a folder of short files: every example is shorter than seq_len (padding)."""
    root = tmp_path_factory.mktemp("tracking")
    tokenizer = train_tokenizer(stdlib_text(20_000), "bpe", 320, str(root / "tok"))
    data = root / "data"
    data.mkdir()
    for i in range(8):
        (data / f"f{i}.txt").write_text(SNIPPET, encoding="utf-8")
    return {"tok": str(root / "tok"), "data": str(data),
            "snippet_tokens": len(text_example(SNIPPET, student_tokenizer=tokenizer).student_input_ids)}


def run(small, out, *extra):
    args = ["--output-dir", str(out), "--max-steps", "3", "--device", "cpu", "--seq-len", "16",
            "--block-size", "8", "--batch-size", "4", "--student-hidden", "32", "--student-layers", "1",
            "--student-heads", "2", "--warmup-steps", "1", "--lr", "1e-3", "--log-interval", "1",
            "--method", "ce", "--data", small["data"], "--student-tokenizer", small["tok"], *extra]
    return main(args)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_summary_metrics_and_tensorboard(small, tmp_path, capsys):
    result = run(small, tmp_path, "--report-to", "tensorboard")
    printed = capsys.readouterr().out
    assert "tide.train: --method ce --pipeline shared" in printed
    assert "student  BD3LM" in printed and "M parameters" in printed
    assert "8 examples" in printed and "maskable" in printed and "student positions per step" in printed
    assert "device   cpu" in printed

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    # wall time and elapsed seconds on every line
    assert all(abs(r["time"] - records[0]["time"]) < 3600 and r["elapsed_s"] >= 0 for r in records)
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    # tokens/s counts real tokens: 4 sequences of the snippet (+ EOS) per step, padded to 16
    assert small["snippet_tokens"] * 4 < 4 * 16
    assert [r["tokens"] for r in records] == [4 * small["snippet_tokens"]] * 3
    assert result["history"] == records

    # the event files, read back by TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/ce", "train/lr", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def fake_tracker(monkeypatch, name):
    """A stand-in module with wandb's / trackio's init, log and finish, recording the calls."""
    calls = []
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.init = lambda **kw: calls.append(("init", kw))
    module.log = lambda values, step=None: calls.append(("log", values, step))
    module.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_report_to_wandb_and_trackio(small, tmp_path, monkeypatch, name):
    calls = fake_tracker(monkeypatch, name)
    run(small, tmp_path, "--report-to", name, "--progress-bar", "false")
    assert calls[0][0] == "init" and calls[0][1]["project"] == "tide" and calls[0][1]["config"]["method"] == "ce"
    logs = [c for c in calls if c[0] == "log"]
    assert [step for _, _, step in logs] == [1, 2, 3]
    assert logs[-1][1]["train/loss"] == pytest.approx(read_metrics(tmp_path)[-1]["loss"])
    assert calls[-1] == ("finish",)


def test_report_to_errors(small, tmp_path):
    with pytest.raises(SystemExit, match="unknown --report-to"):
        run(small, tmp_path, "--report-to", "mlflow")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(SystemExit, match=r"pip install \"tide-dllm\[wandb\]\""):
            run(small, tmp_path, "--report-to", "wandb")

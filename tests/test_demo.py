"""The no-argument demo, shortened to a few steps: every stage runs, it reports held-out bits
per byte with error bars for the four models and a verdict, and its output is quiet (no blank
lines, no third-party progress bars; captured at the file-descriptor level, so the Rust
tokenizer trainer's and Hugging Face's bars would show)."""
import ast
import math
import os

import pytest

import tide.demo as demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shortened(monkeypatch, pipeline):
    monkeypatch.setattr(demo, "TEACHER_STEPS", 3)
    monkeypatch.setattr(demo, "STUDENT_STEPS", 3)
    monkeypatch.setattr(demo, "TRAIN_CHARS", 30_000)
    monkeypatch.setattr(demo, "HELD_OUT_CHARS", 2_000)
    monkeypatch.setattr(demo, "PIPELINE", pipeline)


def check_run(result, printed):
    assert set(result["results"]) == {"teacher", "student before", "distilled", "CE only"}
    for r in result["results"].values():
        assert math.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0 and r["se"] >= 0
        assert isinstance(r["sample"], str)
    assert "held-out bits per byte" in printed and result["verdict"] in printed
    lines = printed.splitlines()
    assert all(line.strip() for line in lines), "blank line in the demo's output"
    for noise in ("Writing model shards", "Loading weights", "[00:00", "Pre-processing sequences", "it/s]"):
        assert noise not in printed, noise
    for path in result["checkpoints"].values():
        assert os.path.exists(os.path.join(path, "model.safetensors"))


def test_demo_runs_quietly(tmp_path, monkeypatch, capfd):
    shortened(monkeypatch, "shared")
    result = demo.run_demo(str(tmp_path))
    captured = capfd.readouterr()
    check_run(result, captured.out + captured.err)


@pytest.mark.slow
def test_demo_cross_tokenizer(tmp_path, monkeypatch, capfd):
    shortened(monkeypatch, "cross")
    result = demo.run_demo(str(tmp_path))
    captured = capfd.readouterr()
    check_run(result, captured.out + captured.err)


def test_unigram_tokenizer_keeps_whitespace_runs(tmp_path):
    """The student tokenizer of the cross demo: indentation is one token and decoding is exact
    (a plain Metaspace made every space its own token: the "only spaces" student)."""
    tok = demo.train_tokenizer(demo.stdlib_text(20_000), "unigram", 300, str(tmp_path / "tok"))
    text = "    def f(x):\n        return x  # done\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces.count("▁") <= 2, pieces


def test_demo_uses_public_entry_points_only():
    """demo imports tide.train's main, never its internals; train imports the demo only to run it."""
    with open(os.path.join(ROOT, "tide", "demo.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert {name for module, name in imported if module == "tide.train"} == {"main"}
    with open(os.path.join(ROOT, "tide", "train.py"), encoding="utf-8") as fh:
        train_tree = ast.parse(fh.read())
    main_function = next(n for n in train_tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "tide.demo" for n in ast.walk(main_function))

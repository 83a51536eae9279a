"""Configuration: YAML values typed by the dataclass field (coerced the way the command line
would, or rejected naming the key), and every option range-checked before anything is built."""
import dataclasses
import glob
import os

import pytest

import tide.train
from tide.config import Config, check, load_config


@pytest.fixture
def base(tmp_path):
    """A valid CE run's arguments; nothing is loaded by `check`."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    data = tmp_path / "text.txt"
    data.write_text("hello\n")
    return ["--method", "ce", "--student-tokenizer", str(tok), "--data", str(data),
            "--output-dir", str(tmp_path / "out"), "--device", "cpu"]


def yaml_config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return ["--config", str(path)]


# --------------------------------------------------------------------------- YAML types
@pytest.mark.parametrize("text,field,value", [
    ('compdemo: "false"\n', "compdemo", False),
    ("compdemo: 'off'\n", "compdemo", False),
    ("compdemo: yes\n", "compdemo", True),           # YAML 1.1 boolean
    ("lr: 1e-4\n", "lr", 1e-4),                      # a string to PyYAML (no dot)
    ('lr: "3.0e-4"\n', "lr", 3e-4),
    ("lr: 1\n", "lr", 1.0),
    ("max_steps: 4.0\n", "max_steps", 4),             # an integral float is that integer
    ('max_steps: "12"\n', "max_steps", 12),
    ("teacher-kind: mdlm\n", "teacher_kind", "mdlm"),
])
def test_yaml_values_are_coerced_by_field_type(tmp_path, text, field, value):
    cfg = load_config(yaml_config(tmp_path, text))
    got = getattr(cfg, field)
    assert got == value and type(got) is type(value), (got, value)


@pytest.mark.parametrize("text,words", [
    ("max_steps: 3.7\n", ["max_steps", "integer", "3.7"]),
    ("max_steps: true\n", ["max_steps", "integer"]),
    ("seq_len: abc\n", ["seq_len", "integer", "abc"]),
    ('compdemo: "maybe"\n', ["compdemo", "true or false"]),
    ("compdemo: 2\n", ["compdemo", "true or false"]),
    ("progress_bar: 1.0\n", ["progress_bar", "true or false"]),
    ("resume: [1]\n", ["resume", "true or false"]),
    ("overwrite: nope\n", ["overwrite", "true or false"]),
    ("allow_config_change: 7\n", ["allow_config_change", "true or false"]),
    ('lr: "fast"\n', ["lr", "number", "fast"]),
    ("temperature: true\n", ["temperature", "number"]),
    ("temperature: [2]\n", ["temperature", "number"]),
    ("teacher: 5\n", ["teacher", "string"]),
    ("data: null\n", ["data", "string"]),
    ("method: {a: 1}\n", ["method", "string"]),
    ("hello\n", ["mapping", "str"]),                   # a scalar file
    ("- method: kl\n", ["mapping", "list"]),
    ("1: 2\n", ["unknown option", "1"]),
])
def test_bad_yaml_values_are_rejected_naming_the_key(tmp_path, text, words):
    with pytest.raises(SystemExit) as error:
        load_config(yaml_config(tmp_path, text))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_command_line_still_wins_over_yaml(tmp_path):
    cfg = load_config(yaml_config(tmp_path, "compdemo: 'true'\nlr: 1e-4\n") + ["--compdemo", "false"])
    assert cfg.compdemo is False and cfg.lr == 1e-4


# --------------------------------------------------------------------------- ranges
# (flags, words in the message); every field of Config appears at least once (see the test below)
BAD = [
    (["--output-dir", ""], ["--output-dir"]),
    (["--max-steps", "0"], ["--max-steps", "positive"]),
    (["--allow-config-change"], ["--allow-config-change", "--resume"]),
    (["--resume", "--overwrite"], ["--resume and --overwrite"]),
    (["--seed", "-1"], ["--seed"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--device", "cuda:x"], ["--device"]),
    (["--dtype", "fp8"], ["--dtype"]),
    (["--parallel", "zero"], ["--parallel"]),
    (["--log-interval", "0"], ["--log-interval", ">= 1"]),
    (["--save-interval", "0"], ["--save-interval", ">= 1"]),
    (["--keep-last", "-1"], ["--keep-last", "0 keeps all"]),
    (["--progress-bar", "false", "--compdemo"], ["--compdemo", "--method ce"]),
    (["--report-to", "mlflow"], ["--report-to", "mlflow"]),
    (["--method", "distill"], ["--method"]),
    (["--pipeline", "mixed"], ["--pipeline"]),
    (["--demo-ratio", "1.0"], ["--demo-ratio"]),
    (["--demo-ratio", "nan"], ["--demo-ratio"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--temperature", "inf"], ["--temperature", "finite"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--lambda-init", "1.5"], ["--lambda-init"]),
    (["--lambda-init", "nan"], ["--lambda-init"]),
    (["--lambda-max", "-0.1"], ["--lambda-max"]),
    (["--lambda-schedule", "step"], ["--lambda-schedule"]),
    (["--lambda-axis", "x"], ["--lambda-axis"]),
    (["--timestep-weight", "x"], ["--timestep-weight"]),
    (["--eps", "1.0"], ["--eps"]),
    (["--eps", "nan"], ["--eps"]),
    (["--ce-schedule-weight", "x"], ["--ce-schedule-weight"]),
    (["--ce-weight", "-1"], ["--ce-weight"]),
    (["--ce-weight", "nan"], ["--ce-weight"]),
    (["--ce-weight", "0"], ["--ce-weight", "nothing to learn"]),
    (["--distill-weight", "inf"], ["--distill-weight"]),
    (["--impl", "bogus"], ["--impl", "bogus", "chunked"]),
    (["--impl", "triton_stream"], ["--impl triton_stream"]),
    (["--student", "/nonexistent/student"], ["--student", "not a directory"]),
    (["--student-kind", "ar"], ["--student-kind"]),
    (["--student-arch", "gpt2"], ["--student-arch"]),
    (["--student-hidden", "0"], ["--student-hidden"]),
    (["--student-hidden", "30"], ["--student-hidden", "--student-heads"]),
    (["--student-layers", "0"], ["--student-layers"]),
    (["--student-heads", "0"], ["--student-heads"]),
    (["--block-size", "0"], ["--block-size"]),
    (["--teacher", "/nonexistent/teacher", "--method", "kl"], ["--teacher", "not a directory"]),
    (["--teacher-kind", "ar"], ["--teacher-kind"]),
    (["--student-tokenizer", "/nonexistent/tok"], ["--student-tokenizer", "not found"]),
    (["--teacher-tokenizer", "/nonexistent/tok"], ["--teacher-tokenizer", "not found"]),
    (["--data", "/nonexistent/data"], ["--data", "not found"]),
    (["--seq-len", "0"], ["--seq-len", "positive"]),
    (["--teacher-seq-len", "-5"], ["--teacher-seq-len"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--grad-accum", "0"], ["--grad-accum"]),
    (["--eval-data", "/nonexistent/held_out"], ["--eval-data", "does not exist"]),
    (["--eval-interval", "-1"], ["--eval-interval", ">= 0"]),
    (["--eval-samples", "0"], ["--eval-samples", ">= 1"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "inf"], ["--lr"]),
    (["--min-lr", "1e-3", "--lr", "1e-4"], ["--min-lr", "--lr"]),
    (["--min-lr", "-0.00001"], ["--min-lr"]),
    (["--warmup-steps", "-1"], ["--warmup-steps"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--weight-decay", "nan"], ["--weight-decay"]),
    (["--beta1", "1.0"], ["--beta1"]),
    (["--beta2", "-0.5"], ["--beta2"]),
    (["--grad-clip", "-1"], ["--grad-clip"]),
    (["--grad-clip", "nan"], ["--grad-clip"]),
    (["--eval-data", "/nonexistent/heldout"], ["--eval-data"]),
    (["--eval-interval", "-1"], ["--eval-interval"]),
    (["--eval-samples", "0"], ["--eval-samples"]),
    # bring your own models (issue 11)
    (["--calm-temperature", "0"], ["--calm-temperature"]),
    (["--calm-temperature", "inf"], ["--calm-temperature", "finite"]),
    (["--alpha-schedule", "sqrt"], ["--alpha-schedule"]),
    (["--ce-schedule-weight", "linear", "--alpha-schedule", "cosine"], ["--ce-schedule-weight elbo"]),
    (["--ce-normalization", "tokens"], ["--ce-normalization"]),
    (["--gradient-checkpointing", "--student-kv-heads", "3"], ["--student-kv-heads", "divide"]),
    (["--student-kv-heads", "-1"], ["--student-kv-heads"]),
    (["--student-intermediate", "-1"], ["--student-intermediate"]),
    (["--teacher-mask-token-id", "-2"], ["--teacher-mask-token-id"]),
    (["--teacher-block-size", "-1"], ["--teacher-block-size"]),
    (["--teacher-concat-order", "x0x0"], ["--teacher-concat-order"]),
    (["--trust-remote-code"], ["--trust-remote-code", "no teacher"]),
    (["--teacher-lm-head", "lm_head"], ["--teacher-lm-head", "--trust-remote-code"]),
]


BAD.append((["--output-dir", "DATA_FILE"], ["--output-dir", "is a file"]))


@pytest.mark.parametrize("flags,words", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_every_option_is_range_checked(base, flags, words):
    data_file = base[base.index("--data") + 1]
    with pytest.raises(SystemExit) as error:
        check(load_config(base + [data_file if f == "DATA_FILE" else f for f in flags]))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_every_field_has_a_bad_value_above():
    covered = {f.lstrip("-").replace("-", "_") for flags, _ in BAD for f in flags if f.startswith("--")}
    missing = sorted(f.name for f in dataclasses.fields(Config) if f.name not in covered)
    assert not missing, (f"options without a range check test: {missing}; give each a range in "
                         f"tide.config.check and a bad value in tests/test_config.py::BAD")


def test_defaults_and_shipped_configs_pass(base, tmp_path):
    check(load_config(base))
    teacher = tmp_path / "teacher"  # stands in for a model directory: check() loads nothing
    teacher.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (teacher / name).write_text("{}")
    shipped = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert len(shipped) >= 4
    for path in shipped:
        check(load_config(["--config", path, "--teacher", str(teacher)] + base[2:]))
    check(load_config(base + ["--temperature", "1e-3", "--min-lr", "5e-5", "--lr", "5e-5", "--warmup-steps", "0",
                              "--grad-clip", "0", "--keep-last", "0", "--teacher-seq-len", "0"]))


@pytest.mark.parametrize("flags", [["--impl", "bogus"], ["--log-interval", "0"], ["--temperature", "inf"],
                                   ["--seq-len", "0"]])
def test_bad_options_fail_before_anything_is_built(base, tmp_path, monkeypatch, flags):
    def built(*args, **kwargs):
        raise AssertionError("the trainer started building before checking its options")
    monkeypatch.setattr(tide.train, "load_tokenizers", built)
    with pytest.raises(SystemExit, match="config error"):
        tide.train.main(base + flags)
    assert not (tmp_path / "out").exists()

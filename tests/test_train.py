"""The trainer end to end on tiny models: every method for one step in each pipeline,
config errors before training, bit-exact resume after SIGKILL, DDP and FSDP2 (gloo,
2 CPU processes) against one process with the same global batch."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tide.config import Config, build_parser, load_config
from tide.demo import stdlib_text, train_tokenizer
from tide.models import build_config, build_model
from tide.train import main

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two tokenizers (BPE / Unigram), a text file, a chat file, MDLM and BD3LM teachers."""
    root = tmp_path_factory.mktemp("train_assets")
    texts = stdlib_text(60_000)
    data = root / "text.txt"
    data.write_text("\n".join(texts), encoding="utf-8")
    tok_t = train_tokenizer(texts, "bpe", 320, str(root / "tok_teacher"))
    train_tokenizer(texts, "unigram", 300, str(root / "tok_student"))
    # same vocabulary, another chat template: the "aligned" pipeline
    tok_t.chat_template = CHAT_TEMPLATE
    tok_t.save_pretrained(root / "tok_teacher_chat")
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                      {"role": "assistant", "content": data.read_text()[i * 80:(i + 1) * 80]}]})
             for i in range(24)]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    mask_id = tok_t.convert_tokens_to_ids("<|mask|>")
    teachers = {}
    for kind in ("mdlm", "bd3lm"):
        torch.manual_seed(0)
        teacher = build_model(kind, build_config("llama", len(tok_t), 48, 1, 2), block_size=8, mask_token_id=mask_id)
        teachers[kind] = root / f"teacher_{kind}"
        teacher.save_pretrained(teachers[kind])
        tok_t.save_pretrained(teachers[kind])
    return {"root": root, "data": str(data), "chat": str(root / "chat.jsonl"),
            "tok_teacher": str(root / "tok_teacher"), "tok_student": str(root / "tok_student"),
            "tok_teacher_chat": str(root / "tok_teacher_chat"),
            "mdlm": str(teachers["mdlm"]), "bd3lm": str(teachers["bd3lm"])}


def tiny(out, **kw):
    args = {"output-dir": str(out), "max-steps": 1, "device": "cpu", "seq-len": 32, "block-size": 8,
            "batch-size": 4, "student-hidden": 32, "student-layers": 1, "student-heads": 2,
            "warmup-steps": 1, "lr": 1e-3, "progress-bar": "false", "log-interval": 1}
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


CASES = [  # (method, pipeline, compdemo, teacher)
    ("ce", "shared", False, None),
    ("kl", "shared", False, "mdlm"),
    ("reverse_kl", "shared", False, "mdlm"),
    ("tidal", "shared", True, "mdlm"),
    ("tidal", "shared", False, "bd3lm"),
    ("kl", "aligned", False, "mdlm"),
    ("tidal", "aligned", True, "mdlm"),
    ("calm", "cross", False, "mdlm"),
    ("reverse_calm", "cross", True, "mdlm"),
    ("calm_tidal", "cross", True, "bd3lm"),
]


@pytest.mark.parametrize("method,pipeline,compdemo,teacher", CASES)
def test_one_step(assets, tmp_path, method, pipeline, compdemo, teacher):
    kw = {"method": method, "pipeline": pipeline, "compdemo": compdemo, "data": assets["data"],
          "student-tokenizer": assets["tok_teacher"]}
    if teacher:
        kw["teacher"] = assets[teacher]
    if pipeline == "aligned":
        kw.update({"data": assets["chat"], "teacher-tokenizer": assets["tok_teacher_chat"], "seq-len": 64})
    if pipeline == "cross":
        kw.update({"student-tokenizer": assets["tok_student"], "teacher-seq-len": 40})
    result = main(tiny(tmp_path, **kw))
    record = result["history"][-1]
    assert record["step"] == 1 and all(map(torch.isfinite, map(torch.tensor, (record["loss"], record["ce"]))))
    if method != "ce":
        assert record["distill"] > 0 and record["distill"] == record["distill"]
    assert record["lambda"] is not None if method in ("tidal", "calm_tidal") else record["lambda"] is None
    ckpt = result["checkpoint"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "optimizer.safetensors", "rng_rank0.safetensors", "checksums.sha256"):
        assert os.path.exists(os.path.join(ckpt, name)), name
    with open(os.path.join(tmp_path, "metrics.jsonl")) as fh:
        assert json.loads(fh.readline())["step"] == 1


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text, name
    assert "default: 2.0" in text and "--output-dir" in text and "--resume" in text


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: kl\ntemperature: 3.0\nblock_size: 16\n")
    cfg = load_config(["--config", str(path), "--temperature", "1.5", "--resume"])
    assert (cfg.method, cfg.temperature, cfg.block_size, cfg.resume) == ("kl", 1.5, 16, True)
    assert (cfg.lambda_init, cfg.lambda_max, cfg.demo_ratio, cfg.eps) == (0.1, 0.9, 0.5, 1e-3)
    path.write_text("metod: kl\n")
    with pytest.raises(SystemExit, match="unknown option"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("change,message", [
    ({"method": "distill"}, "unknown --method"),
    ({"seq-len": 30}, "must divide --seq-len"),
    ({"teacher": "/nonexistent/teacher"}, "is not a directory"),
    ({"data": "/nonexistent/data.txt"}, "--data"),
    ({"pipeline": "cross", "method": "tidal"}, "needs one vocabulary"),
    ({"pipeline": "shared", "method": "reverse_calm"}, "--pipeline cross"),
    ({"student-tokenizer": "STUDENT_TOK"}, "needs one tokenizer"),  # shared pipeline, vocab mismatch
])
def test_bad_config_fails_before_training(assets, tmp_path, change, message):
    kw = {"method": "tidal", "teacher": assets["mdlm"], "data": assets["data"],
          "student-tokenizer": assets["tok_teacher"]}
    kw.update({k: assets["tok_student"] if v == "STUDENT_TOK" else v for k, v in change.items()})
    with pytest.raises(SystemExit, match=message):
        main(tiny(tmp_path, **kw))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    from tide.train import main
    kill_at, calls = int(os.environ["KILL_AT_STEP"]), [0]
    step = torch.optim.AdamW.step
    def dying_step(self, *a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *a, **k)
    torch.optim.AdamW.step = dying_step
    main(sys.argv[1:])
""")


def test_resume_after_sigkill_is_bit_exact(assets, tmp_path):
    kw = {"method": "tidal", "compdemo": "true", "teacher": assets["mdlm"], "data": assets["data"],
          "student-tokenizer": assets["tok_teacher"], "max-steps": 8, "save-interval": 3, "keep-last": 2}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "tide.train"]
    subprocess.run(run + tiny(tmp_path / "full", **kw), check=True, env=env, capture_output=True)
    killed = subprocess.run([sys.executable, "-c", KILLER] + tiny(tmp_path / "cut", **kw),
                            env=dict(env, KILL_AT_STEP="6"), capture_output=True)
    assert killed.returncode == -9  # SIGKILL, in the middle of step 6
    assert sorted(os.listdir(tmp_path / "cut")) == ["checkpoint-3", "metrics.jsonl"]
    subprocess.run(run + tiny(tmp_path / "cut", **kw) + ["--resume"], check=True, env=env, capture_output=True)
    full = load_file(tmp_path / "full" / "checkpoint-8" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "checkpoint-8" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert sorted(os.listdir(tmp_path / "cut")) == ["checkpoint-6", "checkpoint-8", "metrics.jsonl"]

    def trajectory(name):  # every logged number except the wall-clock ones
        with open(tmp_path / name / "metrics.jsonl") as fh:
            return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "time", "elapsed_s")}
                    for line in fh]
    assert trajectory("cut") == trajectory("full")


TEACHER_SNAPSHOT = textwrap.dedent("""
    # tide.train's main, then each rank saves what it holds of the frozen teacher after training
    import os, sys, torch
    import tide.train as train
    from torch.distributed.tensor import DTensor
    seen, load = {}, train.load_teacher
    def loading(*args, **kwargs):
        seen["teacher"] = teacher = load(*args, **kwargs)
        return teacher
    train.load_teacher = loading
    train.main(sys.argv[1:])
    teacher = seen["teacher"]
    layers = {id(p) for p in teacher.layers.parameters()}
    held = {name: dict(in_layers=id(p) in layers, dtensor=isinstance(p, DTensor),
                       placements=[(type(x).__name__, getattr(x, "dim", None), p.device_mesh.size())
                                   for x in p.placements] if isinstance(p, DTensor) else None,
                       local=(p.to_local() if isinstance(p, DTensor) else p).detach().clone())
            for name, p in teacher.named_parameters()}
    held["lm_head_weight"] = dict(in_layers=False, dtensor=isinstance(teacher.lm_head_weight, DTensor),
                                  placements=None, local=teacher.lm_head_weight.detach().clone())
    torch.save(held, os.path.join(os.environ["SNAPSHOT_DIR"], f"rank{os.environ['RANK']}.pt"))
""")


def check_teacher_sharding(snapshots: dict, teacher_dir: str, sharded: bool) -> None:
    """FSDP: every parameter of the teacher's layers is a DTensor Shard(0) on each rank, the ranks
    hold disjoint halves (each one a part, not a copy) that together are the checkpoint's weight;
    embeddings, final norm and LM head are whole on each rank. DDP: all whole (replicated)."""
    saved = load_file(os.path.join(teacher_dir, "model.safetensors"))
    rank0, rank1 = snapshots[0], snapshots[1]
    assert rank0.keys() == rank1.keys()
    in_layers = [name for name in rank0 if rank0[name]["in_layers"]]
    assert in_layers and any("layers.0." in name for name in in_layers), sorted(rank0)
    for name in rank0:
        full = saved[name.removeprefix("decoder.")] if name != "lm_head_weight" else \
            saved.get("lm_head.weight", saved["model.embed_tokens.weight"])  # tied to the embeddings
        a, b = rank0[name], rank1[name]
        if sharded and a["in_layers"]:
            assert a["dtensor"] and b["dtensor"], f"{name} is not sharded after training"
            assert a["placements"] == b["placements"] == [("Shard", 0, 2)], (name, a["placements"])
            assert 0 < a["local"].shape[0] < full.shape[0] and 0 < b["local"].shape[0] < full.shape[0], name
            assert torch.equal(torch.cat([a["local"], b["local"]]), full), name   # two halves, not two copies
        else:  # whole on each rank
            assert not a["dtensor"] and not b["dtensor"], name
            assert torch.equal(a["local"], full) and torch.equal(b["local"], full), name


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(assets, tmp_path, parallel):
    """DDP, and FSDP2 (fully_shard on CPU/gloo), against one process with grad accumulation; under
    FSDP the frozen teacher's layers stay sharded across the two ranks through training."""
    kw = {"method": "tidal", "compdemo": "true", "teacher": assets["mdlm"], "data": assets["data"],
          "student-tokenizer": assets["tok_teacher"], "max-steps": 4, "batch-size": 2, "save-interval": 100}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tide importable from the script's folder
    env = dict(os.environ, OMP_NUM_THREADS="1", SNAPSHOT_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    single = tiny(tmp_path / "one", **kw) + ["--grad-accum", "2"]
    subprocess.run([sys.executable, "-m", "tide.train"] + single, check=True, env=env, capture_output=True)
    (tmp_path / "snapshot.py").write_text(TEACHER_SNAPSHOT)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "snapshot.py")] + tiny(tmp_path / "two", **kw) + ["--parallel", parallel]
    out = subprocess.run(ddp, env=env, capture_output=True, text=True)
    first_error = out.stderr[max(out.stderr.find("Traceback"), 0):][:3000]  # a rank's own traceback, if any
    assert out.returncode == 0, first_error + "\n...\n" + out.stderr[-1500:]
    snapshots = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)}
    check_teacher_sharding(snapshots, assets["mdlm"], sharded=parallel == "fsdp")

    def losses(name):
        with open(tmp_path / name / "metrics.jsonl") as fh:
            return [json.loads(line)["loss"] for line in fh]
    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 4
    assert torch.allclose(torch.tensor(one), torch.tensor(two), rtol=1e-4, atol=1e-5), (one, two)
    a = load_file(tmp_path / "one" / "checkpoint-4" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name


def test_student_from_a_plain_causal_lm(assets, tmp_path):
    """`--student DIR` with a plain Hugging Face causal LM (no tide fields): becomes a BD3LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(assets["tok_teacher"])
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(build_config("qwen3", len(tok), 32, 1, 2))
    plain.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    result = main(tiny(tmp_path / "run", method="tidal", teacher=assets["mdlm"], data=assets["data"],
                       student=tmp_path / "plain"))
    config = json.loads((tmp_path / "run" / "checkpoint-1" / "config.json").read_text())
    assert (config["tide_kind"], config["block_size"]) == ("bd3lm", 8)
    assert config["mask_token_id"] == tok.convert_tokens_to_ids("<|mask|>")
    assert result["history"][0]["distill"] > 0


def test_data_that_cannot_learn_fails_before_any_model_is_built(assets, tmp_path, monkeypatch):
    """Prompts longer than --seq-len leave no maskable token: an error before models are built."""
    lines = [json.dumps({"messages": [{"role": "user", "content": "word " * 100},
                                      {"role": "assistant", "content": "ok"}]}) for _ in range(8)]
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")
    monkeypatch.setattr("tide.train.make_student", no_models)
    monkeypatch.setattr("tide.train.load_model", no_models)
    with pytest.raises(SystemExit, match="none of 8 examples has a maskable"):
        main(tiny(tmp_path / "out", method="ce", data=str(tmp_path / "long.jsonl"),
                  **{"student-tokenizer": assets["tok_teacher"]}))
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def test_train_reads_a_prepared_folder(assets, tmp_path):
    from tide.data import main as data_main
    data_main(["prepare", "--data", assets["chat"], "--student-tokenizer", assets["tok_student"],
               "--teacher-tokenizer", assets["tok_teacher"], "--out", str(tmp_path / "prepared")])
    kw = {"method": "reverse_calm", "pipeline": "cross", "teacher": assets["mdlm"], "data": str(tmp_path / "prepared"),
          "student-tokenizer": assets["tok_student"], "teacher-seq-len": 40}
    record = main(tiny(tmp_path / "out", **kw))["history"][-1]
    assert record["step"] == 1 and record["distill"] > 0
    with pytest.raises(SystemExit, match="prepared with mode .cross. .asked: .shared.*another student tokenizer"):
        main(tiny(tmp_path / "out2", **{**kw, "student-tokenizer": assets["tok_teacher"], "pipeline": "shared",
                                        "method": "tidal"}))

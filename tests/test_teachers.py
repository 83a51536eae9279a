"""Bring-your-own models, on tiny local models only: native dense and MoE decoders as
bidirectional / block teachers, a custom-code dLLM behind --trust-remote-code and its
probed hidden/head adapter, the x0_xt concat order, the teacher flags, an AR checkpoint
turned into a BD3LM student, the student shape options, and missing paths that are
errors, never hub ids."""
import json
import os

import pytest
import torch
from custom_teacher import write_custom_teacher
from transformers import AutoConfig, AutoModelForCausalLM

from tide.demo import stdlib_text, train_tokenizer
from tide.models import BD3LM, bd3lm_sdpa_mask, build_config, build_model, load_model
from tide.train import main, make_student, with_mask_token

TINY_NATIVE = {
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[], head_dim=16),
    "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "mistral": dict(intermediate_size=64, head_dim=16, sliding_window=4),
    "qwen2": dict(intermediate_size=64),
}


def save_native(path, arch, vocab, seed=0):
    config = AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                  **TINY_NATIVE[arch])
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    texts = stdlib_text(30_000)
    (root / "text.txt").write_text("\n".join(texts), encoding="utf-8")
    tok = train_tokenizer(texts, "bpe", 300, str(root / "tok"))          # has <|mask|> as its mask token
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                      {"role": "assistant", "content": texts[0][i * 90:(i + 1) * 90]}]})
             for i in range(16)]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": root, "data": str(root / "text.txt"), "chat": str(root / "chat.jsonl"),
            "tok": str(root / "tok"), "vocab": len(tok), "mask_id": tok.mask_token_id, "tokenizer": tok}


def tiny(out, **kw):
    args = {"output-dir": str(out), "max-steps": 2, "device": "cpu", "seq-len": 32, "block-size": 8,
            "batch-size": 4, "student-hidden": 32, "student-layers": 1, "student-heads": 2,
            "warmup-steps": 1, "lr": 1e-3, "progress-bar": "false", "log-interval": 1}
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def finite_distill(result):
    return all(r["distill"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in result["history"])


# --------------------------------------------------------------------------- missing paths
def test_missing_path_is_an_error_never_a_hub_id(monkeypatch, tmp_path):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached for a missing path")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    for path in ("Qwen/Qwen3-0.6B", str(tmp_path / "absent")):
        with pytest.raises(FileNotFoundError, match="not a local directory"):
            load_model(path, kind="mdlm", mask_token_id=0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path, kind="mdlm", mask_token_id=0)


# --------------------------------------------------------------------------- native teachers
@pytest.mark.parametrize("arch", list(TINY_NATIVE))
def test_native_teachers_run_bidirectionally_and_blockwise(tmp_path, arch):
    path = save_native(tmp_path / arch, arch, 64)
    x = torch.randint(0, 63, (2, 12))
    last = x.clone()
    last[:, -1] = (last[:, -1] + 1) % 63
    mdlm = load_model(path, kind="mdlm", mask_token_id=63).eval()
    bd3lm = load_model(path, kind="bd3lm", mask_token_id=63, block_size=4).eval()
    with torch.no_grad():
        assert (mdlm(last) - mdlm(x))[:, 0].abs().max() > 0            # the first token sees the last
        d = (bd3lm(last, x) - bd3lm(x, x)).abs().sum(-1)
        assert d[:, 8:].min() > 0 and d[:, :8].max() == 0                # x_t attends within its block only


def test_qwen3_moe_teacher_trains(assets, tmp_path):
    """A plain Hugging Face Qwen3-MoE directory (no tide fields) as an MDLM teacher; the mask id
    comes from the teacher tokenizer."""
    path = save_native(tmp_path / "moe", "qwen3_moe", assets["vocab"])
    assets["tokenizer"].save_pretrained(path)
    result = main(tiny(tmp_path / "run", method="tidal", teacher=path, **{"teacher-kind": "mdlm"},
                       data=assets["data"], **{"student-tokenizer": assets["tok"]}))
    assert len(result["history"]) == 2 and finite_distill(result)


def test_teacher_flags_and_their_errors(assets, tmp_path):
    """A plain Llama directory without mask token anywhere: each missing setting is a config error
    naming its flag; with the flags it trains as a BD3LM teacher in x0_xt order."""
    path = str(tmp_path / "plain")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(build_config("llama", assets["vocab"], 32, 1, 2)).save_pretrained(path)
    tok = assets["tokenizer"]
    bare = type(tok).from_pretrained(assets["tok"])
    bare.mask_token = None
    bare.save_pretrained(path)
    base = dict(method="kl", teacher=path, data=assets["data"], **{"student-tokenizer": assets["tok"]})
    with pytest.raises(SystemExit, match="--teacher-kind"):
        main(tiny(tmp_path / "a", **base))
    with pytest.raises(SystemExit, match="--teacher-mask-token-id"):
        main(tiny(tmp_path / "b", **base, **{"teacher-kind": "mdlm"}))
    with pytest.raises(SystemExit, match="--teacher-block-size"):
        main(tiny(tmp_path / "c", **base, **{"teacher-kind": "bd3lm", "teacher-mask-token-id": assets["mask_id"]}))
    with pytest.raises(SystemExit, match="--teacher-concat-order"):
        main(tiny(tmp_path / "d", **base, **{"teacher-concat-order": "xt_then_x0"}))
    result = main(tiny(tmp_path / "e", **base, **{"teacher-kind": "bd3lm", "teacher-mask-token-id": assets["mask_id"],
                                                 "teacher-block-size": 8, "teacher-concat-order": "x0_xt"}))
    assert finite_distill(result)


# --------------------------------------------------------------------------- concat order
def test_x0_xt_gives_the_same_hidden_states_as_xt_x0():
    torch.manual_seed(0)
    a = build_model("bd3lm", build_config("qwen3", 50, 32, 2, 2), block_size=4, mask_token_id=49).double().eval()
    b = BD3LM(a.decoder, 4, 49, concat_order="x0_xt").eval()
    L = 12
    swap = torch.cat([torch.arange(L, 2 * L), torch.arange(L)])        # position i of [x_0, x_t] holds [x_t, x_0][swap[i]]
    assert torch.equal(bd3lm_sdpa_mask(L, 4, "cpu", "x0_xt")[0, 0], bd3lm_sdpa_mask(L, 4)[0, 0][swap][:, swap])
    from tide.models.bd3lm import _flex_rule                          # the flex-attention (CUDA) body
    idx = torch.arange(2 * L)
    assert torch.equal(_flex_rule(L, 4, "x0_xt")(idx[:, None], idx[None, :]), bd3lm_sdpa_mask(L, 4, "cpu", "x0_xt")[0, 0])
    x_0 = torch.randint(0, 49, (2, L))
    x_t = torch.where(torch.rand(2, L) < 0.5, 49, x_0)
    pad = torch.ones(2, L, dtype=torch.long)
    pad[1, 9:] = 0
    with torch.no_grad():
        for padding in (None, pad):
            assert torch.allclose(a(x_t, x_0, padding), b(x_t, x_0, padding), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- custom code
def test_custom_code_teacher_refused_without_trust_then_trains(assets, tmp_path):
    path = write_custom_teacher(tmp_path / "dlm", assets["tokenizer"], vocab=assets["vocab"],
                                mask_token_id=assets["mask_id"])
    kw = dict(method="tidal", teacher=path, data=assets["data"], **{"teacher-kind": "mdlm",
                                                                     "student-tokenizer": assets["tok"]})
    with pytest.raises(SystemExit, match="ships its own modeling code.*--trust-remote-code"):
        main(tiny(tmp_path / "refused", **kw))
    assert not os.path.exists(tmp_path / "refused" / "metrics.jsonl")
    result = main(tiny(tmp_path / "run", **kw, **{"trust-remote-code": "true"}))
    assert len(result["history"]) == 2 and finite_distill(result)


def test_custom_adapter_reads_the_head_input_and_skips_the_logits(tmp_path):
    path = write_custom_teacher(tmp_path / "dlm", vocab=64, mask_token_id=63)
    teacher = load_model(path, kind="mdlm", trust_remote_code=True).eval()
    assert teacher.head_name == "net.proj" and teacher.lm_head_weight.shape == (64, 32)
    net = teacher.decoder.net
    calls = []
    net.proj.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randint(0, 63, (2, 10))
    with torch.no_grad():
        hidden = teacher(x)
        assert not calls                                                  # no [b, l, V] logits computed
        logits = teacher.decoder(x)
    assert torch.allclose(hidden @ teacher.lm_head_weight.T, logits, atol=1e-5)


def test_probe_catches_a_wrong_hidden_head_pairing(tmp_path):
    # the guess (last vocabulary-sized linear) is an auxiliary head on pre-norm states: refused
    path = write_custom_teacher(tmp_path / "aux", vocab=64, mask_token_id=63, aux_head=True)
    with pytest.raises(ValueError, match="probe failed.*net.aux_head.*--teacher-lm-head"):
        load_model(path, kind="mdlm", trust_remote_code=True)
    assert load_model(path, kind="mdlm", trust_remote_code=True, lm_head="net.proj").head_name == "net.proj"
    # logits scaled after the head: no head reproduces them
    path = write_custom_teacher(tmp_path / "scaled", vocab=64, mask_token_id=63, logit_scale=0.5)
    with pytest.raises(ValueError, match="probe failed"):
        load_model(path, kind="mdlm", trust_remote_code=True)
    with pytest.raises(ValueError, match="is not a module"):
        load_model(path, kind="mdlm", trust_remote_code=True, lm_head="net.nothing")


def test_custom_code_block_diffusion_teacher(tmp_path):
    """A custom-code BD3LM teacher (SDAR / WeDLM style: its forward takes a 4-D boolean mask and
    position_ids): through the adapter, x_t attends within its own block and to strictly earlier
    blocks of x_0 only, padded keys not at all; hidden @ head.T are the model's own logits of the
    x_t half; x0_xt gives the same hidden states; a forward without those arguments is refused."""
    from tide.models.bd3lm import bd3lm_inputs
    path = write_custom_teacher(tmp_path / "sdar", vocab=64, mask_token_id=63, block_diffusion=True, block_size=4)
    teacher = load_model(path, kind="bd3lm", trust_remote_code=True).eval()   # block size from config.json
    assert (teacher.kind, teacher.block_size, teacher.head_name) == ("bd3lm", 4, "net.proj")
    L, gen = 12, torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, 63, (2, L), generator=gen)
    x_t = torch.where(torch.rand(2, L, generator=gen) < 0.5, 63, x_0)

    def changed(x, *positions, row=slice(None)):
        y = x.clone()
        for i in positions:
            y[row, i] = (y[row, i] + 1) % 63
        return y

    with torch.no_grad():
        h = teacher(x_t, x_0)
        assert h.shape == (2, L, 32)

        def moved(new_x_t, new_x_0, padding=None, base=h):
            return (teacher(new_x_t, new_x_0, padding) - base).abs().sum(-1)   # [b, L]
        d = moved(changed(x_t, L - 1), x_0)          # x_t, last block: reaches that block, no earlier one
        assert d[:, 8:].min() > 0 and d[:, :8].max() == 0
        d = moved(changed(x_t, 0), x_0)              # x_t, first position: its whole block, no later block
        assert d[:, :4].min() > 0 and d[:, 4:].max() == 0
        d = moved(x_t, changed(x_0, 5))              # x_0, block 1: reaches x_t's block 2 only
        assert d[:, 8:].min() > 0 and d[:, :8].max() == 0
        d = moved(x_t, changed(x_0, 11))             # x_0, last block: no x_t block sees it
        assert d.max() == 0
        # key padding: row 1's last two tokens are padding; changing them moves none of its real tokens
        pad = torch.ones(2, L, dtype=torch.long)
        pad[1, 10:] = 0
        padded = teacher(x_t, x_0, pad)
        assert torch.allclose(padded[0], h[0], atol=1e-6)
        d = moved(changed(x_t, 10, 11, row=1), changed(x_0, 10, 11, row=1), pad, base=padded)
        assert d[1, :10].max() == 0 and d[0].max() == 0
        # the adapter's hidden states against the model's own logits on the same two-half input
        ids, positions, half = bd3lm_inputs(x_t, x_0)
        logits = teacher.decoder(input_ids=ids, attention_mask=bd3lm_sdpa_mask(L, 4).expand(2, -1, -1, -1),
                                 position_ids=positions).logits
        assert torch.allclose(h @ teacher.lm_head_weight.T, logits[:, half], atol=1e-5)
        swapped = load_model(path, kind="bd3lm", trust_remote_code=True, concat_order="x0_xt").eval()
        assert torch.allclose(swapped(x_t, x_0), h, atol=1e-5)
    # the bidirectional kind's forward takes no mask of this shape nor position_ids: refused at load
    plain = write_custom_teacher(tmp_path / "plain", vocab=64, mask_token_id=63)
    with pytest.raises(ValueError, match="cannot run as a BD3LM teacher.*position_ids"):
        load_model(plain, kind="bd3lm", block_size=4, trust_remote_code=True)


def test_custom_code_block_diffusion_teacher_trains(assets, tmp_path, monkeypatch):
    """`--teacher-kind bd3lm --trust-remote-code --teacher-block-size 4` on a custom-code block-diffusion
    teacher: 2 TIDAL + CompDemo steps, every teacher pass on the two-half input of its own block size."""
    import tide.models.custom as custom
    path = write_custom_teacher(tmp_path / "sdar", assets["tokenizer"], vocab=assets["vocab"],
                                mask_token_id=assets["mask_id"], block_diffusion=True)
    masks, make_mask = [], custom.bd3lm_attention_mask

    def spy(length, block_size, *args, **kwargs):
        masks.append((length, block_size))
        return make_mask(length, block_size, *args, **kwargs)
    monkeypatch.setattr(custom, "bd3lm_attention_mask", spy)
    result = main(tiny(tmp_path / "run", method="tidal", compdemo="true", teacher=path, data=assets["data"],
                       **{"teacher-kind": "bd3lm", "teacher-block-size": 4, "trust-remote-code": "true",
                          "student-tokenizer": assets["tok"]}))
    assert len(result["history"]) == 2 and finite_distill(result)
    assert masks[0] == (16, 4)                       # the load-time probe
    assert masks[1:] == [(32, 4)] * 4                # 2 steps x 2 CompDemo passes, --seq-len 32


# --------------------------------------------------------------------------- students
def test_ar_checkpoint_becomes_a_bd3lm_student_and_trains(assets, tmp_path):
    """A Qwen3 causal LM whose embedding has no free row: the mask token is added, the
    embeddings resized, the other weights kept; trained with gradient checkpointing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    ar_dir = tmp_path / "ar"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(stdlib_text(20_000), trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    no_mask = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    ar = AutoModelForCausalLM.from_config(build_config("qwen3", len(no_mask), 32, 2, 2))
    ar.save_pretrained(ar_dir)
    no_mask.save_pretrained(ar_dir)
    assert "<|mask|>" not in no_mask.get_vocab() and ar.config.vocab_size == len(no_mask)

    from tide.config import Config
    student_tok = with_mask_token(PreTrainedTokenizerFast.from_pretrained(ar_dir))
    student = make_student(Config(student=str(ar_dir), block_size=8), student_tok, None, "cpu")
    assert isinstance(student, BD3LM) and student.vocab_size == len(no_mask) + 1
    assert student.mask_token_id == len(no_mask)
    kept = ar.state_dict()
    for name, value in student.decoder.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(value[:len(no_mask)], kept[name]), name
        else:
            assert torch.equal(value, kept[name]), name

    result = main(tiny(tmp_path / "run", method="ce", student=ar_dir, data=assets["data"],
                       **{"gradient-checkpointing": "true"}))
    assert len(result["history"]) == 2
    reloaded = load_model(result["checkpoint"])
    assert isinstance(reloaded, BD3LM) and reloaded.mask_token_id == len(no_mask)


def test_gradient_checkpointing_and_student_shape_options(assets, tmp_path):
    kw = dict(method="ce", data=assets["data"], **{"student-tokenizer": assets["tok"], "student-kv-heads": 1,
                                                    "student-intermediate": 48})
    plain = main(tiny(tmp_path / "plain", **kw))
    checkpointed = main(tiny(tmp_path / "ckpt", **kw, **{"gradient-checkpointing": "true"}))
    assert [r["loss"] for r in plain["history"]] == pytest.approx([r["loss"] for r in checkpointed["history"]],
                                                                   rel=1e-6)
    config = json.loads(open(os.path.join(plain["checkpoint"], "config.json")).read())
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (1, 48)

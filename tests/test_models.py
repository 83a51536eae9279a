"""BD3LM / MDLM wrappers: the four attention rules entry by entry, the cache, and
that the decoder really obeys the mask (perturbation tests on tiny models)."""
import pytest
import torch

from tide.models import BD3LM, MDLM, bd3lm_sdpa_mask, build_config, build_model, load_model


def rule(q, k, L, block):
    """SPEC.md "Student architecture", written out as four plain cases."""
    q_x0, k_x0 = q >= L, k >= L
    bq, bk = (q % L) // block, (k % L) // block
    if not q_x0 and not k_x0:
        return bq == bk          # x_t -> x_t: same block
    if not q_x0 and k_x0:
        return bk < bq           # x_t -> x_0: strictly earlier blocks
    if q_x0 and k_x0:
        return bk <= bq          # x_0 -> x_0: block-causal
    return False                 # x_0 -> x_t: never


@pytest.mark.parametrize("L,block", [(8, 2), (12, 4), (6, 6), (9, 3)])
def test_mask_entries(L, block):
    mask = bd3lm_sdpa_mask(L, block)
    assert mask.shape == (1, 1, 2 * L, 2 * L) and mask.dtype == torch.bool
    for q in range(2 * L):
        for k in range(2 * L):
            assert bool(mask[0, 0, q, k]) == rule(q, k, L, block), (q, k)


def test_mask_cached():
    assert bd3lm_sdpa_mask(16, 4) is bd3lm_sdpa_mask(16, 4)
    model = build_model("bd3lm", build_config("qwen3", 50, 32, 1, 2), block_size=4, mask_token_id=49)
    assert model.attention_mask(16, torch.device("cpu")) is model.attention_mask(16, torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple of block_size"):
        model.attention_mask(10, torch.device("cpu"))


def _perturb(ids, pos, vocab=49):
    out = ids.clone()
    out[:, pos] = (out[:, pos] + 1) % vocab
    return out


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_bd3lm_obeys_rules(arch):
    torch.manual_seed(0)
    model = build_model("bd3lm", build_config(arch, 50, 32, 2, 2), block_size=4, mask_token_id=49).eval()
    assert isinstance(model, BD3LM)
    L = 12
    xt = torch.randint(0, 49, (1, L))
    x0 = torch.randint(0, 49, (1, L))
    with torch.no_grad():
        h = model(xt, x0)
        assert h.shape == (1, L, 32)
        # x_t token in block 1 changes block 1 only (same block), not blocks 0 and 2
        d = (model(_perturb(xt, 5), x0) - h).abs().sum(-1)[0]
        assert d[4:8].min() > 0 and d[:4].max() == 0 and d[8:].max() == 0
        # x_0 token in block 1 reaches x_t block 2 (strictly earlier), not blocks 0 and 1
        d = (model(xt, _perturb(x0, 5)) - h).abs().sum(-1)[0]
        assert d[8:].min() > 0 and d[:8].max() == 0


def test_mdlm_bidirectional_and_padding():
    torch.manual_seed(0)
    model = build_model("mdlm", build_config("qwen3", 50, 32, 2, 2), mask_token_id=49).eval()
    assert isinstance(model, MDLM) and model.block_size is None
    x = torch.randint(0, 49, (2, 10))
    with torch.no_grad():
        h = model(x)
        assert (model(_perturb(x, 9)) - h)[:, 0].abs().sum() > 0  # first position sees the last
        pad = torch.ones(2, 10, dtype=torch.long)
        pad[:, 7:] = 0
        hp = model(x, attention_mask=pad)
        hq = model(_perturb(x, 8), attention_mask=pad)
        assert torch.equal(hp[:, :7], hq[:, :7])  # padding is invisible to the tokens


def test_bd3lm_padding_invisible():
    torch.manual_seed(0)
    model = build_model("bd3lm", build_config("qwen3", 50, 32, 2, 2), block_size=4, mask_token_id=49).eval()
    x = torch.randint(0, 49, (1, 8))
    pad = torch.ones(1, 8, dtype=torch.long)
    pad[:, 6:] = 0
    with torch.no_grad():
        h = model(x, x, attention_mask=pad)
        y = _perturb(x, 7)
        assert torch.equal(model(y, y, attention_mask=pad)[:, :6], h[:, :6])


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = build_model("bd3lm", build_config("llama", 50, 32, 1, 2), block_size=4, mask_token_id=49)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    again = load_model(tmp_path)
    assert isinstance(again, BD3LM) and again.block_size == 4 and again.mask_token_id == 49
    x = torch.randint(0, 49, (2, 8))
    with torch.no_grad():
        assert torch.equal(again(x, x), model(x, x))
    assert model.lm_head_weight.shape == (50, 32)


def test_flex_block_mask_equals_sdpa():
    """The CUDA path (flex attention + cached BlockMask) computes what the SDPA mask does;
    flex attention also runs on CPU, so this is checked here."""
    torch.manual_seed(0)
    sdpa = build_model("bd3lm", build_config("qwen3", 50, 32, 1, 2), block_size=4, mask_token_id=49,
                       attn_implementation="sdpa").eval()
    flex = build_model("bd3lm", build_config("qwen3", 50, 32, 1, 2), block_size=4, mask_token_id=49,
                       attn_implementation="flex_attention").eval()
    flex.load_state_dict(sdpa.state_dict())
    mask = flex.attention_mask(16, torch.device("cpu"))
    assert type(mask).__name__ == "BlockMask" and mask is flex.attention_mask(16, torch.device("cpu"))
    x, y = torch.randint(0, 49, (2, 16)), torch.randint(0, 49, (2, 16))
    pad = torch.ones(2, 16, dtype=torch.long)
    pad[:, 13:] = 0
    with torch.no_grad():
        torch.testing.assert_close(flex(x, y), sdpa(x, y))
        torch.testing.assert_close(flex(x, y, pad)[:, :13], sdpa(x, y, pad)[:, :13])


def test_save_and_load_print_no_hugging_face_progress_bars(tmp_path, capfd):
    """transformers 5 draws "Loading weights" / "Writing model shards" bars on every load and save;
    tide's trainer, evaluator and sampler print their own progress, so those bars stay off there,
    and the user's own setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    model = build_model("bd3lm", build_config("qwen3", 40, 16, 1, 2), block_size=4, mask_token_id=39)
    was_enabled = hf_logging.is_progress_bar_enabled()   # other tests (the demo) may have turned them off
    hf_logging.enable_progress_bar()
    try:
        model.save_pretrained(tmp_path / "m")
        load_model(tmp_path / "m")
        captured = capfd.readouterr()
        for noise in ("Writing model shards", "Loading weights", "it/s]"):
            assert noise not in captured.out + captured.err, noise
        assert hf_logging.is_progress_bar_enabled()
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()

"""Block-diffusion sampler: shapes, no mask tokens left, prompt kept, and one-step blocks
equal the model's own argmax on the masked block."""
import torch

from tide.demo import stdlib_text, train_tokenizer
from tide.generate import generate, main
from tide.models import build_config, build_model


def tiny(kind="bd3lm", vocab=60, block=4):
    torch.manual_seed(0)
    return build_model(kind, build_config("qwen3", vocab, 32, 1, 2), block_size=block, mask_token_id=vocab - 1).eval()


def test_blocks_fill_without_masks():
    model = tiny()
    prompt = [3, 4, 5, 6, 7]                       # ends inside the second block
    out = generate(model, prompt, 10)
    assert len(out) == 10 and model.mask_token_id not in out
    assert generate(model, prompt, 10) == out       # greedy is deterministic


def test_one_step_block_is_the_argmax():
    model = tiny()
    prompt = [3, 4, 5, 6]                          # exactly one block
    out = generate(model, prompt, 4, steps=1)
    seq = torch.tensor([prompt + [model.mask_token_id] * 4])
    with torch.no_grad():
        logits = model(seq, seq)[0, 4:] @ model.lm_head_weight.T
    logits[:, model.mask_token_id] = float("-inf")
    assert out == logits.argmax(-1).tolist()


def test_mdlm_and_eos_stop():
    model = tiny("mdlm")
    out = generate(model, [1, 2, 3], 6)
    assert len(out) == 6 and model.mask_token_id not in out
    first = generate(model, [1, 2, 3], 6)[0]
    assert generate(model, [1, 2, 3], 6, eos_token_id=first) == []


def test_cli(tmp_path, capsys):
    tok = train_tokenizer(stdlib_text(20_000), "bpe", 300, str(tmp_path))
    torch.manual_seed(0)
    model = build_model("bd3lm", build_config("llama", len(tok), 32, 1, 2), block_size=4,
                        mask_token_id=tok.convert_tokens_to_ids("<|mask|>"))
    model.save_pretrained(tmp_path)
    text = main(["--checkpoint", str(tmp_path), "--prompt", "def f(x):", "--max-new-tokens", "8",
                 "--device", "cpu"])
    assert capsys.readouterr().out.startswith("def f(x):") and isinstance(text, str)


def test_block_kv_cache_matches_full_rerun():
    model = tiny(block=4)
    for prompt, new, steps in (([3, 4, 5, 6, 7], 11, None), ([3, 4, 5, 6], 8, 2), ([9], 6, 1)):
        plain = generate(model, prompt, new, steps=steps, cache=False)
        cached = generate(model, prompt, new, steps=steps, cache=True)
        assert cached == plain, (prompt, plain, cached)
    llama = build_model("bd3lm", build_config("llama", 60, 32, 2, 2), block_size=4, mask_token_id=59).eval()
    assert generate(llama, [1, 2], 10, cache=True) == generate(llama, [1, 2], 10, cache=False)

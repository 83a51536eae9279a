"""The sampler: batched ragged prompts give the same tokens as one prompt alone (bit-identical hidden
states), the block KV cache gives the same tokens as the full re-run, the mask token is never emitted,
EOS stops one row only, the strategies, bad input, and the CLI on a checkpoint written by tide.train."""
import json

import pytest
import torch

from tide.demo import stdlib_text, train_tokenizer
from tide.generate import BlockKVCache, _block_causal, _forward, generate, main, ragged_sdpa  # noqa: F401
from tide.models import MDLM, build_config, build_model

V = 60
MASK = V - 1
PROMPTS = [[3, 4, 5, 6, 7], [1], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8], [9, 9], [1, 2, 3],
           [4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]  # 8 lengths, ragged around blocks of 4


def tiny(kind="bd3lm", block=4, arch="qwen3", layers=2, heads=2, kv_heads=None):
    """A random model whose outputs depend on the context (weights large enough that attention matters).
    `kv_heads` < `heads`: grouped-query attention (as in the real Qwen3 students)."""
    torch.manual_seed(0)
    config = build_config(arch, V, 32, layers, heads, num_kv_heads=kv_heads)
    model = build_model(kind, config, block_size=block, mask_token_id=MASK).eval()
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5 if "embed" in name else p.shape[1] ** -0.5)
    return model


@pytest.fixture(scope="module")
def bd3lm():
    return tiny()


def test_blocks_fill_without_masks(bd3lm):
    out = generate(bd3lm, [[3, 4, 5, 6, 7]], 10)[0]       # ends inside the second block
    assert len(out) == 10 and MASK not in out
    assert generate(bd3lm, [[3, 4, 5, 6, 7]], 10)[0] == out  # greedy is deterministic
    assert len(set(out)) > 1                                  # the test model is not degenerate


@pytest.mark.parametrize("heads,kv_heads", [(2, None), (4, 2), (4, 1)])
def test_one_step_block_is_the_argmax_of_the_training_forward(heads, kv_heads):
    """Also checks the grouped-query fold of `ragged_sdpa` against Hugging Face's own GQA attention."""
    bd3lm = tiny(heads=heads, kv_heads=kv_heads)
    prompt = [3, 4, 5, 6]                                     # exactly one block
    out = generate(bd3lm, [prompt], 4, steps=1)[0]
    seq = torch.tensor([prompt + [MASK] * 4])
    with torch.no_grad():
        logits = bd3lm(seq, seq)[0, 4:] @ bd3lm.lm_head_weight.T  # the [x_t, x_0] four-rule forward
    logits[:, MASK] = float("-inf")
    assert out == logits.argmax(-1).tolist()


@pytest.mark.parametrize("arch,heads,kv_heads", [("qwen3", 2, None), ("llama", 2, None), ("qwen3", 4, 2),
                                                ("qwen3", 4, 1), ("llama", 4, 2)])
def test_cache_matches_full_rerun(arch, heads, kv_heads):
    model = tiny(arch=arch, heads=heads, kv_heads=kv_heads)
    assert model.config.num_key_value_heads == (kv_heads or heads)
    for new, steps, strategy, threshold in ((11, None, "low_confidence", None), (8, 2, "low_confidence", None),
                                            (9, None, "margin", None), (12, None, "threshold", 0.3)):
        plain = generate(model, PROMPTS, new, steps=steps, strategy=strategy, threshold=threshold, cache=False)
        cached = generate(model, PROMPTS, new, steps=steps, strategy=strategy, threshold=threshold, cache=True)
        assert cached == plain, (new, steps, strategy)
        assert all(len(o) == new and MASK not in o for o in cached)


@pytest.mark.parametrize("kind,options,kv_heads", [
    ("bd3lm", {}, None), ("bd3lm", {"cache": False}, None),
    ("bd3lm", {"strategy": "threshold", "threshold": 0.2}, None),
    ("bd3lm", {"strategy": "random"}, None), ("bd3lm", {"temperature": 1.0, "top_k": 8, "top_p": 0.9}, None),
    ("mdlm", {}, None), ("mdlm", {"block_size": 4, "steps": 2}, None), ("mdlm", {"temperature": 0.7}, None),
    ("bd3lm", {}, 1), ("bd3lm", {"cache": False}, 2), ("bd3lm", {"temperature": 1.0, "top_k": 8}, 2),
    ("mdlm", {}, 2)])
def test_a_prompt_alone_equals_it_inside_a_ragged_batch_of_8(kind, options, kv_heads):
    model = tiny(kind, heads=4 if kv_heads else 2, kv_heads=kv_heads)   # kv_heads: grouped-query attention
    batch = generate(model, PROMPTS, 9, seed=list(range(100, 108)), **options)
    alone = [generate(model, [p], 9, seed=[100 + i], **options)[0] for i, p in enumerate(PROMPTS)]
    assert batch == alone
    assert all(len(o) == 9 and MASK not in o for o in batch)


def test_ragged_rows_are_bit_identical_to_rows_alone(bd3lm):
    """What the token test rests on: a row's hidden states, prefill and cached decode, do not depend on
    the other rows of its batch (padding is cut off per row group, never masked inside a softmax)."""
    from tide.generate import RAGGED_ATTENTION, _register_attention
    _register_attention()
    bd3lm.decoder.set_attn_implementation(RAGGED_ATTENTION)
    try:
        torch.manual_seed(1)
        lengths = [4, 8, 8, 16]                                    # whole blocks of 4, sorted
        ids = torch.randint(0, MASK, (4, 16))
        block = torch.randint(0, V, (4, 4))
        batch_kv = BlockKVCache(2, 20)
        batch_kv.writes = [(0, 4, 0, 0)]
        groups = [(a, z, 0, n, 0, n, _block_causal(0, n, n, 4, "cpu")) for a, z, n in ((0, 1, 4), (1, 3, 8), (3, 4, 16))]
        prefill = _forward(bd3lm, ids, torch.arange(16)[None], groups, batch_kv)
        batch_kv.writes = [(0, 1, 0, 4), (1, 3, 0, 8), (3, 4, 0, 16)]
        positions = torch.tensor([[4], [8], [8], [16]]) + torch.arange(4)
        decode = _forward(bd3lm, block, positions, [(0, 1, 0, 4, 0, 8, None), (1, 3, 0, 4, 0, 12, None),
                                                    (3, 4, 0, 4, 0, 20, None)], batch_kv)
        for row, n in enumerate(lengths):
            kv = BlockKVCache(2, n + 4)
            kv.writes = [(0, 1, 0, 0)]
            alone = _forward(bd3lm, ids[row:row + 1, :n], torch.arange(n)[None],
                             [(0, 1, 0, n, 0, n, _block_causal(0, n, n, 4, "cpu"))], kv)
            assert torch.equal(alone[0], prefill[row, :n])
            kv.writes = [(0, 1, 0, n)]
            alone = _forward(bd3lm, block[row:row + 1], positions[row:row + 1], [(0, 1, 0, 4, 0, n + 4, None)], kv)
            assert torch.equal(alone[0], decode[row])
    finally:
        bd3lm.decoder.set_attn_implementation("sdpa")


@pytest.mark.parametrize("kind", ["bd3lm", "mdlm"])
def test_eos_stops_one_row_and_not_the_others(kind):
    model = tiny(kind)
    free = generate(model, PROMPTS, 12, block_size=4)
    # an EOS id that row 0 writes in its first block and that some other rows never write
    eos = next(t for t in free[0][:4] if sum(t in o for o in free) < len(free))
    stopped = generate(model, PROMPTS, 12, block_size=4, eos_token_id=eos)
    for out, full in zip(stopped, free):
        assert out == (full[:full.index(eos)] if eos in full else full)
    assert len(stopped[0]) < 4 and any(len(o) == 12 for o in stopped)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_ragged_sdpa_grouped_query_heads_equal_repeated_keys(heads, kv_heads):
    """Query head i reads kv head i // (heads / kv_heads), with and without a block-causal mask,
    over a group whose keys are a slice of a larger buffer; queries outside the groups get zeros."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, heads, 8, 16), torch.randn(3, kv_heads, 20, 16), torch.randn(3, kv_heads, 20, 16)
    mask = _block_causal(4, 8, 12, 4, "cpu")
    groups = [(0, 2, 0, 8, 0, 12, mask), (2, 3, 4, 4, 0, 20, None)]
    out, _ = ragged_sdpa(None, q, k, v, tide_groups=groups, scaling=0.25)
    repeat = heads // kv_heads
    full_k, full_v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q[:2], full_k[:2, :, :12], full_v[:2, :, :12],
                                                            attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out[:2], want.transpose(1, 2))
    want = torch.nn.functional.scaled_dot_product_attention(q[2:, :, 4:], full_k[2:], full_v[2:], scale=0.25)
    torch.testing.assert_close(out[2:, 4:], want.transpose(1, 2))
    assert not out[2:, :4].any()


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_block_kv_cache_grows_in_place_and_attention_reads_it_without_a_copy(kv_heads, monkeypatch):
    """The per-layer buffers are allocated once and written in place (the same data_ptr at every step),
    and every key / value tensor that reaches SDPA while decoding is a view of those buffers: no
    per-step copy, concatenation or (grouped-query attention) head repeat of the cache."""
    import torch.nn.functional as F
    model = tiny(heads=4, kv_heads=kv_heads)
    seen = {"caches": [], "pointers": [], "sdpa": []}

    def grab(module, args, kwargs):
        seen["caches"].append(kwargs["cache"])

    def record(module, args, kwargs, output):
        cache = kwargs["cache"]
        assert all(k.shape[1] == (kv_heads or 4) for k in cache.keys)              # kv heads only, not repeated
        seen["pointers"].append([(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.keys, cache.values)])

    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen["sdpa"].append((query.shape[1], key.untyped_storage().data_ptr(), value.untyped_storage().data_ptr()))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    hooks = [model.backbone.register_forward_pre_hook(grab, with_kwargs=True),
             model.backbone.register_forward_hook(record, with_kwargs=True)]
    try:
        out = generate(model, [[3, 4, 5], [1, 2]], 13)             # both rows: 4 blocks of 4, none leaves early
    finally:
        for hook in hooks:
            hook.remove()
    assert all(len(o) == 13 and MASK not in o for o in out)
    cache = seen["caches"][0]
    assert all(c is cache for c in seen["caches"]) and len(seen["pointers"]) > 8   # one cache, many steps
    assert all(p == seen["pointers"][0] for p in seen["pointers"])                  # never reallocated
    buffers = {pointer for pair in seen["pointers"][0] for pointer in pair}
    assert len(buffers) == 2 * model.config.num_hidden_layers
    assert seen["sdpa"] and all(k in buffers and v in buffers for _, k, v in seen["sdpa"])
    assert {heads for heads, _, _ in seen["sdpa"]} == {kv_heads or 4}              # queries folded onto kv heads


def test_threshold_one_is_one_token_per_step_and_lower_thresholds_save_calls(bd3lm):
    calls = []
    hook = bd3lm.backbone.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        base = generate(bd3lm, PROMPTS, 16)
        one_per_step = len(calls)
        calls.clear()
        assert generate(bd3lm, PROMPTS, 16, strategy="threshold", threshold=1.0) == base
        assert len(calls) == one_per_step
        calls.clear()
        parallel = generate(bd3lm, PROMPTS, 16, strategy="threshold", threshold=0.05)
        assert len(calls) < one_per_step and all(MASK not in o and len(o) == 16 for o in parallel)
    finally:
        hook.remove()


def test_sampling_is_reproducible_and_seeded_per_prompt(bd3lm):
    options = {"temperature": 1.0, "top_p": 0.95}
    first = generate(bd3lm, PROMPTS, 8, seed=3, **options)
    assert generate(bd3lm, PROMPTS, 8, seed=3, **options) == first
    assert generate(bd3lm, PROMPTS, 8, seed=4, **options) != first
    assert generate(bd3lm, PROMPTS[2:], 8, seed=5, **options) == first[2:]  # prompt i uses seed + i


@pytest.mark.parametrize("options,argument", [
    ({"max_new_tokens": -3}, "max_new_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"steps": -1}, "steps"), ({"steps": 0}, "steps"), ({"temperature": 1e-40}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": -1.0}, "temperature"), ({"strategy": "threshold"}, "threshold"),
    ({"strategy": "threshold", "threshold": 0.0}, "threshold"), ({"strategy": "threshold", "threshold": 1.5}, "threshold"),
    ({"threshold": 0.9}, "threshold"), ({"strategy": "threshold", "threshold": 0.9, "steps": 4}, "steps"),
    ({"strategy": "best"}, "strategy"), ({"top_k": 5}, "top_k"), ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"block_size": 0}, "block_size"), ({"eos_token_id": V}, "eos_token_id"), ({"seed": [1]}, "seed")])
def test_bad_options_name_the_argument(bd3lm, options, argument):
    with pytest.raises(ValueError, match=argument):
        generate(bd3lm, [[1, 2], [3]], **{"max_new_tokens": 4, **options})


def test_bad_prompts():
    model = tiny("mdlm", layers=1)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], 4)
    with pytest.raises(TypeError, match="flat list"):
        generate(model, [1, 2, 3], 4)
    with pytest.raises(ValueError, match=r"prompts\[1\].*mask token"):
        generate(model, [[1], [2, MASK]], 4)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        generate(model, [[1, V]], 4)
    with pytest.raises(TypeError, match="BD3LM or MDLM"):
        generate(model.decoder, [[1]], 4)


# --------------------------------------------------------------------------- infill
def reference_infill(model, prefix, n, suffix, steps):
    """An independent, slow infill sampler on the training forward (greedy, "low_confidence"):
    MDLM: `prefix + n masks + suffix`, every position sees every other. BD3LM: the same layout cut
    at the end of the span's last block (later blocks are invisible by design); the span's blocks
    are denoised in order, each on the four-rule forward `[x_t, x_0]`: it sees the clean earlier
    blocks and its own block (prefix / suffix tokens there included). steps: 1 (every masked
    position of a block at once) or None (one position per step, the most probable first)."""
    seq = torch.tensor([prefix + [MASK] * n + suffix])
    span = list(range(len(prefix), len(prefix) + n))
    if model.kind == "bd3lm":
        block = model.block_size
        end = -(-(len(prefix) + n) // block) * block
        seq = seq[:, :end]
        if seq.shape[1] < end:                                 # the layout needs whole blocks: pad (never seen)
            seq = torch.cat([seq, torch.ones(1, end - seq.shape[1], dtype=torch.long)], 1)
        blocks = sorted({i // block for i in span})
        groups = [[i for i in span if i // block == j] for j in blocks]
    else:
        groups = [span]
    for group in groups:
        while any(seq[0, i] == MASK for i in group):
            with torch.no_grad():
                x_0 = seq.masked_fill(seq == MASK, 0)          # x_t of a block only sees x_0 of earlier blocks
                logits = model(seq, x_0)[0] @ model.lm_head_weight.T
            logits[:, MASK] = float("-inf")
            probs = logits.softmax(-1)
            open_ = [i for i in group if seq[0, i] == MASK]
            if steps == 1:
                seq[0, open_] = probs[open_].argmax(-1)
            else:
                best = max(open_, key=lambda i: probs[i].max().item())
                seq[0, best] = probs[best].argmax()
    return seq[0, len(prefix):len(prefix) + n].tolist()


INFILL_CASES = [  # (prefix, span length, suffix): blocks of 4
    ([3, 4, 5, 6, 7], 2, [8, 9, 10, 11, 12, 13]),            # span and one suffix token in block 1
    ([3, 4, 5], 6, [20, 21, 22, 23, 24]),                     # span over blocks 0-2, 3 suffix tokens in block 2
    ([1, 2, 3, 4], 4, [30, 31]),                               # span = block 1 exactly: BD3LM sees no suffix
    ([], 3, [5, 6, 7, 8, 9]),                                  # no prefix
    ([9, 8, 7, 6, 5, 4, 3], 5, []),                            # no suffix
]


@pytest.mark.parametrize("kind,kv_heads", [("bd3lm", None), ("mdlm", None), ("bd3lm", 2), ("mdlm", 1)])
@pytest.mark.parametrize("steps", [1, None])
def test_infill_is_exactly_the_reference_sampler_on_the_training_forward(kind, kv_heads, steps):
    from tide.generate import infill
    model = tiny(kind, heads=4 if kv_heads else 2, kv_heads=kv_heads)
    want = [reference_infill(model, p, n, s, steps) for p, n, s in INFILL_CASES]
    got = infill(model, [p for p, _, _ in INFILL_CASES], [n for _, n, _ in INFILL_CASES],
                 [s for _, _, s in INFILL_CASES], steps=steps)
    assert got == want
    assert [len(g) for g in got] == [n for _, n, _ in INFILL_CASES] and all(MASK not in g for g in got)


class ShiftMDLM(MDLM):
    """A mock MDLM with a known answer: the logits at position i put all the mass on the token at
    i + `shift` of its row (uniform logits when that is a mask or outside the row). The sampler's
    only way to produce a span of `shift` tokens is then to read the `shift` tokens after it."""

    def __init__(self, shift, scale=30.0):
        super().__init__(tiny("mdlm", layers=1).decoder, MASK)
        self.shift, self.scale = shift, scale
        self.eye = torch.nn.Parameter(torch.eye(V), requires_grad=False)

    @property
    def lm_head_weight(self):
        return self.eye

    @property
    def backbone(self):
        model = self

        def forward(input_ids, tide_groups, **kwargs):
            hidden = torch.zeros(*input_ids.shape, V)
            for a, z, _, _, _, k_len, _ in tide_groups:              # row a:z sees its first k_len keys
                source = input_ids[a:z, model.shift:k_len]
                hidden[a:z, :k_len - model.shift] = model.scale * torch.nn.functional.one_hot(source, V) * (
                    source != MASK)[..., None]
            return type("Out", (), {"last_hidden_state": hidden})()
        return forward


def test_mdlm_infill_reads_the_right_context_and_only_it_decides():
    from tide.generate import infill
    model = ShiftMDLM(shift=3)
    prefixes = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], []]
    suffixes = [[11, 12, 13, 14], [15, 16, 17], [18, 19, 20, 21, 22, 23, 24], [25, 26, 27]]
    assert infill(model, prefixes, 3, suffixes) == [s[:3] for s in suffixes]
    assert infill(model, prefixes[::-1], 3, suffixes) == [s[:3] for s in suffixes]   # the prefix plays no part
    assert infill(model, prefixes, 3, suffixes, block_size=1) == [s[:3] for s in suffixes]  # right to left no help
    assert generate(model, prefixes, 3) == infill(model, prefixes, 3) == [[0, 0, 0]] * 4   # no right context


@pytest.mark.parametrize("kind,options", [("bd3lm", {}), ("bd3lm", {"cache": False}), ("mdlm", {}),
                                          ("mdlm", {"block_size": 4, "steps": 2})])
def test_infill_without_a_suffix_is_generate(kind, options):
    from tide.generate import infill
    model = tiny(kind)
    want = generate(model, PROMPTS, 9, **options)
    assert infill(model, PROMPTS, 9, **options) == want
    assert infill(model, PROMPTS, [9] * len(PROMPTS), [[]] * len(PROMPTS), **options) == want


def test_bd3lm_infill_sees_the_suffix_in_the_spans_last_block_and_nothing_after_it():
    from tide.generate import infill
    model = tiny("bd3lm")
    for prefix, n in (([3, 4, 5], 6), ([3, 4, 5, 6, 7], 2)):  # the span's last block: 8..11, 4..7
        base = infill(model, [prefix], n, [[20, 21, 22, 23, 24, 25]])[0]
        after = (-(len(prefix) + n)) % 4                          # suffix tokens inside the span's last block
        assert infill(model, [prefix], n, [[20, 21, 22][:after] + [40, 41, 42, 43, 44]])[0] == base  # unseen
    fills = {tuple(infill(model, [[3, 4, 5, 6, 7]], 2, [[t, 21, 22]])[0]) for t in range(1, 12)}
    assert len(fills) > 1                                         # the suffix token in the block is seen


@pytest.mark.parametrize("kind,options", [("bd3lm", {}), ("bd3lm", {"cache": False}), ("mdlm", {}),
                                          ("bd3lm", {"temperature": 1.0, "top_k": 8}), ("mdlm", {"steps": 2})])
def test_infill_a_row_alone_equals_it_inside_a_ragged_batch(kind, options):
    from tide.generate import infill
    model = tiny(kind, heads=4, kv_heads=2)
    lengths = [1, 5, 3, 6, 2, 4, 7, 3]
    suffixes = [[8, 9, 10][:i % 4] + [11] * (i % 3) for i in range(len(PROMPTS))]
    batch = infill(model, PROMPTS, lengths, suffixes, seed=list(range(100, 108)), **options)
    alone = [infill(model, [p], n, [s], seed=[100 + i], **options)[0]
             for i, (p, n, s) in enumerate(zip(PROMPTS, lengths, suffixes))]
    assert batch == alone and [len(b) for b in batch] == lengths
    if kind == "bd3lm" and not options:
        assert infill(model, PROMPTS, lengths, suffixes, cache=False) == batch


@pytest.mark.parametrize("call,error,match", [
    (lambda f, m: f(m, [[1], [2]], 0), ValueError, "span_lengths"),
    (lambda f, m: f(m, [[1], [2]], [3]), ValueError, "span_lengths"),
    (lambda f, m: f(m, [[1], [2]], [3, -1]), ValueError, "span_lengths"),
    (lambda f, m: f(m, [[1], [2]], 2.5), ValueError, "span_lengths"),
    (lambda f, m: f(m, [[1], [2]], 2, [[3]]), ValueError, "suffixes"),
    (lambda f, m: f(m, [[1], [2]], 2, [[3], [4, MASK]]), ValueError, r"suffixes\[1\].*mask token"),
    (lambda f, m: f(m, [[1], [2]], 2, [[V], [4]]), ValueError, r"suffixes\[0\]"),
    (lambda f, m: f(m, [[1], [2]], 2, [3, 4]), TypeError, "suffixes"),
    (lambda f, m: f(m, [[1], [MASK]], 2), ValueError, r"prefixes\[1\].*mask token"),
    (lambda f, m: f(m, [], 2), ValueError, "prefixes must hold at least one"),
    (lambda f, m: f(m, [1, 2], 2), TypeError, "prefixes"),
    (lambda f, m: f(m, [[1]], 2, steps=0), ValueError, "steps"),
    (lambda f, m: f(m, [[1]], 2, seed=[1, 2]), ValueError, "seed"),
    (lambda f, m: f(m.decoder, [[1]], 2), TypeError, "BD3LM or MDLM")])
def test_infill_bad_input_names_the_argument(bd3lm, call, error, match):
    from tide.generate import infill
    with pytest.raises(error, match=match):
        call(infill, bd3lm)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by `python -m tide.train` (one CE step on a tiny BD3LM)."""
    from tide.train import main as train
    root = tmp_path_factory.mktemp("generate_ckpt")
    texts = stdlib_text(20_000)
    (root / "data.txt").write_text("\n".join(texts), encoding="utf-8")
    train_tokenizer(texts, "bpe", 300, str(root / "tok"))
    args = {"output-dir": str(root / "run"), "max-steps": 1, "device": "cpu", "seq-len": 32, "block-size": 8,
            "batch-size": 4, "student-hidden": 32, "student-layers": 1, "student-heads": 2, "warmup-steps": 1,
            "method": "ce", "data": str(root / "data.txt"), "student-tokenizer": str(root / "tok"),
            "progress-bar": "false", "log-interval": 1}
    return train([x for k, v in args.items() for x in (f"--{k}", str(v))])["checkpoint"]


def test_train_checkpoint_names_eos_and_pad(checkpoint):
    from transformers import AutoTokenizer
    config = json.loads(open(f"{checkpoint}/config.json").read())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert config["eos_token_id"] == tokenizer.eos_token_id is not None
    assert config["pad_token_id"] == tokenizer.pad_token_id is not None


def test_cli_prompts_file_and_batches(checkpoint, tmp_path, capsys):
    lines = tmp_path / "prompts.txt"
    lines.write_text("def f(x):\n\nimport os\nclass A:\nfor i in\nwhile True:\n", encoding="utf-8")
    texts = main(["--checkpoint", checkpoint, "--prompts-file", str(lines), "--batch-size", "4",
                  "--max-new-tokens", "8", "--device", "cpu"])
    assert len(texts) == 5                                      # the blank line is not a prompt
    assert capsys.readouterr().out.startswith("def f(x):")
    # the same prompts one by one (batch size 1), and as JSONL: the same completions
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p}) for p in lines.read_text().split("\n") if p), encoding="utf-8")
    assert main(["--checkpoint", checkpoint, "--prompts-file", str(jsonl), "--batch-size", "1",
                 "--max-new-tokens", "8", "--device", "cpu", "--jsonl"]) == texts
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in records] == texts
    assert main(["--checkpoint", checkpoint, "--prompt", "def f(x):", "--prompt", "import os", "--threshold", "0.5",
                 "--max-new-tokens", "8", "--device", "cpu"])[0] is not None


def test_cli_sampling_options_reach_the_sampler_and_take_effect(checkpoint, monkeypatch):
    """--block-size, --top-k, --top-p, --seed and --no-cache through `python -m tide.generate` (main)."""
    import tide.generate as module
    real, calls = module.generate, []

    def spy(model, prompts, max_new_tokens, **options):               # the real sampler, counting forwards
        forwards = []
        hook = model.backbone.register_forward_pre_hook(lambda m, a: forwards.append(1))
        try:
            return real(model, prompts, max_new_tokens, **options)
        finally:
            hook.remove()
            calls.append(dict(options, forwards=len(forwards)))

    monkeypatch.setattr(module, "generate", spy)
    base = ["--checkpoint", checkpoint, "--prompt", "def f(x):", "--max-new-tokens", "12", "--device", "cpu"]
    two = base + ["--prompt", "import os"]
    # --seed: the same seed, the same samples; prompt i samples with seed + i; another seed, other samples
    sampled = two + ["--temperature", "1.0", "--seed", "7"]
    first = main(sampled)
    assert calls[-1]["seed"] == [7, 8] and calls[-1]["temperature"] == 1.0
    assert main(sampled) == first
    assert main(base[:2] + ["--prompt", "import os"] + base[4:] + ["--temperature", "1.0", "--seed", "8"]) == first[1:]
    assert main(two + ["--temperature", "1.0", "--seed", "9"]) != first
    # --top-k 1 / a tiny --top-p keep only the most probable token: sampling is then greedy (one step per
    # block writes every position, so the order of the writes cannot differ either)
    greedy = main(two + ["--steps", "1"])
    assert main(two + ["--steps", "1", "--temperature", "1.0", "--seed", "7"]) != greedy
    assert main(two + ["--steps", "1", "--temperature", "1.0", "--seed", "7", "--top-k", "1"]) == greedy
    assert calls[-1]["top_k"] == 1 and calls[-1]["top_p"] is None
    assert main(two + ["--steps", "1", "--temperature", "1.0", "--seed", "7", "--top-p", "1e-6"]) == greedy
    assert calls[-1]["top_p"] == 1e-6 and calls[-1]["top_k"] is None
    # --no-cache: the same greedy tokens as the cache
    cached = main(two + ["--block-size", "4"])
    assert calls[-1]["cache"] is True
    assert main(two + ["--block-size", "4", "--no-cache"]) == cached and calls[-1]["cache"] is False
    # --block-size: one forward per block with --steps 1 (12 new tokens: >= 3 blocks of 4, <= 3 of 8, never both 3)
    main(base + ["--steps", "1", "--block-size", "4"])
    assert calls[-1]["block_size"] == 4
    blocks_of_4 = calls[-1]["forwards"]
    main(base + ["--steps", "1"])
    assert calls[-1]["block_size"] is None                          # the model's (8)
    assert blocks_of_4 >= 3 and calls[-1]["forwards"] <= 3 and blocks_of_4 != calls[-1]["forwards"]


def test_cli_chat_wraps_prompts_in_the_chat_template(checkpoint, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer
    with pytest.raises(SystemExit):                             # the demo tokenizer has no chat template
        main(["--checkpoint", checkpoint, "--prompt", "hi", "--chat", "--device", "cpu"])
    assert "chat template" in capsys.readouterr().err
    chat = tmp_path / "chat_ckpt"
    shutil.copytree(checkpoint, chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(chat)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "yo"}]}) + "\n")
    main(["--checkpoint", str(chat), "--prompt", "hi", "--chat", "--prompts-file", str(tmp_path / "chat.jsonl"),
          "--max-new-tokens", "4", "--device", "cpu", "--jsonl"])
    prompts = [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()]
    assert prompts == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                       "<|im_start|>user\nyo<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("flags,option", [
    (["--max-new-tokens", "-3"], "--max-new-tokens"), (["--steps", "-1"], "--steps"),
    (["--temperature", "1e-40"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--threshold", "0"], "--threshold"), (["--batch-size", "0"], "--batch-size")])
def test_cli_bad_options(checkpoint, flags, option, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", checkpoint, "--prompt", "x", "--device", "cpu"] + flags)
    assert option in capsys.readouterr().err


def test_cli_checkpoint_must_be_a_local_tide_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):                             # no hub lookup for a missing path
        main(["--checkpoint", str(tmp_path / "no-such-dir"), "--prompt", "x"])
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", "Qwen/Qwen3-0.6B", "--prompt", "x"])
    assert "not a local checkpoint directory" in capsys.readouterr().err
    build_model("bd3lm", build_config("llama", V, 32, 1, 2), mask_token_id=MASK).decoder.save_pretrained(tmp_path)
    with pytest.raises(SystemExit):                             # a plain causal LM: not a tide checkpoint
        main(["--checkpoint", str(tmp_path), "--prompt", "x", "--device", "cpu"])
    assert "not a tide checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--device", "cpu"])  # no prompt at all
    assert "no prompt" in capsys.readouterr().err


def test_load_model_never_looks_up_the_hub(tmp_path):
    from tide.models import load_model
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_model("Qwen/Qwen3-0.6B")

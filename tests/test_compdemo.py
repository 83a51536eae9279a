"""CompDemo split (SPEC.md §2.2): CPU path (torch generator) and the Philox Triton kernel
(under TRITON_INTERPRET=1 without a GPU): disjoint, union, frequency, determinism per
seed, chunk consistency, teacher pass ids, merge of the two passes, argument checks."""
import math

import pytest
import torch

from tide import compdemo
from tide.kernels import complementary_split as _split_kernels  # noqa: F401  (kernels defined before tests run)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MASK_ID = 999


def _split(path, masked, ratio, seed, input_ids=None, chunk_ids=None):
    """(mask_a, mask_b, pass1, pass2) through the CPU generator path or the Triton kernel."""
    generator = torch.Generator().manual_seed(seed)
    return compdemo._split(masked, ratio, input_ids, MASK_ID if input_ids is not None else None, chunk_ids,
                           generator, use_triton=(path == "triton"))


def _random_masked(rows, length, ratio=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, length, generator=g) < ratio).to(DEVICE)


PATHS = ["cpu", "triton"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(3, 50), (2, 7), (1, 1)])   # [b, l] or chunk-level [b, n_chunks]
def test_disjoint_and_union(path, shape):
    masked = _random_masked(*shape)
    mask_a, mask_b, _, _ = _split(path, masked, 0.5, seed=1)
    assert mask_a.dtype == mask_b.dtype == torch.bool and mask_a.shape == masked.shape
    assert not (mask_a & mask_b).any()
    assert torch.equal(mask_a | mask_b, masked)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_frequency_matches_demo_ratio(path, ratio):
    masked = _random_masked(4, 4096, ratio=0.75)
    mask_a, _, _, _ = _split(path, masked, ratio, seed=2)
    n = int(masked.sum())
    freq = int(mask_a.sum()) / n
    assert abs(freq - ratio) < 5 * math.sqrt(ratio * (1 - ratio) / n)      # 5 sigma


@pytest.mark.parametrize("path", PATHS)
def test_extreme_ratios(path):
    masked = _random_masked(2, 64)
    mask_a, mask_b, _, _ = _split(path, masked, 0.0, seed=3)
    assert not mask_a.any() and torch.equal(mask_b, masked)
    mask_a, mask_b, _, _ = _split(path, masked, 1.0, seed=3)
    assert not mask_b.any() and torch.equal(mask_a, masked)


@pytest.mark.parametrize("path", PATHS)
def test_deterministic_for_a_seed(path):
    masked = _random_masked(3, 300)
    first = _split(path, masked, 0.5, seed=7)[0]
    again = _split(path, masked, 0.5, seed=7)[0]
    other = _split(path, masked, 0.5, seed=8)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_public_complementary_split_seeded():
    masked = _random_masked(2, 100)
    a1, b1 = compdemo.complementary_split(masked, 0.5, generator=torch.Generator(DEVICE.type).manual_seed(5))
    a2, b2 = compdemo.complementary_split(masked, 0.5, generator=torch.Generator(DEVICE.type).manual_seed(5))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert torch.equal(a1 | b1, masked) and not (a1 & b1).any()
    try:
        from tide import losses
    except ImportError:
        return
    a3, _ = losses.complementary_split(masked, 0.5, generator=torch.Generator(DEVICE.type).manual_seed(5))
    assert torch.equal(a1, a3)


def _chunk_ids(rows, length, chunk_len=3, global_ids=False):
    """Chunks of `chunk_len` tokens, every 7th token outside any chunk (-1)."""
    ids = torch.arange(length).div(chunk_len, rounding_mode="floor").expand(rows, -1).clone()
    if global_ids:                                           # unique over the batch
        ids += torch.arange(rows)[:, None] * (length + 1)
    ids[:, ::7] = -1
    return ids.to(DEVICE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("global_ids", [False, True])
def test_chunk_consistency(path, global_ids):
    rows, length = 4, 1200
    masked = torch.ones(rows, length, dtype=torch.bool, device=DEVICE)    # every token masked
    chunks = _chunk_ids(rows, length, global_ids=global_ids)
    mask_a, mask_b, _, _ = _split(path, masked, 0.5, seed=11, chunk_ids=chunks)
    assert not (mask_a & mask_b).any() and torch.equal(mask_a | mask_b, masked)
    for r in range(rows):
        for c in chunks[r][chunks[r] >= 0].unique():
            side = mask_a[r][chunks[r] == c]
            assert side.all() or not side.any(), f"chunk {int(c)} of row {r} split across halves"
    # one draw per (row, chunk): the fraction of chunks in A is near 1/2, and rows differ
    first_token = (chunks >= 0) & (chunks != torch.nn.functional.pad(chunks, (1, 0), value=-2)[:, :-1])
    chunk_in_a = mask_a[first_token].float()
    n = chunk_in_a.numel()
    assert abs(float(chunk_in_a.mean()) - 0.5) < 5 * math.sqrt(0.25 / n)
    assert not torch.equal(mask_a[0], mask_a[1])
    # tokens in no chunk draw per token
    loose = mask_a[chunks < 0].float()
    assert abs(float(loose.mean()) - 0.5) < 5 * math.sqrt(0.25 / loose.numel())


@pytest.mark.parametrize("path", PATHS)
def test_chunk_split_respects_masked(path):
    masked = _random_masked(2, 90, ratio=0.6)
    chunks = _chunk_ids(2, 90)
    mask_a, mask_b, _, _ = _split(path, masked, 0.5, seed=4, chunk_ids=chunks)
    assert torch.equal(mask_a | mask_b, masked) and not (mask_a & mask_b).any()
    # a masked token is in A iff any... its chunk's draw says so: masked tokens of one chunk agree
    for r in range(2):
        for c in chunks[r][chunks[r] >= 0].unique():
            here = (chunks[r] == c) & masked[r]
            side = mask_a[r][here]
            assert side.all() or not side.any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_chunks", [False, True])
def test_teacher_pass_ids(path, with_chunks):
    rows, length = 3, 40
    masked = _random_masked(rows, length)
    input_ids = torch.randint(0, 50, (rows, length), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    chunks = _chunk_ids(rows, length) if with_chunks else None
    mask_a, mask_b, pass1, pass2 = _split(path, masked, 0.5, seed=9, input_ids=input_ids, chunk_ids=chunks)
    assert pass1.dtype == input_ids.dtype and pass1.shape == input_ids.shape
    fill = torch.full_like(input_ids, MASK_ID)
    assert torch.equal(pass1, torch.where(mask_b, fill, input_ids))       # pass 1: only M_B masked
    assert torch.equal(pass2, torch.where(mask_a, fill, input_ids))       # pass 2: only M_A masked
    assert torch.equal(pass1[~masked], input_ids[~masked]) and torch.equal(pass2[~masked], input_ids[~masked])
    assert mask_a.any() and mask_b.any()


def test_teacher_inputs_public():
    rows, length = 2, 30
    masked = _random_masked(rows, length)
    input_ids = torch.randint(0, 50, (rows, length)).to(DEVICE).to(torch.int32)
    chunks = _chunk_ids(rows, length)
    gen = torch.Generator(DEVICE.type)
    out = compdemo.teacher_inputs(input_ids, masked, MASK_ID, 0.5, chunk_ids=chunks, generator=gen.manual_seed(1))
    again = compdemo.teacher_inputs(input_ids, masked, MASK_ID, 0.5, chunk_ids=chunks, generator=gen.manual_seed(1))
    assert isinstance(out, compdemo.CompDemoInputs)
    for name in ("mask_a", "mask_b", "pass1_ids", "pass2_ids"):
        assert torch.equal(getattr(out, name), getattr(again, name)), name
    assert out.pass1_ids.dtype == torch.int32
    assert torch.equal(out.mask_a | out.mask_b, masked)
    assert torch.equal(out.pass1_ids, torch.where(out.mask_b, MASK_ID, input_ids).to(torch.int32))


def test_philox_kernel_seed_tensor_and_int_agree():
    from tide.kernels.complementary_split import philox_split
    masked = _random_masked(2, 200)
    a_int = philox_split(masked, 0.5, 123)[0]
    a_tensor = philox_split(masked, 0.5, torch.tensor([123], device=DEVICE))[0]
    assert torch.equal(a_int, a_tensor)
    big = philox_split(masked, 0.5, 2 ** 62 + 5)[0]                     # high seed bits matter
    assert not torch.equal(big, philox_split(masked, 0.5, 5)[0])


def test_merge_teacher_hidden():
    rows, length, width = 2, 9, 4
    h1 = torch.randn(rows, length, width, device=DEVICE)
    h2 = torch.randn(rows, length, width, device=DEVICE)
    mask_a = _random_masked(rows, length, ratio=0.4)
    merged = compdemo.merge_teacher_hidden(h1, h2, mask_a)
    assert merged.shape == h1.shape
    assert torch.equal(merged[mask_a], h2[mask_a])                         # pass 2 at M_A
    assert torch.equal(merged[~mask_a], h1[~mask_a])                       # pass 1 elsewhere
    with pytest.raises(ValueError, match="mask_a"):
        compdemo.merge_teacher_hidden(h1, h2, mask_a[:, :-1])
    with pytest.raises(ValueError, match="hidden_pass2"):
        compdemo.merge_teacher_hidden(h1, h2[:, :-1], mask_a)


def test_argument_checks():
    masked = _random_masked(2, 8)
    ids = torch.zeros(2, 8, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match="masked"):
        compdemo.complementary_split(masked.int())
    with pytest.raises(ValueError, match="masked"):
        compdemo.complementary_split(masked[0])
    with pytest.raises(ValueError, match="masked"):
        compdemo.complementary_split(masked[None])
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="demo_ratio"):
            compdemo.complementary_split(masked, bad)
    with pytest.raises(TypeError, match="generator"):
        compdemo.complementary_split(masked, 0.5, generator=0)
    with pytest.raises(ValueError, match="input_ids"):
        compdemo.teacher_inputs(ids[:, :-1], masked, MASK_ID)
    with pytest.raises(TypeError, match="input_ids"):
        compdemo.teacher_inputs(ids.float(), masked, MASK_ID)
    with pytest.raises(ValueError, match="mask_token_id"):
        compdemo.teacher_inputs(ids, masked, -1)
    with pytest.raises(ValueError, match="chunk_ids"):
        compdemo.teacher_inputs(ids, masked, MASK_ID, chunk_ids=ids[:1])

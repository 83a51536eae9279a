"""pytest-benchmark micro-benchmarks: every case at a small shape, outside the default test run.

    pytest benchmarks --benchmark-only [--benchmark-columns=median,iqr,rounds]

Small shapes (N=128, V=2048, d_s=64, d_t=128) time the per-call overhead of each
implementation (argument checks, dispatch, block loops) rather than its GEMMs;
`python -m benchmarks.run` is the benchmark of realistic shapes. CPU threads are
fixed to one so that rounds compare. Peers run when they import; compiled peers
and chunked_compile are left out (a compile per test would dominate).
"""
import pytest
import torch

from benchmarks import cases as C

SHAPE = dict(rows=128, vocab=2048, d_s=64, d_t=128, chunks=32)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_num_threads(1)

PARAMS = [(name, impl) for name, case in C.CASES.items() for impl in C.implementations(case, DEVICE)
          if not C.compiled(impl)]


@pytest.mark.parametrize("case_name,impl", PARAMS, ids=[f"{c}-{i}" for c, i in PARAMS])
def test_step(benchmark, case_name, impl):
    x = C.build(case_name, SHAPE, torch.device(DEVICE), torch.float32)
    step = C.make_step(case_name, impl, x)
    step()                                            # warm-up outside the rounds
    benchmark(step)

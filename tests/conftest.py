"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter. Triton decides that
when a kernel is defined (at import of tide.kernels.*) and reads the variable
again at each launch, so it is set here, before any test module is imported,
for the whole session. (test_bad_input unsets it where it checks that
impl="triton" on CPU is a clear error.)
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The heavier, opt-in tier (real-vocabulary tokenizers, long end-to-end runs):
# mark a test `@pytest.mark.slow`; it runs only with TIDE_SLOW_TESTS=1, so the
# default suite (`python -m pytest -q tests`, what CI runs) stays fast.
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier opt-in tier, run with TIDE_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TIDE_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow tier: set TIDE_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

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

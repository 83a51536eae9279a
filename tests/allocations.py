"""A dispatch mode that records the largest tensor any op returns: for the tests that
check a bounded-memory path never creates an `[N, V]`-sized tensor."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Largest byte size (`largest`, with the op that made it, `op`) and element count
    (`largest_numel`) of every tensor an op returns: allocations, views and copies (the
    Triton interpreter's host copies of kernel arguments show up as uint8 storages)."""

    def __init__(self):
        super().__init__()
        self.largest, self.largest_numel, self.op = 0, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor):
                self.largest_numel = max(self.largest_numel, x.numel())
                if x.numel() * x.element_size() > self.largest:
                    self.largest, self.op = x.numel() * x.element_size(), str(func)
        return out

"""Custom-code diffusion LMs (the LLaDA / Dream / LLaDA2-MoE kind) as frozen teachers.

Such a checkpoint ships its own modeling file (`auto_map` in `config.json`); loading
it executes that Python, so `load_model` does it only with `trust_remote_code=True`
(`--trust-remote-code`), and refuses otherwise.

The fused losses take final hidden states (after the final norm) and the LM-head
weight, but these models return logits. The adapter finds the LM head, a module with
a `[V, d]` weight that maps the final hidden states to the vocabulary:
- the module named by `lm_head=` (dotted path, e.g. "model.transformer.ff_out"), else
- `get_output_embeddings()`, else the last `nn.Linear` with `out_features` equal to the
  vocabulary size (`vocab_size` / `embedding_size` in the config, or the input embeddings),
and reads the head's input as the hidden states (a forward pre-hook). In training the
hook ends the forward right there: the model never computes its `[b, l, V]` logits.

At load time one probe batch checks that `hidden @ weight.T` reproduces the model's own
logits. It does not when the model scales, soft-caps or biases its logits, or when the
module found is not the final projection; then a ValueError says what was compared and
what to pass (`lm_head=` / `--teacher-lm-head`). There is no logits fallback: the losses
stream over (hidden, weight) pairs only.

Calls: kind "mdlm" runs `model(input_ids=x_t)` (plus `attention_mask=padding [b, L]` when
the batch has padding) and attends as the model's own code says (these dLLMs are
bidirectional); kind "bd3lm" runs the two-half input of SPEC.md with a boolean
`[b, 1, 2L, 2L]` mask and `position_ids`, which its forward must accept.
"""
from __future__ import annotations

import torch
from torch import nn

from .bd3lm import bd3lm_attention_mask, bd3lm_inputs
from .common import DiffusionLM

AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel")  # tried in this order


class _HeadReached(Exception):
    """Raised by the pre-hook once the head's input is captured: the rest of the forward is skipped."""


def _vocab_sizes(model: nn.Module) -> set[int]:
    config = getattr(model, "config", None)
    sizes = {getattr(config, name) for name in ("vocab_size", "embedding_size", "padded_vocab_size")
             if isinstance(getattr(config, name, None), int)}
    try:
        embeddings = model.get_input_embeddings()
        sizes.add(embeddings.weight.shape[0])
    except (AttributeError, NotImplementedError):
        pass
    return sizes


def find_lm_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """`(dotted name, module)` of the LM head: `name` if given, else found as the module docstring says."""
    modules = dict(model.named_modules())
    sizes = _vocab_sizes(model)
    candidates = [n for n, m in modules.items() if isinstance(m, nn.Linear) and m.out_features in sizes]
    if name:
        if name not in modules:
            raise ValueError(f"lm_head {name!r} is not a module of {type(model).__name__}; its linear layers "
                             f"with a vocabulary-sized output: {candidates or 'none'}")
        head = modules[name]
    else:
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
        if head is None:
            if not candidates:
                raise ValueError(f"{type(model).__name__} has no LM head module (get_output_embeddings() is None and "
                                 f"no nn.Linear has {sorted(sizes) or 'a vocabulary-sized'} outputs): pass lm_head= "
                                 f"(--teacher-lm-head) naming the module whose weight maps the final hidden states "
                                 f"to the vocabulary")
            head = modules[candidates[-1]]
        name = next(n for n, m in modules.items() if m is head)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"LM head {name!r} ({type(head).__name__}) has no 2-D weight [V, d]")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"LM head {name!r} has a bias; the fused losses take hidden states and a weight only")
    return name, head


def _logits_of(output) -> torch.Tensor:
    """The logits of a model output: a tensor, `.logits`, a dict's "logits", or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"cannot find logits in the model's output ({type(output).__name__})")


class CustomCodeDiffusionLM(DiffusionLM):
    """A custom-code dLLM behind the DiffusionLM interface: `forward(x_t, x_0) -> hidden [b, L, d]`."""

    def __init__(self, model: nn.Module, kind: str, mask_token_id: int, block_size: int | None = None,
                 concat_order: str = "xt_x0", lm_head: str | None = None):
        super().__init__(model, mask_token_id)
        self.kind = kind
        self.block_size = int(block_size) if kind == "bd3lm" else None
        self.concat_order = concat_order
        self.head_name, self.head = find_lm_head(model, lm_head)
        self._captured, self._stop = None, False
        self.head.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self._captured = args[0] if args else next(iter(kwargs.values()))
        if self._stop:
            raise _HeadReached

    @property
    def backbone(self) -> nn.Module:
        return self.decoder

    @property
    def layers(self) -> nn.ModuleList:
        """The largest `nn.ModuleList` of the model (its transformer blocks)."""
        lists = [m for m in self.decoder.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            raise ValueError(f"{type(self.decoder).__name__} has no nn.ModuleList of layers to shard")
        return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def attn_implementation(self) -> str:
        return "custom"

    def _run(self, x_t, x_0, attention_mask, stop: bool):
        """(hidden of the whole input `[b, l, d]`, model output or None, slice of x_t)."""
        if self.kind == "bd3lm":
            if x_0 is None:
                raise ValueError("a BD3LM teacher needs the clean sequence x_0 next to x_t")
            ids, positions, x_t_half = bd3lm_inputs(x_t, x_0, self.concat_order)
            mask = bd3lm_attention_mask(x_t.shape[1], self.block_size, x_t.device, attention_mask, self.concat_order)
            if mask.shape[0] != ids.shape[0]:
                mask = mask.expand(ids.shape[0], -1, -1, -1)
            kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
        else:
            kwargs, x_t_half = dict(input_ids=x_t), slice(None)
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
        self._captured, self._stop, output = None, stop, None
        try:
            output = self.decoder(**kwargs)
        except _HeadReached:
            pass
        except TypeError as err:
            if self.kind != "bd3lm":
                raise
            raise ValueError(f"{type(self.decoder).__name__} cannot run as a BD3LM teacher: its forward must accept "
                             f"input_ids [b, 2L], a boolean attention_mask [b, 1, 2L, 2L] and position_ids ({err})") from None
        finally:
            self._stop = False
        hidden, self._captured = self._captured, None
        if hidden is None:
            raise ValueError(f"the forward of {type(self.decoder).__name__} never called {self.head_name!r}: pass "
                             f"lm_head= (--teacher-lm-head) naming the module that maps the final hidden states "
                             f"to the vocabulary")
        return hidden, output, x_t_half

    def forward(self, x_t: torch.Tensor, x_0: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t `[b, L]` (and x_0 `[b, L]` for BD3LM) -> final hidden states `[b, L, d]` of x_t."""
        hidden, _, x_t_half = self._run(x_t, x_0, attention_mask, stop=True)
        return hidden[:, x_t_half]

    @torch.no_grad()
    def probe(self, length: int = 16, batch: int = 2, seed: int = 0) -> float:
        """Check `hidden @ weight.T == logits` on random ids (a quarter masked); returns the max
        relative difference, ValueError beyond tolerance (1e-4 in float32, 2e-2 in half precision)."""
        weight = self.lm_head_weight
        if self.kind == "bd3lm":
            length = max(self.block_size, length // self.block_size * self.block_size)
        gen = torch.Generator().manual_seed(seed)
        x_0 = torch.randint(0, weight.shape[0], (batch, length), generator=gen)
        x_t = torch.where(torch.rand(batch, length, generator=gen) < 0.25, self.mask_token_id, x_0)
        x_0, x_t = x_0.to(weight.device), x_t.to(weight.device)
        hidden, output, _ = self._run(x_t, x_0, None, stop=False)
        logits = _logits_of(output)
        if logits.shape[:-1] != hidden.shape[:-1] or logits.shape[-1] != weight.shape[0]:
            raise ValueError(f"the model's logits {tuple(logits.shape)} do not match its hidden states "
                             f"{tuple(hidden.shape)} and the head {self.head_name!r} {tuple(weight.shape)}")
        expected = hidden.float() @ weight.float().T
        scale = logits.float().abs().max().clamp(min=1.0)
        error = float((logits.float() - expected).abs().max() / scale)
        tolerance = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
        if not error <= tolerance:
            raise ValueError(
                f"probe failed: hidden @ {self.head_name}.weight.T differs from the model's own logits by "
                f"{error:.3g} (relative, tolerance {tolerance:g}). The model post-processes its logits (scaling, "
                f"soft-capping, a bias), or {self.head_name!r} is not the final projection of the hidden states "
                f"after the final norm. Pass lm_head= (--teacher-lm-head) naming that projection; a model whose "
                f"logits are not hidden @ weight.T cannot be used with the fused losses")
        return error


def load_custom(path: str, auto_map: dict, *, kind: str, mask_token_id: int, block_size: int | None,
                concat_order: str, lm_head: str | None, device, dtype) -> CustomCodeDiffusionLM:
    """Load with the checkpoint's own code (the caller has checked trust), wrap, probe."""
    import transformers
    name = next((n for n in AUTO_CLASSES if n in auto_map), None)
    if name is None:
        raise ValueError(f"{path}: config.json auto_map names none of {AUTO_CLASSES} (it has {sorted(auto_map)})")
    model = getattr(transformers, name).from_pretrained(path, trust_remote_code=True, local_files_only=True,
                                                         dtype=dtype)
    wrapped = CustomCodeDiffusionLM(model, kind, mask_token_id, block_size, concat_order, lm_head).to(device)
    wrapped.eval().probe()
    return wrapped

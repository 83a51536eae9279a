"""Diffusion LMs over Hugging Face decoders: BD3LM (student), MDLM (teacher).

    model = build_model("bd3lm", hf_config, block_size=32, mask_token_id=V)
    model = load_model("out/checkpoint-100")      # kind, block, mask id from config.json
    teacher = load_model("llada/", kind="mdlm", mask_token_id=126336, trust_remote_code=True)
    hidden = model(x_t, x_0)                      # [b, L, d], no LM head
    distill, ce = tidal_loss(hidden, model.lm_head_weight, ..., targets=labels)   # [b, L, d] rows

`load_model` reads only local directories (a missing path is a FileNotFoundError, never
a hub lookup). Native architectures (NATIVE_ARCHITECTURES: dense and MoE decoders of
transformers) run under tide's own bidirectional / block masks; a directory whose
config.json has an `auto_map` to its own modeling code runs that code, only with
`trust_remote_code=True`, through the adapter of `custom.py`.
"""
from __future__ import annotations

import json
import os

from transformers import AutoConfig, AutoModelForCausalLM

from .bd3lm import BD3LM, CONCAT_ORDERS, bd3lm_allowed, bd3lm_block_mask, bd3lm_sdpa_mask
from .common import DiffusionLM, default_attention, local_directory, quiet_weight_progress
from .mdlm import MDLM

KINDS = {"bd3lm": BD3LM, "mdlm": MDLM}
ARCHITECTURES = ("qwen3", "llama")  # what build_config makes from scratch
# transformers decoders whose attention takes a prepared 4D mask: run bidirectionally / block-wise
NATIVE_ARCHITECTURES = ("qwen2", "qwen3", "llama", "mistral", "qwen3_moe", "mixtral")


def _make(kind: str, decoder, block_size: int | None, mask_token_id: int, concat_order: str = "xt_x0") -> DiffusionLM:
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {sorted(KINDS)}, got {kind!r}")
    if kind == "bd3lm":
        return BD3LM(decoder, block_size, mask_token_id, concat_order)
    return MDLM(decoder, mask_token_id)


def read_config(path) -> dict:
    """config.json of a local model directory, as a dict (FileNotFoundError / ValueError otherwise)."""
    path = local_directory(path)
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} has no config.json: not a Hugging Face model directory")
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None


def build_config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int | None = None, max_position_embeddings: int = 4096,
                 num_kv_heads: int | None = None, **kw):
    """A fresh Qwen3 or Llama config (random init), for demos, tests and pretraining.

    `intermediate_size` defaults to 4 x hidden, `num_kv_heads` (grouped-query attention,
    must divide num_heads) to num_heads.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
    return AutoConfig.for_model(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, attention_dropout=0.0, **kw)


def build_model(kind: str, config, *, block_size: int | None = 32, mask_token_id: int,
                device="cpu", attn_implementation: str | None = None) -> DiffusionLM:
    """A randomly initialised diffusion LM from a transformers config."""
    attn = attn_implementation or default_attention(kind, device)
    decoder = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return _make(kind, decoder, block_size, mask_token_id).to(device)


def load_model(path, *, kind: str | None = None, block_size: int | None = None,
               mask_token_id: int | None = None, concat_order: str | None = None,
               trust_remote_code: bool = False, lm_head: str | None = None, device="cpu", dtype=None,
               attn_implementation: str | None = None) -> DiffusionLM:
    """A diffusion LM from a local directory: one saved by `save_pretrained` (kind, block size,
    mask id and concat order from its config.json), or any Hugging Face causal LM / dLLM
    directory, then with `kind` ("mdlm" | "bd3lm"), `mask_token_id` (unless config.json has
    one) and for BD3LM `block_size`. `concat_order` "xt_x0" (default) or "x0_xt" (BD3LM).

    Custom-code checkpoints (`auto_map` in config.json) need `trust_remote_code=True` and
    go through `custom.CustomCodeDiffusionLM` (`lm_head`: dotted name of its LM head module,
    found automatically otherwise); the load probes that hidden @ head.T gives its logits.
    """
    path = local_directory(path)
    raw = read_config(path)
    kind = kind or raw.get("tide_kind")
    block_size = block_size or raw.get("block_size")
    mask_token_id = mask_token_id if mask_token_id is not None else raw.get("mask_token_id")
    concat_order = concat_order or raw.get("concat_order") or "xt_x0"
    model_type, auto_map = raw.get("model_type"), raw.get("auto_map") or {}
    if kind is None:
        raise ValueError(f"{path} is not a tide checkpoint, so it does not say which kind of diffusion LM it is (no "
                         f"tide_kind in its config.json): "
                         f"pass kind='mdlm' (full bidirectional) or kind='bd3lm' (block diffusion); "
                         f"trainer: --teacher-kind / --student-kind")
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool) or mask_token_id < 0:
        raise ValueError(f"{path}: no mask token id (config.json has no mask_token_id, got {mask_token_id!r}): "
                         f"pass mask_token_id= (trainer: --teacher-mask-token-id, or a tokenizer with a mask token)")
    if kind == "bd3lm" and not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"{path}: a BD3LM needs a block size (config.json has no block_size): pass block_size= "
                         f"(trainer: --teacher-block-size / --block-size)")
    if concat_order not in CONCAT_ORDERS:
        raise ValueError(f"concat_order must be one of {CONCAT_ORDERS}, got {concat_order!r}")
    if model_type not in NATIVE_ARCHITECTURES:
        if not auto_map:
            raise ValueError(f"{path}: model_type {model_type!r} is not one of the native architectures run "
                             f"bidirectionally here ({', '.join(NATIVE_ARCHITECTURES)}), and its config.json has "
                             f"no auto_map to modeling code of its own")
        if not trust_remote_code:
            raise ValueError(f"{path} ships its own modeling code (config.json auto_map: {auto_map}); loading it "
                             f"runs that Python file. Pass trust_remote_code=True (trainer: --trust-remote-code) "
                             f"only if you trust the directory")
        from .custom import load_custom
        with quiet_weight_progress():
            return load_custom(path, auto_map, kind=kind, mask_token_id=mask_token_id, block_size=block_size,
                               concat_order=concat_order, lm_head=lm_head, device=device, dtype=dtype)
    if lm_head:
        raise ValueError(f"lm_head= is for custom-code models; {path} is a native {model_type} model")
    attn = attn_implementation or default_attention(kind, device)
    with quiet_weight_progress():
        decoder = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype,
                                                       local_files_only=True)
    return _make(kind, decoder, block_size, mask_token_id, concat_order).to(device)


__all__ = ["BD3LM", "MDLM", "DiffusionLM", "build_config", "build_model", "load_model", "read_config",
           "local_directory", "NATIVE_ARCHITECTURES", "CONCAT_ORDERS",
           "default_attention", "bd3lm_allowed", "bd3lm_sdpa_mask", "bd3lm_block_mask"]

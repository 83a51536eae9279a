"""Diffusion LMs over Hugging Face decoders: BD3LM (student), MDLM (teacher).

    model = build_model("bd3lm", hf_config, block_size=32, mask_token_id=V)
    model = load_model("out/checkpoint-100")      # kind, block, mask id from config.json
    hidden = model(x_t, x_0)                      # [b, L, d], no LM head
    distill, ce = tidal_loss(hidden, model.lm_head_weight, ..., targets=labels)   # [b, L, d] rows
"""
from __future__ import annotations

import os

from transformers import AutoConfig, AutoModelForCausalLM

from .bd3lm import BD3LM, bd3lm_allowed, bd3lm_block_mask, bd3lm_sdpa_mask
from .common import DiffusionLM, default_attention
from .mdlm import MDLM

KINDS = {"bd3lm": BD3LM, "mdlm": MDLM}
ARCHITECTURES = ("qwen3", "llama")


def _make(kind: str, decoder, block_size: int | None, mask_token_id: int) -> DiffusionLM:
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {sorted(KINDS)}, got {kind!r}")
    if kind == "bd3lm":
        return BD3LM(decoder, block_size, mask_token_id)
    return MDLM(decoder, mask_token_id)


def build_config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int | None = None, max_position_embeddings: int = 4096, **kw):
    """A fresh Qwen3 or Llama config (random init), for demos, tests and pretraining."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
    return AutoConfig.for_model(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
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
               mask_token_id: int | None = None, device="cpu", dtype=None,
               attn_implementation: str | None = None) -> DiffusionLM:
    """Load a diffusion LM saved by `save_pretrained` (or any local HF causal-LM directory,
    then `kind`, `block_size` and `mask_token_id` must be given). A path that is not a local
    directory is an error, never a Hugging Face hub lookup."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a local directory (tide loads local checkpoints only, no hub ids)")
    config = AutoConfig.from_pretrained(path)
    kind = kind or getattr(config, "tide_kind", None)
    block_size = block_size or getattr(config, "block_size", None)
    if mask_token_id is None:
        mask_token_id = getattr(config, "mask_token_id", None)
    if kind is None or mask_token_id is None or (kind == "bd3lm" and not block_size):
        raise ValueError(f"{path} is not a tide checkpoint: pass kind=, block_size= and mask_token_id=")
    attn = attn_implementation or default_attention(kind, device)
    decoder = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype)
    return _make(kind, decoder, block_size, mask_token_id).to(device)


__all__ = ["BD3LM", "MDLM", "DiffusionLM", "build_config", "build_model", "load_model",
           "default_attention", "bd3lm_allowed", "bd3lm_sdpa_mask", "bd3lm_block_mask"]

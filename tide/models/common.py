"""What the student (BD3LM) and the teacher (MDLM) share: a Hugging Face causal-LM
decoder used as a backbone, the LM head exposed as a weight, HF-format save/load.

A saved model is a plain Hugging Face directory (`config.json`,
`model.safetensors`, tokenizer files); the diffusion settings travel inside
`config.json` as extra attributes: `tide_kind` ("bd3lm" | "mdlm"),
`block_size`, `mask_token_id` and (BD3LM) `concat_order`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import nn


@contextlib.contextmanager
def quiet_weight_progress():
    """Hugging Face's own progress bars ("Loading weights", "Writing model shards") off while a
    small model is loaded or saved: the trainer, evaluator and sampler print their own progress.
    The previous setting is restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def local_directory(path, what: str = "model") -> str:
    """`path` as a string if it is an existing local directory; otherwise FileNotFoundError.

    Every loader calls this first: a missing path is an error, never a Hugging Face hub
    repo id (nothing is ever downloaded; `from_pretrained` also runs with local_files_only).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what} {path!r} is not a local directory (hub repo ids are never downloaded: "
            f"download the model first, e.g. `huggingface-cli download REPO --local-dir DIR`, and pass DIR)")
    return path


def default_attention(kind: str, device: torch.device | str) -> str:
    """Attention backend per model kind and device.

    BD3LM: flex attention on CUDA (cached BlockMask), SDPA otherwise.
    MDLM: flash-attention 2 (non-causal) on CUDA when installed, SDPA otherwise.
    """
    if torch.device(device).type != "cuda":
        return "sdpa"
    if kind == "bd3lm":
        return "flex_attention"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


class DiffusionLM(nn.Module):
    """A decoder whose forward returns final hidden states; subclasses define the mask."""

    kind = "base"
    block_size = None

    def __init__(self, decoder: nn.Module, mask_token_id: int):
        super().__init__()
        self.decoder = decoder  # the full *ForCausalLM: keeps HF save/load and the LM head
        self.mask_token_id = int(mask_token_id)
        for module in decoder.modules():  # diffusion attention is never causal
            if hasattr(module, "is_causal"):
                module.is_causal = False

    @property
    def backbone(self) -> nn.Module:
        return self.decoder.get_decoder()

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers (what FSDP2 shards one by one)."""
        return self.backbone.layers

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """`[V, d]` LM-head weight (tied to the embeddings when the config says so)."""
        return self.decoder.get_output_embeddings().weight

    @property
    def config(self):
        return self.decoder.config

    @property
    def attn_implementation(self) -> str:
        return self.decoder.config._attn_implementation

    @property
    def vocab_size(self) -> int:
        return self.lm_head_weight.shape[0]

    def save_pretrained(self, path, **kwargs) -> None:
        """Hugging Face format (safetensors + config.json with the tide_* fields)."""
        self.config.tide_kind = self.kind
        self.config.block_size = self.block_size
        self.config.mask_token_id = self.mask_token_id
        if self.kind == "bd3lm":
            self.config.concat_order = self.concat_order
        with quiet_weight_progress():
            self.decoder.save_pretrained(path, safe_serialization=True, **kwargs)

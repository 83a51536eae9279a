"""TIDE: cross-architecture distillation of diffusion language models.

The public API (see API.md / README): the fused-linear losses and their modules.
"""
from .losses import (CALMLoss, KLLoss, TIDALLoss, calm_loss, complementary_split, kl_loss, tidal_loss,
                     token_logprobs)

__all__ = ["tidal_loss", "kl_loss", "token_logprobs", "calm_loss", "complementary_split",
           "TIDALLoss", "KLLoss", "CALMLoss"]
__version__ = "0.1.0"

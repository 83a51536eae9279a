"""TIDE: cross-architecture distillation of diffusion language models.

The public API (see API.md / README): the fused-linear losses and their modules.
"""
from .losses import (CALMLoss, CrossEntropyLoss, DistillOutput, KLLoss, TIDALLoss, calm_from_logprobs, calm_loss,
                     complementary_split, cross_entropy, kl_loss, tidal_loss, token_logprobs)

__all__ = ["tidal_loss", "kl_loss", "cross_entropy", "token_logprobs", "calm_loss", "calm_from_logprobs",
           "complementary_split", "DistillOutput", "TIDALLoss", "KLLoss", "CrossEntropyLoss", "CALMLoss"]
__version__ = "0.1.0"


def _register_with_lm_eval() -> None:
    """Register the lm-evaluation-harness model `tide` (tide.harness.TideLM) when lm-eval is
    installed: a lazy placeholder, so `import tide` imports only lm-eval's registry."""
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
        return
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: it skips them once the registry is non-empty)
    from lm_eval.api.registry import model_registry
    if "tide" not in model_registry:
        model_registry.register("tide", target="tide.harness:TideLM")


_register_with_lm_eval()

"""tide-dllm: cross-architecture distillation of diffusion language models (TIDE).

The Triton kernels live in `tide/kernels/` (the subpackage `tide.kernels`). No
top-level module named `kernels` is installed or importable from a checkout: it
would shadow Hugging Face's own `kernels` package, which transformers imports.
"""
from setuptools import setup

setup(
    name="tide-dllm",
    version="0.1.0",
    description="TIDE: fused distillation losses and a slim trainer for diffusion LMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `benchmarks/` is run from the repository root (`python -m benchmarks.run`), never
    # installed: a top-level module with such a generic name would shadow others.
    packages=["tide", "tide.models", "tide.kernels"],
    # torch is not pinned here: install the build that fits your machine first
    # (README). Nothing below is heavy.
    install_requires=[
        "torch>=2.5",
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "tokenizers>=0.20",
        "transformers>=4.56",
        "datasets>=3.0",
    ],
    extras_require={
        # lm-eval: the harness model's test runs lm_eval.simple_evaluate on a local task;
        # matplotlib: the replication test checks its plot
        "test": ["pytest>=8", "triton>=3.2", "tensorboard", "lm-eval>=0.4.13", "matplotlib"],
        "gpu": ["flash-attn"],
        "bench": ["matplotlib", "pytest-benchmark"],
        # the peers benchmarks/run.py compares against, when they install (never a dependency)
        "peers": ["liger-kernel", "cut-cross-entropy"],
        "eval": ["lm-eval>=0.4.13"],    # the lm-evaluation-harness model `tide` (tide.harness)
        # experiment trackers for `tide.train --report-to` (imported only when chosen)
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "trackio": ["trackio"],
        # the opt-in real-vocabulary test tier (TIDE_SLOW_TESTS=1): transformers converts the GGUF
        # vocabularies of the llama-cpp-python sdist with it (tests/real_tokenizers.py)
        "real-tokenizers": ["gguf"],
    },
    # lm-eval has no plugin entry points: this is its command line with the model `tide` registered
    entry_points={"console_scripts": ["tide-lm-eval = tide.harness:main"]},
)

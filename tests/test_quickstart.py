"""The README's promises that code can check: the quick start is two commands and CI runs
the second word for word; the loss example runs as written and its hidden states are
bidirectional (what a masked-diffusion model needs), unlike a plain causal decoder's."""
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_section(title: str) -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def code_blocks(section: str, language: str) -> list[str]:
    return [m.strip() for m in re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = code_blocks(readme_section("Quick start"), "bash")
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    install_demo, install_test = commands
    assert "torch==2.13.0" in install_demo and install_demo.endswith("python -m tide.train")
    assert "torch==2.13.0" in install_test and '".[test]"' in install_test
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        ci_lines = [line.strip() for line in fh]
    assert install_test in ci_lines


def test_loss_example_runs_and_is_bidirectional():
    (snippet,) = code_blocks(readme_section("Use the losses in your own training step"), "python")
    torch.manual_seed(0)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    student, teacher, x_0 = scope["student"], scope["teacher"], scope["x_0"]
    assert scope["student_hidden"].grad_fn is not None and student.lm_head_weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())

    # changing the last token of a block changes the hidden state of its first position
    # (bidirectional inside the block) for the student, and everywhere for the teacher
    changed = x_0.clone()
    changed[:, 15] = (changed[:, 15] + 1) % (scope["V"] - 1)
    with torch.no_grad():
        assert not torch.allclose(student(x_0, x_0)[:, 0], student(changed, changed)[:, 0])
        assert not torch.allclose(teacher(x_0)[:, 0], teacher(changed)[:, 0])
        # what the README warns about: the plain decoder's own forward is causal
        causal = teacher.decoder.model
        for module in causal.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = True
        assert torch.allclose(causal(x_0).last_hidden_state[:, 0], causal(changed).last_hidden_state[:, 0])


def test_repository_root_does_not_shadow_hugging_faces_kernels_package():
    # transformers imports Hugging Face's `kernels` package (a dependency of transformers 5.x)
    # while loading any model; a `kernels/` package at the repository root would be found first
    # by `python -m tide.train` or `python -m pytest` run from the root, and every model import
    # would fail. Run Python from the root, as the quick start does.
    import subprocess
    import sys

    probe = ("import importlib.util, os, sys\n"
             "spec = importlib.util.find_spec('kernels')\n"
             "origin = (spec.origin or '') if spec else ''\n"
             "assert not os.path.abspath(origin).startswith(os.path.join(os.getcwd(), 'kernels')), origin\n"
             "import transformers.models.qwen3.modeling_qwen3\n"
             "import tide.kernels.tidal\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]

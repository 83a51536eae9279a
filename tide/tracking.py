"""Experiment tracking for `tide.train --report-to none|tensorboard|wandb|trackio`.

Each tracker receives the same numbers as `metrics.jsonl`, under `train/<name>`,
at the optimizer step. The libraries are optional extras, imported only when
chosen (`pip install "tide-dllm[tensorboard]"`, `[wandb]`, `[trackio]`):

- tensorboard: event files in `<output_dir>/tensorboard/` (`tensorboard --logdir ...`);
- wandb: `wandb.init(project="tide", name=<run name>, config=<the Config>, dir=<output_dir>)`;
- trackio: `trackio.init(project="tide", name=<run name>, config=<the Config>)`.
"""
from __future__ import annotations

import importlib.util
import os

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
# the module each choice imports, and the extra that installs it
_MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio")}
PROJECT = "tide"


def missing_library(report_to: str) -> str | None:
    """None when `report_to` can be used here, else what to install (checked before training)."""
    if report_to == "none":
        return None
    package = _MODULES[report_to][1]
    if importlib.util.find_spec(package) is None:
        return f'--report-to {report_to} needs the {package} package: pip install "tide-dllm[{package}]"'
    return None


class Tracker:
    """`log(record, step)` sends the numeric fields of a metrics record; `close()` flushes."""

    def __init__(self, report_to: str, output_dir: str, run_name: str, config: dict):
        self.report_to, self.backend = report_to, None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.backend = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
        elif report_to == "wandb":
            import wandb
            self.backend = wandb
            wandb.init(project=PROJECT, name=run_name, config=config, dir=output_dir)
        elif report_to == "trackio":
            import trackio
            self.backend = trackio
            trackio.init(project=PROJECT, name=run_name, config=config)

    def log(self, record: dict, step: int) -> None:
        values = {f"train/{k}": float(v) for k, v in record.items()
                  if k not in ("step", "time", "elapsed_s") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.report_to == "tensorboard":
            for tag, value in values.items():
                self.backend.add_scalar(tag, value, global_step=step)
        elif self.backend is not None:
            self.backend.log(values, step=step)

    def close(self) -> None:
        if self.report_to == "tensorboard":
            self.backend.close()
        elif self.backend is not None:
            self.backend.finish()

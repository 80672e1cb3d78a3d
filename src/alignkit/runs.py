"""Run folders, metrics logs, checkpoints and progress bars.

Each stage writes to ``runs/NAME/STAGE/``::

    config.yaml          the resolved config
    metrics.jsonl        one JSON line per logged step
    tb/                  TensorBoard events (the same scalars)
    checkpoints/step-N/  state to resume from (written atomically; see alignkit.training)
    final/               the stage's output (model, dataset, report)
    DONE                 written last; a pipeline skips stages that have it
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.config import dump_config, to_dict
from alignkit.errors import AlignkitError


class RunDir:
    def __init__(self, output_dir: str, name: str, stage: str):
        self.path = Path(output_dir) / name / stage
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # run.output_dir (or a folder on the way) is a file, or not writable
            blocked = next((q for q in [self.path, *self.path.parents] if q.exists() and not q.is_dir()), None)
            why = f"{blocked} is a file, not a folder" if blocked is not None else (e.strerror or str(e))
            raise AlignkitError(f"run.output_dir: cannot create the run folder {self.path} ({why})") from None

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, cfg: Any) -> None:
        # under a temporary name, then renamed: a kill mid-write leaves the previous config.yaml,
        # which --resume compares the new config with
        tmp = self.path / ".config.yaml.tmp"
        dump_config(cfg, tmp)
        os.replace(tmp, self.path / "config.yaml")

    def mark_done(self, summary: dict | None = None) -> None:
        (self.path / "DONE").write_text(json.dumps(summary or {}, indent=2, default=float))

    def is_done(self) -> bool:
        return (self.path / "DONE").exists()


class MetricsLogger:
    """Appends one JSON line per step and mirrors scalars to TensorBoard."""

    def __init__(self, run: RunDir, resume_step: int | None = None, tensorboard: bool = True):
        self.file = run.path / "metrics.jsonl"
        if resume_step is None:
            self.file.write_text("")
        else:  # keep the lines up to the checkpoint; drop those after it
            kept = [line for line in read_metrics(self.file) if line.get("step", 0) <= resume_step]
            self.file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.path / "tb"))
            except ImportError:
                self.tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (or of the one in folder ``path``). A line that is not a
    JSON object is passed over: the log is alignkit's own, and the one way it gets such a line is a
    kill mid-write, whose step is logged again when the run resumes from its last checkpoint."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None  # a line cut short by a kill (or a full disk) while it was being written
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- seeds


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- run folders


def run_dir_at(path: str | Path) -> RunDir:
    """A RunDir whose folder is exactly ``path`` (for recipes that nest SFT in their own run)."""
    p = Path(path)
    return RunDir(str(p.parent), p.name, "")


def clear_run(run: RunDir) -> None:
    """A fresh start in a used folder: drop its checkpoints and DONE, so a later
    ``--resume`` cannot pick up a checkpoint of the earlier run."""
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    (run.path / "DONE").unlink(missing_ok=True)


def done_step(run: RunDir) -> int | None:
    """The step count a finished run recorded in DONE (None when unfinished)."""
    try:
        return json.loads((run.path / "DONE").read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return None


def progress(total: int, description: str, disable: bool = False):
    """A rich progress bar (transient off so the last state stays on screen)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
                   disable=disable or os.environ.get("ALIGNKIT_NO_PROGRESS") == "1")
    task = bar.add_task(description, total=total, info="")
    return bar, task


def config_hash(cfg: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]

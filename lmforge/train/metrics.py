"""The training run's record: ``metrics.jsonl`` (and TensorBoard when asked), written by rank 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.rundir import atomic_write_text

METRICS = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int, tensorboard: bool):
        self.on = enabled
        self.path = Path(run_dir) / METRICS
        self.tb = None
        if not self.on:
            return
        if resume_step and self.path.exists():
            # Drop records past the checkpoint we resumed from; they will be produced again.
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        elif not resume_step:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                print("warning: tensorboard is not installed; pip install tensorboard", file=sys.stderr)

    def record(self, **rec) -> None:
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def say(self, msg: str) -> None:
        if self.on:
            print(msg, flush=True)

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def read_records(run_dir) -> list[dict]:
    """Every record of a run's ``metrics.jsonl``; a torn last line (a crash mid-write) is skipped."""
    path = Path(run_dir) / METRICS
    recs = []
    for ln in path.read_text().splitlines() if path.exists() else []:
        try:
            recs.append(json.loads(ln))
        except json.JSONDecodeError:
            pass
    return recs


def val_curve(run_dir) -> list[tuple[int, float]]:
    """(step, val loss) of every evaluation of a run, in order."""
    return [(r["step"], r["val_loss"]) for r in read_records(run_dir) if "val_loss" in r]

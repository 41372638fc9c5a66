"""A training run's health and the guard's event timeline, as plain data (``lmforge status RUN``)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.rundir import read_manifest
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.guard import QUARANTINE, read_events
from lmforge.train.metrics import read_records
from lmforge.train.workload import TRAINING_STAGES


def run_status(run_dir) -> dict:
    """Plain data about a run: status, progress, last losses, events, quarantine, checkpoints."""
    run_dir = Path(run_dir)
    man = read_manifest(run_dir, expect_stage=TRAINING_STAGES)
    recs = read_records(run_dir)
    train_recs = [r for r in recs if "loss" in r]
    val_recs = [r for r in recs if "val_loss" in r]
    events = read_events(run_dir)
    q = run_dir / QUARANTINE
    quarantined = json.loads(q.read_text()).get("steps", []) if q.exists() else []
    kinds = [e["event"] for e in events]
    if "gave_up" in kinds:
        health = "failed: the guard gave up"
    elif "rolled_back" in kinds or "skipped" in kinds:
        health = f"recovered: {kinds.count('skipped')} skipped steps, {kinds.count('rolled_back')} rollbacks"
    else:
        health = "healthy"
    return {
        "run_dir": str(run_dir),
        "status": man.get("status"),
        "max_steps": man["config"].get("max_steps"),
        "last_step": train_recs[-1]["step"] if train_recs else 0,
        "last_loss": train_recs[-1]["loss"] if train_recs else None,
        "last_val_loss": val_recs[-1]["val_loss"] if val_recs else None,
        "health": health,
        "events": events,
        "quarantined_steps": quarantined,
        "checkpoints": [c.name for c in list_checkpoints(run_dir)],
    }

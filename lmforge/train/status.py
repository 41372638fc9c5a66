"""``lmforge status RUN``: a training run's health and the guard's event timeline."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lmforge.rundir import read_manifest
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.guard import QUARANTINE, read_events


def run_status(run_dir) -> dict:
    """Plain data about a run: status, progress, last losses, events, quarantine, checkpoints."""
    run_dir = Path(run_dir)
    man = read_manifest(run_dir, expect_stage="train")
    recs = []
    mpath = run_dir / "metrics.jsonl"
    if mpath.exists():
        for ln in mpath.read_text().splitlines():
            try:
                recs.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
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


def status_cmd(run: Path = typer.Argument(..., help="A train run directory."),
               as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")):
    """Show a training run's health and the timeline of detected spikes, skips, rollbacks and resumes.

    Example: lmforge status runs/d4
    """
    s = run_status(run)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    c = Console()
    c.print(f"[bold]{s['run_dir']}[/]  status [bold]{s['status']}[/]  step {s['last_step']}/{s['max_steps']}  "
            f"loss {s['last_loss']}  val loss {s['last_val_loss']}")
    c.print(f"health: {s['health']}")
    c.print(f"checkpoints: {', '.join(s['checkpoints']) or 'none'}")
    if s["quarantined_steps"]:
        qs = s["quarantined_steps"]
        c.print(f"quarantined: {len(qs)} batch steps ({qs[0]}..{qs[-1]})")
    if s["events"]:
        t = Table(title="events")
        for col in ("time", "step", "event", "detail"):
            t.add_column(col)
        for e in s["events"]:
            detail = {k: v for k, v in e.items() if k not in ("time", "step", "event")}
            when = dt.datetime.fromtimestamp(e["time"]).strftime("%H:%M:%S")
            t.add_row(when, str(e["step"]), e["event"], json.dumps(detail)[:100])
        c.print(t)

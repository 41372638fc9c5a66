"""``lmforge train`` and ``lmforge status``: thin wrappers over :mod:`lmforge.train`."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lmforge.config import flag_tree
from lmforge.scaling.forecast import train_with_forecast
from lmforge.train.config import load_train_config
from lmforge.train.status import run_status
from lmforge.train.trainer import train


def train_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="Data run directory (from `lmforge data --tokenizer`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write (default runs/train)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="TOML file: a \\[train] table, with \\[train.model] and \\[train.guard] tables."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Model size dial: width 64*depth, depth layers (train.model.depth)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (train.max_steps)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override any key: --set train.lr=1e-3 --set train.model.n_kv_head=2"),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto: continue from the newest valid checkpoint in --out "
                                         "(start fresh if none); never (the default); or a checkpoint directory."),
    forecast: Optional[Path] = typer.Option(None, "--forecast", help="A fit.json (`lmforge fit`): record its forecast for "
                                            "this run before the first step, and check it at the end."),
    compile_: bool = typer.Option(False, "--compile", help="Run the model under torch.compile."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun, shard the model with FSDP2 instead of DDP."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Train a Llama-architecture model on tokenized data.

    Examples:

      lmforge train --data runs/data --depth 4 --steps 500 -o runs/d4

      lmforge train --data runs/data --depth 4 --steps 500 -o runs/d4 --resume auto

      lmforge train -c train.toml --set train.lr=1e-3 --set train.guard.loss_z=5

      torchrun --nproc_per_node=2 -m lmforge train --data runs/data -c train.toml

    Precedence: defaults < --config file < --set < flags.
    """
    flags = flag_tree(**{"data": str(data) if data else None, "out": str(out) if out else None, "model.depth": depth,
                         "max_steps": steps, "compile": compile_ or None, "fsdp": fsdp or None})
    cfg = load_train_config(config, set_, flags)
    if forecast is not None:
        train_with_forecast(cfg, forecast, resume=resume or "never", progress=not quiet)
    else:
        train(cfg, resume=resume or "never", progress=not quiet)


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

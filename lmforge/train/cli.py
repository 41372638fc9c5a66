from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lmforge.config import load_toml, parse_overrides


def train_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="Data run directory (from `lmforge data --tokenizer`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write (default runs/train)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML config: top-level train keys and a [model] table."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Model size dial: width 64*depth, depth layers."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (train.max_steps)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override any key, e.g. --set lr=1e-3 --set model.n_kv_head=2"),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto: continue from the newest valid checkpoint in --out (start fresh if none); or a checkpoint directory."),
    compile_: bool = typer.Option(False, "--compile", help="Run the model under torch.compile."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun, shard the model with FSDP2 instead of DDP."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Train a Llama-architecture model on tokenized data.

    Examples:

      lmforge train --data runs/data --depth 4 --steps 500 -o runs/d4

      lmforge train --data runs/data --depth 4 --steps 500 -o runs/d4 --resume auto

      torchrun --nproc_per_node=2 -m lmforge train --data runs/data -c train.toml

    Precedence: defaults < --config file < flags < --set.
    """
    from lmforge.train.loop import config_from_sources, train

    file_cfg = load_toml(config) if config else {}
    flags: dict = {}
    if data is not None:
        flags["data"] = str(data)
    if out is not None:
        flags["out"] = str(out)
    if depth is not None:
        flags["model"] = {"depth": depth}
    if steps is not None:
        flags["max_steps"] = steps
    if compile_:
        flags["compile"] = True
    if fsdp:
        flags["fsdp"] = True
    over = parse_overrides(set_)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(flags.get(k), dict):
            flags[k].update(v)
        else:
            flags[k] = v
    cfg = config_from_sources(file_cfg, flags, where=str(config) if config else "--set")
    train(cfg, resume=resume or False, progress=not quiet)

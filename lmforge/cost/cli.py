"""``lmforge hw`` and ``lmforge cost``: the machine's peak, and a ledger of what runs cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lmforge.cost.hw import cache_path, measure_cpu
from lmforge.cost.ledger import inference_cost, ledger, serve_usage
from lmforge.errors import LmforgeError
from lmforge.progress import console


def hw_cmd(force: bool = typer.Option(False, "--force", help="Measure again even if a cached value exists.")):
    """Measure this CPU's bf16 and fp32 matmul peak FLOP/s and cache them for MFU.

    Example: lmforge hw --force
    """
    e = measure_cpu(force=force)
    c = Console()
    c.print(f"[bold]{e['name']}[/] ({e['threads']} threads)")
    c.print(f"  fp32 peak: {e['fp32'] / 1e9:8.1f} GFLOP/s")
    c.print(f"  bf16 peak: {e['bf16'] / 1e9:8.1f} GFLOP/s" if e.get("bf16") else "  bf16: not supported")
    c.print(f"  cached in {cache_path()}")


def cost_cmd(
    runs: Optional[List[Path]] = typer.Argument(None, help="Train runs, pipeline runs or ladders."),
    inference: bool = typer.Option(False, "--inference", help="Price inference instead: $ per million tokens."),
    tokens_per_s: Optional[float] = typer.Option(None, "--tokens-per-s", help="Measured generation throughput."),
    hardware: str = typer.Option("cpu", "--hardware", help="With --inference: a hardware catalog name."),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="A TOML hardware catalog that adds or overrides entries."),
    serve: Optional[Path] = typer.Option(None, "--serve", help="Sum a server's usage ledger (the --dir of "
                                         "`lmforge serve`) per API user and model."),
    as_json: bool = typer.Option(False, "--json"),
):
    """A ledger of FLOPs, device-hours, kWh, dollars and CO2 across runs and ladders.

    Examples: lmforge cost runs/ladder runs/target
              lmforge cost --inference --tokens-per-s 2400 --hardware H100
              lmforge cost --serve runs/serve
    """
    if serve is not None:
        u = serve_usage(serve)
        if as_json:
            print(json.dumps(u, indent=2))
            return
        t = Table(title=f"usage: {serve}")
        for col in ("user", "requests", "prompt tokens", "completion tokens", "$"):
            t.add_column(col, justify="right")
        for name, g in sorted(u["users"].items()):
            t.add_row(name, f"{g['requests']:,}", f"{g['prompt_tokens']:,}", f"{g['completion_tokens']:,}", f"{g['usd']:.6f}")
        g = u["total"]
        t.add_row("total", f"{g['requests']:,}", f"{g['prompt_tokens']:,}", f"{g['completion_tokens']:,}", f"{g['usd']:.6f}")
        Console().print(t)
        for name, r in u["routers"].items():
            tiers = ", ".join(f"{t} {n}" for t, n in sorted(r["tiers"].items()))
            print(f"router {name}: {r['requests']} requests, {r['share_escalated']:.1%} escalated, "
                  f"{r['fallback']} fell back; answered by {tiers}")
        if u["unreadable"]:
            print(f"warning: {u['unreadable']} unreadable line(s) in {serve}/usage.jsonl (cut short by a crash?)")
        return
    if inference:
        if tokens_per_s is None:
            raise LmforgeError("--inference needs --tokens-per-s (measured throughput)")
        r = inference_cost(tokens_per_s, hardware, catalog=catalog)
        print(f"{r['hardware']}: ${r['usd_per_million_tokens']:.4f} per million tokens, "
              f"{r['kwh_per_million_tokens']:.4f} kWh per million tokens at {tokens_per_s:g} tokens/s")
        return
    if not runs:
        raise LmforgeError("name at least one run or ladder directory")
    L = ledger(runs)
    if as_json:
        print(json.dumps(L, indent=2))
        return
    t = Table(title="cost ledger")
    for col in ("run", "status", "FLOPs", "wall", "MFU", "device-h", "kWh", "$", "CO2 kg", "val loss"):
        t.add_column(col, justify="right")
    for r in L["runs"]:
        t.add_row(r["run"], str(r["status"]), f"{r['flops']:.3g}", f"{r['wall_s']:.0f}s", f"{(r['mfu'] or 0):.1%}",
                  f"{r['device_hours']:.4g}", f"{r['kwh']:.4g}", f"{r['usd']:.4f}", f"{r['co2_kg']:.4g}",
                  f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-")
    tot = L["total"]
    t.add_row("[bold]total", "", f"{tot['flops']:.3g}", f"{tot['wall_s']:.0f}s", "", f"{tot['device_hours']:.4g}",
              f"{tot['kwh']:.4g}", f"{tot['usd']:.4f}", f"{tot['co2_kg']:.4g}", "")
    c = console()
    c.print(t)
    for g, v in L["groups"].items():
        c.print(f"{g}: {v['share_of_flops']:.1%} of FLOPs, {v['share_of_usd']:.1%} of spend")

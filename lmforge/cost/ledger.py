"""``lmforge cost``: a ledger of compute and spend across runs and ladders."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.cost.catalog import get_hardware
from lmforge.errors import LmforgeError
from lmforge.rundir import MANIFEST, ladder_rungs


def _train_runs(path: Path) -> list[tuple[str, Path]]:
    """(group, run dir) pairs: a ladder expands to its started rungs, a pipeline run to its train stage."""
    rungs = ladder_rungs(path)
    if rungs is not None:
        return [(f"ladder:{path.name}", r) for r in rungs if (r / MANIFEST).exists()]
    man = path / MANIFEST
    if not man.exists():
        raise LmforgeError(f"{path}: not a run or ladder directory (no {MANIFEST})")
    stage = json.loads(man.read_text()).get("stage")
    if stage == "run" and (path / "train" / MANIFEST).exists():
        return [(path.name, path / "train")]
    if stage != "train":
        raise LmforgeError(f"{path}: a '{stage}' directory has no training cost; pass train runs or ladders")
    return [(path.name, path)]


def ledger(paths) -> dict:
    rows = []
    for p in map(Path, paths):
        for group, run in _train_runs(p):
            man = json.loads((run / MANIFEST).read_text())
            m = man.get("metrics", {})
            cost = m.get("cost", {})
            rows.append({
                "group": group, "run": str(run), "status": man.get("status"),
                "flops": m.get("model_flops", 0.0), "wall_s": m.get("train_time_s", 0.0),
                "mfu": m.get("mfu"), "device_hours": cost.get("device_hours", m.get("device_hours", 0.0)),
                "kwh": cost.get("kwh", 0.0), "usd": cost.get("usd", 0.0), "co2_kg": cost.get("co2_kg", 0.0),
                "hardware": cost.get("hardware"), "val_loss": m.get("final_val_loss"),
            })
    keys = ("flops", "wall_s", "device_hours", "kwh", "usd", "co2_kg")
    total = {k: sum(r[k] or 0.0 for r in rows) for k in keys}
    groups = {}
    for r in rows:
        g = groups.setdefault(r["group"], {k: 0.0 for k in keys})
        for k in keys:
            g[k] += r[k] or 0.0
    for g in groups.values():
        g["share_of_flops"] = g["flops"] / total["flops"] if total["flops"] else 0.0
        g["share_of_usd"] = g["usd"] / total["usd"] if total["usd"] else 0.0
    return {"runs": rows, "groups": groups, "total": total}


def inference_cost(tokens_per_s: float, hardware: str, devices: int = 1, catalog=None) -> dict:
    if tokens_per_s <= 0:
        raise LmforgeError("--tokens-per-s must be positive")
    hw = get_hardware(hardware, catalog)
    usd_per_hour = hw.usd_per_hour * devices
    return {"hardware": hw.name, "devices": devices, "tokens_per_s": tokens_per_s,
            "usd_per_million_tokens": usd_per_hour / (tokens_per_s * 3600) * 1e6,
            "kwh_per_million_tokens": hw.watts * devices / 1000 / (tokens_per_s * 3600) * 1e6}


USAGE_FILE = "usage.jsonl"


def serve_usage(serve_dir) -> dict:
    """Sum a server's usage ledger (``usage.jsonl``, one line per request) per user and model.

    A line cut short by a crash mid-write is counted as ``unreadable``, never silently dropped."""
    path = Path(serve_dir) / USAGE_FILE
    if not path.exists():
        raise LmforgeError(f"{serve_dir}: no {USAGE_FILE}; give the directory `lmforge serve --dir` wrote to")
    users: dict[str, dict] = {}
    models: dict[str, dict] = {}
    total = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0}
    routed: dict[str, dict] = {}
    unreadable = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        for table, key in ((users, row.get("user") or "-"), (models, row.get("model") or "-"), (None, None)):
            agg = total if table is None else table.setdefault(
                key, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0})
            agg["requests"] += 1
            agg["prompt_tokens"] += int(row.get("prompt_tokens", 0))
            agg["completion_tokens"] += int(row.get("completion_tokens", 0))
            agg["usd"] += float(row.get("usd", 0.0))
        if "tier" in row:  # a routed request: which tier answered, and whether it escalated or fell back
            r = routed.setdefault(row.get("model") or "-", {"requests": 0, "escalated": 0, "fallback": 0, "tiers": {}})
            r["requests"] += 1
            r["escalated"] += bool(row.get("escalated"))
            r["fallback"] += bool(row.get("fallback"))
            r["tiers"][row["tier"]] = r["tiers"].get(row["tier"], 0) + 1
    for r in routed.values():
        r["share_escalated"] = r["escalated"] / r["requests"]
    return {"users": users, "models": models, "routers": routed, "total": total, "unreadable": unreadable}

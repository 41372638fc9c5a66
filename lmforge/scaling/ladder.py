"""The ladder: a grid of small training runs whose results a scaling law is fitted to.

``plan_ladder`` turns a base training config into rungs (model size from the depth dial,
tokens as multiples of 20 tokens per parameter, or fixed token budgets) with per-rung
hyperparameters from the size rules below, and prices every rung before anything runs.
Given the compute of the run it is meant to forecast, it keeps every rung at most a tenth
of it and the whole ladder at most a third. ``run_ladder`` trains the
rungs as ordinary run directories under ``LADDER/rungs/``, skipping finished ones and
resuming an interrupted one.

Size rules (documented in docs/scaling.md):
- learning rate scales as 1/width: ``lr = lr_ref * d_ref / d_model`` (the muP-style rule
  that keeps per-layer update sizes comparable across widths), capped at ``lr_ref``;
- batch size grows with model size as ``N^(1/3)`` from ``batch_ref`` at ``N_ref``, rounded to a
  power of two (larger models tolerate and benefit from larger batches);
- warmup grows with the rung's tokens: ``warmup_frac`` of its steps, but never fewer than
  ``warmup_min_steps`` (nor more than half the run). Short rungs need the floor: at 3e-3 a
  500-step run warmed up for 25 steps ends 25% worse than one warmed up for 200, which
  would poison the fit with an optimisation failure rather than a scaling effect.

Every rung is evaluated on the same ``eval_windows`` validation windows, whatever its batch
size, so the final losses the law is fitted to are comparable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.cost.catalog import check_hardware, get_hardware, run_cost
from lmforge.data.shards import open_tokens
from lmforge.errors import LmforgeError
from lmforge.model.model import ModelConfig, flops_per_token, param_counts
from lmforge.rundir import LADDER_FILE, Manifest, atomic_write_json, is_complete
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import train


@dataclass
class LadderConfig:
    # Depth 1 is left out: one layer cannot compose attention heads, and its loss curve has a
    # different shape from deeper models' (docs/scaling.md), which bends the joint fit.
    depths: list = field(default_factory=lambda: [2, 3, 4, 5])
    multipliers: list = field(default_factory=lambda: [1, 2, 5, 10])  # x 20 tokens per parameter
    tokens_per_param: float = 20.0
    tokens: list = field(default_factory=list)  # fixed token budgets for every depth, instead of multipliers
    budgets: dict = field(default_factory=dict)  # {"depth": [tokens, ...]} per depth, from design_ladder; overrides both
    aspect: int = 64  # width per layer (model.aspect): d_model = aspect * depth
    context: int = 256
    lr_ref: float = 3e-3
    d_ref: int = 128
    batch_ref: int = 16
    n_ref: float = 1e6
    warmup_frac: float = 0.05
    warmup_min_steps: int = 200
    schedule: str = "cosine"
    vocab_size: int = 0  # 0: from the data's tokenizer
    seed: int = 1337
    eval_windows: int = 1024  # validation windows of context tokens, the same set for every rung
    precision: str = "auto"
    hardware: str = "cpu"
    expected_mfu: float = 0.25  # for the time and cost estimate before anything has run

    def __post_init__(self):
        if not self.depths or any(d < 1 for d in self.depths):
            raise LmforgeError("ladder.depths must be a non-empty list of positive depths")
        if not self.multipliers or any(m <= 0 for m in self.multipliers):
            raise LmforgeError("ladder.multipliers must be a non-empty list of positive numbers")
        if any(t <= 0 for t in self.tokens):
            raise LmforgeError("ladder.tokens must be positive token budgets")
        if self.eval_windows < 1:
            raise LmforgeError("ladder.eval_windows must be at least 1")
        self.hardware = check_hardware(self.hardware, what="ladder.hardware")


def rung_hparams(model: ModelConfig, cfg: LadderConfig) -> dict:
    N = param_counts(model)["non_embedding"]
    lr = min(cfg.lr_ref, cfg.lr_ref * cfg.d_ref / model.d_model)
    raw_batch = cfg.batch_ref * (N / cfg.n_ref) ** (1 / 3)
    batch = int(2 ** round(math.log2(max(1.0, raw_batch))))
    return {"lr": lr, "batch_size": max(1, batch)}


def rung_warmup(steps: int, cfg: LadderConfig) -> int:
    return min(steps // 2, max(cfg.warmup_min_steps, int(cfg.warmup_frac * steps)))


def plan_ladder(cfg: LadderConfig, data_dir: str, vocab_size: int, budget_flops: float | None = None,
                max_rung_flops: float | None = None) -> list[dict]:
    """The rungs, smallest compute first, each with its N, D, steps, hyperparameters and cost estimate.

    ``max_rung_flops`` drops rungs bigger than that; ``budget_flops`` then keeps the cheapest
    rungs whose total fits."""
    hw = get_hardware(cfg.hardware)
    peak = hw.peak("fp32" if cfg.precision == "fp32" else "bf16")
    rungs = []
    for depth in cfg.depths:
        model = ModelConfig(depth=depth, aspect=cfg.aspect, vocab_size=cfg.vocab_size or vocab_size, context=cfg.context)
        hp = rung_hparams(model, cfg)
        if cfg.eval_windows % hp["batch_size"]:
            raise LmforgeError(f"ladder.eval_windows = {cfg.eval_windows} is not a multiple of depth {depth}'s batch size "
                               f"{hp['batch_size']}; use a power of two so every rung sees the same val windows")
        N = param_counts(model)["non_embedding"]
        fpt = flops_per_token(model)
        budgets = ([(f"{t / 1e6:.3g}M", t) for t in cfg.budgets.get(str(depth), [])]
                   or [(f"{t / 1e6:g}M", t) for t in cfg.tokens]
                   or [(f"x{m:g}", m * cfg.tokens_per_param * N) for m in cfg.multipliers])
        for label, tokens_target in budgets:
            tokens_per_step = hp["batch_size"] * cfg.context
            steps = max(10, math.ceil(tokens_target / tokens_per_step))
            D = steps * tokens_per_step
            flops = fpt * D
            seconds = flops / (peak * cfg.expected_mfu)
            rungs.append({
                "name": f"d{depth}-{label}", "depth": depth, "N": N,
                "params_total": param_counts(model)["total"], "D": D, "tokens_per_param": D / N, "steps": steps,
                "flops": flops, "flops_per_token": fpt, "lr": hp["lr"], "batch_size": hp["batch_size"],
                "warmup_steps": rung_warmup(steps, cfg),
                "est_seconds": seconds, "est_cost": run_cost(seconds / 3600, hw),
            })
    rungs.sort(key=lambda r: r["flops"])
    smallest = rungs[0]
    if max_rung_flops is not None:
        rungs = [r for r in rungs if r["flops"] <= max_rung_flops]
    if budget_flops is not None:
        kept, acc = [], 0.0
        for r in rungs:
            if acc + r["flops"] <= budget_flops:
                kept.append(r)
                acc += r["flops"]
        rungs = kept
    if not rungs:
        raise LmforgeError(f"the budget is below even the smallest rung ({smallest['name']}: {smallest['flops']:.3g} FLOPs); "
                           "raise the budget or use smaller depths or token budgets")
    return rungs


def target_limits(target_flops: float) -> dict:
    """The rules a ladder for a target run of ``target_flops`` keeps: each rung at most a tenth
    of the target's compute, and all rungs together at most a third."""
    if target_flops <= 0:
        raise LmforgeError(f"--target-flops {target_flops:g}: must be positive")
    return {"max_rung_flops": target_flops / 10, "budget_flops": target_flops / 3}


def rung_train_config(rung: dict, cfg: LadderConfig, data_dir: str, out_dir: Path) -> TrainConfig:
    return TrainConfig(
        data=str(data_dir), out=str(out_dir),
        model=ModelConfig(depth=rung["depth"], aspect=cfg.aspect, vocab_size=cfg.vocab_size, context=cfg.context),
        batch_size=rung["batch_size"], max_steps=rung["steps"], lr=rung["lr"], warmup_steps=rung["warmup_steps"],
        schedule=cfg.schedule, eval_every=0, eval_batches=cfg.eval_windows // rung["batch_size"],
        ckpt_every=max(50, rung["steps"] // 5),
        log_every=max(1, rung["steps"] // 50), seed=cfg.seed, precision=cfg.precision, hardware=cfg.hardware,
    )


def create_ladder(ladder_dir, cfg: LadderConfig, data_dir: str, budget_flops: float | None = None,
                  target_flops: float | None = None) -> dict:
    _, td = open_tokens(data_dir)
    limits = target_limits(target_flops) if target_flops else {"max_rung_flops": None, "budget_flops": None}
    if budget_flops is not None:
        limits["budget_flops"] = min(budget_flops, limits["budget_flops"] or budget_flops)
    rungs = plan_ladder(cfg, data_dir, td.vocab_size, **limits)
    plan = {"config": asdict(cfg), "data": str(Path(data_dir).resolve()), "rungs": rungs,
            "total_flops": sum(r["flops"] for r in rungs), "train_tokens_available": len(td.split("train")),
            "target_flops": target_flops, **limits}
    ladder_dir = Path(ladder_dir)
    ladder_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ladder_dir / LADDER_FILE, plan)
    return plan


def load_ladder(ladder_dir) -> dict:
    p = Path(ladder_dir) / LADDER_FILE
    if not p.exists():
        raise LmforgeError(f"{p}: no ladder plan here; run `lmforge ladder plan -o {ladder_dir}` first")
    return json.loads(p.read_text())


def run_ladder(ladder_dir, progress: bool = True) -> list[Path]:
    """Train every rung not yet finished; return the rung run directories."""
    ladder_dir = Path(ladder_dir)
    plan = load_ladder(ladder_dir)
    cfg = LadderConfig(**plan["config"])
    total = plan["total_flops"]
    done_flops = 0.0
    dirs = []
    t0 = time.time()
    for i, rung in enumerate(plan["rungs"]):
        out = ladder_dir / "rungs" / rung["name"]
        dirs.append(out)
        if is_complete(out, "train"):
            done_flops += rung["flops"]
            continue
        if progress:
            eta = ""
            if done_flops and time.time() - t0 > 1:
                rate = done_flops / (time.time() - t0)
                eta = f", ladder ETA {(total - done_flops) / rate / 60:.1f} min" if rate else ""
            print(f"[ladder {i + 1}/{len(plan['rungs'])}] {rung['name']}: N={rung['N']:.3g} D={rung['D']:.3g} "
                  f"({done_flops / total:.0%} of ladder compute done{eta})", flush=True)
        tcfg = rung_train_config(rung, cfg, plan["data"], out)
        train(tcfg, resume="auto", progress=progress)
        done_flops += rung["flops"]
    man = Manifest(ladder_dir, "ladder", plan["config"])
    for d in dirs:
        man.add_input(d.name, d)
    man.set_metrics(rungs=len(dirs), total_flops=total)
    man.finish()
    return dirs

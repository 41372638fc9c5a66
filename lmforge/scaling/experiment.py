"""The whole predict-then-launch workflow as one resumable function: ``lmforge ladder experiment``.

    data -> tokenizer -> ladder plan (sized from the target's compute) -> ladder run -> fit
         -> pick the target's depth and tokens from the fit -> forecast (written before launch)
         -> target run -> check the forecast -> plot, cost ledger, report

Every stage writes into OUT and is skipped when its output is complete, so an interrupted
experiment picks up where it stopped (an interrupted training run resumes from its
checkpoint). The forecast is written once, before the target starts, and never rewritten.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.cost.catalog import check_hardware
from lmforge.cost.ledger import ledger
from lmforge.data.shards import INDEX
from lmforge.errors import LmforgeError
from lmforge.model.model import ModelConfig, flops_per_token, param_counts
from lmforge.rundir import atomic_write_json, atomic_write_text, is_complete, read_manifest
from lmforge.scaling.fit import Point, backtest
from lmforge.scaling.forecast import best_depth, check_forecast, fit_runs, forecast, load_fit, plot_fit, train_with_forecast
from lmforge.scaling.ladder import LadderConfig, create_ladder, load_ladder, run_ladder, rung_hparams, rung_train_config, rung_warmup
from lmforge.tokenizer.encode import build_token_data

FORECAST_FILE = "forecast.json"


@dataclass
class ExperimentConfig:
    sources: list = field(default_factory=lambda: ["default:stdlib+site"])
    vocab_size: int = 4096
    depths: list = field(default_factory=lambda: [2, 3])
    tokens: list = field(default_factory=lambda: [1e6, 2e6, 3e6, 4e6, 6e6, 8e6])
    target_flops: float = 7.5e14  # the launch being forecast; rungs stay under 1/10 of it, the ladder under 1/3
    context: int = 256
    eval_windows: int = 1024
    n_boot: int = 200
    seed: int = 1337
    hardware: str = "cpu"

    def __post_init__(self):
        if self.target_flops <= 0:
            raise LmforgeError(f"experiment.target_flops = {self.target_flops}: must be positive")
        self.hardware = check_hardware(self.hardware, what="experiment.hardware")


def _prepare_data(cfg: ExperimentConfig, out: Path, say) -> Path:
    data, tok = out / "data", out / "tokenizer"
    if (data / "tokens" / INDEX).exists() and is_complete(data):
        say(f"data: up to date in {data}")
        return data
    build_token_data(cfg.sources, data, tok, vocab_size=cfg.vocab_size, say=say)
    return data


def target_plan(fit_dir: Path, ladder: dict, cfg: ExperimentConfig) -> dict:
    """The target run: the depth the fit prefers for ``target_flops``, trained with the ladder's size rules."""
    nd, _, d = load_fit(fit_dir)
    family = d["model"]
    # The target must not repeat data, or its loss measures memorisation the law never saw.
    pick = best_depth(nd, cfg.target_flops, family["vocab_size"], family["context"],
                      max_tokens=ladder["train_tokens_available"])
    lcfg = LadderConfig(**ladder["config"])
    model = ModelConfig(depth=pick["depth"], vocab_size=family["vocab_size"], context=family["context"])
    hp = rung_hparams(model, lcfg)
    tokens_per_step = hp["batch_size"] * cfg.context
    steps = max(10, round(cfg.target_flops / flops_per_token(model) / tokens_per_step))
    D = steps * tokens_per_step
    return {"name": f"target-d{pick['depth']}", "depth": pick["depth"], "N": param_counts(model)["non_embedding"],
            "D": D, "steps": steps, "flops": flops_per_token(model) * D, "lr": hp["lr"], "batch_size": hp["batch_size"],
            "warmup_steps": rung_warmup(steps, lcfg), "tokens_per_param": D / pick["N"]}


def run_experiment(out, cfg: ExperimentConfig | None = None, progress: bool = True) -> dict:
    """Run (or resume) the experiment in ``out``; return the report dict (also written to report.json)."""
    cfg = cfg or ExperimentConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    t0 = time.time()
    cfg_path = out / "experiment.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != json.loads(json.dumps(asdict(cfg))):
        raise LmforgeError(f"{cfg_path}: {out} holds an experiment with a different config; use a new --out")
    atomic_write_json(cfg_path, asdict(cfg))

    data = _prepare_data(cfg, out, say)

    ladder_dir = out / "ladder"
    if not (ladder_dir / "ladder.json").exists():
        lcfg = LadderConfig(depths=list(cfg.depths), tokens=list(cfg.tokens), context=cfg.context,
                            eval_windows=cfg.eval_windows, seed=cfg.seed, hardware=cfg.hardware)
        create_ladder(ladder_dir, lcfg, str(data), target_flops=cfg.target_flops)
    ladder = load_ladder(ladder_dir)
    if len(ladder["rungs"]) < 5:
        raise LmforgeError(f"{ladder_dir}: only {len(ladder['rungs'])} rungs fit under the target's limits (each rung "
                           f"<= {cfg.target_flops / 10:.3g} FLOPs, all <= {cfg.target_flops / 3:.3g}), and a fit needs 5; "
                           "raise --target-flops or add smaller depths or token budgets")
    say(f"ladder: {len(ladder['rungs'])} rungs, {ladder['total_flops']:.3g} FLOPs "
        f"({ladder['total_flops'] / cfg.target_flops:.1%} of the target's), largest rung "
        f"{max(r['flops'] for r in ladder['rungs']):.3g} FLOPs")
    t_ladder = time.time()
    run_ladder(ladder_dir, progress=progress)
    ladder_wall = time.time() - t_ladder

    fit_dir = out / "fit"
    fit_runs([ladder_dir], fit_dir, n_boot=cfg.n_boot)
    target = target_plan(fit_dir, ladder, cfg)
    fc_path = out / FORECAST_FILE
    if not fc_path.exists():
        fc = forecast(fit_dir, target["N"], target["D"], target["flops"])
        atomic_write_json(fc_path, {"made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "target": target, "forecast": fc})
    made = json.loads(fc_path.read_text())
    fc, target = made["forecast"], made["target"]
    say(f"forecast for {target['name']} (N={target['N']:.3g}, D={target['D']:.3g}, C={target['flops']:.3g}): "
        f"{fc['loss']:.4f}, 80% [{fc['interval_80'][0]:.4f}, {fc['interval_80'][1]:.4f}], "
        f"95% [{fc['interval_95'][0]:.4f}, {fc['interval_95'][1]:.4f}] (made {made['made_at']})")

    target_dir = out / "target"
    tcfg = rung_train_config(target, LadderConfig(**ladder["config"]), str(data), target_dir)
    tcfg.eval_every = max(1, target["steps"] // 10)
    if not is_complete(target_dir):
        say(f"target: depth {target['depth']}, {target['steps']} steps -> {target_dir}")
        train_with_forecast(tcfg, fit_dir / "fit.json", resume="auto", progress=progress)
    check = check_forecast(target_dir)
    png = plot_fit(fit_dir, out / "scaling.png", forecast_point=fc, actual=check["actual"])

    nd, c, fitd = load_fit(fit_dir)
    ledg = ledger([ladder_dir, target_dir])
    rungs = []
    for r in ladder["rungs"]:
        m = read_manifest(ladder_dir / "rungs" / r["name"])["metrics"]
        rungs.append({"name": r["name"], "N": r["N"], "D": m["tokens"], "tokens_per_param": m["tokens"] / r["N"],
                      "flops": m["model_flops"], "epochs": m["epochs"], "val_loss": m["final_val_loss"],
                      "train_time_s": m["train_time_s"], "batch_size": r["batch_size"], "lr": r["lr"],
                      "fitted": nd.predict(r["N"], m["tokens"])})
    tm = read_manifest(target_dir)["metrics"]
    report = {
        "config": asdict(cfg), "corpus_hash": read_manifest(data)["metrics"].get("corpus_hash"),
        "train_tokens_available": ladder["train_tokens_available"], "rungs": rungs,
        "backtest": backtest([Point(**q) for q in fitd["points"]]),
        "fit": {"params": nd.params, "stderr": nd.stderr, "rmse_log": nd.rmse_log, "warnings": nd.warnings,
                "compute_only": {"params": c.params, "stderr": c.stderr, "rmse_log": c.rmse_log}},
        "target": {**target, "epochs": tm["epochs"], "train_time_s": tm["train_time_s"], "val_loss": tm["final_val_loss"],
                   "mfu": tm.get("mfu"), "guard": tm.get("guard")},
        "forecast": {**fc, "made_at": made["made_at"]}, "check": check,
        "ladder_share_of_flops": ledg["groups"].get(f"ladder:{ladder_dir.name}", {}).get("share_of_flops"),
        "ledger_total": ledg["total"], "ladder_wall_s_this_call": round(ladder_wall, 1),
        "wall_s_this_call": round(time.time() - t0, 1), "plot": str(png),
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_report(report))
    say(f"forecast {check['forecast']:.4f} vs actual {check['actual']:.4f}: error {check['error_pct']:+.2f}%, "
        f"{'inside' if check['in_80'] else 'outside'} the 80% interval; report in {out / 'report.md'}")
    return report


def render_report(r: dict) -> str:
    """The report as Markdown tables, ready to paste into docs/scaling.md."""
    lines = ["| rung | N (non-emb) | D tokens | tokens/param | epochs | batch | lr | FLOPs | train time | val loss | fit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in r["rungs"]:
        lines.append(f"| {g['name']} | {g['N']:,} | {g['D']:,} | {g['tokens_per_param']:.1f} | {g['epochs']:.3f} | "
                     f"{g['batch_size']} | {g['lr']:.2g} | {g['flops']:.3g} | {g['train_time_s']:.0f} s | "
                     f"{g['val_loss']:.4f} | {g['fitted']:.4f} |")
    f = r["fit"]
    lines += ["", "| parameter | value | bootstrap s.e. |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.4g} | {f['stderr'].get(k, math.nan):.2g} |" for k, v in f["params"].items()]
    lines += ["", f"log-residual RMS {f['rmse_log']:.4f}; warnings: {'; '.join(f['warnings']) or 'none'}"]
    for b in r.get("backtest", []):
        lines += [f"backtest: refitted without {b['name']} ({b['compute_vs_fitted']:.2g}x the compute of the largest "
                  f"rung left in), the law predicts {b['predicted']:.4f} for it; actual {b['actual']:.4f}, "
                  f"error {b['error_pct']:+.2f}%"]
    t, fc, ck = r["target"], r["forecast"], r["check"]
    lines += ["", "| | |", "|---|---|",
              f"| target | depth {t['depth']}, N = {t['N']:,}, D = {t['D']:,} ({t['tokens_per_param']:.1f} tokens/param, "
              f"{t['epochs']:.3f} epochs), C = {t['flops']:.3g} FLOPs |",
              f"| forecast (made {fc['made_at']}) | {fc['loss']:.4f} |",
              f"| 80% interval | [{fc['interval_80'][0]:.4f}, {fc['interval_80'][1]:.4f}] |",
              f"| 95% interval | [{fc['interval_95'][0]:.4f}, {fc['interval_95'][1]:.4f}] |",
              f"| actual final val loss | {ck['actual']:.4f} |",
              f"| error | {ck['error_pct']:+.2f}% ({'inside' if ck['in_80'] else 'outside'} the 80% interval, "
              f"{'inside' if ck['in_95'] else 'outside'} the 95%) |",
              f"| target train time | {t['train_time_s']:.0f} s (MFU {t['mfu'] or 0:.1%}) |",
              f"| ladder share of all FLOPs | {r['ladder_share_of_flops']:.1%} |",
              f"| total | {r['ledger_total']['flops']:.3g} FLOPs, {r['ledger_total']['wall_s'] / 3600:.2f} h, "
              f"{r['ledger_total']['kwh']:.3f} kWh, ${r['ledger_total']['usd']:.3f}, {r['ledger_total']['co2_kg']:.3f} kg CO2 |"]
    return "\n".join(lines) + "\n"

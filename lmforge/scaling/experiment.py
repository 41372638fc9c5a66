"""The whole predict-then-launch workflow as one resumable function: ``lmforge ladder experiment``.

    data -> tokenizer -> pilot: where the loss curve reaches its tail (regime.py)
         -> ladder designed from the targets, every rung on the tail (design.py) -> ladder run -> fit
         -> a forecast for every target, written with its time before any target starts
         -> the targets, one after another -> check each forecast -> plot, cost ledger, report

Every stage writes into OUT and is skipped when its output is complete, so an interrupted
experiment picks up where it stopped (an interrupted training run resumes from its
checkpoint). The forecasts are written once, before the first target starts, and never rewritten.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmforge.cost.catalog import check_hardware
from lmforge.cost.hw import cpu_name
from lmforge.cost.ledger import ledger
from lmforge.data.shards import INDEX, open_tokens
from lmforge.errors import LmforgeError
from lmforge.rundir import atomic_write_json, atomic_write_text, is_complete, read_manifest
from lmforge.scaling.design import design_ladder, ladder_flops, run_spec, smallest_feasible
from lmforge.scaling.fit import Point, backtest
from lmforge.scaling.forecast import check_forecast, fit_runs, forecast, load_fit, load_law, plot_fit, train_with_forecast
from lmforge.scaling.ladder import LadderConfig, create_ladder, load_ladder, run_ladder, rung_train_config
from lmforge.scaling.regime import tail_onset
from lmforge.tokenizer.encode import build_token_data
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import val_curve
from lmforge.train.trainer import train

FORECAST_FILE = "forecast.json"
DESIGN_FILE = "design.json"
PILOT_FILE = "pilot.json"
PILOT_SHARE = 6.0  # the pilot spends at most 1/6 of the smallest target: half of what pilot and ladder may


@dataclass
class ExperimentConfig:
    sources: list = field(default_factory=lambda: ["default:stdlib+site"])
    vocab_size: int = 4096
    # The launches being forecast. The ladder is designed from them (rungs <= 1/10 and the ladder
    # <= 1/3 of the smallest); the second is > 25x the largest rung.
    target_flops: list = field(default_factory=lambda: [2.5e14, 4.2e14])
    target_depths: list = field(default_factory=list)  # empty: chosen by design.pick_target_depths
    aspect: int = 32  # width per layer; small enough that a 2-core CPU can afford three depths of rungs
    min_steps: int = 400  # the shortest rung: past the first few hundred steps' transient (docs/scaling.md, "Schedules")
    # Sequences per step at 1M parameters (the size rule scales it by N^(1/3)): below 1M parameters the
    # rungs are step-limited, and half the width-64 reference trains them further per token at the same speed.
    batch_ref: int = 8
    context: int = 256
    eval_windows: int = 1024
    n_boot: int = 200
    # Before the design, one run at the smallest target's depth at constant lr, evaluated pilot_evals
    # times, finds where the loss curve reaches its power-law tail; no rung trains on fewer tokens.
    pilot: bool = True
    pilot_evals: int = 32
    seed: int = 1337
    precision: str = "auto"
    hardware: str = "cpu"

    def __post_init__(self):
        if isinstance(self.target_flops, (int, float)):
            self.target_flops = [self.target_flops]
        if not self.target_flops or any(c <= 0 for c in self.target_flops):
            raise LmforgeError(f"experiment.target_flops = {self.target_flops}: give positive budgets")
        self.hardware = check_hardware(self.hardware, what="experiment.hardware")


def _prepare_data(cfg: ExperimentConfig, out: Path, say) -> Path:
    data, tok = out / "data", out / "tokenizer"
    if (data / "tokens" / INDEX).exists() and is_complete(data):
        say(f"data: up to date in {data}")
        return data
    build_token_data(cfg.sources, data, tok, vocab_size=cfg.vocab_size, say=say)
    return data


def ladder_base(cfg: ExperimentConfig) -> LadderConfig:
    """The size rules every rung and target of the experiment follows."""
    # One warmup rule for rungs and targets alike: 200 steps, at most half the run (warmup_frac 0).
    return LadderConfig(aspect=cfg.aspect, context=cfg.context, eval_windows=cfg.eval_windows, seed=cfg.seed,
                        precision=cfg.precision, hardware=cfg.hardware, warmup_frac=0.0, batch_ref=cfg.batch_ref)


def pilot_depth(cfg: ExperimentConfig, vocab_size: int, max_tokens: float) -> int:
    """The smallest target's depth, as designed without a token floor: the rungs there must be on
    the tail for its forecast, and the deeper rungs reach the tail no later (docs/scaling.md)."""
    d = design_ladder(cfg.target_flops, ladder_base(cfg), vocab_size, max_tokens=max_tokens,
                      target_depths=cfg.target_depths or None, min_steps=cfg.min_steps)
    return min(t["depth"] for t in d["targets"])


def constant_lr_config(spec: dict, base: LadderConfig, data: Path, out_dir: Path, vocab_size: int, n_evals: int,
                       eval_windows: int) -> TrainConfig:
    """A pilot run of ``spec`` (design.run_spec): the size rules' lr and batch, constant after the
    common warmup, evaluated ``n_evals`` times on ``eval_windows`` val windows."""
    tcfg = rung_train_config(spec, base, str(data), out_dir)
    tcfg.model.vocab_size = vocab_size
    tcfg.schedule, tcfg.warmup_steps = "constant", base.warmup_min_steps
    tcfg.eval_every = max(1, spec["steps"] // n_evals)
    tcfg.eval_batches = max(1, eval_windows // spec["batch_size"])
    return tcfg


def pilot_onset(tcfg: TrainConfig) -> tuple[list[tuple[int, float]], dict]:
    """A finished pilot's val curve in tokens, and where it reached its tail (regime.tail_onset)."""
    per_step = tcfg.batch_size * tcfg.model.context
    curve = [(s * per_step, v) for s, v in val_curve(tcfg.out)]
    return curve, tail_onset(curve, after_tokens=tcfg.warmup_steps * per_step)


def pilot_config(cfg: ExperimentConfig, data: Path, out_dir: Path) -> TrainConfig:
    """The pilot: the smallest target's depth on 1/PILOT_SHARE of that target's compute (within
    one epoch), evaluated ``pilot_evals`` times on a quarter of the ladder's val windows."""
    _, td = open_tokens(data)
    base, max_tokens = ladder_base(cfg), len(td.split("train"))
    depth = pilot_depth(cfg, td.vocab_size, max_tokens)
    per_token = run_spec("pilot", depth, 1, base, td.vocab_size)["flops_per_token"]
    tokens = min(min(cfg.target_flops) / PILOT_SHARE / per_token, max_tokens)
    spec = run_spec(f"pilot-d{depth}", depth, tokens, base, td.vocab_size)
    return constant_lr_config(spec, base, data, out_dir, td.vocab_size, cfg.pilot_evals, cfg.eval_windows // 4)


def _pilot(cfg: ExperimentConfig, out: Path, data: Path, say) -> dict | None:
    """Where this corpus's loss curve reaches its tail (``pilot.json``), measured once."""
    if not cfg.pilot:
        return None
    path = out / PILOT_FILE
    if path.exists():
        return json.loads(path.read_text())
    tcfg = pilot_config(cfg, data, out / "pilot")
    say(f"pilot: depth {tcfg.model.depth}, {tcfg.max_steps} steps at constant lr, {cfg.pilot_evals} evaluations")
    man = train(tcfg, resume="auto", progress=False)
    try:
        curve, onset = pilot_onset(tcfg)
    except ValueError as e:
        raise LmforgeError(f"{out / 'pilot'}: {e}; the pilot trains on 1/{PILOT_SHARE:g} of the smallest target, "
                           "so raise --target-flops") from None
    m = man["metrics"]
    rec = {"depth": tcfg.model.depth, "tokens": m["tokens"], "flops": m["model_flops"], "train_time_s": m["train_time_s"],
           "flops_per_s": m["model_flops"] / max(m["train_time_s"], 1e-9), "curve": curve,
           "onset_tokens": onset["onset_tokens"], "slopes": onset["slopes"], "reason": onset["reason"]}
    atomic_write_json(path, rec)
    return rec


def _infeasible(cfg: ExperimentConfig, err: str, pilot: dict, data: Path, min_tokens: float,
                at_least: bool = False) -> LmforgeError:
    """``err``, with the smallest targets (same ratios) whose ladder keeps the rules with rungs of
    ``min_tokens`` or more, and about how long that experiment would take at the pilot's rate.
    ``at_least``: the onset lies beyond ``min_tokens``, so those budgets are a lower bound."""
    _, td = open_tokens(data)
    base = ladder_base(cfg)
    found = smallest_feasible(cfg.target_flops, base, td.vocab_size, len(td.split("train")),
                              target_depths=cfg.target_depths or None, min_steps=cfg.min_steps, min_tokens=min_tokens,
                              reserved=pilot["flops"])
    if found is None:
        return LmforgeError(f"{err}; no target budget within 10,000x keeps the rules within one epoch of this corpus")
    scale, d = found
    total = (pilot["flops"] + ladder_flops(d["ladder"].budgets, d["ladder"], td.vocab_size)
             + sum(t["flops"] for t in d["targets"]))
    hours = total / pilot["flops_per_s"] / 3600
    budgets = ",".join(f"{c * scale:.2g}" for c in cfg.target_flops)
    epochs = max(t["D"] for t in d["targets"]) / len(td.split("train"))
    repeat = f", and a target would see {epochs:.1f} epochs of this corpus's train split" if epochs > 1 else ""
    return LmforgeError(f"{err}. The smallest targets in the same ratios whose rungs all train on "
                        f"{'more than ' if at_least else ''}{min_tokens:.3g} tokens are --target-flops {budgets}"
                        f"{' at least' if at_least else ''}: about {hours:.1f} device-hours for the whole experiment "
                        f"at the pilot's {pilot['flops_per_s']:.3g} FLOP/s{repeat}")


def _design(cfg: ExperimentConfig, out: Path, data: Path, say, pilot: dict | None = None) -> tuple[dict, list[dict]]:
    """The ladder plan and the targets, designed once and then read back."""
    ladder_dir = out / "ladder"
    if not (out / DESIGN_FILE).exists():
        _, td = open_tokens(data)
        base, max_tokens = ladder_base(cfg), len(td.split("train"))
        tail = {"min_tokens": pilot["onset_tokens"], "reserved": pilot["flops"]} if pilot else {}
        try:
            d = design_ladder(cfg.target_flops, base, td.vocab_size, max_tokens=max_tokens,
                              target_depths=cfg.target_depths or None, min_steps=cfg.min_steps, **tail)
        except LmforgeError as e:
            raise (_infeasible(cfg, str(e), pilot, data, pilot["onset_tokens"]) if pilot else e) from None
        if pilot:
            d["notes"].append(f"every rung trains on at least {pilot['onset_tokens']:.3g} tokens, where the pilot's "
                              f"loss curve reached its tail ({pilot['reason']})")
        create_ladder(ladder_dir, d["ladder"], str(data))
        atomic_write_json(out / DESIGN_FILE, {"targets": d["targets"], "rung_cap_flops": d["rung_cap_flops"],
                                              "notes": d["notes"]})
    design = json.loads((out / DESIGN_FILE).read_text())
    ladder = load_ladder(ladder_dir)
    largest = max(r["flops"] for r in ladder["rungs"])
    say(f"ladder: {len(ladder['rungs'])} rungs at depths {ladder['config']['depths']}, {ladder['total_flops']:.3g} FLOPs "
        f"({ladder['total_flops'] / min(cfg.target_flops):.1%} of the smallest target), largest rung {largest:.3g}")
    for t in design["targets"]:
        say(f"  {t['name']}: N={t['N']:,} D={t['D']:,} C={t['flops']:.3g} ({t['flops'] / largest:.1f}x the largest rung)")
    for n in design["notes"]:
        say(f"  note: {n}")
    return ladder, design["targets"]


def _forecasts(fit_dir: Path, targets: list[dict], out: Path) -> dict:
    """Every target's forecast, written once before any target starts."""
    path = out / FORECAST_FILE
    if not path.exists():
        made = {"made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "targets": [{"target": t, "forecast": forecast(fit_dir, t["N"], t["D"], t["flops"])} for t in targets]}
        atomic_write_json(path, made)
    return json.loads(path.read_text())


def _run_target(entry: dict, ladder: dict, data: Path, fit_dir: Path, out: Path, progress: bool, say) -> Path:
    t = entry["target"]
    target_dir = out / t["name"]
    tcfg = rung_train_config(t, LadderConfig(**ladder["config"]), str(data), target_dir)
    tcfg.eval_every = max(1, t["steps"] // 10)
    if is_complete(target_dir):
        return target_dir
    if not (fit_dir / "fit.json").exists():
        raise LmforgeError(f"{fit_dir / 'fit.json'} is missing, so {t['name']} has no forecast to train against")
    launch = target_dir.parent / f"{t['name']}.launch.json"
    if not launch.exists():  # the first launch; the first step follows within seconds
        atomic_write_json(launch, {"launched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    fc = entry["forecast"]
    say(f"{t['name']}: depth {t['depth']}, {t['steps']} steps; forecast {fc['loss']:.4f} "
        f"80% [{fc['interval_80'][0]:.4f}, {fc['interval_80'][1]:.4f}]")
    train_with_forecast(tcfg, fit_dir / "fit.json", resume="auto", progress=progress)
    return target_dir


def run_experiment(out, cfg: ExperimentConfig | None = None, progress: bool = True, only: list[str] | None = None) -> dict:
    """Run (or resume) the experiment in ``out``; return the report dict (also written to report.json).

    ``only`` trains just the named targets (``target2-d4``, or ``target2``), so separate processes
    or machines can train targets side by side once the forecasts exist; the report is written by
    whichever call finds every target finished, and until then the return value lists the pending ones."""
    cfg = cfg or ExperimentConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    cfg_path = out / "experiment.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != json.loads(json.dumps(asdict(cfg))):
        raise LmforgeError(f"{cfg_path}: {out} holds an experiment with a different config; use a new --out")
    atomic_write_json(cfg_path, asdict(cfg))

    data = _prepare_data(cfg, out, say)
    pilot = _pilot(cfg, out, data, say)
    if pilot and pilot["onset_tokens"] is None:
        raise _infeasible(cfg, f"{out / PILOT_FILE}: the pilot's loss curve is {pilot['reason'].split(':')[0]}; it "
                               f"trained on 1/{PILOT_SHARE:g} of the smallest target, more than any rung may, so every "
                               "rung would stop before the tail the targets reach", pilot, data, pilot["tokens"],
                          at_least=True)
    ladder, targets = _design(cfg, out, data, say, pilot)
    ladder_dir = out / "ladder"
    if len(ladder["rungs"]) < 5:
        raise LmforgeError(f"{ladder_dir}: only {len(ladder['rungs'])} rungs fit the rules, and a fit needs 5; "
                           "raise --target-flops")
    run_ladder(ladder_dir, progress=progress)
    fit_dir = out / "fit"
    if not (fit_dir / "fit.json").exists() or not (out / FORECAST_FILE).exists():
        fit_runs([ladder_dir], fit_dir, n_boot=cfg.n_boot)
    made = _forecasts(fit_dir, targets, out)
    if not (out / "prelaunch.json").exists():
        write_prelaunch_record(out, ladder, made)
    say(f"forecasts made {made['made_at']} (record: {out / 'prelaunch.json'})")
    names = [e["target"]["name"] for e in made["targets"]]
    unknown = [n for n in only or [] if not any(n in (full, full.split("-")[0]) for full in names)]
    if unknown:
        raise LmforgeError(f"--target {', '.join(unknown)}: no such target; this experiment's are {', '.join(names)}")
    for e in made["targets"]:
        name = e["target"]["name"]
        if not only or any(n in (name, name.split("-")[0]) for n in only):
            _run_target(e, ladder, data, fit_dir, out, progress, say)
    pending = [n for n in names if not is_complete(out / n)]
    if pending:
        say(f"waiting for {', '.join(pending)}; run the experiment again once they finish for the report")
        return {"pending": pending}
    target_dirs = [out / n for n in names]
    report = build_report(out, cfg, ladder, made, target_dirs)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_report(report))
    for t in report["targets"]:
        say(f"{t['name']}: forecast {t['forecast']:.4f} vs actual {t['actual']:.4f}: error {t['error_pct']:+.2f}%, "
            f"{'inside' if t['in_80'] else 'outside'} the 80% interval")
    say(f"report in {out / 'report.md'}")
    return report


def rung_rows(ladder_dir: Path, ladder: dict, nd) -> list[dict]:
    """Each finished rung's size, budget, hyperparameters, result and the fitted law's value for it."""
    rows = []
    for r in ladder["rungs"]:
        m = read_manifest(ladder_dir / "rungs" / r["name"])["metrics"]
        rows.append({"name": r["name"], "depth": r["depth"], "N": r["N"], "D": m["tokens"], "steps": r["steps"],
                     "warmup_steps": r["warmup_steps"], "tokens_per_param": m["tokens"] / r["N"],
                     "flops": m["model_flops"], "epochs": m["epochs"], "val_loss": m["final_val_loss"],
                     "train_time_s": m["train_time_s"], "batch_size": r["batch_size"], "lr": r["lr"],
                     "precision": m.get("precision"), "fitted": nd.predict(r["N"], m["tokens"])})
    return rows


def write_prelaunch_record(out: Path, ladder: dict, made: dict) -> Path:
    """``prelaunch.json``: what was known when the forecasts were made (the rungs, the chosen law,
    the forecasts and their time), for committing before any target trains."""
    nd, _, fitd = load_fit(out / "fit")
    law = load_law(fitd)
    rec = {"corpus_hash": read_manifest(out / "data")["metrics"].get("corpus_hash"),
           "design": json.loads((out / DESIGN_FILE).read_text()), "ladder_flops": ladder["total_flops"],
           "rungs": rung_rows(out / "ladder", ladder, nd),
           "fit": {"form": law.chosen if law else "ND", "params": nd.params, "rmse_log": nd.rmse_log,
                   "selection": law.selection if law else None},
           "forecasts": made, "machine": {"cpu": cpu_name(), "torch": torch.__version__}}
    atomic_write_json(out / "prelaunch.json", rec)
    return out / "prelaunch.json"


def build_report(out: Path, cfg: ExperimentConfig, ladder: dict, made: dict, target_dirs: list[Path]) -> dict:
    """Everything the recorded experiment reports, from the run directories."""
    ladder_dir, fit_dir = out / "ladder", out / "fit"
    nd, c, fitd = load_fit(fit_dir)
    law = load_law(fitd)
    rungs = rung_rows(ladder_dir, ladder, nd)
    precisions = {r["precision"] for r in rungs}
    targets = []
    for entry, tdir in zip(made["targets"], target_dirs):
        t, fc = entry["target"], entry["forecast"]
        m = read_manifest(tdir)["metrics"]
        precisions.add(m.get("precision"))
        launch = json.loads((tdir.parent / f"{t['name']}.launch.json").read_text())
        chk = check_forecast(tdir)
        targets.append({**t, "forecast": fc["loss"], "interval_80": fc["interval_80"], "interval_95": fc["interval_95"],
                        "warnings": fc.get("warnings", []), "forecast_made_at": made["made_at"],
                        "launched_at": launch["launched_at"], "actual": chk["actual"], "error_pct": chk["error_pct"],
                        "in_80": chk["in_80"], "in_95": chk["in_95"], "largest_rung_ratio": t["flops"] / max(
                            r["flops"] for r in rungs), "epochs": m["epochs"], "train_time_s": m["train_time_s"],
                        "mfu": m.get("mfu"), "guard": m.get("guard")})
    points = [Point(**q) for q in fitd["points"]]
    pilot_dir = out / "pilot"
    ledg = ledger([*([pilot_dir] if pilot_dir.exists() else []), ladder_dir, *target_dirs])
    pilot = json.loads((out / PILOT_FILE).read_text()) if (out / PILOT_FILE).exists() else None
    fcs = [{**e["forecast"], "actual": t["actual"]} for e, t in zip(made["targets"], targets)]
    png = plot_fit(fit_dir, out / "scaling.png", forecasts=fcs)
    return {
        "config": asdict(cfg), "corpus_hash": read_manifest(out / "data")["metrics"].get("corpus_hash"),
        "train_tokens_available": ladder["train_tokens_available"],
        "machine": {"cpu": cpu_name(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "precision": sorted(p for p in precisions if p), "rungs": rungs,
        "pilot": pilot, "ladder_flops": ladder["total_flops"], "design_notes": json.loads((out / DESIGN_FILE).read_text())["notes"],
        "fit": {"form": law.chosen if law else "ND", "params": nd.params, "stderr": nd.stderr, "rmse_log": nd.rmse_log,
                "warnings": nd.warnings, "selection": law.selection if law else None, "backtest_calibration": law.backtests if law else None,
                "backtest": backtest(points),
                "compute_only": {"params": c.params, "stderr": c.stderr, "rmse_log": c.rmse_log}},
        "targets": targets,
        "ladder_share_of_flops": ledg["groups"].get(f"ladder:{ladder_dir.name}", {}).get("share_of_flops"),
        "ledger_total": ledg["total"], "plot": str(png),
    }


def render_report(r: dict) -> str:
    """The report as Markdown tables, ready to paste into docs/scaling.md."""
    lines = ["| rung | N (non-emb) | D tokens | tokens/param | steps | warmup | batch | lr | FLOPs | train time | val loss | fit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in r["rungs"]:
        lines.append(f"| {g['name']} | {g['N']:,} | {g['D']:,} | {g['tokens_per_param']:.1f} | {g['steps']} | "
                     f"{g['warmup_steps']} | {g['batch_size']} | {g['lr']:.2g} | {g['flops']:.3g} | "
                     f"{g['train_time_s']:.0f} s | {g['val_loss']:.4f} | {g['fitted']:.4f} |")
    f = r["fit"]
    lines += ["", f"chosen form: **{f['form']}**", "", "| parameter | value | bootstrap s.e. |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.4g} | {f['stderr'].get(k, math.nan) or math.nan:.2g} |" for k, v in f["params"].items()]
    lines += ["", f"log-residual RMS {f['rmse_log']:.4f}; warnings: {'; '.join(f['warnings']) or 'none'}"]
    for note in r.get("design_notes", []):
        lines += [f"design: {note}"]
    lines += ["", "| | " + " | ".join(t["name"] for t in r["targets"]) + " |",
              "|---|" + "---:|" * len(r["targets"])]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(t) for t in r["targets"]) + " |")

    row("depth, N", lambda t: f"{t['depth']}, {t['N']:,}")
    row("D tokens (tokens/param, epochs)", lambda t: f"{t['D']:,} ({t['tokens_per_param']:.0f}, {t['epochs']:.2f})")
    row("compute", lambda t: f"{t['flops']:.3g} FLOPs ({t['largest_rung_ratio']:.1f}x the largest rung)")
    row("forecast made", lambda t: t["forecast_made_at"])
    row("launched", lambda t: t["launched_at"])
    row("forecast", lambda t: f"{t['forecast']:.4f}")
    row("80% interval", lambda t: f"[{t['interval_80'][0]:.4f}, {t['interval_80'][1]:.4f}]")
    row("95% interval", lambda t: f"[{t['interval_95'][0]:.4f}, {t['interval_95'][1]:.4f}]")
    row("actual final val loss", lambda t: f"{t['actual']:.4f}")
    row("error", lambda t: f"{t['error_pct']:+.2f}% ({'inside' if t['in_80'] else 'outside'} 80%, "
                           f"{'inside' if t['in_95'] else 'outside'} 95%)")
    row("train time", lambda t: f"{t['train_time_s']:.0f} s (MFU {t['mfu'] or 0:.1%})")
    tot = r["ledger_total"]
    lines += ["", f"ladder: {r['ladder_flops']:.3g} FLOPs, {r['ladder_share_of_flops']:.1%} of all; total "
              f"{tot['flops']:.3g} FLOPs, {tot['wall_s'] / 3600:.2f} h, {tot['kwh']:.3f} kWh, ${tot['usd']:.3f}, "
              f"{tot['co2_kg']:.3f} kg CO2; precision {', '.join(r['precision'])} on {r['machine']['cpu']}"]
    return "\n".join(lines) + "\n"

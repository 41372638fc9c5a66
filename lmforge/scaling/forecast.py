"""From finished runs to a fitted law, a forecast, a compute plan, and a check of the forecast."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from lmforge.cost.catalog import get_hardware, run_cost
from lmforge.data.shards import open_tokens
from lmforge.errors import LmforgeError
from lmforge.model.model import ModelConfig, flops_per_token, param_counts
from lmforge.rundir import MANIFEST, atomic_write_json, ladder_rungs, update_manifest
from lmforge.scaling.fit import (REFERENCE_FITS, CalibratedLaw, Point, ScalingFit, calibrate, compute_optimal, fit_c,
                                 reference_fit)
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import train

FIT_FILE = "fit.json"


def expand_runs(paths) -> list[Path]:
    """Run directories named directly, or every rung of a ladder directory."""
    out = []
    for p in map(Path, paths):
        rungs = ladder_rungs(p)
        if rungs is not None:
            out += rungs
        elif (p / MANIFEST).exists():
            out.append(p)
        else:
            raise LmforgeError(f"{p}: neither a ladder directory nor a run directory (no {MANIFEST})")
    return out


def collect_points(paths) -> tuple[list[Point], dict]:
    """Final val losses of finished train runs, refusing unfinished runs and mixed data or tokenizers."""
    runs = expand_runs(paths)
    unfinished, points, keys, aspects = [], [], {}, set()
    for r in runs:
        m = r / MANIFEST
        man = json.loads(m.read_text()) if m.exists() else {}
        if man.get("status") != "complete" or man.get("stage") != "train":
            unfinished.append(f"{r} ({man.get('status', 'not started')})")
            continue
        met = man["metrics"]
        inputs = man.get("inputs", {})
        model = man.get("config", {}).get("model", {})
        key = (inputs.get("data", {}).get("token_index_hash"), inputs.get("tokenizer", {}).get("hash"),
               model.get("vocab_size"), model.get("context"))
        keys.setdefault(key, []).append(str(r))
        aspects.add(model.get("aspect", 64))
        points.append(Point(N=float(met["params_non_embedding"]), D=float(met["tokens"]), loss=float(met["final_val_loss"]),
                            C=float(met["model_flops"]), name=r.name))
    if unfinished:
        raise LmforgeError(f"cannot fit on runs that never finished: {', '.join(unfinished[:5])}"
                           f"{' ...' if len(unfinished) > 5 else ''}; finish them (`lmforge ladder run`) or leave them out")
    if len(keys) > 1:
        groups = "; ".join(f"{len(v)} runs like {Path(v[0]).name}" for v in keys.values())
        raise LmforgeError(f"the runs were trained on different data, tokenizers or context lengths ({groups}); "
                           "fit only runs whose manifests record the same token index and tokenizer hashes")
    key = list(keys)[0] if keys else (None, None, None, None)
    # The model family (vocab, context) lets a plan turn a budget into a depth on the same dial.
    meta = {"runs": [str(r) for r in runs], "data_hashes": list(key[:2]),
            "model": {"vocab_size": key[2], "context": key[3], "aspect": aspects.pop() if len(aspects) == 1 else None}}
    return points, meta


def fit_runs(paths, out_dir, form: str = "ND", n_boot: int = 200) -> dict:
    """Fit the runs' final losses and write ``fit.json``. With ``form="ND"`` (the default) every
    L(N, D) form is fitted, one is chosen by backtest, and the calibrated interval data is stored
    under ``law``; ``nd`` stays the Chinchilla fit, for readers of older files."""
    points, meta = collect_points(paths)
    law = calibrate(points, n_boot=n_boot) if form == "ND" else None
    nd = law.fits["ND"] if law else None
    c = fit_c(points, n_boot=n_boot)
    out = {"form": form, "nd": nd.to_json() if nd else None, "c": c.to_json(), "points": [vars(p) for p in points],
           "law": law.to_json() if law else None, **meta}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / FIT_FILE, out)
    return out


def load_fit(path) -> tuple[ScalingFit | None, ScalingFit | None, dict]:
    """(L(N, D) fit or None, L(C) fit or None, the fit file's dict) from a fit.json, its
    directory, or the name of a published fit (``chinchilla``, ``chinchilla-replication``).

    The L(N, D) fit is the form the backtests chose, when the file holds that choice."""
    if str(path) in REFERENCE_FITS:
        return reference_fit(str(path)), None, {"reference": str(path), "points": []}
    p = Path(path)
    if p.is_dir():
        p = p / FIT_FILE
    if not p.exists():
        raise LmforgeError(f"{p}: no fit here; run `lmforge fit LADDER -o DIR` first, or name a published fit: "
                           f"{', '.join(REFERENCE_FITS)}")
    d = json.loads(p.read_text())
    law = load_law(d)
    nd = law.fits[law.chosen] if law else (ScalingFit.from_json(d["nd"]) if d.get("nd") else None)
    return nd, ScalingFit.from_json(d["c"]), d


def load_law(fit_dict: dict) -> CalibratedLaw | None:
    """The calibrated law stored in a fit file's dict, or None (a compute-only fit, an older file)."""
    return CalibratedLaw.from_json(fit_dict["law"]) if fit_dict.get("law") else None


def _interval(law: CalibratedLaw | None, fit: ScalingFit, N: float, D: float, C: float) -> dict:
    """The calibrated interval when the fit has one, else the fit's own bootstrap interval."""
    if law is not None:
        iv = law.interval(N, D, C)
        return {**iv, "interval_80": iv["80%"], "interval_95": iv["95%"]}
    iv = fit.interval(N, D, C)
    return {"loss": iv["loss"], "interval_80": iv["80%"], "interval_95": iv["95%"], "warnings": []}


def forecast(fit_path, N: float, D: float, C: float | None = None) -> dict:
    """Predicted final val loss of a run with N non-embedding parameters and D tokens.

    ``C`` is the run's training FLOPs (``flops_per_token * D``), the quantity the compute-only
    law was fitted on; when it is not known, 6ND stands in for it."""
    nd, c, d = load_fit(fit_path)
    C = C or 6.0 * N * D
    fit = nd or c
    iv = _interval(load_law(d), fit, N, D, C)
    ext = fit.extrapolation(N=N, D=D, C=C)
    warn = []
    far = {k: v for k, v in ext.items() if v > 100 or v < 0.01}
    if far:
        warn.append("forecast far outside the fitted range: " + ", ".join(f"{k} is {v:.3g}x the largest fitted value" for k, v in far.items()))
    elif any(v > 1 for v in ext.values()):
        warn.append("extrapolating beyond the fitted range: " + ", ".join(f"{k} {v:.3g}x" for k, v in ext.items() if v > 1))
    extra = {k: iv[k] for k in ("components", "backtest_coverage", "widening_factor", "forms") if k in iv}
    return {"N": N, "D": D, "C": C, "loss": iv["loss"], "interval_80": iv["interval_80"], "interval_95": iv["interval_95"],
            "form": fit.form, "extrapolation": ext, "warnings": warn + iv["warnings"], **extra,
            "loss_compute_only": c.predict(C=C) if c is not None else None}


def depth_options(nd: ScalingFit, flops: float, vocab_size: int, context: int, max_depth: int = 64,
                  max_tokens: float | None = None, aspect: int = 64) -> list[dict]:
    """Every depth on the dial that can spend ``flops`` on at least one token per parameter (and, with
    ``max_tokens``, on no more tokens than the data holds: no repeated data), with its N, D (from the
    real FLOPs per token, embeddings and attention included) and predicted loss."""
    out = []
    for depth in range(1, max_depth + 1):
        cfg = ModelConfig(depth=depth, aspect=aspect, vocab_size=vocab_size, context=context)
        N, fpt = param_counts(cfg)["non_embedding"], flops_per_token(cfg)
        D = flops / fpt
        if D < N:
            break
        if max_tokens is not None and D > max_tokens:
            continue
        out.append({"depth": depth, "N": N, "D": D, "flops_per_token": fpt, "tokens_per_param": D / N,
                    "loss": nd.predict(N, D)})
    return out


def best_depth(nd: ScalingFit, flops: float, vocab_size: int, context: int, max_tokens: float | None = None,
               aspect: int = 64) -> dict:
    """The depth whose run of ``flops`` the fitted law predicts to end lowest."""
    opts = depth_options(nd, flops, vocab_size, context, max_tokens=max_tokens, aspect=aspect)
    if not opts and max_tokens is not None and depth_options(nd, flops, vocab_size, context, aspect=aspect):
        raise LmforgeError(f"every depth that can use {flops:.3g} FLOPs would need more than the {max_tokens:.3g} "
                           "train tokens the data holds; add data or lower the budget")
    if not opts:
        cfg = ModelConfig(depth=1, aspect=aspect, vocab_size=vocab_size, context=context)
        need = flops_per_token(cfg) * param_counts(cfg)["non_embedding"]
        raise LmforgeError(f"a budget of {flops:.3g} FLOPs is too small for even the smallest model: depth 1 needs "
                           f"{need:.3g} FLOPs for one token per parameter")
    return min(opts, key=lambda o: o["loss"])


def forecast_for_config(fit_path, cfg: TrainConfig) -> dict:
    """The forecast for a training config's run: N from its model, D and C from its steps and batch
    (over the ranks torchrun starts), the vocabulary from its data when the config leaves it at 0."""
    model = cfg.model
    if not model.vocab_size:
        model = dataclasses.replace(model, vocab_size=open_tokens(cfg.data)[1].vocab_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    D = cfg.max_steps * cfg.batch_size * cfg.grad_accum * world * model.context
    return forecast(fit_path, param_counts(model)["non_embedding"], D, flops_per_token(model) * D)


def train_with_forecast(cfg: TrainConfig, fit_path, resume="never", progress: bool = True) -> dict:
    """Record the fit's forecast in the run's manifest before the first step, train, then check it."""
    fc = forecast_for_config(fit_path, cfg)
    main = os.environ.get("RANK", "0") == "0"
    if main:
        print(f"forecast: final val loss {fc['loss']:.4f} (80% {fc['interval_80'][0]:.4f}-{fc['interval_80'][1]:.4f}, "
              f"95% {fc['interval_95'][0]:.4f}-{fc['interval_95'][1]:.4f})", flush=True)
        for w in fc["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    man = train(cfg, resume=resume, progress=progress, record={"forecast": {**fc, "fit": str(Path(fit_path).resolve())}})
    if not man:  # ranks other than 0
        return man
    chk = check_forecast(cfg.out)
    print(f"forecast {chk['forecast']:.4f} vs actual {chk['actual']:.4f}: error {chk['error_pct']:+.2f}%, "
          f"{'inside' if chk['in_80'] else 'outside'} the 80% interval", flush=True)
    return update_manifest(cfg.out, forecast_check=chk)


def check_forecast(run_dir) -> dict:
    man = json.loads((Path(run_dir) / MANIFEST).read_text())
    fc = man.get("forecast")
    if not fc:
        raise LmforgeError(f"{run_dir}: the run has no forecast; train with --forecast FIT to record one")
    actual = man.get("metrics", {}).get("final_val_loss")
    if actual is None or man.get("status") != "complete":
        raise LmforgeError(f"{run_dir}: the run has not finished, so there is nothing to check yet")
    err = (actual - fc["loss"]) / actual
    return {"forecast": fc["loss"], "actual": actual, "error_pct": 100 * err,
            "in_80": fc["interval_80"][0] <= actual <= fc["interval_80"][1],
            "in_95": fc["interval_95"][0] <= actual <= fc["interval_95"][1],
            "interval_80": fc["interval_80"], "interval_95": fc["interval_95"]}


def plan_compute(fit_path, flops: float | None = None, dollars: float | None = None, device_hours: float | None = None,
                 hardware: str = "H100", mfu: float = 0.4, gpus: int | None = None, days: float | None = None,
                 smallest_N: float | None = None, catalog=None, max_tokens: float | None = None) -> dict:
    """Compute-optimal N and D for a budget, with wall-clock, dollars and kWh on named hardware.

    Exactly one budget form: FLOPs, dollars, device-hours, or (gpus, days) for the reverse question."""
    hw = get_hardware(hardware, catalog)
    flops_per_device_hour = hw.peak_bf16 * mfu * 3600
    given = [x is not None for x in (flops, dollars, device_hours)] + [gpus is not None or days is not None]
    if sum(given) != 1:
        raise LmforgeError("give exactly one budget: --flops, --dollars, --device-hours, or --gpus with --days")
    if gpus is not None or days is not None:
        if not gpus or not days:
            raise LmforgeError("the reverse plan needs both --gpus and --days")
        device_hours = gpus * days * 24
    if dollars is not None:
        device_hours = dollars / hw.usd_per_hour
    if device_hours is not None:
        flops = device_hours * flops_per_device_hour
    if not flops or flops <= 0:
        raise LmforgeError("the budget must be positive")
    dh = flops / flops_per_device_hour
    out = {"flops": flops, "hardware": hw.name, "mfu": mfu, "device_hours": dh, "cost": run_cost(dh, hw)}
    if gpus:
        out["wall_days"] = dh / gpus / 24
        out["gpus"] = gpus
    if fit_path:
        nd, c, d = load_fit(fit_path)
        if nd is not None:
            opt = compute_optimal(nd, flops)
            if smallest_N and opt["N"] < smallest_N:
                raise LmforgeError(f"a budget of {flops:.3g} FLOPs is too small for even the smallest model "
                                   f"({smallest_N:.3g} parameters)")
            iv = _interval(load_law(d), nd, opt["N"], opt["D"], flops)
            out.update(N=opt["N"], D=opt["D"], tokens_per_param=opt["tokens_per_param"], loss=iv["loss"],
                       interval_80=iv["interval_80"], interval_95=iv["interval_95"], form=nd.form)
            family = d.get("model") or {}
            if family.get("vocab_size") and family.get("context"):
                pick = best_depth(nd, flops, family["vocab_size"], family["context"], max_tokens,
                                  aspect=family.get("aspect") or 64)
                fc = forecast(fit_path, pick["N"], pick["D"], flops)
                out["depth_plan"] = {**pick, "interval_80": fc["interval_80"], "interval_95": fc["interval_95"],
                                     "vocab_size": family["vocab_size"], "context": family["context"]}
        else:
            out.update(loss=c.predict(C=flops))
    return out


def plot_fit(fit_path, out_png, forecast_point: dict | None = None, actual: float | None = None,
             forecasts: list[dict] | None = None) -> Path:
    """The rungs, the fitted law and L(C); each forecast (``forecast_point``, or ``forecasts``
    whose entries may carry an ``actual``) with its 80% and 95% intervals and the actual loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    nd, c, d = load_fit(fit_path)
    pts = [Point(**p) for p in d["points"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    Ns = sorted({p.N for p in pts})
    cmap = plt.get_cmap("viridis")
    for i, N in enumerate(Ns):
        col = cmap(i / max(1, len(Ns) - 1))
        sel = sorted([p for p in pts if p.N == N], key=lambda p: p.C)
        ax.scatter([p.C for p in sel], [p.loss for p in sel], color=col, zorder=3, label=f"N={N:.2g}")
        if nd is not None:
            Ds = np.logspace(np.log10(min(p.D for p in sel) / 2), np.log10(max(p.D for p in sel) * 2), 50)
            # the points sit at their measured compute (embeddings and attention included), so the
            # curve uses the same FLOPs per token rather than 6N
            per_token = sel[0].C / sel[0].D
            ax.plot(per_token * Ds, [nd.predict(N, D) for D in Ds], color=col, lw=1, alpha=0.7)
    forecasts = list(forecasts or []) + ([{**forecast_point, "actual": actual}] if forecast_point else [])
    Cmax = max([max(p.C for p in pts) * 30] if not forecasts else [f["C"] * 2 for f in forecasts])
    Cs = np.logspace(np.log10(min(p.C for p in pts) / 2), np.log10(Cmax), 100)
    ax.plot(Cs, [c.predict(C=x) for x in Cs], "k--", lw=1, label="L(C) fit")
    for i, fc in enumerate(forecasts):
        lo, hi = fc["interval_95"]
        lo80, hi80 = fc["interval_80"]
        ax.errorbar([fc["C"]], [fc["loss"]], yerr=[[fc["loss"] - lo], [hi - fc["loss"]]], fmt="none", ecolor="C3", capsize=4, lw=1)
        ax.errorbar([fc["C"]], [fc["loss"]], yerr=[[fc["loss"] - lo80], [hi80 - fc["loss"]]], fmt="s", color="C3", capsize=0, lw=3,
                    label="forecast (80% / 95%)" if i == 0 else None)
        if fc.get("actual") is not None:
            ax.scatter([fc["C"]], [fc["actual"]], marker="*", s=160, color="C1", zorder=4, label=f"actual {fc['actual']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def fmt_params(fit: ScalingFit) -> list[str]:
    def num(x, fmt):  # a value that overflowed on the way to JSON comes back as None
        return format(x, fmt) if x is not None else "inf"

    return [f"{k:>7} = {num(v, '.4g')} ± {num(fit.stderr.get(k, math.nan), '.2g')}" for k, v in fit.params.items()]

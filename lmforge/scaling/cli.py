"""CLI verbs for predictable scaling: ladder plan/run, fit, forecast, plan, cost."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lmforge.config import flag_tree, resolve_config
from lmforge.data.shards import open_tokens
from lmforge.errors import LmforgeError
from lmforge.model.model import flops_per_token, param_counts
from lmforge.progress import console
from lmforge.scaling.design import design_ladder
from lmforge.scaling.experiment import ExperimentConfig, run_experiment
from lmforge.scaling.forecast import (check_forecast, fit_runs, fmt_params, forecast, load_fit, load_law, plan_compute,
                                      plot_fit)
from lmforge.scaling.ladder import LadderConfig, create_ladder, run_ladder
from lmforge.train.config import load_train_config

ladder_app = typer.Typer(help="Plan and run a ladder of small training runs for a scaling-law fit.", no_args_is_help=True)


def si(x: float) -> str:
    """Compact counts for tables: 53.4k, 1.5M, 2.09T."""
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _parse_list(text: str | None, cast, flag: str) -> list | None:
    if text is None:
        return None
    try:
        return [cast(float(x)) if cast is int and float(x).is_integer() else cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LmforgeError(f"{flag} {text!r}: expected comma-separated numbers, for example {flag} 1,2,4") from None


@ladder_app.command("plan")
def ladder_plan_cmd(
    data: Path = typer.Option(Path("runs/default/data"), "--data", help="Tokenized data run directory."),
    out: Path = typer.Option(Path("runs/ladder"), "--out", "-o", help="Ladder directory to create."),
    depths: Optional[str] = typer.Option(None, "--depths", help="Comma-separated depth dial values (default 2,3,4,5; 2 and up: see docs/scaling.md)."),
    multipliers: Optional[str] = typer.Option(None, "--multipliers", help="Token budgets as multiples of 20 tokens/param (default 1,2,5,10)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Fixed token budgets for every depth instead, e.g. 1e6,2e6,4e6."),
    context: Optional[int] = typer.Option(None, "--context", help="Sequence length (default 256)."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Catalog name used to price the rungs (default cpu)."),
    budget: Optional[float] = typer.Option(None, "--budget-flops", help="Drop the largest rungs beyond this total."),
    target: Optional[str] = typer.Option(None, "--target-flops", help="Compute of the run(s) the ladder will forecast, "
                                         "comma-separated: keep each rung under 1/10 of the smallest and the ladder under 1/3."),
    design: bool = typer.Option(False, "--design", help="Design depths and budgets from --target-flops by the rules in "
                                "docs/scaling.md (three depths bracketing the targets, three budgets each)."),
    target_depths: Optional[str] = typer.Option(None, "--target-depths", help="With --design: each target's depth "
                                                "(default: nearest 20 tokens/param)."),
    min_tokens: Optional[float] = typer.Option(None, "--min-tokens", help="With --design: no rung on fewer tokens, e.g. "
                                               "where a pilot's loss curve reached its tail (the experiment's pilot.json)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file whose \\[ladder] table sets any ladder key."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set ladder.lr_ref=2e-3"),
):
    """Propose a grid of rungs and show each rung's cost before anything runs.

    Examples:
      lmforge ladder plan --data runs/default/data --depths 2,3,4,5 -o runs/ladder
      lmforge ladder plan --data runs/big/data --depths 2,3 --tokens 1e6,2e6,4e6,8e6 --target-flops 7.5e14
      lmforge ladder plan --data runs/big/data --target-flops 2.5e14,4.2e14 --design --set ladder.aspect=32

    Precedence: defaults < --config file < --set < flags.
    """
    flags = flag_tree(depths=_parse_list(depths, int, "--depths"), multipliers=_parse_list(multipliers, float, "--multipliers"),
                      tokens=_parse_list(tokens, float, "--tokens"), context=context, hardware=hardware)
    cfg = resolve_config(LadderConfig, "ladder", config, set_, flags)
    targets = _parse_list(target, float, "--target-flops")
    if design:
        if not targets:
            raise LmforgeError("--design needs --target-flops: the ladder is designed from the runs it will forecast")
        _, td = open_tokens(data)
        d = design_ladder(targets, cfg, td.vocab_size, max_tokens=len(td.split("train")),
                          target_depths=_parse_list(target_depths, int, "--target-depths"), min_tokens=min_tokens or 0.0)
        plan = create_ladder(out, d["ladder"], str(data), budget)
        for t in d["targets"]:
            print(f"{t['name']}: depth {t['depth']}, N = {si(t['N'])}, D = {si(t['D'])}, {t['steps']} steps, "
                  f"{si(t['flops'])} FLOPs")
        for note in d["notes"]:
            print(f"note: {note}")
    else:
        plan = create_ladder(out, cfg, str(data), budget, min(targets) if targets else None)
    t = Table(title=f"ladder {out}: {len(plan['rungs'])} rungs")
    for col in ("rung", "N (non-emb)", "D tokens", "tokens/param", "steps", "batch", "lr", "FLOPs", "est. time", "est. $"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in plan["rungs"]:
        t.add_row(r["name"], si(r["N"]), si(r["D"]), f"{r['tokens_per_param']:.3g}", str(r["steps"]), str(r["batch_size"]),
                  f"{r['lr']:.2g}", si(r["flops"]), f"{r['est_seconds'] / 60:.1f} min", f"{r['est_cost']['usd']:.4f}")
    c = console()
    c.print(t)
    c.print(f"total {plan['total_flops']:.3g} FLOPs; largest rung sees {max(r['D'] for r in plan['rungs']) / plan['train_tokens_available']:.2f} epochs "
            f"of the {plan['train_tokens_available']:,} train tokens. Next: lmforge ladder run {out}")


@ladder_app.command("run")
def ladder_run_cmd(ladder: Path = typer.Argument(Path("runs/ladder")), quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Train every rung not yet finished (an interrupted rung resumes from its checkpoint).

    Example: lmforge ladder run runs/ladder
    """
    dirs = run_ladder(ladder, progress=not quiet)
    print(f"{len(dirs)} rungs finished in {ladder}/rungs. Next: lmforge fit {ladder}")


@ladder_app.command("experiment")
def ladder_experiment_cmd(
    out: Path = typer.Option(Path("runs/scaling"), "--out", "-o", help="Experiment directory; re-running resumes it."),
    target_flops: Optional[str] = typer.Option(
        None, "--target-flops", help="Compute of each target run being forecast, comma-separated "
        f"(default {','.join(f'{c:g}' for c in ExperimentConfig().target_flops)})."),
    target_depths: Optional[str] = typer.Option(None, "--target-depths",
                                                help="Depth of each target (default: the depth nearest 20 tokens/param)."),
    source: Optional[List[str]] = typer.Option(None, "--source", "-s", help="Corpus (default: default:stdlib+site)."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Catalog hardware for the cost ledger (default cpu)."),
    aspect: Optional[int] = typer.Option(None, "--aspect", help="Model width per layer (default 32)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Tokenizer vocabulary (default 4096)."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="Train only this target (e.g. target2): one process "
                                               "per machine or device trains the targets side by side once the forecasts "
                                               "exist. On one CPU, give each process its share of the cores with "
                                               "OMP_NUM_THREADS (e.g. 1 each on 2 cores), or run one at a time."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file whose \\[experiment] table sets any key."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set experiment.n_boot=100"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """The recorded scaling experiment, end to end: data, ladder, fit, forecasts, targets, checks.

    First a pilot (OUT/pilot.json) trains the smallest target's depth on 1/6 of its compute and
    finds where the loss curve reaches its power-law tail; no rung trains on fewer tokens.
    The ladder is then designed from the targets (docs/scaling.md, "Designing the ladder"):
    depths that bracket each target's, three token budgets per depth, each rung at most 1/10
    and pilot plus ladder at most 1/3 of the smallest target. When the targets are too small
    for that, it stops and names the smallest budgets that would do. Every target's forecast is
    written to OUT/forecast.json, with its time, before the first target starts.

    Examples:
      lmforge ladder experiment -o runs/scaling
      lmforge ladder experiment -o runs/mine --source data/corpus --target-flops 1e15,2.5e15 --hardware H100

    Precedence: defaults < --config file < --set < flags.
    """
    flags = flag_tree(sources=source or None, vocab_size=vocab_size, aspect=aspect, hardware=hardware,
                      target_flops=_parse_list(target_flops, float, "--target-flops"),
                      target_depths=_parse_list(target_depths, int, "--target-depths"))
    cfg = resolve_config(ExperimentConfig, "experiment", config, set_, flags)
    r = run_experiment(out, cfg, progress=not quiet, only=target or None)
    if "pending" not in r:
        print(Path(out) / "report.md")
        print(Path(r["plot"]))


def fit_cmd(
    runs: List[Path] = typer.Argument(..., help="Ladder directories and/or train run directories."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write fit.json and fit.png (default: the first argument)."),
    form: str = typer.Option("ND", "--form", help="ND: the L(N, D) forms (Chinchilla's E + A/N^a + B/D^b and Kaplan's "
                             "[(Nc/N)^(aN/aD) + Dc/D]^aD), one chosen by backtest; C: compute only."),
    n_boot: int = typer.Option(200, "--bootstrap", help="Bootstrap resamples for standard errors and intervals."),
):
    """Fit scaling laws to finished runs' final validation losses; choose the L(N, D) form by backtest.

    Each form is refitted without the largest-compute runs, and without the largest model size,
    and must predict them; the form with the smaller backtest error is used for forecasts, and
    the backtests' misses calibrate the forecast intervals.

    Example: lmforge fit runs/ladder
    """
    if form not in ("ND", "C"):
        raise LmforgeError(f"--form {form}: use ND or C")
    out = out or runs[0]
    fit_runs(runs, out, form=form, n_boot=n_boot)
    nd, c, d = load_fit(out)
    png = plot_fit(out, Path(out) / "fit.png")
    con = console()
    law = load_law(d)
    if law:
        _print_law(con, law)
    elif nd:
        con.print(f"[bold]L(N, D) = E + A/N^alpha + B/D^beta[/]  ({nd.n_points} runs, log-residual RMS {nd.rmse_log:.4f})")
        for line in fmt_params(nd):
            con.print("  " + line)
    con.print(f"[bold]L(C) = a*C^b + c[/]  (log-residual RMS {c.rmse_log:.4f})")
    for line in fmt_params(c):
        con.print("  " + line)
    for w in c.warnings:
        con.print(f"[yellow]warning:[/] {w}")
    con.print(f"saved {Path(out) / 'fit.json'} and {png}")


FORM_TITLES = {"ND": "Chinchilla L(N, D) = E + A/N^alpha + B/D^beta",
               "kaplan": "Kaplan L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D"}


def _print_law(con, law) -> None:
    """Each form's parameters and backtests, the choice, and the backtests' interval coverage."""
    sel = law.selection
    for name, fit in law.fits.items():
        mark = "  [green](chosen)[/]" if name == law.chosen else ""
        con.print(f"[bold]{FORM_TITLES.get(name, name)}[/]{mark}  ({fit.n_points} runs, log-residual RMS {fit.rmse_log:.4f})")
        for line in fmt_params(fit):
            con.print("  " + line)
        for w in fit.warnings:
            con.print(f"  [yellow]warning:[/] {w}")
        info = sel["forms"].get(name, {})
        for bt_name, bt in info.get("backtests", {}).items():
            pts = ", ".join(f"{p['name']} {p['predicted']:.4f} vs {p['actual']:.4f} ({p['error_pct']:+.2f}%)"
                            for p in bt["points"])
            con.print(f"  backtest {bt_name}: mean abs error {bt['mape']:.2f}%  " + escape(f"[{pts}]"))
    cov = law.coverage()
    if cov["n"]:
        con.print(f"chosen form: {law.chosen} (lowest backtest error); its backtest intervals held {cov['80%']:.0%} of "
                  f"{cov['n']} held-out runs at 80%, {cov['95%']:.0%} at 95%")
    for w in law.warnings:
        if not any(w.startswith(f"{name}: ") for name in law.fits):  # each form's own warnings are printed above
            con.print(f"[yellow]warning:[/] {escape(w)}")


def forecast_cmd(
    fit: Path = typer.Option(Path("runs/ladder"), "--fit", help="A fit.json or the directory holding it."),
    params: Optional[float] = typer.Option(None, "--params", help="Non-embedding parameters N."),
    tokens: Optional[float] = typer.Option(None, "--tokens", help="Training tokens D."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A train TOML: N and D are taken from it."),
    check: Optional[Path] = typer.Option(None, "--check", help="A finished run: compare its final loss with its recorded forecast."),
):
    """Predict a run's final validation loss with 80% and 95% intervals, or check a finished run.

    Examples: lmforge forecast --fit runs/ladder --params 2e7 --tokens 4e8
              lmforge forecast --check runs/target
    """
    flops = None
    if check:
        r = check_forecast(check)
        print(f"forecast {r['forecast']:.4f}  actual {r['actual']:.4f}  error {r['error_pct']:+.2f}%  "
              f"80% [{r['interval_80'][0]:.4f}, {r['interval_80'][1]:.4f}] {'inside' if r['in_80'] else 'OUTSIDE'}  "
              f"95% [{r['interval_95'][0]:.4f}, {r['interval_95'][1]:.4f}] {'inside' if r['in_95'] else 'OUTSIDE'}")
        return
    if config:
        tc = load_train_config(config)
        if not tc.model.vocab_size:
            tc.model.vocab_size = open_tokens(tc.data)[1].vocab_size
        params = param_counts(tc.model)["non_embedding"]
        tokens = tc.max_steps * tc.batch_size * tc.grad_accum * tc.model.context
        flops = flops_per_token(tc.model) * tokens
    if params is None or tokens is None:
        raise LmforgeError("give --params and --tokens, or --config TRAIN.toml, or --check RUN")
    r = forecast(fit, params, tokens, flops)
    print(f"N = {params:.4g}  D = {tokens:.4g}  C = {r['C']:.4g} FLOPs" + ("" if flops else " (6ND)"))
    print(f"predicted final val loss {r['loss']:.4f}   80% [{r['interval_80'][0]:.4f}, {r['interval_80'][1]:.4f}]   "
          f"95% [{r['interval_95'][0]:.4f}, {r['interval_95'][1]:.4f}]   (form {r['form']})")
    for w in r["warnings"]:
        print(f"warning: {w}")


def plan_cmd(
    fit: Optional[str] = typer.Option(None, "--fit", help="A fit.json or its directory (for N, D and the predicted loss), "
                                      "or a published fit: chinchilla, chinchilla-replication."),
    flops: Optional[float] = typer.Option(None, "--flops"),
    dollars: Optional[float] = typer.Option(None, "--dollars"),
    device_hours: Optional[float] = typer.Option(None, "--device-hours"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Reverse plan: this many devices ..."),
    days: Optional[float] = typer.Option(None, "--days", help="... for this many days."),
    hardware: str = typer.Option("H100", "--hardware", help="A hardware catalog name (A100, H100, H200, cpu, or your own)."),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="A TOML hardware catalog that adds or overrides entries."),
    mfu: float = typer.Option(0.4, "--mfu", help="Model FLOPs utilisation to assume."),
):
    """Size a run from a budget: compute-optimal N and D, days, dollars, kWh and predicted loss.

    Examples: lmforge plan --fit runs/ladder --dollars 5000 --hardware H100
              lmforge plan --fit chinchilla-replication --gpus 25000 --days 100 --hardware A100 --mfu 0.32
    """
    r = plan_compute(fit, flops, dollars, device_hours, hardware, mfu, gpus, days, catalog=catalog)
    print(f"compute      {r['flops']:.4g} FLOPs on {r['hardware']} at MFU {r['mfu']:.0%}")
    print(f"device-hours {r['device_hours']:.4g}" + (f"  = {r['wall_days']:.1f} days on {r['gpus']} devices" if "wall_days" in r else ""))
    print(f"cost         ${r['cost']['usd']:,.0f}   {r['cost']['kwh']:,.0f} kWh   {r['cost']['co2_kg'] / 1000:,.1f} t CO2")
    if "N" in r:
        print(f"optimal      N = {r['N']:.4g} params, D = {r['D']:.4g} tokens ({r['tokens_per_param']:.1f} tokens/param, C = 6ND)")
        iv = r["interval_80"]
        print(f"predicted    loss {r['loss']:.4f}  " + (f"80% [{iv[0]:.4f}, {iv[1]:.4f}]" if iv[0] < iv[1] else
                                                       "(a published fit: no interval, and its loss is on its own data)"))
    if "depth_plan" in r:
        d = r["depth_plan"]
        print(f"on the dial  depth {d['depth']}: N = {d['N']:.4g}, D = {d['D']:.4g} tokens ({d['tokens_per_param']:.1f} tokens/param, "
              f"{d['flops_per_token']:.3g} FLOPs/token at vocab {d['vocab_size']}, context {d['context']})")
        print(f"             loss {d['loss']:.4f}  80% [{d['interval_80'][0]:.4f}, {d['interval_80'][1]:.4f}]  "
              f"95% [{d['interval_95'][0]:.4f}, {d['interval_95'][1]:.4f}]")

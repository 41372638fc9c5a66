"""``lmforge router label|train|eval``: make labelled queries, fit the classifier, measure a router."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from lmforge.errors import LmforgeError
from lmforge.route.config import load_router
from lmforge.route.evaluate import evaluate_router, format_report, label_tasks, plot_report, read_labelled
from lmforge.route.policy import train_classifier

router_app = typer.Typer(help="Tiered routing: label queries, train the classifier, evaluate a router file. "
                              "Serve one with `lmforge serve --router router.toml`.", no_args_is_help=True)


@router_app.command("label")
def label_cmd(
    small: str = typer.Option(..., "--small", help="The cheap tier's model directory."),
    large: str = typer.Option(..., "--large", help="The expensive tier's model directory."),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="Executable tasks (JSONL with prompt, entry_point, "
                                         "doctest; e.g. `lmforge post-data`'s tasks_test.jsonl): quality is pass/fail."),
    source: Optional[List[Path]] = typer.Option(None, "--source", "-s", help="Or held-out Python source (files or "
                                                "directories) the models did not train on: quality is minus bits per byte."),
    out: Path = typer.Option(..., "--out", "-o", help="The labelled JSONL to write."),
    limit: int = typer.Option(400, "--limit", help="Most queries (0: every task)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer to a task."),
    seed: int = typer.Option(0, "--seed"),
):
    """Label held-out code queries with each tier's quality. With --tasks: 1 where the tier's greedy
    answer passes the task's doctests when run, else 0. With --source: minus its bits per byte on
    a function's body, given the signature and docstring.

    Example: lmforge router label --small runs/small --large runs/large --tasks runs/post-data/tasks_test.jsonl -o runs/route/labelled.jsonl
    """
    if (tasks is None) == (not source):
        raise LmforgeError("router label: give exactly one of --tasks (executable tasks) or --source (Python source)")
    r = label_tasks(small, large, list(source or []), out, limit, seed=seed, tasks=tasks, max_new_tokens=max_new_tokens)
    fmt = "{:.1%}" if r["quality"] == "pass" else "{:.4f}"
    print(f"{out}: {r['queries']} queries; mean quality small {fmt.format(r['small_mean'])}, large "
          f"{fmt.format(r['large_mean'])}; the large tier is better on {r['large_better_share']:.0%}")


@router_app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="Labelled JSONL: {\"prompt\", \"small\", \"large\"} per line "
                              "(qualities; the large tier is needed where it is better by more than --margin)."),
    out: Path = typer.Option(..., "--out", "-o", help="The classifier file (JSON) to write."),
    margin: float = typer.Option(0.0, "--margin", help="How much better the large tier must be to be needed."),
):
    """Fit the routing classifier: logistic regression on hashed word n-grams and the prompt's shape.
    It predicts P(large tier needed) before anything is generated.

    Example: lmforge router train --data runs/route/labelled.jsonl -o runs/route/clf.json
    """
    rows = read_labelled(data)
    info = train_classifier([r["prompt"] for r in rows], [r["large"] - r["small"] > margin for r in rows], out)
    print(f"{out}: trained on {info['n_train']} queries, {info['share_large']:.0%} needing the large tier")


@router_app.command("eval")
def eval_cmd(
    router: Path = typer.Option(..., "--router", help="The router file (TOML)."),
    data: Path = typer.Option(..., "--data", help="Labelled JSONL (see `lmforge router label`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write report.json, report.md and "
                                       "routing.png (default: next to --data)."),
    max_tokens: int = typer.Option(48, "--max-tokens", help="The small tier's answer length for its confidence."),
):
    """RouteLLM's metrics for a router: APGR, CPT(50%), CPT(80%), $ per 1,000 queries, side by side
    with random routing at the same rate, always-small and always-large, plus a cost-quality plot.

    Example: lmforge router eval --router router.toml --data runs/route/labelled.jsonl -o runs/route/eval
    """
    cfg = load_router(router)
    rows = read_labelled(data)
    out = out or data.parent / f"{data.stem}-eval"
    out.mkdir(parents=True, exist_ok=True)
    rep = evaluate_router(cfg, rows, out / "work", max_tokens)
    text = format_report(rep)
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    (out / "report.md").write_text(text + "\n")
    png = plot_report(rep, out / "routing.png")
    print(text)
    print(f"\nwrote {out / 'report.json'}, {out / 'report.md'}, {png}")

"""``lmforge eval``: a thin wrapper over :mod:`lmforge.eval.run` and the lm-eval bridge."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lmforge.config import flag_tree, resolve_config
from lmforge.errors import LmforgeError
from lmforge.eval.harness import simple_evaluate
from lmforge.eval.run import EvalConfig, compare, evaluate
from lmforge.eval.tasks import KNOWN, TaskConfig
from lmforge.rundir import Manifest, atomic_write_json


def eval_cmd(
    model: str = typer.Argument(..., help="An lmforge run, an HF directory, or an OpenAI-compatible URL (generation "
                                "tasks only); or the word 'compare' followed by eval run directories."),
    runs: Optional[List[str]] = typer.Argument(None, help="With 'compare': the eval runs to show side by side."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help=f"Comma-separated: {', '.join(KNOWN)}."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help=f"Run directory (default {EvalConfig.out}); for "
                                       "compare, the bar-chart PNG (default compare.png)."),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", help=f"Completions per humaneval/doctest problem "
                                          f"(default {TaskConfig.samples}; pass@10 needs 10). One sample is greedy."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=f"Sampling temperature when --samples > 1 "
                                                f"(default {TaskConfig.temperature})."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Items per task (default: all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Sequences per forward pass (default {EvalConfig.batch_size})."),
    chat: Optional[str] = typer.Option(None, "--chat", help="auto (default: SFT/DPO/distill runs are chat models), on, off. "
                                       "A chat model gets each generation prompt as a user turn."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling and bootstrap seed."),
    endpoint_model: Optional[str] = typer.Option(None, "--endpoint-model", help="With a URL MODEL: the model name it serves."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="With a URL MODEL: the environment variable "
                                              f"holding its key (default {EvalConfig.api_key_env})."),
    harness: Optional[str] = typer.Option(None, "--harness", help="Comma-separated lm-evaluation-harness tasks, run "
                                          "through the bridge instead of the built-in tasks (needs the [eval] extra)."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="With --harness: a directory of local lm-eval task YAMLs."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with an \\[eval] table (and \\[eval.task])."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override any key: --set eval.task.timeout_s=5"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Evaluate a model on tasks that execute, and compare eval runs.

    Built-in tasks: bpb:SOURCE (bits per byte of any `lmforge data` source; a data run means
    its val split), humaneval (pass@1/pass@10, each completion run with its tests in a
    sandbox), doctest:FILE (post-data's held-out tasks), mc:FILE.jsonl (multiple choice:
    acc, acc_norm as lm-evaluation-harness defines them), gen:FILE.jsonl (exact match).
    Every metric comes with a bootstrap standard error; the run directory holds the manifest
    (model hash, task data hashes, seeds) and every item's result.

    Examples:

      lmforge eval runs/default/train --tasks bpb:default,humaneval -o runs/eval-base

      lmforge eval runs/sft --tasks mc:items.jsonl,gen:qa.jsonl --samples 1 -o runs/eval-sft

      lmforge eval compare runs/eval-base runs/eval-sft -o compare.png

      lmforge eval runs/default/hf --harness my_task --include-path tasks/ -o runs/eval-h

    Precedence: defaults < --config file < --set < flags.
    """
    if model == "compare":
        png = out or Path("compare.png")
        print(compare(runs or [], png))
        print(f"chart: {png}")
        return
    if runs:
        raise LmforgeError(f"unexpected arguments {' '.join(runs)}: evaluate one MODEL, or `lmforge eval compare RUN...`")
    if harness:
        _harness(model, harness, include_path, out or Path("runs/eval-harness"), limit, batch_size or 16)
        return
    flags = flag_tree(**{"model": model, "tasks": [t for t in tasks.split(",") if t] if tasks else None, "out": str(out) if out else None, "batch_size": batch_size,
                         "chat": chat, "endpoint_model": endpoint_model, "api_key_env": api_key_env,
                         "task.samples": samples, "task.temperature": temperature, "task.limit": limit,
                         "task.seed": seed})
    cfg = resolve_config(EvalConfig, "eval", config, set_, flags)
    evaluate(cfg, progress=not quiet)
    print()
    print((Path(cfg.out) / "table.md").read_text().rstrip())
    print(f"\neval run: {cfg.out}")


def _harness(model: str, tasks: str, include_path, out: Path, limit, batch_size: int) -> None:
    names = [t for t in tasks.split(",") if t]
    res = simple_evaluate(model, names, str(include_path) if include_path else None, batch_size, limit)
    man = Manifest(out, "eval-harness", {"model": model, "tasks": names, "include_path": str(include_path or ""),
                                         "limit": limit})
    man.add_input("model", model)
    atomic_write_json(out / "results.json", {"results": res["results"], "versions": res.get("versions", {}),
                                             "n-samples": res.get("n-samples", {})})
    man.add_output("results", out / "results.json", hash_it=True)
    man.set_metrics(results=res["results"])
    man.finish()
    for task, metrics in res["results"].items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))))
    print(f"eval run: {out}")

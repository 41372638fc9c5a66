"""``lmforge eval``, ``audit contamination`` and ``provenance``: thin wrappers over :mod:`lmforge.eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lmforge.config import flag_tree, resolve_config
from lmforge.data.decontam import DEFAULT_NGRAM
from lmforge.errors import LmforgeError
from lmforge.eval.contamination import AuditConfig, audit_contamination
from lmforge.eval.harness import simple_evaluate
from lmforge.eval.provenance import provenance_run
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


SHOWN_ITEMS = 20  # contaminated items printed under the audit table; items.jsonl has them all

audit_app = typer.Typer(
    help="Audit what a model was trained on. `contamination`: which benchmark items the training data already "
         "holds (n-gram overlap), and what that does to a score.",
    no_args_is_help=True,
)


@audit_app.command("contamination")
def contamination_cmd(
    data: Optional[List[str]] = typer.Option(
        None, "--data", "-d", show_default=False,
        help="Training data: an `lmforge data` run directory (its cleaned train split is read), or any source "
             "`lmforge data` reads (a directory, .jsonl, .parquet, hf:NAME, default, default:stdlib+site). Repeatable."),
    tasks: Optional[List[str]] = typer.Option(
        None, "--tasks", "-t", show_default=False,
        help="Benchmarks, comma-separated or repeated: humaneval (prompt + canonical solution), mc:FILE (question + "
             "right choice), gen:FILE (prompt + answer), doctest:FILE (post-data tasks: prompt + reference)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Audit run directory to write (default: runs/audit)."),
    ngram: Optional[int] = typer.Option(None, "-n", "--ngram", help=f"n-gram length in normalised tokens (default {DEFAULT_NGRAM})."),
    results: Optional[Path] = typer.Option(
        None, "--results", help="An `lmforge eval` run of the same tasks: also score the clean items against all."),
    min_overlap: Optional[float] = typer.Option(
        None, "--min-overlap", help="Contaminated only when at least this share of an item's n-grams is found "
                                    "(default 0: any shared n-gram)."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="Training documents listed per item (default 10)."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="JSONL field / parquet column of a source (default: text)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file whose \\[audit] table sets any key."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set audit.max_docs=3"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no table."),
):
    """Find benchmark items whose text the training data already holds: n-gram overlap, one streaming pass.

    Text is normalised (NFKC, case folded, word characters only, so case, whitespace and punctuation never decide a match); an item is contaminated when one of its 13-grams occurs in a training document. Only the benchmark's n-grams are held in memory, so the corpus can be any size.

    Writes OUT/items.jsonl (per item: overlap ratio, contaminated, the first training documents involved) and OUT/manifest.json (per task: share contaminated; with --results, the score on clean items against all).

    Examples:

      lmforge audit contamination --data runs/data --tasks humaneval

      lmforge audit contamination --data default:stdlib+site --tasks humaneval -o runs/audit-site

      lmforge audit contamination --data runs/data --tasks humaneval,mc:arc.jsonl --results runs/eval -n 8

    Precedence: defaults < --config file < --set < flags.
    """
    flags = flag_tree(data=[str(d) for d in data] if data else None, tasks=tasks or None,
                      out=str(out) if out else None, ngram=ngram, results=str(results) if results else None,
                      min_overlap=min_overlap, max_docs=max_docs, text_field=text_field)
    cfg = resolve_config(AuditConfig, "audit", config, set_, flags)
    man = audit_contamination(cfg, progress=not quiet)
    if not quiet:
        print_report(man, Path(cfg.out))


def print_report(man: dict, out: Path) -> None:
    """The per-task table, then the first contaminated items with their first training document."""
    m = man["metrics"]
    console = Console()
    t = Table(title=f"lmforge audit contamination: {man['config']['ngram']}-grams, {m['docs_scanned']:,} documents "
                    f"({m['bytes_scanned'] / 1e6:.1f} MB) in {m['scan_seconds']} s", title_justify="left")
    for col in ("task", "items", "contaminated", "%", "mean overlap", "score: all -> clean"):
        t.add_column(col, justify="left" if col in ("task", "score: all -> clean") else "right")
    for spec, tm in m["tasks"].items():
        short = f" ({tm['too_short']} too short to check)" if tm["too_short"] else ""
        t.add_row(spec, f"{tm['items']}{short}", str(tm["contaminated"]), f"{tm['percent_contaminated']:.1f}",
                  "-" if tm["mean_overlap"] is None else f"{tm['mean_overlap']:.3f}", _score_text(tm.get("scores")))
    console.print(t)
    shown = 0
    with open(out / "items.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["contaminated"] and shown < SHOWN_ITEMS:
                more = f" (+{r['docs_total'] - 1} more)" if r["docs_total"] > 1 else ""
                console.print(f"  {r['task']} {r['id']}: overlap {r['overlap']:.2f}, in {r['docs'][0] if r['docs'] else '?'}{more}",
                              markup=False, highlight=False, soft_wrap=True)  # paths stay whole, for copying
                shown += 1
    console.print(f"per-item rows: {out / 'items.jsonl'}")


def _score_text(scores: dict | None) -> str:
    if not scores:
        return "-"
    parts = [f"{k} {v['all']:.3f} -> {v['clean']:.3f}" for k, v in scores.items()
             if isinstance(v, dict) and v["all"] is not None and v["clean"] is not None]
    return f"{'; '.join(parts)} (n {scores['n_all']} -> {scores['n_clean']})"


def provenance_cmd(
    a: Path = typer.Argument(..., help="The original: an lmforge model directory or a Hugging Face Llama directory."),
    b: Path = typer.Argument(..., help="The suspect, in either format. Its tensor names and order are never used."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to write: manifest.json (both models' "
                                       "hashes, verdict, score, per-layer similarities) and provenance.txt."),
) -> None:
    """Is model B derived from model A, or the same architecture trained separately?

    Compares the weights, not the names: B may have renamed tensors, permuted attention heads or
    MLP units, weights rescaled between adjacent layers, or further training, and still reads as
    derived. Per layer it prints the cosine similarity of products that those changes cannot move
    (qk: W_q^T W_k summed over heads; ov: W_o W_v; mlp: W_down W_up) and of residual-side Gram
    matrices (gram). Scores near 1 mean copied weights, near 0 unrelated ones; the verdict is
    derived at a score of at least 0.2, independent below, and incomparable when the two models'
    matrix shapes cannot be paired (a different architecture).

    Example: lmforge provenance runs/d4 suspects/tiny-llama -o runs/provenance
    """
    print(provenance_run(a, b, out)[1])

"""The ``lmforge`` command line. Each verb is a thin wrapper over a Python function.

Verbs live next to the code they drive (``lmforge/<stage>/cli.py``) and are registered
here, so that this file stays a table of contents; ``run``, the whole pipeline, is the
one verb that belongs to no single stage.

Every verb that has settings reads them the same way: a TOML file (``--config``) with a
table named after the verb's section, ``--set SECTION.KEY=VALUE``, and flags, with the
precedence defaults < file < --set < flags.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lmforge.config import flag_tree, resolve_config
from lmforge.cost.cli import cost_cmd, hw_cmd
from lmforge.data.cli import data_cmd
from lmforge.errors import Interrupted, LmforgeError
from lmforge.eval.cli import audit_app, eval_cmd, provenance_cmd
from lmforge.knowledge.cli import index_cmd
from lmforge.route.cli import router_app
from lmforge.serve.cli import serve_cmd
from lmforge.export.cli import export_cmd, import_hf_cmd
from lmforge.model.cli import sample_cmd
from lmforge.pipeline import RunConfig, run_pipeline
from lmforge.post.cli import chat_cmd, distill_cmd, dpo_cmd, pairs_cmd, post_data_cmd, sft_cmd
from lmforge.scaling.cli import fit_cmd, forecast_cmd, ladder_app, plan_cmd
from lmforge.tokenizer.cli import tokenizer_cmd
from lmforge.train.cli import status_cmd, train_cmd

app = typer.Typer(
    name="lmforge",
    help=(
        "Build a GPT-style language model end to end: data -> tokenizer -> train -> "
        "sample -> export. Start with `lmforge run`, which does all of it on the "
        "embedded default corpus (this Python's standard library)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def run_cmd(
    out: Path = typer.Option(Path("runs/default"), "--out", "-o", help="Run directory; re-running resumes it."),
    source: Optional[List[str]] = typer.Option(None, "--source", "-s", help="Corpus (default: the embedded stdlib corpus). Repeatable: dirs, .jsonl, .parquet, hf:NAME."),
    depth: Optional[int] = typer.Option(None, "--depth", help=f"Model size dial: depth layers of width 64*depth (default {RunConfig.depth})."),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"Training steps, each --batch-size x --context tokens (default {RunConfig.steps})."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help=f"BPE vocabulary size (default {RunConfig.vocab_size})."),
    context: Optional[int] = typer.Option(None, "--context", help=f"Training sequence length in tokens (default {RunConfig.context})."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Sequences per step (default {RunConfig.batch_size})."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of documents held out for validation, "
                                                 f"chosen by content hash (default {RunConfig.val_fraction})."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file whose \\[run] table sets any key."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set run.lr=2e-3"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Build a model end to end: data -> tokenizer -> train -> samples -> HF export.

    With no options this trains a ~3M-parameter model on this Python's standard library
    in about 15 minutes on 2 CPU cores. Example: lmforge run --depth 6 --steps 2000 -o runs/d6

    Precedence: defaults < --config file < --set < flags.
    """
    flags = flag_tree(sources=source or None, depth=depth, steps=steps, vocab_size=vocab_size, context=context,
                      batch_size=batch_size, val_fraction=val_fraction)
    cfg = resolve_config(RunConfig, "run", config, set_, flags)
    r = run_pipeline(cfg, out, progress=not quiet)
    print()
    print(f"run directory:   {r['run_dir']}")
    print(f"val loss curve:  {r['loss_png']}")
    print(f"final val loss:  {r['val_loss']:.4f} nats/token (unigram entropy {r['unigram_entropy']:.4f})")
    print(f"HF export:       {r['hf_dir']}  (transformers.AutoModelForCausalLM.from_pretrained)")
    print("samples:")
    for p, s in r["samples"]:
        print("-" * 60)
        print(p + s)


app.command("run")(run_cmd)
app.command("data")(data_cmd)
app.command("tokenizer")(tokenizer_cmd)
app.command("train")(train_cmd)
app.command("status")(status_cmd)
app.command("sample")(sample_cmd)
app.command("export")(export_cmd)
app.command("import-hf")(import_hf_cmd)
app.command("hw")(hw_cmd)
app.command("cost")(cost_cmd)
app.add_typer(ladder_app, name="ladder")
app.command("fit")(fit_cmd)
app.command("forecast")(forecast_cmd)
app.command("plan")(plan_cmd)
app.command("post-data")(post_data_cmd)
app.command("post-pairs")(pairs_cmd)
app.command("sft")(sft_cmd)
app.command("dpo")(dpo_cmd)
app.command("distill")(distill_cmd)
app.command("chat")(chat_cmd)
app.command("eval")(eval_cmd)
app.add_typer(audit_app, name="audit")
app.command("provenance")(provenance_cmd)
app.command("serve")(serve_cmd)
app.add_typer(router_app, name="router")
app.command("index")(index_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input prints one line and exits 2; LMFORGE_DEBUG=1 shows tracebacks."""
    try:
        app(args=argv, standalone_mode=True)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.code)
    except LmforgeError as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

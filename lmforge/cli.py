"""The ``lmforge`` command line. Each verb is a thin wrapper over a Python function.

Verbs live next to the code they drive (``lmforge/<stage>/cli.py``) and are
registered here, so that this file stays a table of contents.
"""

from __future__ import annotations

import os
import sys

import typer

from lmforge.errors import LmforgeError

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


def _register() -> None:
    from lmforge.data.cli import data_cmd
    from lmforge.tokenizer.cli import tokenizer_cmd
    from lmforge.train.cli import train_cmd
    from lmforge.model.cli import sample_cmd
    from lmforge.export.cli import export_cmd, import_hf_cmd
    from lmforge.cost.cli import hw_cmd
    from lmforge.pipeline import run_cmd
    from lmforge.train.status import status_cmd
    from lmforge.scaling.cli import cost_cmd, fit_cmd, forecast_cmd, ladder_app, plan_cmd

    app.command("run")(run_cmd)
    app.command("data")(data_cmd)
    app.command("tokenizer")(tokenizer_cmd)
    app.command("train")(train_cmd)
    app.command("sample")(sample_cmd)
    app.command("export")(export_cmd)
    app.command("import-hf")(import_hf_cmd)
    app.command("hw")(hw_cmd)
    app.command("status")(status_cmd)
    app.add_typer(ladder_app, name="ladder")
    app.command("fit")(fit_cmd)
    app.command("forecast")(forecast_cmd)
    app.command("plan")(plan_cmd)
    app.command("cost")(cost_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input prints one line and exits 2; LMFORGE_DEBUG=1 shows tracebacks."""
    _register()
    from lmforge.train.loop import Interrupted

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

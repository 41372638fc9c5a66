"""``lmforge export`` and ``lmforge import-hf``: thin wrappers over :mod:`lmforge.export.hf`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmforge.errors import LmforgeError
from lmforge.export.hf import export_hf, import_hf

FORMATS = ("hf",)


def export_cmd(
    run: Path = typer.Argument(..., help="A train run, an import-hf output, a checkpoint, or any lmforge model directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory to write (default RUN/hf). An earlier export there is replaced."),
    format: str = typer.Option("hf", "--format", help="hf: Hugging Face LlamaForCausalLM, safetensors (GGUF is planned)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weight dtype: float32, bfloat16 or float16."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: the one the run manifest records)."),
) -> None:
    """Export a trained model (weights, config, tokenizer) for other tools.

    Example: lmforge export runs/train -o runs/train-hf

    then in Python: AutoModelForCausalLM.from_pretrained("runs/train-hf")
    """
    if format not in FORMATS:
        raise LmforgeError(f"--format {format}: unknown format; supported: {', '.join(FORMATS)}")
    path = export_hf(run, out or Path(run) / "hf", dtype=dtype, tokenizer_dir=tokenizer)
    print(f"exported {path}")


def import_hf_cmd(
    hf_dir: Path = typer.Argument(..., help="A local Llama-architecture Hugging Face model directory (config.json + safetensors)."),
    out: Path = typer.Option(Path("runs/imported"), "--out", "-o", help="lmforge model directory to write. An earlier import there is replaced."),
) -> None:
    """Import a local Hugging Face Llama checkpoint, e.g. to continue pretraining it.

    Example: lmforge import-hf ~/models/tiny-llama -o runs/tiny

    then tokenize data with its tokenizer and train from it:
    lmforge data CORPUS -o runs/tiny-data --tokenizer runs/tiny/tokenizer;
    lmforge train --data runs/tiny-data -o runs/cpt --set init_from=runs/tiny
    """
    print(f"imported {import_hf(hf_dir, out)}")

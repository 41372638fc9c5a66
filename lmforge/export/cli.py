from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmforge.errors import LmforgeError


def export_cmd(
    run: Path = typer.Argument(..., help="A train run directory or any lmforge model directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default RUN/hf)."),
    format: str = typer.Option("hf", "--format", help="hf: Hugging Face LlamaForCausalLM (safetensors)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer dir (default: from the run manifest)."),
):
    """Export a trained model for other tools.

    Example: lmforge export runs/d4 --format hf -o runs/d4-hf
    then: transformers.AutoModelForCausalLM.from_pretrained("runs/d4-hf")
    """
    from lmforge.export.hf import export_hf

    if format != "hf":
        raise LmforgeError(f"--format {format}: unknown format; supported: hf")
    path = export_hf(run, out or Path(run) / "hf", dtype=dtype, tokenizer_dir=tokenizer)
    print(f"exported {path}")


def import_hf_cmd(
    hf_dir: Path = typer.Argument(..., help="A local Llama-architecture HF model directory (safetensors)."),
    out: Path = typer.Option(Path("runs/imported"), "--out", "-o"),
):
    """Import a local Hugging Face Llama checkpoint for continued pretraining or fine-tuning.

    Example: lmforge import-hf ~/models/tiny-llama -o runs/tiny
    then: lmforge train --data runs/data -o runs/cpt --set init_from='runs/tiny'
    """
    from lmforge.export.hf import import_hf

    print(f"imported into {import_hf(hf_dir, out)}")

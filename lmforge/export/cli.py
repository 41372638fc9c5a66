"""``lmforge export`` and ``lmforge import-hf``: thin wrappers over :mod:`lmforge.export.hf` and :mod:`lmforge.export.gguf`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmforge.errors import LmforgeError
from lmforge.export.gguf import export_gguf
from lmforge.export.hf import export_hf, import_hf

FORMATS = ("hf", "gguf")


def export_cmd(
    run: Path = typer.Argument(..., help="A train run, an import-hf output, a checkpoint, or any lmforge model directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory to write (default RUN/hf or RUN/gguf). An earlier export there is replaced."),
    format: str = typer.Option("hf", "--format", help="hf: Hugging Face LlamaForCausalLM, safetensors; gguf: one model.gguf for llama.cpp."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Weight dtype. hf: float32 (default), bfloat16, float16; "
                                        "gguf: f16 (default), f32, bf16, q8_0."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: the one the run manifest records)."),
) -> None:
    """Export a trained model (weights, config, tokenizer) for other tools.

    Example: lmforge export runs/train -o runs/train-hf

    then in Python: AutoModelForCausalLM.from_pretrained("runs/train-hf")

    Example: lmforge export runs/train --format gguf --dtype q8_0 -o runs/train-gguf

    then with llama.cpp: llama-cli -m runs/train-gguf/model.gguf
    """
    if format not in FORMATS:
        raise LmforgeError(f"--format {format}: unknown format; supported: {', '.join(FORMATS)}")
    if format == "gguf":
        path = export_gguf(run, out or Path(run) / "gguf", dtype=dtype or "f16", tokenizer_dir=tokenizer)
    else:
        path = export_hf(run, out or Path(run) / "hf", dtype=dtype or "float32", tokenizer_dir=tokenizer)
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

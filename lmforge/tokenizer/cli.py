from __future__ import annotations

from pathlib import Path

import typer


def tokenizer_cmd(
    data: Path = typer.Argument(Path("runs/data"), help="Data run directory (from `lmforge data`)."),
    out: Path = typer.Option(Path("runs/tokenizer"), "--out", "-o", help="Tokenizer directory to write."),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Total vocabulary, special tokens included."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Merges must occur at least this often."),
    max_train_mb: float = typer.Option(40.0, "--max-train-mb", help="Train on at most this much text (0: all)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Train a byte-level BPE tokenizer on the cleaned train split.

    The directory loads with transformers.PreTrainedTokenizerFast.from_pretrained.
    Example: lmforge tokenizer runs/data -o runs/tok --vocab-size 8192
    Then tokenize the data: lmforge data -o runs/data --tokenizer runs/tok
    """
    from lmforge.tokenizer.train import train_tokenizer

    man = train_tokenizer(data, out, vocab_size=vocab_size, min_frequency=min_frequency,
                          max_train_bytes=int(max_train_mb * 1e6) or None, progress=not quiet)
    m = man["metrics"]
    print(f"tokenizer: {out}  vocab {m['vocab_size']}  val compression {m['val_bytes_per_token']} bytes/token")

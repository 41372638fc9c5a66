"""``lmforge tokenizer``: the command-line face of :func:`lmforge.tokenizer.train.train_tokenizer`."""

from __future__ import annotations

from pathlib import Path

import typer

from lmforge.errors import LmforgeError


def tokenizer_cmd(
    data: Path = typer.Argument(Path("runs/data"), help="Data run directory (from `lmforge data`)."),
    out: Path = typer.Option(Path("runs/tokenizer"), "--out", "-o", help="Tokenizer directory to write."),
    vocab_size: int = typer.Option(8192, "--vocab-size",
                                   help="Total vocabulary: 7 special tokens + 256 bytes + merges. Bigger compresses "
                                        "text into fewer tokens but costs embedding parameters."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="A merge must occur at least this often."),
    max_train_mb: float = typer.Option(40.0, "--max-train-mb",
                                       help="Train on at most this much of the train split (0: all of it)."),
    tokenize: bool = typer.Option(False, "--tokenize",
                                  help="Then tokenize DATA's splits with the new tokenizer (what `lmforge train` reads)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Train a byte-level BPE tokenizer on a data run's cleaned train split.

    Special tokens get fixed ids: <|bos|> 0, <|eos|> 1, <|pad|> 2, <|system|> 3, <|user|> 4, <|assistant|> 5, <|end|> 6. The directory loads with transformers.AutoTokenizer.from_pretrained and records its val-split compression (bytes per token) in manifest.json.

    Examples:

      lmforge tokenizer runs/data -o runs/tok --tokenize

      lmforge tokenizer runs/data -o runs/tok16k --vocab-size 16384
    """
    from lmforge.tokenizer.train import train_tokenizer

    if max_train_mb < 0:
        raise LmforgeError(f"--max-train-mb {max_train_mb}: must be >= 0 (0 means all of the train split)")
    man = train_tokenizer(data, out, vocab_size=vocab_size, min_frequency=min_frequency,
                          max_train_bytes=int(max_train_mb * 1e6) or None, progress=not quiet)
    m = man["metrics"]
    if not quiet:
        print(f"tokenizer: {out}  vocab {m['vocab_size']:,}  val compression {m['bytes_per_token']} bytes/token  "
              f"({m['train_seconds']} s)")
    if tokenize:
        from lmforge.data.cli import print_summary
        from lmforge.data.shards import tokenize_data

        data_man = tokenize_data(data, out, progress=not quiet)
        if not quiet:
            print_summary(data_man, data)

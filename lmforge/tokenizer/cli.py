"""``lmforge tokenizer``: the command-line face of :func:`lmforge.tokenizer.train.train_tokenizer`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lmforge.config import flag_tree, resolve_config

from lmforge.data.cli import print_summary
from lmforge.tokenizer.encode import tokenize_data
from lmforge.tokenizer.train import TokenizerConfig, train_tokenizer


def tokenizer_cmd(
    data: Path = typer.Argument(Path("runs/data"), help="Data run directory (from `lmforge data`)."),
    out: Path = typer.Option(Path("runs/tokenizer"), "--out", "-o", help="Tokenizer directory to write."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size",
                                             help="Total vocabulary (default 8192): 7 special tokens + 256 bytes + merges. "
                                                  "Bigger compresses text into fewer tokens but costs embedding parameters."),
    min_frequency: Optional[int] = typer.Option(None, "--min-frequency", help="A merge must occur at least this often (default 2)."),
    max_train_mb: Optional[float] = typer.Option(None, "--max-train-mb",
                                                 help="Train on at most this much of the train split (default 40; 0: all of it)."),
    tokenize: bool = typer.Option(False, "--tokenize",
                                  help="Then tokenize DATA's splits with the new tokenizer (what `lmforge train` reads)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file whose \\[tokenizer] table sets any tokenizer key."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set tokenizer.vocab_size=4096"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Train a byte-level BPE tokenizer on a data run's cleaned train split.

    Special tokens get fixed ids: <|bos|> 0, <|eos|> 1, <|pad|> 2, <|system|> 3, <|user|> 4, <|assistant|> 5, <|end|> 6. The directory loads with transformers.AutoTokenizer.from_pretrained and records its val-split compression (bytes per token) in manifest.json.

    Examples:

      lmforge tokenizer runs/data -o runs/tok --tokenize

      lmforge tokenizer runs/data -o runs/tok16k --vocab-size 16384

    Precedence: defaults < --config file < --set < flags.
    """
    flags = flag_tree(vocab_size=vocab_size, min_frequency=min_frequency, max_train_mb=max_train_mb)
    cfg = resolve_config(TokenizerConfig, "tokenizer", config, set_, flags)
    man = train_tokenizer(data, out, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                          max_train_bytes=int(cfg.max_train_mb * 1e6) or None, progress=not quiet)
    m = man["metrics"]
    if not quiet:
        print(f"tokenizer: {out}  vocab {m['vocab_size']:,}  val compression {m['bytes_per_token']} bytes/token  "
              f"({m['train_seconds']} s)")
    if tokenize:
        data_man = tokenize_data(data, out, progress=not quiet)
        if not quiet:
            print_summary(data_man, data)

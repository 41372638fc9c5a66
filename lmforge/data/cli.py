from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def data_cmd(
    sources: Optional[List[str]] = typer.Argument(None, help="Dirs, .jsonl, .parquet, hf:NAME[:SPLIT], save_to_disk dirs, "
                                                            "default, default:stdlib+site. None: the embedded corpus."),
    out: Path = typer.Option(Path("runs/data"), "--out", "-o", help="Data run directory to write."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Also tokenize into shards with this tokenizer."),
    tokenize_only: bool = typer.Option(False, "--tokenize-only", help="Skip cleaning; tokenize an existing data dir."),
    text_field: str = typer.Option("text", "--text-field", help="Field (JSONL) or column (parquet, datasets) with the text."),
    min_chars: int = typer.Option(64, "--min-chars"),
    max_chars: int = typer.Option(500_000, "--max-chars"),
    near_dedup: bool = typer.Option(True, "--near-dedup/--no-near-dedup", help="MinHash near-duplicate removal."),
    val_fraction: float = typer.Option(0.02, "--val-fraction"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Ingest, clean, deduplicate and split a corpus; with --tokenizer, tokenize it into shards.

    Examples:

      lmforge data -o runs/data                              # the embedded corpus

      lmforge data notes/ chats.jsonl --text-field body -o runs/mix

      lmforge data -o runs/data --tokenizer runs/tok --tokenize-only
    """
    from rich.console import Console
    from rich.table import Table

    from lmforge.data.prepare import DataConfig, prepare_data
    from lmforge.data.shards import tokenize_data

    if tokenize_only:
        if tokenizer is None:
            from lmforge.errors import LmforgeError

            raise LmforgeError("--tokenize-only needs --tokenizer DIR")
        man = tokenize_data(out, tokenizer, progress=not quiet)
    else:
        cfg = DataConfig(min_chars=min_chars, max_chars=max_chars, dedup_near=near_dedup, val_fraction=val_fraction,
                         text_field=text_field)
        man = prepare_data(sources or ["default"], out, cfg, tokenizer_dir=tokenizer, progress=not quiet)
    m = man["metrics"]
    t = Table(title=f"data: {out}")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_row("documents seen", f"{m['docs_seen']:,}")
    t.add_row("kept", f"{m['docs_kept']:,}")
    for reason, n in m["dropped"].items():
        t.add_row(f"  dropped: {reason}", f"{n:,}")
    t.add_row("train docs / MB", f"{m['docs_train']:,} / {m['bytes_train'] / 1e6:.1f}")
    t.add_row("val docs / MB", f"{m['docs_val']:,} / {m['bytes_val'] / 1e6:.1f}")
    if "tokens_train" in m:
        t.add_row("train tokens", f"{m['tokens_train']:,}")
        t.add_row("val tokens", f"{m['tokens_val']:,}")
        t.add_row("bytes per token", f"{m['bytes_per_token']}")
    Console().print(t)

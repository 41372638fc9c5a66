"""``lmforge data``: the command-line face of :func:`lmforge.data.prepare.prepare_data`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lmforge.config import flag_tree, resolve_config
from lmforge.data.prepare import DataConfig, prepare_data
from lmforge.errors import LmforgeError
from lmforge.tokenizer.encode import tokenize_data
from lmforge.tokenizer.io import load_tokenizer


def data_cmd(
    sources: Optional[List[str]] = typer.Argument(
        None, show_default=False,
        help="Where the text comes from, any mix of: a directory tree of text/code files; a .jsonl or .jsonl.gz "
             "file; a .parquet file; a folder written by datasets' save_to_disk; hf:NAME[:SPLIT] or hf:NAME:CONFIG:SPLIT (streamed from "
             "the Hugging Face hub); default (this Python's standard library, ~32 MB) or default:stdlib+site "
             "(plus site-packages' .py files). None given: default."),
    out: Path = typer.Option(Path("runs/data"), "--out", "-o", help="Data run directory to write."),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="Tokenizer directory (from `lmforge tokenizer`): also tokenize the splits into "
                                  "DATA/tokens/*.bin, which is what `lmforge train` reads."),
    tokenize_only: bool = typer.Option(False, "--tokenize-only",
                                       help="Skip cleaning: only tokenize the existing data run in --out (needs --tokenizer)."),
    text_field: Optional[str] = typer.Option(None, "--text-field",
                                             help="JSONL field / parquet or datasets column holding the text (default: text)."),
    min_chars: Optional[int] = typer.Option(None, "--min-chars", help="Drop shorter documents (default: 64)."),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="Drop longer documents (default: 500000)."),
    near_dedup: Optional[bool] = typer.Option(None, "--near-dedup/--no-near-dedup", show_default=False,
                                              help="MinHash near-duplicate removal (default: on)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction",
                                                 help="Share of documents held out for validation, chosen by content "
                                                      "hash so a document always lands in the same split (default: 0.02)."),
    decontaminate: Optional[List[str]] = typer.Option(
        None, "--decontaminate", show_default=False,
        help="Benchmarks to keep out of the train split, comma-separated or repeated: humaneval, mc:FILE, gen:FILE, "
             "doctest:FILE. A train document sharing a 13-gram of normalised tokens (--set data.decontam_ngram=N) "
             "with any item is dropped and counted as 'contaminated'; val is left as it is."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="TOML file whose \\[data] table sets any data key, `sources` included."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a data key, e.g. --set data.num_perm=64"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, no summary table."),
):
    """Ingest, clean, deduplicate and split a corpus; with --tokenizer, also tokenize it into shards.

    Cleaning normalises Unicode (NFC), drops binary files and invalid UTF-8, filters by length, and removes exact and near duplicates (MinHash). Kept documents go to DATA/clean/{train,val}-*.jsonl; DATA/manifest.json records the sources' hashes, the config, and what was dropped and why.

    Examples:

      lmforge data -o runs/data              (the embedded corpus)

      lmforge data docs/ chats.jsonl.gz --text-field body -o runs/mix

      lmforge data -o runs/data --decontaminate humaneval,mc:arc.jsonl   (drop train documents that hold benchmark text)

      lmforge tokenizer runs/data -o runs/tok

      lmforge data -o runs/data --tokenizer runs/tok --tokenize-only

    Precedence: defaults < --config file < --set < flags.
    """
    if tokenize_only:
        if tokenizer is None:
            raise LmforgeError("--tokenize-only needs --tokenizer DIR (a directory made by `lmforge tokenizer`)")
        man = tokenize_data(out, tokenizer, progress=not quiet)
    else:
        flags = flag_tree(text_field=text_field, min_chars=min_chars, max_chars=max_chars, dedup_near=near_dedup,
                          val_fraction=val_fraction, sources=sources or None, decontaminate=decontaminate or None)
        cfg = resolve_config(DataConfig, "data", config, set_, flags)
        if tokenizer is not None:
            load_tokenizer(tokenizer)  # fail now, not after minutes of cleaning
        man = prepare_data(cfg.sources, out, cfg, progress=not quiet)
        if tokenizer is not None:
            man = tokenize_data(out, tokenizer, progress=not quiet)
    if not quiet:
        print_summary(man, out)


def print_summary(man: dict, out: Path) -> None:
    m = man["metrics"]
    t = Table(title=f"lmforge data: {out}", title_justify="left")
    t.add_column("")
    t.add_column("documents", justify="right")
    t.add_column("MB", justify="right")
    t.add_column("tokens", justify="right")
    t.add_row("seen", f"{m['docs_seen']:,}", _mb(m.get("input_bytes", 0)), "")
    t.add_row("kept", f"{m['docs_kept']:,}", _mb(m["bytes_train"] + m["bytes_val"]), "")
    for reason, n in m["dropped"].items():
        if n:
            t.add_row(f"  dropped: {reason}", f"{n:,}", "", "")
    for split in ("train", "val"):
        tokens = f"{m[f'tokens_{split}']:,}" if f"tokens_{split}" in m else "-"
        t.add_row(split, f"{m[f'docs_{split}']:,}", _mb(m[f"bytes_{split}"]), tokens)
    console = Console()
    console.print(t)
    for task, d in m.get("decontamination", {}).get("tasks", {}).items():
        console.print(f"decontaminated against {task}: {d['items_overlapped']} of {d['items']} items overlapped "
                      "a dropped train document")
    if "bytes_per_token" in m:
        console.print(f"{m['bytes_per_token']} bytes/token, {m['token_dtype']} shards in {out / 'tokens'}")
    else:
        console.print(f"next: lmforge tokenizer {out} -o TOKDIR --tokenize")


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f}" if n_bytes >= 100_000 else f"{n_bytes / 1e6:.3f}"

"""``lmforge data``: the command-line face of :func:`lmforge.data.prepare.prepare_data`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lmforge.config import flag_tree, resolve_config
from lmforge.data.executor import make_executor
from lmforge.data.mix import load_mix
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
    mix: Optional[Path] = typer.Option(
        None, "--mix", show_default=False,
        help="Mix file naming the sources with their weights: \\[sources] name = PATH, then \\[shares] name = 0.7 (of "
             "the training tokens) or \\[tokens] name = N (per pass), and optionally \\[epochs] name = passes (above 1 "
             "upsamples). Training then draws every step at these shares. See docs/data.md."),
    profile: Optional[str] = typer.Option(None, "--profile",
                                          help="Quality filter profile: prose, code, or auto (per document, by "
                                               "extension and content; the default)."),
    no_filters: bool = typer.Option(False, "--no-filters", help="Turn every quality filter off (gopher, repetition, "
                                                                "c4, code); length, dedup and PII still apply."),
    languages: Optional[str] = typer.Option(
        None, "--languages", show_default=False,
        help="Keep only prose in these languages, ISO 639-1 codes comma-separated (en,de,zh); code is kept. The "
             "manifest counts documents per language."),
    pii: Optional[bool] = typer.Option(None, "--pii/--no-pii", show_default=False,
                                       help="Replace emails, public IP addresses, phone numbers and secrets (API keys, "
                                            "private keys, AWS keys) by typed placeholders (default: on)."),
    executor: Optional[str] = typer.Option(None, "--executor",
                                           help="Where tasks run: local (the default: processes on this machine) or ray (a Ray "
                                                "cluster; see docs/distributed.md)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes for the local executor (default 0: one "
                                                                  "per core); CPUs of a Ray cluster started here."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="HOST:PORT of a running Ray cluster (`ray start --head`); "
                                                   "default: start one on this machine."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="TOML file whose \\[data] table sets any data key, `sources` included."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a data key, e.g. --set data.num_perm=64"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, no summary table."),
):
    """Ingest, clean, deduplicate and split a corpus; with --tokenizer, also tokenize it into shards.

    Cleaning reads compressed files (.gz .bz2 .xz .zst, tar archives) and HTML (main text), normalises Unicode (NFC), drops binary files and invalid UTF-8, filters by length and quality (\\[data.filters]: gopher, repetition, c4, code; profile by document), optionally by language, scrubs PII, and removes exact and near duplicates (MinHash) across the whole corpus. Kept documents go to DATA/clean/{train,val}-*.jsonl; DATA/manifest.json records the sources' hashes, the config, and per filter the documents and bytes removed; DATA/removed/REASON.jsonl holds the first few removed documents of each kind, to inspect. An interrupted run resumes where it stopped when rerun with the same arguments.

    Examples:

      lmforge data -o runs/data              (the embedded corpus)

      lmforge data docs/ chats.jsonl.gz --text-field body -o runs/mix

      lmforge data -o runs/data --decontaminate humaneval,mc:arc.jsonl   (drop train documents that hold benchmark text)

      lmforge data --mix mix.toml -o runs/mix --languages en   (weighted sources, English prose only)

      lmforge data /data/crawl --executor ray --ray-address head:6379 -o /shared/runs/crawl

      lmforge data docs/ --set data.filters.min_words=20 --set data.pii=false

      lmforge tokenizer runs/data -o runs/tok

      lmforge data -o runs/data --tokenizer runs/tok --tokenize-only

    Precedence: defaults < --config file < --set < flags.
    """
    if tokenize_only:
        if tokenizer is None:
            raise LmforgeError("--tokenize-only needs --tokenizer DIR (a directory made by `lmforge tokenizer`)")
        man = _tokenize(out, tokenizer, quiet, executor, ray_address, workers)
    else:
        off = {"gopher": False, "repetition": False, "c4": False, "code": False} if no_filters else {}
        flags = flag_tree(text_field=text_field, min_chars=min_chars, max_chars=max_chars, dedup_near=near_dedup,
                          val_fraction=val_fraction, sources=sources or None, decontaminate=decontaminate or None,
                          languages=languages, pii=pii, executor=executor, ray_address=ray_address, workers=workers,
                          **{"filters.profile": profile}, **{f"filters.{k}": v for k, v in off.items()})
        cfg = resolve_config(DataConfig, "data", config, set_, flags)
        the_mix = load_mix(mix) if mix is not None else None
        if the_mix is not None and sources:
            raise LmforgeError("--mix names the sources itself; drop the SOURCES arguments or the --mix file")
        if tokenizer is not None:
            load_tokenizer(tokenizer)  # fail now, not after minutes of cleaning
        man = prepare_data(cfg.sources, out, cfg, progress=not quiet, mix=the_mix)
        if tokenizer is not None:
            man = _tokenize(out, tokenizer, quiet, cfg.executor, cfg.ray_address, cfg.workers)
    if not quiet:
        print_summary(man, out)


def _tokenize(out: Path, tokenizer: Path, quiet: bool, executor: str | None, address: str | None,
              workers: int | None) -> dict:
    """Ray runs tokenizing as tasks too; locally, the tokenizer's own threads already use every core."""
    if executor != "ray":
        return tokenize_data(out, tokenizer, progress=not quiet)
    ex = make_executor("ray", address or None, workers or 0)
    try:
        return tokenize_data(out, tokenizer, progress=not quiet, executor=ex)
    finally:
        ex.close()


def print_summary(man: dict, out: Path) -> None:
    m = man["metrics"]
    t = Table(title=f"lmforge data: {out}", title_justify="left")
    t.add_column("")
    t.add_column("documents", justify="right")
    t.add_column("MB", justify="right")
    t.add_column("tokens", justify="right")
    t.add_row("seen", f"{m['docs_seen']:,}", _mb(m.get("input_bytes", 0)), "")
    t.add_row("kept", f"{m['docs_kept']:,}", _mb(m["bytes_train"] + m["bytes_val"]), "")
    removed = m.get("filters", {})
    for reason, n in m["dropped"].items():
        if n:
            f = removed.get(reason, {})
            mb = _mb(f["bytes"]) if "bytes" in f else ""
            tokens = f"~{f['tokens_est']:,}" if "tokens_est" in f else ""
            t.add_row(f"  dropped: {reason}", f"{n:,}", mb, tokens)
    for split in ("train", "val"):
        tokens = f"{m[f'tokens_{split}']:,}" if f"tokens_{split}" in m else "-"
        t.add_row(split, f"{m[f'docs_{split}']:,}", _mb(m[f"bytes_{split}"]), tokens)
    console = Console()
    console.print(t)
    if m.get("pii"):
        console.print("PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in m["pii"].items()))
    if m.get("languages"):
        console.print("documents per language: " + ", ".join(f"{k} {v:,}" for k, v in list(m["languages"].items())[:12]))
    if removed:
        console.print(f"removed documents to inspect: {out / 'removed'}/REASON.jsonl")
    for task, d in m.get("decontamination", {}).get("tasks", {}).items():
        console.print(f"decontaminated against {task}: {d['items_overlapped']} of {d['items']} items overlapped "
                      "a dropped train document")
    if "bytes_per_token" in m:
        console.print(f"{m['bytes_per_token']} bytes/token, {m['token_dtype']} shards in {out / 'tokens'}")
    else:
        console.print(f"next: lmforge tokenizer {out} -o TOKDIR --tokenize")


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f}" if n_bytes >= 100_000 else f"{n_bytes / 1e6:.3f}"

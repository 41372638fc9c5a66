"""``lmforge index``: build, update and search a knowledge index (:mod:`lmforge.knowledge.index`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

import typer

from lmforge.config import flag_tree, resolve_config
from lmforge.errors import LmforgeError
from lmforge.knowledge.index import (STOPWORDS, TOKENIZERS, Hit, IndexConfig, build_index, open_index,
                                     stored_config)

PREVIEW_LINES = 3


def index_cmd(
    sources: Optional[List[str]] = typer.Argument(
        None, show_default=False,
        help="What to index, any mix of what `lmforge data` reads: directories of text/code files, .jsonl, "
             ".parquet, archives, hf:NAME, default (this Python's standard library). With --query: the index "
             "file to search (or give it with -o)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The index file (SQLite) to create or update."),
    query: Optional[str] = typer.Option(None, "--query", help="Search the index instead of building it; prints "
                                        "the best chunks with their path, line and character offsets."),
    k: int = typer.Option(5, "-k", help="How many chunks --query prints."),
    chunk_chars: Optional[int] = typer.Option(None, "--chunk-chars",
                                              help=f"Characters per chunk (default {IndexConfig.chunk_chars})."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Characters a chunk shares with the previous "
                                          f"one (default {IndexConfig.overlap})."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=f"{', '.join(TOKENIZERS)}: code keeps "
                                            "snake_case identifiers whole, words splits them, stem adds English "
                                            f"stemming (default {IndexConfig.tokenizer})."),
    text_field: Optional[str] = typer.Option(None, "--text-field",
                                             help="JSONL field / parquet or datasets column holding the text "
                                                  "(default: text)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file whose \\[index] table sets any key."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set index.overlap=100"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
):
    """Index documents for retrieval, or search an index with --query.

    Documents are cut into overlapping chunks (at blank lines and line starts, so code stays readable) and stored with a BM25 full-text index in one SQLite file. Running it again updates the index: only changed files are re-chunked, deleted ones are dropped, and the settings the index was built with are kept unless a flag changes them. Symbolic links are not followed, so nothing outside the named sources is read.

    Examples:

      lmforge index docs/ src/ -o kb.sqlite

      lmforge index docs/ src/ -o kb.sqlite     (after edits: re-indexes only what changed)

      lmforge index -o kb.sqlite                (update from the sources it was built from)

      lmforge index --query "how do I resume training" kb.sqlite -k 3

      lmforge index default -o stdlib.sqlite --chunk-chars 800 --overlap 100

    Precedence: the index's own settings < --config file < --set < flags.
    """
    if query is not None:
        search_and_print(_query_target(sources, out), query, k)
        return
    if out is None:
        raise LmforgeError("name the index file with -o, e.g. `lmforge index docs/ -o kb.sqlite`")
    stored = stored_config(out)
    sources = list(sources or []) or _stored_sources(out)
    flags = flag_tree(chunk_chars=chunk_chars, overlap=overlap, tokenizer=tokenizer, text_field=text_field)
    cfg = resolve_config(IndexConfig, "index", config, set_, flags, base=vars(stored).copy() if stored else None)
    stats = build_index(sources, out, cfg, progress=not quiet)
    if not quiet:
        print_summary(stats)


def _query_target(sources: Optional[List[str]], out: Optional[Path]) -> Path:
    """The index --query searches: the one positional argument, or -o."""
    given = list(sources or [])
    if out is not None and not given:
        return out
    if out is None and len(given) == 1:
        return Path(given[0])
    raise LmforgeError("--query searches one index: give it as the only argument "
                       "(`lmforge index --query WORDS kb.sqlite`) or with -o, not both")


def _stored_sources(out: Path) -> list[str]:
    if not out.exists():
        raise LmforgeError(f"name what to index, e.g. `lmforge index docs/ -o {out}`; {out} does not exist yet")
    with open_index(out) as idx:
        sources = idx.info().get("sources") or []
    if not sources:
        raise LmforgeError(f"{out} records no sources; name them: `lmforge index SOURCES -o {out}`")
    return sources


def search_and_print(path: Path, query: str, k: int) -> None:
    with open_index(path) as idx:
        hits = idx.search(query, k)
    if not hits:
        print(f"no chunk of {path} matches {query!r}")
        return
    for rank, h in enumerate(hits, 1):
        print(format_hit(rank, h, query))


def format_hit(rank: int, h: Hit, query: str = "") -> str:
    """``rank  score  path:line  [chars start-end]``, then a few numbered lines of the chunk: from
    the first line that holds a query word (else from the top), blank lines left out."""
    head = f"{rank:>2}  {h.score:7.2f}  {_display(h.path)}:{h.line}  [chars {h.start}-{h.end}]"
    return "\n".join([head] + [f"      {n:>5} | {text[:110]}" for n, text in preview(h, query)])


def preview(h: Hit, query: str) -> list[tuple[int, str]]:
    """Up to PREVIEW_LINES (line number, text) pairs of a hit."""
    words = {w.lower() for w in re.findall(r"\w+", query)}
    words = words - STOPWORDS or words
    lines = [(h.line + i, ln) for i, ln in enumerate(h.text.splitlines()) if ln.strip()]
    first = next((i for i, (_, ln) in enumerate(lines) if words & {w.lower() for w in re.findall(r"\w+", ln)}), 0)
    return lines[first:first + PREVIEW_LINES]


def _display(path: str) -> str:
    """A path under the working directory is shown relative to it: shorter, and still clickable."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def print_summary(stats: dict) -> None:
    s = stats
    print(f"{s['index']}: {s['docs']:,} documents, {s['chunks']:,} chunks "
          f"({s['added']:,} added, {s['updated']:,} updated, {s['unchanged']:,} unchanged, {s['removed']:,} removed"
          f"{'; new settings, so every document was indexed again' if s['rebuilt'] else ''})")
    print(f"read {s['bytes_read'] / 1e6:.2f} MB in {s['seconds']:.1f} s ({s['mb_per_s']:.1f} MB/s)")
    if s["skipped"]:
        print("skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(s["skipped"].items())))
    print(f'search it: lmforge index --query "WORDS" {s["index"]}')

"""Reading documents from every supported source, one at a time.

A source string is one of:
- ``default`` or ``default:stdlib+site``: the embedded corpus;
- a directory: every text file under it (binary files are counted and skipped);
- a file ending in ``.jsonl`` / ``.ndjson`` (JSON lines) with a text field; any other file
  (``.json`` included) is one plain-text document;
- an ``.html`` / ``.htm`` file (compressed or in a tar archive too) is one document: its main
  content as text (:mod:`lmforge.data.html`), boilerplate such as navigation left out;
- any of those compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``: read as the file they hold),
  and tar archives (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.tar.zst``),
  whose regular members are one document each (see :mod:`lmforge.data.compressed`);
- a ``.parquet`` file with a text column (a directory of them works as a tree: every
  ``.parquet`` and ``.jsonl`` file inside is read as records);
- ``hf:NAME`` or ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``: a Hugging Face dataset, streamed;
- a folder written by ``datasets.Dataset.save_to_disk``.

Documents are yielded as ``(doc_id, text)``; undecodable input, and a truncated or corrupt
archive, is counted in ``stats`` (a :class:`Drops`, which keeps the first paths of each kind)
and never raises. Malformed structured input (bad JSON, missing field) is an error that names
the file, line and field.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmforge.data.compressed import codec_of, corrupt_errors, inner_name, is_tar, iter_tar, open_text, read_document
from lmforge.data.corpus import default_corpus_paths
from lmforge.data.html import html_to_text, is_html
from lmforge.errors import LmforgeError

BINARY_SNIFF = 8192
HTML_MAX_CHARS = 2_000_000
PATHS_KEPT = 20  # per drop reason, for the manifest: enough to find the files, not a second listing


class Drops(Counter):
    """Counts of dropped inputs by reason, and the paths of the first few of each kind."""

    def __init__(self):
        super().__init__()
        self.paths: dict[str, list[str]] = {}

    def drop(self, reason: str, path=None) -> None:
        self[reason] += 1
        if path is not None:
            kept = self.paths.setdefault(reason, [])
            if len(kept) < PATHS_KEPT:
                kept.append(str(path))


def decode_bytes(raw: bytes, stats: Counter) -> str | None:
    """UTF-8 text, or None (counted) for binary data or invalid UTF-8."""
    if b"\x00" in raw[:BINARY_SNIFF]:
        stats["binary"] += 1
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["invalid_utf8"] += 1
        return None


def source_files(source: str) -> list[Path] | None:
    """The files a file-based source reads (for hashing and progress), or None for streamed sources."""
    if source.startswith("hf:"):
        return None
    if source == "default" or source.startswith("default:"):
        variant = source.split(":", 1)[1] if ":" in source else "stdlib"
        return default_corpus_paths(variant)
    p = Path(source)
    if not p.exists():
        raise LmforgeError(f"{source}: no such file or directory; a source is a directory, a .jsonl or .parquet "
                           "file, a datasets save_to_disk folder, hf:NAME[:SPLIT], or default")
    if p.is_dir():
        if _is_hf_disk_dataset(p):
            return None
        return _tree_files(p)
    return [p]


def _tree_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, sorted, skipping hidden and cache directories (.git, __pycache__)."""
    out = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).parts[:-1]
        if any(part.startswith(".") or part == "__pycache__" for part in rel):
            continue
        if f.is_file() and not f.is_symlink():
            out.append(f)
    return out


def _is_hf_disk_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists()


def iter_source(source: str, text_field: str, stats: Drops,
                files: list[Path] | None = None) -> Iterator[tuple[str, str]]:
    """``(doc_id, text)`` for every document of ``source``; ``files`` reuses a source_files() listing."""
    if source.startswith("hf:"):
        yield from _iter_hf_hub(source, text_field)
        return
    p = Path(source)
    if p.is_dir() and _is_hf_disk_dataset(p):
        yield from _iter_hf_disk(p, text_field)
        return
    for f in files if files is not None else source_files(source):
        yield from iter_file(f, text_field, stats)


def iter_file(f: Path, text_field: str, stats: Drops) -> Iterator[tuple[str, str]]:
    name = f.name.lower()
    if is_tar(name):
        yield from _iter_tar(f, stats)
    elif inner_name(name).endswith((".jsonl", ".ndjson")):
        yield from _iter_jsonl(f, text_field, stats)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(f, text_field)
    else:
        try:
            raw = read_document(f) if codec_of(name) else f.read_bytes()
        except corrupt_errors() as e:
            if not codec_of(name) and isinstance(e, OSError):  # a permission-denied file should not stop the run
                stats.drop("unreadable", f)
            else:
                stats.drop("corrupt_archive", f)
            return
        if raw is None:
            stats.drop("too_long", f)
            return
        text = decode_bytes(raw, stats)
        if text is not None and is_html(name):
            text = _html_text(text, f, stats)
        if text is not None:
            yield str(f), text


def _html_text(html: str, where, stats: Drops) -> str | None:
    """The main content of an HTML page as text; a page with none (only navigation, say) is counted,
    and so is one over HTML_MAX_CHARS, whose parse tree would take tens of times its size in memory
    (an 8 MB page of a whole manual, ~600 MB): such a page is a dump, not an article."""
    if len(html) > HTML_MAX_CHARS:
        stats.drop("too_long", where)
        return None
    text = html_to_text(html)
    if text is None:
        stats.drop("html_empty", where)
    return text


def _iter_tar(f: Path, stats: Drops) -> Iterator[tuple[str, str]]:
    """Every regular member of a tar archive is a document; a break in the archive ends it, counted."""
    try:
        for member, raw in iter_tar(f):
            if raw is None:
                stats.drop("too_long", f"{f}#{member}")
                continue
            text = decode_bytes(raw, stats)
            if text is not None and is_html(member):
                text = _html_text(text, f"{f}#{member}", stats)
            if text is not None:
                yield f"{f}#{member}", text
    except corrupt_errors():
        stats.drop("corrupt_archive", f)


def _iter_jsonl(f: Path, text_field: str, stats: Drops) -> Iterator[tuple[str, str]]:
    damaged = corrupt_errors() if codec_of(f.name) else ()
    with open_text(f) as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError:
                raise LmforgeError(f"{f}:{lineno + 1}: invalid UTF-8 in a JSONL file; re-encode it as UTF-8") from None
            except damaged:  # the lines before the damage were read; the rest of the file is lost
                stats.drop("corrupt_archive", f)
                return
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{f}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(rec, dict) or text_field not in rec:
                keys = ", ".join(list(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
                raise LmforgeError(f"{f}:{lineno}: no field '{text_field}' (found: {keys}); pick the field with --text-field")
            text = rec[text_field]
            if not isinstance(text, str):
                raise LmforgeError(f"{f}:{lineno}: field '{text_field}' is {type(text).__name__}, not a string")
            yield f"{f}:{lineno}", text


def _iter_parquet(f: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise LmforgeError(f"{f}: not a readable parquet file ({e})") from None
    import pyarrow as pa

    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise LmforgeError(f"{f}: no column '{text_field}' (found: {', '.join(schema.names[:8])}); "
                           "pick the column with --text-field")
    col_type = schema.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise LmforgeError(f"{f}: column '{text_field}' holds {col_type}, not text; pick a text column with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=256):
        for text in batch.column(0).to_pylist():
            row += 1
            yield f"{f}#{row}", text or ""  # a null counts as an empty document


def _check_field(features, text_field: str, where: str) -> None:
    if features is None:  # some streamed datasets only know their columns once read
        return
    if text_field not in features:
        raise LmforgeError(f"{where}: no column '{text_field}' (found: {', '.join(list(features)[:8])}); "
                           "pick the column with --text-field")
    dtype = getattr(features[text_field], "dtype", None)
    if dtype not in (None, "string", "large_string"):
        raise LmforgeError(f"{where}: column '{text_field}' holds {dtype}, not text; pick a text column with --text-field")


def _iter_rows(ds, text_field: str, where: str) -> Iterator[tuple[str, str]]:
    _check_field(getattr(ds, "features", None), text_field, where)
    for i, rec in enumerate(ds):
        if text_field not in rec:
            raise LmforgeError(f"{where}: row {i} has no column '{text_field}' (found: {', '.join(list(rec)[:8])}); "
                               "pick the column with --text-field")
        text = rec[text_field]
        if text is not None and not isinstance(text, str):
            raise LmforgeError(f"{where}: column '{text_field}' holds {type(text).__name__}, not text; "
                               "pick a text column with --text-field")
        yield f"{where}#{i}", text or ""


def _iter_hf_disk(p: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        for split in sorted(ds):
            yield from _iter_rows(ds[split], text_field, f"{p}[{split}]")
    else:
        yield from _iter_rows(ds, text_field, str(p))


def _iter_hf_hub(source: str, text_field: str) -> Iterator[tuple[str, str]]:
    import datasets

    parts = source[3:].split(":")
    name, config, split = parts[0], None, "train"
    if len(parts) == 2:
        split = parts[1]
    elif len(parts) >= 3:
        config, split = parts[1], parts[2]
    if not name:
        raise LmforgeError(f"{source}: no dataset name; write hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    with _quiet_hub_logs():
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # the hub is a network service: report, don't dump a traceback
            raise LmforgeError(f"{source}: cannot load the Hugging Face dataset ({_first_line(e)})") from None
        rows = _iter_rows(ds, text_field, source)
        while True:
            try:
                item = next(rows)
            except StopIteration:
                return
            except LmforgeError:
                raise
            except Exception as e:  # a dropped connection mid-stream
                raise LmforgeError(f"{source}: reading the Hugging Face dataset failed ({_first_line(e)})") from None
            yield item


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


@contextmanager
def _quiet_hub_logs():
    """Keep the hub client's retry warnings off stderr, where errors must be a single line."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

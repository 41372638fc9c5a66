"""Reading documents from every supported source, one at a time.

A source string is one of:
- ``default`` or ``default:stdlib+site``: the embedded corpus;
- a directory: every text file under it (binary files are counted and skipped);
- a file ending in ``.jsonl`` / ``.jsonl.gz`` / ``.json`` (JSON lines) with a text field;
- a ``.parquet`` file, or a directory of them is read as a tree of text files unless it
  holds only parquet files;
- ``hf:NAME`` or ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``: a Hugging Face dataset, streamed;
- a folder written by ``datasets.Dataset.save_to_disk``.

Documents are yielded as ``(doc_id, text)``; undecodable input is counted in ``stats`` and
never raises. Malformed structured input (bad JSON, missing field) is an error that names
the file, line and field.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError

BINARY_SNIFF = 8192


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


def describe(source: str) -> str:
    return source


def source_files(source: str) -> list[Path] | None:
    """The files a file-based source reads (for hashing and progress), or None for streamed sources."""
    if source.startswith("hf:"):
        return None
    if source == "default" or source.startswith("default:"):
        from lmforge.data.corpus import default_corpus_files

        variant = source.split(":", 1)[1] if ":" in source else "stdlib"
        return default_corpus_files(variant)
    p = Path(source)
    if not p.exists():
        raise LmforgeError(f"{source}: no such file or directory")
    if p.is_dir():
        if _is_hf_disk_dataset(p):
            return None
        return [f for f in sorted(p.rglob("*")) if f.is_file() and not f.is_symlink() and "__pycache__" not in f.parts]
    return [p]


def _is_hf_disk_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists()


def iter_source(source: str, text_field: str, stats: Counter) -> Iterator[tuple[str, str]]:
    if source.startswith("hf:"):
        yield from _iter_hf_hub(source, text_field)
        return
    p = Path(source)
    if p.is_dir() and _is_hf_disk_dataset(p):
        yield from _iter_hf_disk(p, text_field)
        return
    for f in source_files(source):
        yield from iter_file(f, text_field, stats)


def iter_file(f: Path, text_field: str, stats: Counter) -> Iterator[tuple[str, str]]:
    name = f.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from _iter_jsonl(f, text_field)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(f, text_field)
    else:
        try:
            raw = f.read_bytes()
        except OSError as e:
            stats["unreadable"] += 1
            return
        text = decode_bytes(raw, stats)
        if text is not None:
            yield str(f), text


def _iter_jsonl(f: Path, text_field: str) -> Iterator[tuple[str, str]]:
    opener = gzip.open if f.name.lower().endswith(".gz") else open
    with opener(f, "rt", encoding="utf-8", errors="strict") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError:
                raise LmforgeError(f"{f}:{lineno + 1}: invalid UTF-8 in a JSONL file; re-encode it as UTF-8") from None
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
    if text_field not in pf.schema_arrow.names:
        raise LmforgeError(f"{f}: no column '{text_field}' (found: {', '.join(pf.schema_arrow.names[:8])}); "
                           "pick the column with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield f"{f}#{row}", text


def _check_field(features, text_field: str, where: str) -> None:
    if features is not None and text_field not in features:
        raise LmforgeError(f"{where}: no column '{text_field}' (found: {', '.join(list(features)[:8])}); "
                           "pick the column with --text-field")


def _iter_rows(ds, text_field: str, where: str) -> Iterator[tuple[str, str]]:
    _check_field(getattr(ds, "features", None), text_field, where)
    for i, rec in enumerate(ds):
        text = rec.get(text_field)
        if isinstance(text, str):
            yield f"{where}#{i}", text


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
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # the hub is a network service: report, don't dump a traceback
        raise LmforgeError(f"{source}: cannot load the Hugging Face dataset ({str(e).splitlines()[0][:200]})") from None
    yield from _iter_rows(ds, text_field, source)

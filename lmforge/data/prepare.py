"""``lmforge data``: ingest, clean, deduplicate and split a corpus into a data run directory.

Output layout::

    DATA/clean/train-00000.jsonl ...   one {"text": ...} per line, rolled every shard_bytes
    DATA/clean/val-00000.jsonl ...
    DATA/tokens/...                    after tokenizing (lmforge.data.shards)
    DATA/manifest.json                 stage "data"

Everything streams: one document is in memory at a time, dedup state is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.data.clean import Deduper, content_hash, normalize
from lmforge.data.sources import iter_source, source_files
from lmforge.errors import LmforgeError
from lmforge.rundir import Manifest, commit_temp

DROP_REASONS = ("binary", "invalid_utf8", "unreadable", "empty", "too_short", "too_long", "exact_dup", "near_dup")


@dataclass
class DataConfig:
    min_chars: int = 64
    max_chars: int = 500_000
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.8
    num_perm: int = 128
    val_fraction: float = 0.02
    text_field: str = "text"
    split_salt: str = "lmforge"
    shard_bytes: int = 64 << 20
    shard_tokens: int = 16_000_000

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise LmforgeError(f"--val-fraction {self.val_fraction}: must be between 0 and 1")
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise LmforgeError(f"--min-chars {self.min_chars} / --max-chars {self.max_chars}: need 0 <= min < max")
        if not 0 < self.near_threshold <= 1:
            raise LmforgeError(f"near_threshold {self.near_threshold}: must be in (0, 1]")


def split_of(h: bytes, salt: str, val_fraction: float) -> str:
    """Deterministic split by content hash: the same document lands in the same split everywhere."""
    x = int.from_bytes(hashlib.blake2b(h, key=salt.encode()[:64], digest_size=8).digest(), "big")
    return "val" if x / 2**64 < val_fraction else "train"


class ShardWriter:
    """Rolling JSONL shards; each is written under a temp name and renamed when closed."""

    def __init__(self, out_dir: Path, split: str, shard_bytes: int):
        self.out_dir, self.split, self.shard_bytes = out_dir, split, shard_bytes
        self.files: list[str] = []
        self._f = None
        self._size = 0
        self.docs = self.chars = self.bytes = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.files):05d}.jsonl"
        self._name = name
        self._f = open(self.out_dir / f".{name}.tmp", "w", encoding="utf-8")
        self._size = 0

    def write(self, text: str) -> None:
        if self._f is None:
            self._open()
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        self._f.write(line)
        self._size += len(line)
        self.docs += 1
        self.chars += len(text)
        self.bytes += len(text.encode("utf-8"))
        if self._size >= self.shard_bytes:
            self._close_current()

    def _close_current(self) -> None:
        commit_temp(self._f, self.out_dir / f".{self._name}.tmp", self.out_dir / self._name)
        self.files.append(self._name)
        self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._close_current()


def _progress(total: int | None, enabled: bool, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if not enabled or not sys.stderr.isatty():
        return None
    cols = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    if total is None:
        cols = [SpinnerColumn(), TextColumn(label), TextColumn("{task.completed} docs"), TimeElapsedColumn()]
    p = Progress(*cols, transient=True)
    p.start()
    return p


def prepare_data(sources: list[str], out_dir, cfg: DataConfig | None = None, tokenizer_dir=None, progress: bool = True) -> dict:
    """Clean, dedup and split ``sources`` into ``out_dir``; tokenize too when ``tokenizer_dir`` is given."""
    cfg = cfg or DataConfig()
    sources = list(sources) or ["default"]
    out_dir = Path(out_dir)
    clean_dir = out_dir / "clean"
    clean_dir.mkdir(parents=True, exist_ok=True)
    for old in clean_dir.glob("*.jsonl"):
        old.unlink()
    (out_dir / "manifest.json").unlink(missing_ok=True)
    man = Manifest(out_dir, "data", {"sources": sources, **asdict(cfg)})
    stats: Counter = Counter()
    writers = {s: ShardWriter(clean_dir, s, cfg.shard_bytes) for s in ("train", "val")}
    dedup = Deduper(out_dir / ".dedup.sqlite", near=cfg.dedup_near, threshold=cfg.near_threshold, num_perm=cfg.num_perm)
    corpus_h = hashlib.sha256()
    t0 = time.time()
    in_bytes = 0
    try:
        for src in sources:
            files = source_files(src)
            bar = _progress(len(files) if files is not None else None, progress, f"data {src}")
            task = bar.add_task("read", total=len(files) if files else None) if bar else None
            src_h = hashlib.sha256()
            for doc_id, raw in _iter_with_progress(src, cfg.text_field, stats, bar, task):
                stats["seen"] += 1
                in_bytes += len(raw)
                src_h.update(doc_id.encode() + b"\0" + raw.encode("utf-8", "surrogatepass") + b"\0")
                text = normalize(raw)
                reason = _filter(text, cfg)
                if reason is None and cfg.dedup_exact:
                    h = content_hash(text)
                    if dedup.is_exact_dup(h):
                        reason = "exact_dup"
                else:
                    h = content_hash(text)
                if reason is None and dedup.is_near_dup(text):
                    reason = "near_dup"
                if reason:
                    stats[reason] += 1
                    continue
                stats["kept"] += 1
                corpus_h.update(h)
                writers[split_of(h, cfg.split_salt, cfg.val_fraction)].write(text)
            if bar:
                bar.stop()
            man.add_input(src, src if not src.startswith(("hf:", "default")) else out_dir, content_hash="sha256:" + src_h.hexdigest())
            man.data["inputs"][src]["path"] = src if src.startswith(("hf:", "default")) else str(Path(src).resolve())
    finally:
        for w in writers.values():
            w.close()
        dedup.close()
    stats["binary"] += 0  # make every reason appear in the report, zero or not
    dropped = {r: stats[r] for r in DROP_REASONS}
    if stats["kept"] == 0:
        why = ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "no documents found"
        raise LmforgeError(f"empty corpus: no documents kept from {', '.join(sources)} ({why}); "
                           "check the paths, --text-field and --min-chars")
    if writers["train"].docs == 0:
        raise LmforgeError(f"every kept document fell in the val split; lower --val-fraction (now {cfg.val_fraction})")
    for split, w in writers.items():
        man.add_output(f"clean_{split}", clean_dir, files=w.files)
    elapsed = time.time() - t0
    man.set_metrics(docs_seen=stats["seen"], docs_kept=stats["kept"], dropped=dropped,
                    docs_train=writers["train"].docs, docs_val=writers["val"].docs,
                    chars_train=writers["train"].chars, chars_val=writers["val"].chars,
                    bytes_train=writers["train"].bytes, bytes_val=writers["val"].bytes,
                    input_mb_per_s=round(in_bytes / 1e6 / elapsed, 2) if elapsed > 0 else None,
                    corpus_hash="sha256:" + corpus_h.hexdigest())
    man.finish()
    if tokenizer_dir is not None:
        from lmforge.data.shards import tokenize_data

        return tokenize_data(out_dir, tokenizer_dir, progress=progress)
    return man.data


def _iter_with_progress(src, text_field, stats, bar, task):
    last_file = None
    for doc_id, text in iter_source(src, text_field, stats):
        if bar is not None:
            file_part = doc_id.split(":")[0].split("#")[0]
            if bar.tasks[0].total is None or file_part != last_file:
                bar.advance(task)
            last_file = file_part
        yield doc_id, text


def _filter(text: str, cfg: DataConfig) -> str | None:
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    return None


def clean_files(data_dir, split: str) -> list[Path]:
    """The cleaned JSONL shards of a split, as the data manifest lists them."""
    from lmforge.rundir import read_manifest

    man = read_manifest(data_dir, expect_stage="data")
    out = man.get("outputs", {}).get(f"clean_{split}")
    if out is None:
        raise LmforgeError(f"{data_dir}/manifest.json lists no '{split}' split; rerun `lmforge data`")
    return [Path(data_dir) / "clean" / f for f in out["files"]]


def iter_clean(data_dir, split: str):
    for f in clean_files(data_dir, split):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]

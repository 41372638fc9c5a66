"""``lmforge data``: ingest, clean, deduplicate and split a corpus into a data run directory.

Output layout::

    DATA/clean/train-00000.jsonl ...   one {"text": ...} per line, rolled every shard_bytes
    DATA/clean/val-00000.jsonl ...
    DATA/tokens/...                    after tokenizing (lmforge.tokenizer.encode)
    DATA/manifest.json                 stage "data"

Everything streams: one document is in memory at a time, dedup state is on disk. Reading
the cleaned splits back is :mod:`lmforge.data.cleaned`.

With ``decontaminate`` (``--decontaminate humaneval,mc:FILE``), a train document that shares an
n-gram with any benchmark item is dropped and counted as ``contaminated``
(:mod:`lmforge.data.decontam`); only the benchmark's n-grams are held in memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.data.clean import Deduper, content_hash, normalize
from lmforge.data.decontam import DEFAULT_NGRAM, NgramIndex, benchmark_index, parse_specs, spec_file
from lmforge.data.sources import Drops, iter_source, source_files
from lmforge.errors import LmforgeError
from lmforge.progress import Bar
from lmforge.rundir import MANIFEST, Manifest, commit_temp

DROP_REASONS = ("binary", "invalid_utf8", "unreadable", "corrupt_archive", "empty", "too_short", "too_long",
                "contaminated", "exact_dup", "near_dup")


@dataclass
class DataConfig:
    """Settings of the data stage; a TOML ``[data]`` table and ``--set data.KEY=VALUE`` fill the same fields."""

    sources: list = field(default_factory=list)  # what `lmforge data` reads when no source is named on the command line
    min_chars: int = 64  # shorter documents are mostly stubs (empty __init__.py, one-line notes)
    # Long enough to keep big, ordinary modules (the stdlib's largest real ones are ~300 KB); generated
    # blobs beyond this are dropped.
    max_chars: int = 500_000
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.8  # estimated Jaccard similarity of 5-word shingles
    num_perm: int = 128
    val_fraction: float = 0.02  # ~0.5 MB of val text from the 32 MB stdlib corpus
    text_field: str = "text"
    split_salt: str = "lmforge"  # change it to draw a different (still deterministic) val split
    shard_bytes: int = 64 << 20  # cleaned JSONL shard size
    shard_tokens: int = 16_000_000  # tokens per .bin shard
    # Benchmarks to keep out of the train split, e.g. ["humaneval", "mc:arc.jsonl"]: a document sharing an
    # n-gram of decontam_ngram normalised tokens with any of their items is dropped ("contaminated").
    decontaminate: list | str = field(default_factory=list)  # a str: comma-separated, as --set gives it
    decontam_ngram: int = DEFAULT_NGRAM

    def __post_init__(self):
        self.decontaminate = parse_specs(self.decontaminate)  # "humaneval,mc:F" as well as a list; names checked
        if self.decontam_ngram < 1:
            raise LmforgeError(f"decontam_ngram = {self.decontam_ngram}: must be at least 1 (13 is usual)")
        if not 0 < self.val_fraction < 1:
            raise LmforgeError(f"val_fraction (--val-fraction) = {self.val_fraction}: must be between 0 and 1")
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise LmforgeError(f"min_chars = {self.min_chars}, max_chars = {self.max_chars} (--min-chars, --max-chars): "
                               "need 0 <= min_chars < max_chars")
        if not 0 < self.near_threshold <= 1:
            raise LmforgeError(f"near_threshold = {self.near_threshold}: must be in (0, 1]")
        if self.num_perm < 2:
            raise LmforgeError(f"num_perm = {self.num_perm}: must be at least 2 (64 or 128 are usual)")
        if self.shard_bytes < 1 or self.shard_tokens < 1:
            raise LmforgeError(f"shard_bytes = {self.shard_bytes}, shard_tokens = {self.shard_tokens}: must be positive")


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
        n_bytes = len(text.encode("utf-8"))
        self._f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        self._size += n_bytes  # close enough to the line's size, for rolling shards
        self.docs += 1
        self.chars += len(text)
        self.bytes += n_bytes
        if self._size >= self.shard_bytes:
            self._close_current()

    def _close_current(self) -> None:
        commit_temp(self._f, self.out_dir / f".{self._name}.tmp", self.out_dir / self._name)
        self.files.append(self._name)
        self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._close_current()

    def abort(self) -> None:
        """Drop the shard being written: a failed run must not leave a complete-looking file."""
        if self._f is not None:
            self._f.close()
            (self.out_dir / f".{self._name}.tmp").unlink(missing_ok=True)
            self._f = None


class _Run:
    """The state of one prepare_data call: counters, writers, dedup index, running hashes."""

    def __init__(self, out_dir: Path, cfg: DataConfig, bench: NgramIndex | None = None):
        self.cfg = cfg
        self.bench = bench
        self.items_hit: set[int] = set()  # benchmark items that a dropped document overlapped
        self.stats = Drops()
        self.writers = {s: ShardWriter(out_dir / "clean", s, cfg.shard_bytes) for s in ("train", "val")}
        self.dedup = Deduper(out_dir / ".dedup.sqlite", near=cfg.dedup_near, threshold=cfg.near_threshold,
                             num_perm=cfg.num_perm)
        self.corpus_h = hashlib.sha256()
        self.in_bytes = 0

    def add(self, raw: str, doc_id: str | None = None) -> None:
        """Clean one document and write it to its split, or count why it was dropped."""
        try:
            self.in_bytes += len(raw.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates, e.g. from a \ud800 escape in JSON
            self.stats["invalid_utf8"] += 1
            return
        text = normalize(raw)
        reason = _filter(text, self.cfg)
        h = content_hash(text)
        split = split_of(h, self.cfg.split_salt, self.cfg.val_fraction)
        # Checked before dedup, so a dropped document never enters the dedup index: its copies are
        # checked (and dropped) in their own right rather than counted as duplicates of a document
        # that is not there. Only train is decontaminated: val is never trained on, so benchmark
        # text in it cannot leak into a model; and since a document's split depends on its content
        # alone, val stays the same with and without --decontaminate, so the val losses of models
        # trained on both versions of the corpus remain comparable.
        if reason is None and split == "train" and self.bench is not None:
            hits = self.bench.hits(text)
            if hits:
                reason = "contaminated"
                self.items_hit.update(self.bench.owners(hits))
        if reason is None and self.cfg.dedup_exact and self.dedup.check_and_add_exact(h):
            reason = "exact_dup"
        if reason is None and self.dedup.check_and_add_near(text):
            reason = "near_dup"
        if reason:
            if reason == "contaminated":
                self.stats.drop(reason, doc_id)  # the manifest's dropped_paths then names the first few
            else:
                self.stats[reason] += 1
            return
        self.stats["kept"] += 1
        self.corpus_h.update(h)
        self.writers[split].write(text)

    def close(self, ok: bool) -> None:
        for w in self.writers.values():
            w.close() if ok else w.abort()
        self.dedup.close()

    def dropped(self) -> dict:
        return {r: self.stats[r] for r in DROP_REASONS}

    def seen(self) -> int:
        """Every document met, including files dropped before decoding (binary, invalid UTF-8)."""
        return self.stats["kept"] + sum(self.dropped().values())


def prepare_data(sources: list[str], out_dir, cfg: DataConfig | None = None, progress: bool = True) -> dict:
    """Clean, dedup and split ``sources`` into ``out_dir``; returns the data manifest (as a dict).

    Raises LmforgeError for bad input: a missing path, malformed JSONL, a missing text field,
    or a corpus from which no document survives. Tokenizing is a later step
    (:func:`lmforge.tokenizer.encode.tokenize_data`).
    """
    cfg = cfg or DataConfig()
    sources = [str(s) for s in sources] or list(cfg.sources) or ["default"]
    out_dir = Path(out_dir)
    file_lists = {src: source_files(src) for src in sources}  # a missing path fails before anything is touched
    bench = benchmark_index(cfg.decontaminate, cfg.decontam_ngram) if cfg.decontaminate else None  # so does a bad task
    _clear_outputs(out_dir)
    man = Manifest(out_dir, "data", {**asdict(cfg), "sources": sources})
    for spec in cfg.decontaminate:
        man.add_input(f"decontaminate:{spec}", spec_file(spec))
    run = _Run(out_dir, cfg, bench)
    t0 = time.time()
    try:
        for src in sources:
            src_hash = _read_source(src, file_lists[src], run, progress)
            man.data["inputs"][src] = {"path": _source_path(src), "hash": src_hash,
                                       "files": len(file_lists[src]) if file_lists[src] is not None else None}
    except BaseException:
        run.close(ok=False)
        raise
    run.close(ok=True)
    _check_not_empty(run, sources, cfg)
    for split, w in run.writers.items():
        man.add_output(f"clean_{split}", out_dir / "clean", files=w.files)
    elapsed = time.time() - t0
    tr, va = run.writers["train"], run.writers["val"]
    man.set_metrics(docs_seen=run.seen(), docs_kept=run.stats["kept"], dropped=run.dropped(),
                    dropped_paths=run.stats.paths,
                    docs_train=tr.docs, docs_val=va.docs, chars_train=tr.chars, chars_val=va.chars,
                    bytes_train=tr.bytes, bytes_val=va.bytes, input_bytes=run.in_bytes,
                    clean_seconds=round(elapsed, 2),
                    input_mb_per_s=round(run.in_bytes / 1e6 / elapsed, 2) if elapsed > 0 else None,
                    corpus_hash="sha256:" + run.corpus_h.hexdigest())
    if bench is not None:
        man.set_metrics(decontamination=_decontam_summary(bench, run.items_hit))
    man.finish()
    return man.data


def _decontam_summary(bench: NgramIndex, items_hit: set[int]) -> dict:
    """Per benchmark task: its items, and how many of them a dropped train document overlapped."""
    tasks: dict = {}
    for i, item in enumerate(bench.items):
        t = tasks.setdefault(item.task, {"items": 0, "items_overlapped": 0})
        t["items"] += 1
        t["items_overlapped"] += i in items_hit
    return {"ngram": bench.n, "benchmark_ngrams": len(bench), "tasks": tasks}


def _clear_outputs(out_dir: Path) -> None:
    """Remove what an earlier run left, so no stale clean shard or token index looks current."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for pattern in ("clean/*.jsonl", "clean/.*.tmp", "tokens/index.json", "tokens/*.bin", "tokens/.*.tmp"):
        for old in out_dir.glob(pattern):
            old.unlink()
    (out_dir / "clean").mkdir(parents=True, exist_ok=True)


def _read_source(src: str, files: list[Path] | None, run: _Run, progress: bool) -> str:
    """Feed every document of one source to ``run``; returns a hash of the source's raw content."""
    src_h = hashlib.sha256()
    last_file = None
    # Per file when the file count is known, else per document.
    total, unit = (len(files), "files") if files is not None else (None, "docs")
    with Bar(f"data {src}", total, unit=unit, enabled=progress) as bar:
        for doc_id, raw in iter_source(src, run.cfg.text_field, run.stats, files):
            src_h.update(doc_id.encode("utf-8", "surrogatepass") + b"\0" + raw.encode("utf-8", "surrogatepass") + b"\0")
            run.add(raw, doc_id)
            file_part = doc_id.split("#")[0].rsplit(":", 1)[0] if files is not None else None
            if files is None or file_part != last_file:
                bar.advance()
            last_file = file_part
    return "sha256:" + src_h.hexdigest()


def _source_path(src: str) -> str:
    if src.startswith(("hf:", "default")) and not Path(src).exists():
        return src
    return str(Path(src).resolve())


def _check_not_empty(run: _Run, sources: list[str], cfg: DataConfig) -> None:
    if run.stats["kept"] == 0:
        why = ", ".join(f"{k} {v}" for k, v in run.dropped().items() if v) or "no documents found"
        raise LmforgeError(f"empty corpus: no documents kept from {', '.join(sources)} ({why}); "
                           f"check the paths, --text-field (now '{cfg.text_field}') and --min-chars (now {cfg.min_chars})")
    if run.writers["train"].docs == 0:
        dirty = run.stats["contaminated"]
        also = f" ({dirty} train documents were dropped as contaminated)" if dirty else ""
        raise LmforgeError(f"every kept document fell in the val split{also}; lower --val-fraction (now {cfg.val_fraction})")


def _filter(text: str, cfg: DataConfig) -> str | None:
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    return None

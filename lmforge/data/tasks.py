"""The data stage's per-shard tasks: clean and filter one shard of input, then write its survivors.

``clean_task`` reads one shard of input (a run of files, or a whole streamed source), and for
each document: normalises it, applies the length, quality and language filters, scrubs PII,
checks benchmark contamination (train split only), and writes the survivor with its content
hash, MinHash signature and band keys. ``write_task`` runs after deduplication
(:mod:`lmforge.data.dedup`) and writes the shard's kept documents to its train and val files.

Every task writes under the run's ``work/`` folder, to temp names renamed when complete, and a
``.json`` summary last: a task whose summary exists is finished, which is what lets an
interrupted run resume without redoing it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lmforge.data.clean import MinHasher, content_hash, normalize, split_of
from lmforge.data.decontam import benchmark_index
from lmforge.data.langid import detect
from lmforge.data.pii import scrub
from lmforge.data.quality import apply_filters, profile_of
from lmforge.data.sources import Drops, iter_source
from lmforge.rundir import atomic_write_json, commit_temp

SAMPLE_CHARS = 4000  # of each removed document kept for inspection: enough to judge it, not a copy of the corpus
EXACT_BAND = -1  # the band number of exact-duplicate keys, beside the MinHash bands 0..b-1
EXACT, NEAR = 0, 1  # duplicate pair kinds, and the reason codes of removed documents
REASONS = {EXACT: "exact_dup", NEAR: "near_dup"}


@dataclass(frozen=True)
class Shard:
    """One task's input: a run of a source's files (or, for a streamed source, all of it)."""

    index: int
    source: str  # what the user named: a path, default, hf:NAME
    name: str  # the source's name in the mix (the source string itself without a mix)
    files: tuple[str, ...] | None
    bytes: int  # on disk, for progress and balancing


def done_file(work: Path, stage: str, index: int) -> Path:
    return work / stage / f"{index:05d}.json"


def read_done(work: Path, stage: str, index: int, stamp: str | None = None) -> dict | None:
    """A finished task's summary (marked ``reused``), or None: not run, or run on other input."""
    f = done_file(work, stage, index)
    if not f.exists():
        return None
    summary = json.loads(f.read_text(encoding="utf-8"))
    if stamp is not None and summary.get("stamp") != stamp:
        return None
    return {**summary, "reused": True}


def input_stamp(shard: "Shard") -> str:
    """Names, sizes and modification times of a shard's files: a file edited since its task ran
    makes the task run again on resume."""
    h = hashlib.sha256(shard.source.encode())
    for p in shard.files or ():
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@lru_cache(maxsize=2)
def _bench(specs: tuple[str, ...], n: int):
    return benchmark_index(list(specs), n)


@lru_cache(maxsize=4)
def _hasher(threshold: float, num_perm: int) -> MinHasher:
    return MinHasher(threshold=threshold, num_perm=num_perm)


class _Removed:
    """Per drop reason: documents, bytes and the first few documents, for the report."""

    def __init__(self, keep: int):
        self.keep = keep
        self.docs: Counter = Counter()
        self.bytes: Counter = Counter()
        self.samples: dict[str, list] = {}

    def add(self, reason: str, doc_id: str, text: str) -> None:
        self.docs[reason] += 1
        self.bytes[reason] += len(text.encode("utf-8", "surrogatepass"))
        kept = self.samples.setdefault(reason, [])
        if len(kept) < self.keep:
            kept.append({"id": doc_id, "text": text[:SAMPLE_CHARS]})

    def summary(self) -> dict:
        return {"docs": dict(self.docs), "bytes": dict(self.bytes), "samples": self.samples}


def _length_reason(text: str, cfg) -> str | None:
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    return None


class _Cleaner:
    """The per-document decisions of a clean task, in order; returns (text, reason)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.languages = set(cfg.languages)
        self.lang_counts: Counter = Counter()
        self.pii_counts: Counter = Counter()
        self.edited = Counter()  # documents and bytes the line filters cut out of kept documents
        self.bench = _bench(tuple(cfg.decontaminate), cfg.decontam_ngram) if cfg.decontaminate else None
        self.items_hit: set[int] = set()

    def __call__(self, doc_id: str, text: str, split_of) -> tuple[str, str | None, str]:
        cfg = self.cfg
        reason = _length_reason(text, cfg)
        if reason:
            return text, reason, ""
        profile = profile_of(doc_id, text, cfg.filters.profile, cfg.filters.auto_code_lines)
        if self.languages or cfg.count_languages:
            lang = self._language(text, profile)
            if self.languages and profile == "prose" and lang not in self.languages:
                return text, "language", ""
        kept, reason = apply_filters(text, doc_id, cfg.filters)
        if reason:
            return text, reason, ""
        if len(kept) != len(text):
            self.edited["docs"] += 1
            self.edited["bytes"] += len(text.encode("utf-8")) - len(kept.encode("utf-8"))
        text = kept
        if cfg.pii:
            text, counts = scrub(text, tuple(cfg.pii_kinds))
            self.pii_counts.update(counts)
        split = split_of(text)
        # Only train is decontaminated: val is never trained on, and a document's split depends on
        # its content alone, so val stays the same with and without --decontaminate.
        if split == "train" and self.bench is not None:
            hits = self.bench.hits(text)
            if hits:
                self.items_hit.update(self.bench.owners(hits))
                return text, "contaminated", split
        return text, None, split

    def _language(self, text: str, profile: str) -> str:
        lang = detect(text)[0] if profile == "prose" else "code"
        self.lang_counts[lang] += 1
        return lang


def clean_task(shard: Shard, cfg, work: Path, parts: int) -> dict:
    """Clean one shard of input into ``work/clean/NNNNN.*``; returns (and saves) its summary."""
    stamp = input_stamp(shard)
    done = read_done(work, "clean", shard.index, stamp)
    if done is not None:
        return done
    out = work / "clean"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{shard.index:05d}"
    drops, removed, cleaner = Drops(), _Removed(cfg.samples), _Cleaner(cfg)
    hasher = _hasher(cfg.near_threshold, cfg.num_perm) if cfg.dedup_near else None
    src_h, in_bytes, n = hashlib.sha256(), 0, 0
    keys = _KeyWriter(Path(f"{stem}.keys.bin"), parts)
    sigs = open(f"{stem}.sig.bin", "wb")
    no_sig = np.zeros(cfg.num_perm, dtype=np.uint32).tobytes()
    tmp = Path(f"{stem}.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f, sigs, keys:
        files = [Path(p) for p in shard.files] if shard.files is not None else None
        for doc_id, raw in iter_source(shard.source, cfg.text_field, drops, files):
            src_h.update(doc_id.encode("utf-8", "surrogatepass") + b"\0")
            try:
                raw_bytes = raw.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates, e.g. from a \ud800 escape in JSON
                drops["invalid_utf8"] += 1
                continue
            src_h.update(raw_bytes + b"\0")
            in_bytes += len(raw_bytes)
            del raw_bytes  # a document can be tens of MB: hold one copy of it at a time
            # NFC shortens a text at most 4 times (the longest canonical decomposition is 4 code points),
            # so this one is too long after it as well: spare normalising it.
            if len(raw) > 4 * cfg.max_chars:
                removed.add("too_long", doc_id, raw)
                continue
            text, reason, split = cleaner(doc_id, normalize(raw), lambda t: split_of(content_hash(t), cfg.split_salt,
                                                                                      cfg.val_fraction))
            if reason:
                removed.add(reason, doc_id, text)
                if reason == "contaminated":
                    drops.drop(reason, doc_id)  # the manifest's dropped_paths names the first few
                continue
            sig = hasher.signature(text) if hasher is not None else None
            sigs.write(sig.tobytes() if sig is not None else no_sig)
            gid = (shard.index << 32) | n
            if cfg.dedup_exact:  # the first 8 bytes of the content hash
                keys.add(EXACT_BAND, int.from_bytes(content_hash(text)[:8], "little", signed=True), gid)
            if sig is not None:
                for band, key in enumerate(hasher.band_keys(sig).tolist()):
                    keys.add(band, key, gid)
            f.write(json.dumps({"id": doc_id, "split": split, "text": text}, ensure_ascii=False) + "\n")
            n += 1
        commit_temp(f, tmp, Path(f"{stem}.jsonl"))
    np.save(f"{stem}.offsets.npy", keys.offsets())
    summary = {"index": shard.index, "stamp": stamp, "docs": n, "input_bytes": in_bytes, "source_hash": src_h.hexdigest(),
               "drops": dict(drops), "drop_paths": drops.paths, "removed": removed.summary(),
               "languages": dict(cleaner.lang_counts), "pii": dict(cleaner.pii_counts),
               "edited": dict(cleaner.edited), "items_hit": sorted(cleaner.items_hit)}
    atomic_write_json(done_file(work, "clean", shard.index), summary)
    return summary


class _KeyWriter:
    """Dedup rows (band, key, gid) to ``path`` as int64, in runs of at most RUN_ROWS rows, each sorted
    by partition (key mod parts) with its offsets kept: memory stays one run, however long the shard,
    and a partition's task reads just its slice of each run.

    One exact row per document (band -1) and one per MinHash band; gid = task << 32 | row orders
    documents as the corpus does, so the first of a group of duplicates is the one kept."""

    RUN_ROWS = 1 << 16

    def __init__(self, path: Path, parts: int):
        self.f = open(path, "wb")
        self.parts, self.buf, self.runs, self.written = parts, [], [], 0

    def add(self, band: int, key: int, gid: int) -> None:
        self.buf.append((band, key, gid))
        if len(self.buf) >= self.RUN_ROWS:
            self._flush()

    def _flush(self) -> None:
        rows = np.array(self.buf, dtype=np.int64).reshape(-1, 3)
        part = np.mod(rows[:, 1], self.parts)
        order = np.argsort(part, kind="stable")
        self.f.write(rows[order].tobytes())
        self.runs.append(self.written + np.searchsorted(part[order], np.arange(self.parts + 1)))
        self.written += len(rows)
        self.buf = []

    def offsets(self) -> np.ndarray:
        """(runs, parts + 1): where each run's slice of each partition starts, in rows of the file."""
        return np.array(self.runs, dtype=np.int64).reshape(-1, self.parts + 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.buf:
            self._flush()
        self.f.close()


def write_task(shard: Shard, cfg, work: Path, removed: np.ndarray) -> dict:
    """Write the shard's documents that dedup kept to ``work/write/{train,val}-NNNNN.jsonl``;
    ``removed``: this shard's (gid, reason code) rows from :func:`lmforge.data.dedup.resolve`."""
    done = read_done(work, "write", shard.index)
    if done is not None:
        return done
    out = work / "write"
    out.mkdir(parents=True, exist_ok=True)
    dropped = {int(g) & 0xFFFFFFFF: REASONS[int(c)] for g, c in removed.tolist()}
    counts = {s: {"docs": 0, "chars": 0, "bytes": 0} for s in ("train", "val")}
    dups = _Removed(cfg.samples)
    files, handles = {}, {}
    try:
        with open(work / "clean" / f"{shard.index:05d}.jsonl", encoding="utf-8") as src:
            for row, line in enumerate(src):
                rec = json.loads(line)
                split, text = rec["split"], rec["text"]
                if row in dropped:
                    dups.add(dropped[row], rec["id"], text)
                    continue
                if split not in handles:
                    files[split] = f"{split}-{shard.index:05d}.jsonl"
                    handles[split] = open(out / f".{files[split]}.tmp", "w", encoding="utf-8")
                handles[split].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                c = counts[split]
                c["docs"] += 1
                c["chars"] += len(text)
                c["bytes"] += len(text.encode("utf-8"))
        for split, fh in handles.items():
            commit_temp(fh, out / f".{files[split]}.tmp", out / files[split])
    except BaseException:
        for fh in handles.values():
            fh.close()
        raise
    summary = {"index": shard.index, "files": files, "counts": counts, "removed": dups.summary()}
    atomic_write_json(done_file(work, "write", shard.index), summary)
    return summary

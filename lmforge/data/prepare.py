"""``lmforge data``: ingest, clean, filter, deduplicate and split a corpus into a data run directory.

Output layout::

    DATA/clean/train-00000.jsonl ...   one {"text": ...} per line, one file per shard of input
    DATA/clean/val-00000.jsonl ...
    DATA/removed/REASON.jsonl          the first few documents each filter removed, to inspect
    DATA/tokens/...                    after tokenizing (lmforge.tokenizer.encode)
    DATA/manifest.json                 stage "data"
    DATA/work/                         task outputs while the run is under way; gone when complete

The input is cut into shards of about ``task_bytes``, and the work into stages of independent
tasks (:mod:`lmforge.data.tasks`, :mod:`lmforge.data.dedup`) run by an executor
(:mod:`lmforge.data.executor`): clean and filter each shard; group duplicate candidates by
partition of the hash space; join the pairs; write each shard's kept documents. A task's
outputs are committed with a summary file, so rerunning an interrupted command skips finished
tasks. Everything streams; no stage holds the corpus in memory.

With ``decontaminate`` (``--decontaminate humaneval,mc:FILE``), a train document that shares an
n-gram with any benchmark item is dropped and counted as ``contaminated``
(:mod:`lmforge.data.decontam`); only the benchmark's n-grams are held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.data.decontam import (
    DEFAULT_NGRAM,
    NgramIndex,
    benchmark_index,
    parse_specs,
    spec_file,
)
from lmforge.data.dedup import group_task, removed_of, resolve
from lmforge.data.executor import EXECUTORS, make_executor
from lmforge.data.langid import parse_languages
from lmforge.data.pii import KINDS as PII_KINDS
from lmforge.data.pii import check_kinds
from lmforge.data.quality import FilterConfig
from lmforge.data.sources import PATHS_KEPT, source_files
from lmforge.data.tasks import Shard, clean_task, write_task
from lmforge.errors import LmforgeError
from lmforge.progress import Bar
from lmforge.rundir import MANIFEST, Manifest, atomic_write_json, hash_json

DROP_REASONS = ("binary", "invalid_utf8", "unreadable", "corrupt_archive", "html_empty", "empty", "too_short", "too_long",
                "language", "contaminated", "exact_dup", "near_dup")
MAX_PARTS = 256  # dedup partitions, at most
PART_BYTES = 1 << 20  # of input per dedup partition: its keys are a few hundred KB


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
    shard_tokens: int = 16_000_000  # tokens per .bin shard
    # Benchmarks to keep out of the train split, e.g. ["humaneval", "mc:arc.jsonl"]: a document sharing an
    # n-gram of decontam_ngram normalised tokens with any of their items is dropped ("contaminated").
    decontaminate: list | str = field(default_factory=list)  # a str: comma-separated, as --set gives it
    decontam_ngram: int = DEFAULT_NGRAM
    filters: FilterConfig = field(default_factory=FilterConfig)  # [data.filters]: quality filters, each switchable
    # Keep only prose in these languages ("en,de" or a list of ISO 639-1 codes); code is kept whatever its
    # comments' language. Empty: keep every language.
    languages: list | str = field(default_factory=list)
    count_languages: bool = False  # count documents per language even when none is filtered out (costs a pass of langid)
    pii: bool = True  # replace emails, public IPs, phone numbers and secrets by typed placeholders
    pii_kinds: list | str = field(default_factory=lambda: list(PII_KINDS))
    executor: str = "local"  # local | ray
    # Processes for the local executor (0: one per core). Output is the same for any number; each worker
    # holds one task's state, so memory grows with workers, not with the corpus.
    workers: int = 0
    ray_address: str = ""  # HOST:PORT of a running Ray cluster; empty: start one on this machine
    task_bytes: int = 8 << 20  # input per task: small enough to spread a corpus over workers, big enough to amortise
    samples: int = 5  # removed documents kept per filter in DATA/removed/, for a human to inspect

    def __post_init__(self):
        self.decontaminate = parse_specs(self.decontaminate)  # "humaneval,mc:F" as well as a list; names checked
        self.languages = list(parse_languages(self.languages))
        self.pii_kinds = list(check_kinds(self.pii_kinds))
        if self.executor not in EXECUTORS:
            raise LmforgeError(f"executor = '{self.executor}' (--executor): unknown; use one of: {', '.join(EXECUTORS)}")
        if self.workers < 0:
            raise LmforgeError(f"workers = {self.workers} (--workers): must be 0 (one per core) or more")
        if self.task_bytes < 1 or self.samples < 0:
            raise LmforgeError(f"task_bytes = {self.task_bytes}, samples = {self.samples}: task_bytes must be positive "
                               "and samples at least 0")
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
        if self.shard_tokens < 1:
            raise LmforgeError(f"shard_tokens = {self.shard_tokens}: must be positive")


def plan_shards(named: list[tuple[str, str]], file_lists: dict, task_bytes: int) -> list:
    """Cut every source into shards of about ``task_bytes`` of input, in corpus order; a streamed
    source (hf:, save_to_disk) is one shard, since only its reader knows where it ends."""
    shards: list[Shard] = []
    for name, src in named:
        files = file_lists[src]
        if files is None:
            shards.append(Shard(len(shards), src, name, None, 0))
            continue
        run, size = [], 0
        for f in files:
            run.append(str(f))
            size += f.stat().st_size
            if size >= task_bytes:
                shards.append(Shard(len(shards), src, name, tuple(run), size))
                run, size = [], 0
        if run or not files:
            shards.append(Shard(len(shards), src, name, tuple(run), size))
    return shards


def prepare_data(sources: list[str], out_dir, cfg: DataConfig | None = None, progress: bool = True,
                 mix=None, executor=None) -> dict:
    """Clean, filter, dedup and split ``sources`` into ``out_dir``; returns the data manifest (as a dict).

    ``mix`` (a :class:`lmforge.data.mix.Mix`) names the sources instead, with their weights,
    which the manifest records for tokenizing and training. ``executor`` runs the tasks (by
    default the one ``cfg.executor`` names). Rerunning after an interruption, with the same
    sources and config, skips the tasks that finished.

    Raises LmforgeError for bad input: a missing path, malformed JSONL, a missing text field,
    or a corpus from which no document survives. Tokenizing is a later step
    (:func:`lmforge.tokenizer.encode.tokenize_data`).
    """
    cfg = cfg or DataConfig()
    if mix is not None:
        named = [(s.name, s.path) for s in mix.sources]
    else:
        named = [(str(s), str(s)) for s in (sources or cfg.sources or ["default"])]
    paths = list(dict.fromkeys(src for _, src in named))
    out_dir = Path(out_dir)
    file_lists = {src: source_files(src) for src in paths}  # a missing path fails before anything is touched
    bench = benchmark_index(cfg.decontaminate, cfg.decontam_ngram) if cfg.decontaminate else None  # so does a bad task
    shards = plan_shards(named, file_lists, cfg.task_bytes)
    # Enough partitions that each holds the keys of about PART_BYTES of input, even when one big file
    # makes one shard; at least one per shard, so a cluster has a task per worker.
    parts = min(MAX_PARTS, max(len(shards), -(-sum(s.bytes for s in shards) // PART_BYTES)))
    work = out_dir / "work"
    _clear_outputs(out_dir)
    where_run = ("executor", "ray_address", "workers")  # the same work, whichever executor does it
    _open_work(work, {"config": {k: v for k, v in asdict(cfg).items() if k not in where_run}, "sources": named,
                      "parts": parts,
                      "shards": [[s.source, s.files] for s in shards]})
    man = Manifest(out_dir, "data", {**asdict(cfg), "sources": [src for _, src in named]})
    if mix is not None:
        man.data["mix"] = mix.to_dict()
    for spec in cfg.decontaminate:
        man.add_input(f"decontaminate:{spec}", spec_file(spec))
    ex = executor or make_executor(cfg.executor, cfg.ray_address or None, cfg.workers or os.cpu_count() or 1)
    t0 = time.time()
    try:
        cleaned, written, seconds = _run_stages(ex, shards, parts, cfg, work, progress)
    finally:
        if executor is None:
            ex.close()
    report = _report(cleaned, written, cfg.samples)
    kept = sum(w["counts"][s]["docs"] for w in written for s in ("train", "val"))
    train_docs = sum(w["counts"]["train"]["docs"] for w in written)
    _check_not_empty(kept, train_docs, report["dropped"], [src for _, src in named], cfg)
    files = _commit(out_dir, work, shards, written)
    _write_samples(out_dir / "removed", report.pop("samples"))
    _record_inputs(man, named, shards, cleaned, file_lists)
    for split in ("train", "val"):
        man.add_output(f"clean_{split}", out_dir / "clean", files=[f for f, _ in files[split]],
                       sources=[n for _, n in files[split]])
    elapsed = time.time() - t0
    in_bytes = sum(c["input_bytes"] for c in cleaned)
    tot = {s: {k: sum(w["counts"][s][k] for w in written) for k in ("docs", "chars", "bytes")} for s in ("train", "val")}
    reused = {stage: sum(bool(r.get("reused")) for r in results)
              for stage, results in (("clean", cleaned), ("write", written))}
    man.set_metrics(docs_seen=kept + sum(report["dropped"].values()), docs_kept=kept, dropped=report["dropped"],
                    dropped_paths=report["dropped_paths"], filters=report["filters"], edited=report["edited"],
                    pii=report["pii"], languages=report["languages"],
                    docs_train=tot["train"]["docs"], docs_val=tot["val"]["docs"], chars_train=tot["train"]["chars"],
                    chars_val=tot["val"]["chars"], bytes_train=tot["train"]["bytes"], bytes_val=tot["val"]["bytes"],
                    input_bytes=in_bytes, tasks=len(shards), tasks_reused=reused, executor=ex.name,
                    clean_seconds=round(elapsed, 2), stage_seconds=seconds,
                    input_mb_per_s=round(in_bytes / 1e6 / elapsed, 2) if elapsed > 0 else None,
                    corpus_hash=_corpus_hash(out_dir, files))
    if bench is not None:
        hit = set().union(*(c["items_hit"] for c in cleaned))
        man.set_metrics(decontamination=_decontam_summary(bench, hit))
    man.finish()
    shutil.rmtree(work, ignore_errors=True)
    return man.data


def _run_stages(ex, shards: list, parts: int, cfg: DataConfig, work: Path, progress: bool):
    """clean -> dedup (by partition) -> join -> write; returns the clean and write summaries, in
    shard order, and each stage's seconds."""
    seconds: dict = {}
    cleaned = _stage(ex, "clean", clean_task, [(s, cfg, work, parts) for s in shards], progress, seconds)
    if not all(c.get("reused") for c in cleaned):  # what dedup and writing made from the old clean output is stale
        for stage in ("group", "write"):
            shutil.rmtree(work / stage, ignore_errors=True)
    tasks = [s.index for s in shards]
    _stage(ex, "dedup", group_task, [(p, parts, tasks, work, cfg.near_threshold, cfg.num_perm) for p in range(parts)],
           progress, seconds)
    t0 = time.perf_counter()
    removed = resolve(parts, work)
    seconds["join"] = round(time.perf_counter() - t0, 2)
    written = _stage(ex, "write", write_task, [(s, cfg, work, removed_of(removed, s.index)) for s in shards],
                     progress, seconds)
    return cleaned, written, seconds


def _record_inputs(man: Manifest, named: list, shards: list, cleaned: list, file_lists: dict) -> None:
    """Each source's path and content hash (over its shards' hashes when it was cut into several)."""
    for name, src in named:
        digests = [c["source_hash"] for s, c in zip(shards, cleaned) if s.name == name]
        h = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
        man.data["inputs"][name] = {"path": _source_path(src), "hash": "sha256:" + h,
                                    "files": len(file_lists[src]) if file_lists[src] is not None else None}


def _corpus_hash(out_dir: Path, files: dict) -> str:
    """Of the clean files' bytes in corpus order: the same corpus gives the same hash, however it
    was cut into shards."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        for name, _ in files[split]:
            with open(out_dir / "clean" / name, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def _stage(ex, label: str, fn, tasks: list[tuple], progress: bool, seconds: dict) -> list:
    """Run one stage's tasks; results in task order, whatever order they finished in."""
    results: list = [None] * len(tasks)
    t0 = time.perf_counter()
    with Bar(f"data {label}", len(tasks), unit="tasks", enabled=progress) as bar:
        for i, result in ex.run(fn, tasks):
            results[i] = result
            bar.advance()
    seconds[label] = round(time.perf_counter() - t0, 2)
    return results


def _open_work(work: Path, plan: dict) -> None:
    """Keep ``work/`` from an interrupted run of the same plan (its finished tasks are reused);
    anything else there is stale."""
    key = hash_json(plan)
    f = work / "plan.json"
    if f.exists() and json.loads(f.read_text(encoding="utf-8")).get("key") == key:
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atomic_write_json(f, {"key": key})


def _commit(out_dir: Path, work: Path, shards: list, written: list) -> dict:
    """Move the written shards into ``clean/``; per split, (file, source name) in corpus order."""
    files: dict[str, list] = {"train": [], "val": []}
    for s, w in zip(shards, written):
        for split, name in sorted(w["files"].items()):
            (work / "write" / name).replace(out_dir / "clean" / name)
            files[split].append((name, s.name))
    for split in files:
        files[split].sort()
    return files


def _report(cleaned: list, written: list, samples: int) -> dict:
    """Merge the tasks' summaries, in corpus order: what was dropped and why, per filter."""
    dropped: Counter = Counter({r: 0 for r in DROP_REASONS})
    paths: dict[str, list] = {}
    filters: dict[str, dict] = {}
    kept_samples: dict[str, list] = {}
    pii, langs, edited = Counter(), Counter(), Counter()
    for c in cleaned:
        dropped.update(c["drops"])
        for r, ps in c["drop_paths"].items():
            paths.setdefault(r, []).extend(ps)
        pii.update(c["pii"])
        langs.update(c["languages"])
        edited.update(c["edited"])
    for summary in [c["removed"] for c in cleaned] + [w["removed"] for w in written]:
        for reason, n in summary["docs"].items():
            dropped[reason] += n if reason not in ("contaminated",) else 0
            f = filters.setdefault(reason, {"docs": 0, "bytes": 0})
            f["docs"] += n
            f["bytes"] += summary["bytes"][reason]
            kept_samples.setdefault(reason, []).extend(summary["samples"].get(reason, []))
    return {"dropped": dict(dropped), "dropped_paths": {r: p[:PATHS_KEPT] for r, p in paths.items()},
            "filters": filters, "pii": dict(pii), "languages": dict(langs.most_common()), "edited": dict(edited),
            "samples": {r: s[:samples] for r, s in kept_samples.items()}}


def _write_samples(folder: Path, samples: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for reason, docs in samples.items():
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        tmp = folder / f".{reason}.jsonl.tmp"
        tmp.write_text(lines, encoding="utf-8")
        tmp.replace(folder / f"{reason}.jsonl")


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
    for pattern in ("clean/*.jsonl", "clean/.*.tmp", "removed/*.jsonl", "tokens/index.json", "tokens/*.bin",
                    "tokens/.*.tmp"):
        for old in out_dir.glob(pattern):
            old.unlink()
    (out_dir / "clean").mkdir(parents=True, exist_ok=True)


def _source_path(src: str) -> str:
    if src.startswith(("hf:", "default")) and not Path(src).exists():
        return src
    return str(Path(src).resolve())


def _check_not_empty(kept: int, train_docs: int, dropped: dict, sources: list[str], cfg: DataConfig) -> None:
    if kept == 0:
        why = ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "no documents found"
        raise LmforgeError(f"empty corpus: no documents kept from {', '.join(sources)} ({why}); "
                           f"check the paths, --text-field (now '{cfg.text_field}'), --min-chars (now {cfg.min_chars}) "
                           "and the filters ([data.filters], --no-filters)")
    if train_docs == 0:
        dirty = dropped.get("contaminated", 0)
        also = f" ({dirty} train documents were dropped as contaminated)" if dirty else ""
        raise LmforgeError(f"every kept document fell in the val split{also}; lower --val-fraction (now {cfg.val_fraction})")

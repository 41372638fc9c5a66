"""``lmforge audit contamination``: which benchmark items the training data already holds.

For every item of every task, the share of its n-grams (13 normalised tokens by default) that
occur anywhere in the training data, whether that makes it contaminated, and the first few
training documents involved; per task, the share of items contaminated and, given an eval run,
the score on the clean items against the score on all of them. The n-gram code, the benchmark
loaders and the training-document reader are :mod:`lmforge.data.decontam`, which
``lmforge data --decontaminate`` uses to drop such documents in the first place.

One streaming pass: the benchmark's n-grams are hashed into a set, then every training document
is tokenised, checked against it and forgotten, so memory follows the benchmark, not the corpus.

Layout of an audit run::

    OUT/manifest.json   stage "audit": config, inputs with hashes, metrics per task
    OUT/items.jsonl     one row per item: {"task", "id", "ngrams", "matched", "overlap",
                        "contaminated", "docs", "docs_total", "example"}
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from lmforge.data.decontam import (DEFAULT_NGRAM, TASK_KINDS, NgramIndex, benchmark_index, is_data_run, jsonl_rows,
                                   parse_specs, spec_file, split_spec, training_docs)
from lmforge.data.sources import Drops, source_files
from lmforge.errors import LmforgeError
from lmforge.eval.tasks import slug
from lmforge.progress import Bar
from lmforge.rundir import MANIFEST, Manifest, atomic_write_text, hash_file, read_manifest



@dataclass
class AuditConfig:
    """Settings of a contamination audit; a TOML ``[audit]`` table and ``--set audit.KEY=VALUE`` fill the same fields."""

    data: list | str = field(default_factory=list)  # data runs (their train split) or any `lmforge data` sources
    tasks: list | str = field(default_factory=list)  # "humaneval", "mc:FILE", "gen:FILE", "doctest:FILE"
    out: str = "runs/audit"
    ngram: int = DEFAULT_NGRAM
    # An item is contaminated when it shares at least one n-gram with the training data (the rule of the
    # GPT-3 report) and at least this share of its n-grams: raise it to ignore stray shared phrases.
    min_overlap: float = 0.0
    max_docs: int = 10  # training documents listed per item (all are counted)
    results: Optional[str] = None  # an `lmforge eval` run: score the clean items against all of them
    text_field: str = "text"  # for JSONL / parquet sources

    def __post_init__(self):
        self.data = [str(d) for d in ([self.data] if isinstance(self.data, (str, Path)) else self.data)]
        self.results = str(self.results) if self.results else None
        self.tasks = parse_specs(self.tasks)
        if self.ngram < 1:
            raise LmforgeError(f"ngram (-n) = {self.ngram}: must be at least 1 (13 is usual)")
        if not 0 <= self.min_overlap <= 1:
            raise LmforgeError(f"min_overlap (--min-overlap) = {self.min_overlap}: must be between 0 and 1")
        if self.max_docs < 0:
            raise LmforgeError(f"max_docs (--max-docs) = {self.max_docs}: must be 0 or more")


# ----------------------------------------------------------------------------- the audit


def audit_contamination(cfg: AuditConfig, progress: bool = True) -> dict:
    """Audit ``cfg.tasks`` against ``cfg.data``; writes ``items.jsonl`` and the manifest into
    ``cfg.out`` and returns the manifest (as a dict); its ``metrics.tasks`` has the per-task figures."""
    _check_inputs(cfg)
    index = benchmark_index(cfg.tasks, cfg.ngram)
    results = read_results(cfg.results, cfg.tasks) if cfg.results else {}
    out = Path(cfg.out)
    (out / MANIFEST).unlink(missing_ok=True)  # no stale manifest may vouch for a half-written audit
    man = Manifest(out, "audit", asdict(cfg))
    for spec in cfg.tasks:
        man.add_input(f"task:{spec}", spec_file(spec))
    if cfg.results:
        man.add_input("results", cfg.results)
    scan = Scan(index, cfg.max_docs)
    for where in cfg.data:
        man.data["inputs"][f"data:{where}"] = scan_training_data(scan, where, cfg.text_field, progress)
    rows = item_rows(scan, cfg.min_overlap)
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    man.add_output("items", out / "items.jsonl", hash_it=True, records=len(rows))
    man.set_metrics(tasks=task_metrics(rows, cfg.tasks, results), benchmark_ngrams=len(index), **scan.totals())
    man.finish()
    return man.data


def _check_inputs(cfg: AuditConfig) -> None:
    """Fail before any work on what is missing or misspelt."""
    if not cfg.tasks:
        raise LmforgeError(f"no tasks: pass --tasks, e.g. --tasks humaneval,mc:items.jsonl (known: {', '.join(TASK_KINDS)})")
    if not cfg.data:
        raise LmforgeError("no training data: pass --data DATA_RUN (an `lmforge data` run directory) or a source "
                           "such as a directory, a .jsonl file or default:stdlib+site")
    for where in cfg.data:
        if not is_data_run(where):
            source_files(where)  # a missing path is an error now, not after the benchmark is loaded


class Scan:
    """What the pass over the training data found: benchmark n-grams seen, and per item its documents."""

    def __init__(self, index: NgramIndex, max_docs: int):
        self.index, self.max_docs = index, max_docs
        self.found: set[int] = set()  # bounded by the benchmark's n-grams
        self.docs: list[list[str]] = [[] for _ in index.items]
        self.docs_total = [0] * len(index.items)
        self.n_docs = self.n_bytes = self.n_hit = 0
        self.seconds = 0.0

    def add(self, doc_id: str, text: str) -> None:
        self.n_docs += 1
        self.n_bytes += len(text.encode("utf-8", "surrogatepass"))
        hits = self.index.hits(text)
        if not hits:
            return
        self.n_hit += 1
        self.found |= hits
        for i in set(self.index.owners(hits)):
            self.docs_total[i] += 1
            if len(self.docs[i]) < self.max_docs:
                self.docs[i].append(doc_id)

    def totals(self) -> dict:
        return {"docs_scanned": self.n_docs, "bytes_scanned": self.n_bytes, "docs_overlapping": self.n_hit,
                "scan_seconds": round(self.seconds, 2),
                "scan_mb_per_s": round(self.n_bytes / 1e6 / self.seconds, 2) if self.seconds > 0 else None}


def scan_training_data(scan: Scan, where: str, text_field: str, progress: bool) -> dict:
    """Stream one data run or source through ``scan``; returns its manifest input entry (path, hash)."""
    t0 = time.perf_counter()
    run = is_data_run(where)
    h = hashlib.sha256()  # a source's content hash, computed on the way (a data run's is its manifest's)
    stats = Drops()
    with Bar(f"audit {where}", None, unit="docs", enabled=progress) as bar:
        for doc_id, text in training_docs(where, text_field, stats):
            if not run:
                h.update(doc_id.encode("utf-8", "surrogatepass") + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
            scan.add(doc_id, text)
            bar.advance()
    scan.seconds += time.perf_counter() - t0
    if run:
        return {"path": str(Path(where).resolve()), "hash": hash_file(Path(where) / MANIFEST), "split": "train"}
    path = where if where.startswith(("hf:", "default")) and not Path(where).exists() else str(Path(where).resolve())
    return {"path": path, "hash": "sha256:" + h.hexdigest(), "skipped": dict(stats)}


def item_rows(scan: Scan, min_overlap: float) -> list[dict]:
    """One row per benchmark item, in task and file order."""
    index = scan.index
    matched = index.matched_counts(scan.found)
    rows = []
    for i, item in enumerate(index.items):
        size = index.sizes[i]
        overlap = matched[i] / size if size else None  # None: shorter than n tokens, so never checked
        dirty = bool(matched[i]) and overlap >= min_overlap
        rows.append({"task": item.task, "id": item.id, "ngrams": size, "matched": matched[i],
                     "overlap": None if overlap is None else round(overlap, 4), "contaminated": dirty,
                     "docs": scan.docs[i], "docs_total": scan.docs_total[i],
                     "example": index.example(i, scan.found) if matched[i] else None})
    return rows


def task_metrics(rows: list[dict], specs: list[str], results: dict) -> dict:
    """Per task: items, how many were checked (long enough for one n-gram), contaminated, and the
    clean-vs-all scores when eval results are given."""
    out = {}
    for spec in specs:
        mine = [r for r in rows if r["task"] == spec]
        checked = [r for r in mine if r["ngrams"]]
        dirty = sum(r["contaminated"] for r in mine)
        m = {"items": len(mine), "checked": len(checked), "too_short": len(mine) - len(checked),
             "contaminated": dirty, "percent_contaminated": round(100 * dirty / len(mine), 2) if mine else 0.0,
             "mean_overlap": round(sum(r["overlap"] for r in checked) / len(checked), 4) if checked else None}
        if spec in results:
            m["scores"] = clean_scores(mine, results[spec])
        out[spec] = m
    return out


# ----------------------------------------------------------------------------- eval results


def read_results(eval_dir: str, specs: list[str]) -> dict:
    """``{spec: {item id: {metric: value}}}`` from an eval run's ``items/<slug>.jsonl``, for the tasks
    it has; none of them there is an error."""
    read_manifest(eval_dir, expect_stage="eval")
    items_dir = Path(eval_dir) / "items"
    out = {}
    for spec in specs:
        f = items_dir / f"{slug(spec)}.jsonl"
        f = f if f.is_file() else _same_task_file(items_dir, spec)
        if f is not None:
            out[spec] = _read_item_metrics(f)
    if not out:
        raise LmforgeError(f"--results {eval_dir}: no per-item results for {', '.join(specs)} (looked for "
                           f"{', '.join(str(items_dir / (slug(s) + '.jsonl')) for s in specs)}); "
                           "evaluate the same tasks with `lmforge eval`")
    return out


def _same_task_file(items_dir: Path, spec: str) -> Path | None:
    """The results of the same task file named another way (``mc:./a.jsonl`` vs ``mc:/abs/a.jsonl``):
    same task kind and file name, when exactly one result file matches."""
    kind, arg = split_spec(spec)
    if not arg or not items_dir.is_dir():
        return None
    found = []
    for f in sorted(items_dir.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            first = fh.readline()
        try:
            task = json.loads(first).get("task", "")
        except (json.JSONDecodeError, AttributeError):
            continue
        k, _, a = str(task).partition(":")
        if k == kind and a and Path(a).name == Path(arg).name:
            found.append(f)
    return found[0] if len(found) == 1 else None


def _read_item_metrics(f: Path) -> dict:
    out = {}
    for lineno, item_id, row in jsonl_rows(f):
        if "id" not in row or not isinstance(row.get("metrics"), dict):
            raise LmforgeError(f"{f}:{lineno}: a result row needs 'id' and 'metrics' (an object of numbers); "
                               "rerun `lmforge eval`")
        out[item_id] = row["metrics"]
    return out


def clean_scores(rows: list[dict], item_metrics: dict) -> dict:
    """Mean of each metric over every scored item and over the clean ones (not contaminated)."""
    dirty = {r["id"] for r in rows if r["contaminated"]}
    known = {r["id"] for r in rows}
    scored = {i: m for i, m in item_metrics.items() if i in known}  # eval --limit may have scored fewer
    if not scored:
        raise LmforgeError(f"--results: none of the {len(item_metrics)} result ids matches an audited item of "
                           f"'{rows[0]['task'] if rows else '?'}'; were they evaluated on the same file?")
    names = sorted({k for m in scored.values() for k in m})
    out = {"n_all": len(scored), "n_clean": sum(i not in dirty for i in scored),
           "unmatched": len(item_metrics) - len(scored)}
    for name in names:
        every = [_num(m.get(name)) for m in scored.values()]
        clean = [_num(m.get(name)) for i, m in scored.items() if i not in dirty]
        out[name] = {"all": _mean(every), "clean": _mean(clean)}
    return out


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 6) if vals else None


# ----------------------------------------------------------------------------- command line

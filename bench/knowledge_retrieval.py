"""Knowledge index: retrieval quality against bm25s, build throughput and query latency at ~100k chunks.

    python bench/knowledge_retrieval.py            # 10 stdlib packages, 3 tokenizers; the stdlib in ~100k chunks
    python bench/knowledge_retrieval.py --quick    # 3 packages, default tokenizer, a 5 MB sample: seconds
    python bench/knowledge_retrieval.py --json out.json

Quality. The held-out code base is a set of standard-library packages (email, json, http...),
indexed on their own with lmforge's defaults (1200-character chunks, 200 overlap). Every function
or method with a docstring of at least 3 words gives one query, its docstring's first paragraph;
the right answer is any chunk holding the whole ``def`` line. Since that docstring is in the
indexed text, this measures finding the code a description quotes, not understanding a
paraphrase. recall@k is the share of queries with a right chunk in the top k, MRR@10 the mean
of 1/rank (0 past 10). bm25s (its defaults: lowercase, ``\\w\\w+`` tokens, English stopwords,
Lucene BM25 with k1 1.5, b 0.75) indexes exactly the same chunk texts; lmforge is SQLite FTS5's
BM25 (k1 1.2, b 0.75) with the query's words OR-ed.

Scale. The whole embedded corpus (this Python's standard library, ~30 MB of source and docs)
indexed with 400-character chunks (overlap 50), which cuts it into ~100k chunks: the same text
a default index holds in 37k chunks, in 2.8x as many smaller ones. Build MB/s counts the UTF-8
text read; "no-change update" re-runs the build over the same files (every document hashed and
found unchanged). Query latency is one search at a time (k=10), after 20 warm-up queries, over
400 queries: half docstring paragraphs (whose recall is reported too, now against every chunk of
the standard library, tests included), half 2-3 identifiers drawn from the same files, with a
fixed seed. bm25s answers the same queries over the same chunks from memory.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import shlex
import sqlite3
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.data.corpus import default_corpus_paths  # noqa: E402
from lmforge.knowledge import IndexConfig, build_index, open_index  # noqa: E402
from lmforge.cost.hw import cpu_name  # noqa: E402
from lmforge.knowledge.index import TOKENIZERS  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PACKAGES = ["email", "json", "xml", "http", "asyncio", "logging", "urllib", "importlib", "concurrent", "unittest"]
QUICK_PACKAGES = ["json", "http", "email"]
KS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------
# Quality


def docstring_queries(files: list[Path]) -> list[dict]:
    """One query per documented function: {"query", "path", "def_start", "def_end"} (character offsets)."""
    out = []
    for f in files:
        if f.suffix != ".py":
            continue
        try:
            text = f.read_bytes().decode("utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):  # the stdlib's deliberately broken test fixtures
            continue
        starts = line_starts(text)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            query = first_paragraph(ast.get_docstring(node) or "")
            if len(re.findall(r"\w+", query)) < 3:
                continue
            s = starts[node.lineno - 1]
            e = text.find("\n", s)
            out.append({"query": query, "path": str(f), "def_start": s, "def_end": len(text) if e < 0 else e})
    return out


def line_starts(text: str) -> list[int]:
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
    return starts


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def load_chunks(db: Path) -> list[tuple]:
    """(id, path, start, end, text) of every chunk, in id order: the corpus bm25s gets too."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute('SELECT id, path, start, "end", text FROM chunks ORDER BY id').fetchall()
    finally:
        conn.close()


def relevant_ids(queries: list[dict], chunks: list[tuple]) -> list[set[int]]:
    """For each query, the chunks that hold its whole def line."""
    by_path: dict[str, list[tuple]] = {}
    for cid, path, start, end, _ in chunks:
        by_path.setdefault(path, []).append((cid, start, end))
    out = []
    for q in queries:
        spans = by_path.get(q["path"], [])
        ids = {cid for cid, s, e in spans if s <= q["def_start"] and q["def_end"] <= e}
        out.append(ids or {cid for cid, s, e in spans if s <= q["def_start"] < e})
    return out


def score(ranked: list[list[int]], relevant: list[set[int]]) -> dict:
    """recall@1/5/10 and MRR@10 of ranked chunk ids against the relevant sets."""
    ranks = []
    for ids, rel in zip(ranked, relevant):
        ranks.append(next((i + 1 for i, cid in enumerate(ids[:10]) if cid in rel), None))
    n = len(ranks)
    out = {f"recall@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in KS}
    out["mrr@10"] = sum(1 / r for r in ranks if r is not None) / n
    return out


def run_lmforge(db: Path, queries: list[dict]) -> tuple[list[list[int]], float]:
    with open_index(db) as kb:
        t = time.perf_counter()
        ranked = [[h.chunk_id for h in kb.search(q["query"], k=10)] for q in queries]
        return ranked, (time.perf_counter() - t) / len(queries)


def bm25s_index(texts: list[str]):
    """(bm25s retriever, seconds to build it), or None when bm25s is not installed."""
    try:
        import bm25s
    except ImportError:
        return None
    t = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, show_progress=False), show_progress=False)
    return retriever, time.perf_counter() - t


def bm25s_search(retriever, ids: list[int], queries: list[str]) -> tuple[list[list[int]], list[float]]:
    """Ranked chunk ids and per-query seconds, one query at a time like the index is asked."""
    import bm25s

    ranked, secs = [], []
    for q in queries:
        t = time.perf_counter()
        toks = bm25s.tokenize([q], return_ids=False, show_progress=False)[0]
        docs, _ = retriever.retrieve([toks or [""]], k=10, show_progress=False)
        secs.append(time.perf_counter() - t)
        ranked.append([ids[j] for j in docs[0]])
    return ranked, secs


def quality(packages: list[str], tokenizers: list[str], work: Path) -> list[dict]:
    sources = [str(STDLIB / p) for p in packages]
    files = sorted(f for s in sources for f in Path(s).rglob("*.py") if "__pycache__" not in f.parts)
    queries = docstring_queries(files)
    print(f"\nquality: {len(queries)} docstring queries from {len(files)} .py files of {', '.join(packages)}")
    rows = []
    chunks = None
    for tok in tokenizers:
        db = work / f"quality-{tok}.sqlite"
        stats = build_index(sources, db, IndexConfig(tokenizer=tok), progress=False)
        chunks = chunks or load_chunks(db)  # the chunking does not depend on the tokenizer
        ranked, per_q = run_lmforge(db, queries)
        rows.append({"system": f"lmforge FTS5 ({tok})", **score(ranked, relevant_ids(queries, load_chunks(db))),
                     "ms/query": per_q * 1e3, "chunks": stats["chunks"]})
    bm = bm25s_index([c[4] for c in chunks])
    if bm is None:
        print("bm25s is not installed (pip install bm25s): skipping the comparison")
    else:
        ranked, secs = bm25s_search(bm[0], [c[0] for c in chunks], [q["query"] for q in queries])
        rows.append({"system": "bm25s (same chunks)", **score(ranked, relevant_ids(queries, chunks)),
                     "ms/query": statistics.mean(secs) * 1e3, "chunks": len(chunks)})
    print_table(rows, ["system", "recall@1", "recall@5", "recall@10", "mrr@10", "ms/query", "chunks"])
    return rows


# ---------------------------------------------------------------------------------------------
# Scale


def scale_queries(files: list[Path], n: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """(docstring queries with their targets, short identifier-ish queries): n in all, half each,
    from a seeded sample of the corpus's .py files."""
    rng = random.Random(seed)
    py = [f for f in files if f.suffix == ".py"]
    sample = rng.sample(py, min(200, len(py)))
    docs = docstring_queries(sample)
    idents = sorted({w for f in sample for w in re.findall(r"\b[a-z]+_[a-z_]+\b", f.read_text(errors="replace"))})
    long_q = rng.sample(docs, min(n // 2, len(docs)))
    short_q = [" ".join(rng.sample(idents, rng.randint(2, 3))) for _ in range(n - len(long_q))]
    return long_q, short_q


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def timed_search(db: Path, queries: list[str]) -> tuple[list[list[int]], list[float]]:
    """Ranked chunk ids and per-query seconds, after a warm-up (a server's page cache is warm)."""
    with open_index(db) as kb:
        for q in queries[:20]:
            kb.search(q, k=10)
        ranked, secs = [], []
        for q in queries:
            t = time.perf_counter()
            ranked.append([h.chunk_id for h in kb.search(q, k=10)])
            secs.append(time.perf_counter() - t)
    return ranked, secs


def latency_row(system: str, secs: list[float]) -> dict:
    return {"system": system, "p50 ms": percentile(secs, 50) * 1e3, "p99 ms": percentile(secs, 99) * 1e3,
            "mean ms": statistics.mean(secs) * 1e3}


def scale(files: list[Path], n_queries: int, work: Path, quick: bool) -> dict:
    db = work / "scale.sqlite"
    cfg = IndexConfig(chunk_chars=400, overlap=50)
    sources = [str(f) for f in files] if quick else ["default"]  # quick: a sample of the default corpus's files
    first = build_index(sources, db, cfg, progress=False)
    again = build_index(sources, db, cfg, progress=False)
    long_q, short_q = scale_queries(files, n_queries)
    queries = [q["query"] for q in long_q] + short_q
    ranked, secs = timed_search(db, queries)
    mb = first["bytes_read"] / 1e6
    r = {"files": len(files), "mb": mb, "chunks": first["chunks"], "chunk_chars": cfg.chunk_chars,
         "overlap": cfg.overlap, "build_s": first["seconds"], "build_mb_s": mb / first["seconds"],
         "update_s": again["seconds"], "update_unchanged": again["unchanged"],
         "index_mb": db.stat().st_size / 1e6, "queries": len(queries)}
    print(f"\nscale: {r['files']} files, {mb:.1f} MB of text -> {r['chunks']:,} chunks "
          f"({cfg.chunk_chars} chars, overlap {cfg.overlap}); index file {r['index_mb']:.0f} MB")
    print(f"  build            {r['build_s']:7.1f} s   {r['build_mb_s']:6.2f} MB/s")
    print(f"  no-change update {r['update_s']:7.1f} s   ({r['update_unchanged']} documents unchanged)")
    chunks = load_chunks(db)
    relevant = relevant_ids(long_q, chunks)
    rows = [{**latency_row("lmforge FTS5", secs), **score(ranked[:len(long_q)], relevant)}]
    bm = bm25s_index([c[4] for c in chunks])
    if bm is not None:
        retriever, r["bm25s_index_s"] = bm
        ids = [c[0] for c in chunks]
        bm25s_search(retriever, ids, queries[:20])  # warm-up, as for the index
        bm_ranked, bm_secs = bm25s_search(retriever, ids, queries)
        rows.append({**latency_row("bm25s (in memory)", bm_secs), **score(bm_ranked[:len(long_q)], relevant)})
    print(f"  {len(queries)} queries, k=10 ({len(long_q)} docstrings, {len(short_q)} identifier pairs/triples); "
          f"recall over the docstrings, against all {len(chunks):,} chunks:")
    print_table(rows, ["system", "p50 ms", "p99 ms", "mean ms", "recall@1", "recall@5", "mrr@10"])
    if bm is not None:
        print(f"  bm25s built its in-memory index in {r['bm25s_index_s']:.1f} s from the chunk texts already read; "
              "it has no file and no incremental update")
    r["rows"] = rows
    return r


def corpus_files(quick: bool) -> list[Path]:
    files = default_corpus_paths("stdlib")
    if not quick:
        return files
    picked, total = [], 0
    for f in random.Random(0).sample(files, len(files)):
        if total > 5_000_000:
            break
        picked.append(f)
        total += f.stat().st_size
    return sorted(picked)


# ---------------------------------------------------------------------------------------------


def print_table(rows: list[dict], cols: list[str]) -> None:
    width = max(len(r["system"]) for r in rows) + 2
    print(f"{cols[0]:<{width}}" + "".join(f"{c:>11}" for c in cols[1:]))
    for r in rows:
        cells = [f"{r[c]:>11.3f}" if isinstance(r[c], float) else f"{r[c]:>11,}" for c in cols[1:]]
        print(f"{r['system']:<{width}}" + "".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 packages, default tokenizer, ~5 MB scale corpus")
    ap.add_argument("--queries", type=int, default=None, help="latency queries (default 400, quick 100)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"cpu: {cpu_name()} ({os.cpu_count()} CPUs); Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        packages = QUICK_PACKAGES if a.quick else PACKAGES
        tokenizers = [IndexConfig.tokenizer] if a.quick else list(TOKENIZERS)
        q = quality(packages, tokenizers, work)
        s = scale(corpus_files(a.quick), a.queries or (100 if a.quick else 400), work, a.quick)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"command": sys.argv, "cpu": cpu_name(), "cpus": os.cpu_count(),
                                      "sqlite": sqlite3.sqlite_version, "quality": q, "scale": s}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Training text for a model that reads retrieved code: each document is the best chunk of another
file, a separator line, then a chunk of the file itself.

    python bench/retrieval_corpus.py -o runs/rag-corpus/train.jsonl
    lmforge run -s runs/rag-corpus/train.jsonl -o runs/rag
    python bench/knowledge_bpb.py --model runs/rag/train --package rich --sep '\n# ---- end of retrieved code ----\n'

RETRO-style models learn to use their neighbours because they train with them in context; a model
trained on plain files has never seen useful text before a file starts and barely copies from it
(docs/knowledge.md, the "copy" row). Here the neighbour is found much as bench/knowledge_bpb.py finds
it at test time: by BM25 over 800-character slices of the standard library's .py files, starting
every 600 characters (the measurement's index cuts chunks of the same size and overlap, but at line
breaks), queried with the chunk's first QUERY_CHARS characters, keeping the best hit from a
different file. The neighbours come from bm25s (`pip install bm25s`), which answers 16,000 queries
in one batch in seconds where one-at-a-time SQLite queries take minutes; the measurement itself
uses lmforge.knowledge. The standard library only: site-packages, where the held-out package of the
measurement lives, is never read.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.data.corpus import default_corpus_paths  # noqa: E402

SEP = "\n# ---- end of retrieved code ----\n"
QUERY_CHARS = 400


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size) if len(text[i : i + size]) >= size // 2]


def _wrap(words: list[str], per_line: int) -> str:
    return "\n".join(" ".join(words[i : i + per_line]) for i in range(0, len(words), per_line))


def documents(files: list[Path], chunk_chars: int = 800, neighbour_chars: int = 500, max_docs: int = 16000,
              seed: int = 0, copy_share: float = 0.0, scrambled_share: float = 0.0) -> list[str]:
    """One document per sampled chunk of ``files``: its best BM25 neighbour from another file, SEP, the chunk.

    In a ``copy_share`` of the documents the neighbour slot holds a span of the chunk itself instead,
    so that the text after SEP repeats text before it: the signal that teaches a model to copy. In a
    ``scrambled_share`` the document is the chunk's words in random order, SEP, the same words again
    (wrapped at another width, so no line repeats): nothing but copying predicts the second half."""
    import bm25s  # an optional dependency, for this script only

    texts = {f: f.read_text(encoding="utf-8", errors="replace") for f in files}
    local = [(f, c) for f, text in texts.items() for c in chunks(text, chunk_chars)]
    random.Random(seed).shuffle(local)
    local = local[:max_docs]
    pool = [(f, text[i : i + 800]) for f, text in texts.items() for i in range(0, max(1, len(text) - 200), 600)]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([t for _, t in pool], show_progress=False), show_progress=False)
    queries = bm25s.tokenize([text[:QUERY_CHARS] for _, text in local], return_ids=False, show_progress=False)
    queries = [[t for t in q if t in retriever.vocab_dict] for q in queries]  # words no chunk has score nothing
    local = [lt for lt, q in zip(local, queries) if q]
    if not local:
        return []
    found, _ = retriever.retrieve([q for q in queries if q], k=min(30, len(pool)), show_progress=False, n_threads=1)
    docs, rng = [], random.Random(seed + 1)
    for (f, text), hits in zip(local, found):
        r = rng.random() if copy_share or scrambled_share else 1.0
        if r < copy_share:
            start = rng.randrange(max(1, len(text) - neighbour_chars))
            docs.append(text[start : start + neighbour_chars] + SEP + text)
            continue
        if r < copy_share + scrambled_share:
            words = text.split()
            rng.shuffle(words)
            words = words[:80]
            docs.append(_wrap(words, 8) + SEP + _wrap(words, 11))
            continue
        other = next((int(j) for j in hits if pool[int(j)][0] != f), None)
        if other is not None:  # every close chunk was the file's own: no neighbour to learn from
            docs.append(pool[other][1][:neighbour_chars] + SEP + text)
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=Path("runs/rag-corpus/train.jsonl"))
    ap.add_argument("--chunk-chars", type=int, default=800, help="local text per document")
    ap.add_argument("--neighbour-chars", type=int, default=500, help="retrieved text per document")
    ap.add_argument("--max-docs", type=int, default=20000)
    ap.add_argument("--copy-share", type=float, default=0.0,
                    help="share of documents whose neighbour is a span of the chunk itself (teaches copying)")
    ap.add_argument("--scrambled-share", type=float, default=0.0,
                    help="share of documents that are a chunk's words shuffled, SEP, the same words again")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    files = [p for p in default_corpus_paths("stdlib") if p.suffix == ".py" and p.stat().st_size > 2000]
    t0 = time.perf_counter()
    docs = documents(files, a.chunk_chars, a.neighbour_chars, a.max_docs, a.seed, a.copy_share,
                     a.scrambled_share)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = a.out.with_suffix(".tmp")
    with tmp_out.open("w", encoding="utf-8") as out:
        for d in docs:
            out.write(json.dumps({"text": d}) + "\n")
    tmp_out.replace(a.out)
    print(f"{len(docs)} documents from {len(files)} files -> {a.out} ({a.out.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

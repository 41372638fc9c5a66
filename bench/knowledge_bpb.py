"""Does retrieval help the model? Bits per byte on held-out files of a package the model never saw,
with and without the package's other files retrievable.

    python bench/knowledge_bpb.py --model runs/default/train --package rich

The package's files are split by file: a fifth are the held-out targets, the rest are indexed
(`lmforge.knowledge`, BM25). Each target file is cut into windows of T tokens; every window is
scored four ways, with the same model and the same T tokens:

  local P        the P tokens before the window (no retrieval)
  local P+R      the P+R tokens before the window: as much context as retrieval gets, all local
  retrieval      the first R tokens of the best chunk for the query "the P tokens before the
                 window", an end-of-document token, then the same P tokens (with --sep TEXT, the
                 chunk's first tokens and TEXT's tokens make up the R instead)
  copy           as retrieval, but the "chunk" is the R tokens that end with the window itself: an
                 exact copy of what is scored. No retriever can place better text, so this row
                 bounds what in-context material can give this model: it measures whether it copies

`lmforge run`'s model trained on the standard library only, so a site-packages package is code it
never saw. P + R + T is the model's context.
"""

from __future__ import annotations

import argparse
import importlib
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.cost.hw import cpu_name  # noqa: E402
from lmforge.eval.lm import open_lm  # noqa: E402
from lmforge.knowledge.index import IndexConfig, build_index, open_index  # noqa: E402


def windows(ids: list[int], before: int, size: int, limit: int) -> list[int]:
    starts = list(range(before, len(ids) - size, size))
    return starts[:limit]


def score(lm, pairs) -> float:
    return sum(lp for lp, _ in lm.loglikelihood(pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/default/train")
    ap.add_argument("--package", default="rich", help="an installed package the model did not train on")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--before", type=int, default=96, help="P: local tokens before each window")
    ap.add_argument("--retrieved", type=int, default=128, help="R: retrieved tokens")
    ap.add_argument("--window", type=int, default=32, help="T: tokens scored per window")
    ap.add_argument("--per-file", type=int, default=20, help="most windows per held-out file")
    ap.add_argument("--sep", default="", help="text between the retrieved tokens and the local ones, in place "
                    "of an end-of-document token: what a model trained by bench/retrieval_corpus.py saw there "
                    "(backslash escapes such as \\n are read)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    pkg = Path(importlib.import_module(a.package).__file__).parent
    files = sorted(p for p in pkg.rglob("*.py") if p.stat().st_size > 2000)
    random.Random(a.seed).shuffle(files)
    n_hold = max(1, int(len(files) * a.holdout))
    held, indexed = files[:n_hold], files[n_hold:]
    lm = open_lm(a.model, Path(tempfile.mkdtemp()), chat=False)
    ctx = lm.context
    if a.before + a.retrieved + a.window > ctx:
        raise SystemExit(f"P + R + T = {a.before + a.retrieved + a.window} exceeds the model's context of {ctx}")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / a.package
        src.mkdir()
        for f in indexed:  # a copy: the index covers exactly the other files, nothing else of the package
            (src / f.relative_to(pkg).as_posix().replace("/", "__")).write_text(f.read_text(encoding="utf-8"))
        t0 = time.perf_counter()
        build_index([str(src)], Path(tmp) / "kb.sqlite", IndexConfig(chunk_chars=800, overlap=200), progress=False)
        t_index = time.perf_counter() - t0
        index = open_index(Path(tmp) / "kb.sqlite")
        sep_text = a.sep.encode("ascii", "backslashreplace").decode("unicode_escape")
        sep = lm.encode(sep_text) if sep_text else [lm.eos_id]
        keep = a.retrieved - len(sep) + 1  # an end-of-document token is the one token past R
        local, longer, retrieved, copied, n_bytes, n_windows = [], [], [], [], 0, 0
        for f in held:
            ids = lm.encode(f.read_text(encoding="utf-8"))
            for s in windows(ids, a.before + a.retrieved, a.window, a.per_file):
                target = ids[s : s + a.window]
                prev = ids[s - a.before : s]
                hits = index.search(lm.decode(prev), 1)
                extra = lm.encode(hits[0].text)[:keep] if hits else []
                local.append((prev, target))
                longer.append((ids[s - a.before - a.retrieved : s], target))
                retrieved.append((extra + sep + prev, target))
                copied.append((ids[s + a.window - keep : s + a.window] + sep + prev, target))
                n_bytes += len(lm.decode(target).encode("utf-8"))
                n_windows += 1
        index.close()

    bpb = {name: -score(lm, pairs) / math.log(2) / n_bytes
           for name, pairs in (("local P", local), ("local P+R", longer), ("retrieval", retrieved),
                                               ("copy", copied))}
    print(f"cpu: {cpu_name()}   model {a.model} (context {ctx})   package {a.package}: {len(held)} held-out files, "
          f"{len(indexed)} indexed ({t_index:.1f} s)   {n_windows} windows of {a.window} tokens, {n_bytes:,} bytes")
    print(f"P = {a.before}, R = {a.retrieved}, T = {a.window}, separator {a.sep!r} ({len(sep)} tokens)\n")
    print("| context | bits per byte | vs local P |")
    print("|---|---|---|")
    for name, v in bpb.items():
        print(f"| {name} | {v:.4f} | {v / bpb['local P'] - 1:+.1%} |")
    print(f"\ncommand: python bench/knowledge_bpb.py --model {a.model} --package {a.package}"
          + (f" --sep {a.sep!r}" if a.sep else ""))


if __name__ == "__main__":
    main()

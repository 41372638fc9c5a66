"""Global exact and near-duplicate removal, as a shuffle by hash band.

Each clean task wrote, per surviving document, rows ``(band, key, gid)``: one exact row (the
content hash) and one per MinHash band (:mod:`lmforge.data.tasks`). Documents that share a
(band, key) are candidates. The key space is cut into partitions, so ``group_task`` for one
partition reads only its slice of every task's rows: a shuffle by band key that runs as
independent tasks on any executor. Within a bucket, every later document is paired with the
first (by corpus order); near candidates are kept only when their signatures' estimated Jaccard
similarity reaches the threshold (exact ones are paired as they are).

``resolve`` joins the pairs with union-find: each connected group keeps its first document, so
the result does not depend on which task found which pair. A group is transitive: if B nearly
copies A and C nearly copies B, C goes too, even when it is further from A than the threshold.
The pairs are the only global state, and there are as many as there are duplicates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.data.tasks import EXACT, EXACT_BAND, NEAR, read_done
from lmforge.rundir import atomic_write_json


def group_task(part: int, parts: int, tasks: list[int], work: Path, threshold: float, num_perm: int) -> dict:
    """Candidate pairs of one partition of the key space -> ``work/group/NNNNN.npy`` (a, b, kind)."""
    done = read_done(work, "group", part)
    if done is not None:
        return done
    out = work / "group"
    out.mkdir(parents=True, exist_ok=True)
    chunks = []
    for t in tasks:
        stem = work / "clean" / f"{t:05d}"
        offsets = np.load(f"{stem}.offsets.npy")
        if not offsets.size:
            continue
        rows = np.memmap(f"{stem}.keys.bin", dtype=np.int64, mode="r").reshape(-1, 3)
        chunks.extend(np.array(rows[a:b]) for a, b in offsets[:, [part, part + 1]].tolist())
    rows = np.concatenate(chunks) if chunks else np.zeros((0, 3), dtype=np.int64)
    pairs = _pairs(rows, work, threshold, num_perm)
    tmp = out / f".{part:05d}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, pairs)
    tmp.replace(out / f"{part:05d}.npy")
    summary = {"part": part, "rows": len(rows), "pairs": len(pairs)}
    atomic_write_json(out / f"{part:05d}.json", summary)
    return summary


def _pairs(rows: np.ndarray, work: Path, threshold: float, num_perm: int) -> np.ndarray:
    if not len(rows):
        return np.zeros((0, 3), dtype=np.int64)
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]  # by band, then key, then corpus order
    same = (rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1])
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    first = np.repeat(rows[starts, 2], np.diff(np.append(starts, len(rows))))
    later = rows[:, 2] != first
    a, b, band = first[later], rows[later, 2], rows[later, 0]
    exact = band == EXACT_BAND
    out = [np.stack([a[exact], b[exact], np.full(exact.sum(), EXACT)], axis=1)]
    near_a, near_b = a[~exact], b[~exact]
    if len(near_a):
        pairs = np.unique(np.stack([near_a, near_b], axis=1), axis=0)  # one check per pair, however many bands agree
        ok = _similar(pairs, work, threshold, num_perm)
        out.append(np.concatenate([pairs[ok], np.full((int(ok.sum()), 1), NEAR)], axis=1))
    return np.concatenate(out).astype(np.int64)


def _similar(pairs: np.ndarray, work: Path, threshold: float, num_perm: int) -> np.ndarray:
    sigs: dict[int, np.ndarray] = {}

    def sig(gid: int) -> np.ndarray:
        task = gid >> 32
        if task not in sigs:
            sigs[task] = np.memmap(work / "clean" / f"{task:05d}.sig.bin", dtype=np.uint32, mode="r").reshape(-1, num_perm)
        return sigs[task][gid & 0xFFFFFFFF]

    return np.array([float(np.mean(sig(int(x)) == sig(int(y)))) >= threshold for x, y in pairs], dtype=bool)


def resolve(parts: int, work: Path) -> np.ndarray:
    """Removed documents as sorted int64 rows (gid, reason code): every member of a duplicate
    group but its first; exact_dup when it copies another document exactly, else near_dup."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    exact_copies: set[int] = set()
    for p in range(parts):
        pairs = np.load(work / "group" / f"{p:05d}.npy")
        for a, b, kind in pairs.tolist():
            if kind == EXACT:
                exact_copies.add(b)
            ra, rb = find(a), find(b)
            if ra != rb:  # the smaller gid, earlier in the corpus, becomes the root and is kept
                parent[max(ra, rb)] = min(ra, rb)
    removed = sorted(x for x in parent if find(x) != x)
    return np.array([(x, EXACT if x in exact_copies else NEAR) for x in removed], dtype=np.int64).reshape(-1, 2)


def removed_of(removed: np.ndarray, task: int) -> np.ndarray:
    """The rows of ``removed`` (sorted by gid) that belong to one clean task."""
    lo, hi = np.searchsorted(removed[:, 0], [task << 32, (task + 1) << 32])
    return removed[lo:hi]


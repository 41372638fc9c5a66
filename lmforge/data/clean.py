"""Cleaning: normalisation, length filters, exact and near-duplicate removal.

Dedup state lives in a SQLite file rather than Python sets, so memory stays flat however
large the corpus: the exact-dedup table holds one 8-byte key per document, and the
MinHash LSH index holds one row per (band, bucket) with the signatures beside it for the
final Jaccard check.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import unicodedata
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def lsh_params(num_perm: int, threshold: float) -> tuple[int, int]:
    """Bands b and rows r (b*r <= num_perm) whose S-curve midpoint (1/b)^(1/r) is nearest the threshold."""
    best = None
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if b < 1:
            break
        mid = (1.0 / b) ** (1.0 / r)
        if best is None or abs(mid - threshold) < best[0]:
            best = (abs(mid - threshold), b, r)
    return best[1], best[2]


class Deduper:
    """Exact and MinHash near-duplicate detection backed by an on-disk SQLite index."""

    def __init__(self, path: Path, near: bool = True, threshold: float = 0.8, num_perm: int = 128,
                 shingle: int = 5, seed: int = 1):
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self.db = sqlite3.connect(str(self.path))
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("PRAGMA cache_size=-8000")  # an 8 MB page cache, whatever the corpus size
        self.db.execute("CREATE TABLE exact (h BLOB PRIMARY KEY) WITHOUT ROWID")
        self.near, self.threshold, self.num_perm, self.shingle, self.seed = near, threshold, num_perm, shingle, seed
        if near:
            self.bands, self.rows = lsh_params(num_perm, threshold)
            self.db.execute("CREATE TABLE sig (id INTEGER PRIMARY KEY, s BLOB)")
            self.db.execute("CREATE TABLE lsh (band INTEGER, bucket BLOB, id INTEGER)")
            self.db.execute("CREATE INDEX lsh_idx ON lsh (band, bucket)")
        self._n = 0

    def is_exact_dup(self, h: bytes) -> bool:
        cur = self.db.execute("INSERT OR IGNORE INTO exact (h) VALUES (?)", (h,))
        return cur.rowcount == 0

    def _signature(self, text: str) -> np.ndarray | None:
        from datasketch import MinHash

        words = _WORD.findall(text)
        k = self.shingle
        if len(words) < k:
            return None  # too short to shingle: exact dedup already covered it
        shingles = {" ".join(words[i : i + k]).encode("utf-8") for i in range(len(words) - k + 1)}
        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(shingles))
        return m.hashvalues.astype(np.uint64)

    def is_near_dup(self, text: str) -> bool:
        """True if a kept document is estimated at >= threshold Jaccard similarity; else index this one."""
        if not self.near:
            return False
        sig = self._signature(text)
        if sig is None:
            return False
        buckets = [sig[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(self.bands)]
        candidates = set()
        for b, bucket in enumerate(buckets):
            for (cid,) in self.db.execute("SELECT id FROM lsh WHERE band=? AND bucket=?", (b, bucket)):
                candidates.add(cid)
        for cid in candidates:
            (blob,) = self.db.execute("SELECT s FROM sig WHERE id=?", (cid,)).fetchone()
            other = np.frombuffer(blob, dtype=np.uint64)
            if float(np.mean(other == sig)) >= self.threshold:
                return True
        self._n += 1
        self.db.execute("INSERT INTO sig (id, s) VALUES (?, ?)", (self._n, sig.tobytes()))
        self.db.executemany("INSERT INTO lsh (band, bucket, id) VALUES (?, ?, ?)",
                            [(b, bucket, self._n) for b, bucket in enumerate(buckets)])
        return False

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

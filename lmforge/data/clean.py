"""Cleaning: normalisation, length filters, exact and near-duplicate removal.

Dedup state lives in a SQLite file (with a fixed page cache) rather than Python sets, so
memory stays flat however large the corpus: the exact-dedup table holds one 16-byte key per
document, and the MinHash LSH index one row per (band, band hash) of each kept document, with
its signature beside it for the final similarity check.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import unicodedata
import zlib
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
MINHASH_CHUNK = 4096
MAX_CANDIDATES = 64  # per band and document
_MIX = np.uint64(0x100000001B3)  # the 64-bit FNV prime: a cheap, well-spread polynomial base


def normalize(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _identity(h: int) -> int:
    return h


def shingle_hashes(text: str, k: int) -> np.ndarray | None:
    """Distinct 32-bit hashes of the k-word shingles of ``text``, or None if it has fewer than k words.

    Words are hashed once with crc32 and shingles combined in numpy, which is several times
    faster than hashing every joined shingle string, and the same on every run and machine.
    """
    words = _WORD.findall(text)
    if len(words) < k:
        return None
    wh = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
    n = len(words) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):
        h = h * _MIX + wh[j : j + n]  # wraps mod 2**64, as intended
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


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
    """Exact and MinHash near-duplicate detection backed by an on-disk SQLite index.

    The first of a group of near-duplicates is kept; later ones are dropped. Each kept
    document's signature is split into ``bands`` bands of ``rows`` values; documents that
    agree on a whole band are candidates, and a candidate counts only if the estimated
    Jaccard similarity (the share of equal signature values) reaches the threshold.
    """

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
        self._n = 0
        if near:
            from datasketch import MinHash

            template = MinHash(num_perm=num_perm, seed=seed)
            # Permutations are drawn once, not per document; datasketch >= 2 also wants their scheme named.
            self._mh_kwargs = {"num_perm": num_perm, "seed": seed, "hashfunc": _identity,
                               "permutations": template.permutations}
            if getattr(template, "scheme", None) is not None:
                self._mh_kwargs["scheme"] = template.scheme
            self.bands, self.rows = lsh_params(num_perm, threshold)
            self.db.execute("CREATE TABLE sig (id INTEGER PRIMARY KEY, s BLOB)")
            self.db.execute("CREATE TABLE lsh (band INTEGER, key INTEGER, id INTEGER)")
            self.db.execute("CREATE INDEX lsh_idx ON lsh (band, key)")
            # One query per document; the LIMIT bounds the work when a bucket is crowded (boilerplate).
            self._query = " UNION ".join(
                f"SELECT * FROM (SELECT id FROM lsh WHERE band={b} AND key=? LIMIT {MAX_CANDIDATES})"
                for b in range(self.bands))

    def check_and_add_exact(self, h: bytes) -> bool:
        """True if ``h`` was seen before; otherwise record it and return False."""
        cur = self.db.execute("INSERT OR IGNORE INTO exact (h) VALUES (?)", (h,))
        return cur.rowcount == 0

    def _signature(self, text: str) -> np.ndarray | None:
        from datasketch import MinHash

        hashes = shingle_hashes(text, self.shingle)
        if hashes is None:
            return None  # too short to shingle: exact dedup already covered it
        m = MinHash(**self._mh_kwargs)
        # Chunks keep the (shingles x num_perm) temporaries a few MB even for the longest document.
        for i in range(0, len(hashes), MINHASH_CHUNK):
            m.update_batch(hashes[i : i + MINHASH_CHUNK].tolist())
        return m.hashvalues.astype(np.uint32)  # MinHash values are below 2**32 in every datasketch scheme

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        rows = sig[: self.bands * self.rows].reshape(self.bands, self.rows)
        return [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "big", signed=True) for r in rows]

    def check_and_add_near(self, text: str) -> bool:
        """True if a kept document is estimated at >= threshold Jaccard similarity; otherwise index
        this one as kept and return False."""
        if not self.near:
            return False
        sig = self._signature(text)
        if sig is None:
            return False
        keys = self._band_keys(sig)
        ids = [cid for (cid,) in self.db.execute(self._query, keys)]
        for i in range(0, len(ids), 500):  # SQLite caps the number of ? parameters
            chunk = ids[i : i + 500]
            rows = self.db.execute(f"SELECT s FROM sig WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            for (blob,) in rows:
                if float(np.mean(np.frombuffer(blob, dtype=np.uint32) == sig)) >= self.threshold:
                    return True
        self._n += 1
        self.db.execute("INSERT INTO sig (id, s) VALUES (?, ?)", (self._n, sig.tobytes()))
        self.db.executemany("INSERT INTO lsh (band, key, id) VALUES (?, ?, ?)",
                            [(b, k, self._n) for b, k in enumerate(keys)])
        return False

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

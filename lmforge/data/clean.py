"""Cleaning primitives: normalisation, content hashes, and MinHash signatures for near-dup removal.

Grouping documents by hash and band key is :mod:`lmforge.data.dedup`; it works from the
signatures and keys computed here, written to disk per task, so memory stays flat however
large the corpus.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
MINHASH_CHUNK = 4096
_MIX = np.uint64(0x100000001B3)  # the 64-bit FNV prime: a cheap, well-spread polynomial base


def normalize(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_of(h: bytes, salt: str, val_fraction: float) -> str:
    """Deterministic split by content hash: the same document lands in the same split everywhere."""
    x = int.from_bytes(hashlib.blake2b(h, key=salt.encode()[:64], digest_size=8).digest(), "big")
    return "val" if x / 2**64 < val_fraction else "train"


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


class MinHasher:
    """MinHash signatures and LSH band keys of documents, for near-duplicate detection.

    A signature is ``num_perm`` minimum hash values over the document's k-word shingles; the
    share of equal values estimates the Jaccard similarity of two documents. The signature is
    cut into ``bands`` bands of ``rows`` values: documents that agree on a whole band are
    candidates (:mod:`lmforge.data.dedup` groups them by band key), and a candidate counts only
    when the estimated similarity reaches the threshold.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        from datasketch import MinHash

        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        template = MinHash(num_perm=num_perm, seed=seed)
        # Permutations are drawn once, not per document; datasketch >= 2 also wants their scheme named.
        self._mh_kwargs = {"num_perm": num_perm, "seed": seed, "hashfunc": _identity,
                           "permutations": template.permutations}
        if getattr(template, "scheme", None) is not None:
            self._mh_kwargs["scheme"] = template.scheme
        self.bands, self.rows = lsh_params(num_perm, threshold)

    def signature(self, text: str) -> np.ndarray | None:
        """uint32[num_perm], or None for a document under one shingle (exact dedup covers those)."""
        from datasketch import MinHash

        hashes = shingle_hashes(text, self.shingle)
        if hashes is None:
            return None
        m = MinHash(**self._mh_kwargs)
        # Chunks keep the (shingles x num_perm) temporaries a few MB even for the longest document.
        for i in range(0, len(hashes), MINHASH_CHUNK):
            m.update_batch(hashes[i : i + MINHASH_CHUNK].tolist())
        return m.hashvalues.astype(np.uint32)  # MinHash values are below 2**32 in every datasketch scheme

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """int64[bands]: one well-spread key per band of the signature."""
        rows = sig[: self.bands * self.rows].reshape(self.bands, self.rows)
        return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "big", signed=True)
                         for r in rows], dtype=np.int64)

    def similar(self, a: np.ndarray, b: np.ndarray) -> bool:
        return float(np.mean(a == b)) >= self.threshold

"""Weighted source mixing: which sources a model trains on, and in what proportions.

A mix file names the sources and how much of each the model sees::

    [sources]            # name = any source `lmforge data` reads
    code = "default"
    docs = "/usr/share/doc"

    [shares]             # of the training tokens; normalised, so 7 and 3 work as well as 0.7 and 0.3
    code = 0.7
    docs = 0.3

    [epochs]             # optional: the most passes over a source (default 1); above 1 upsamples it
    docs = 3

Instead of ``[shares]``, ``[tokens]`` gives each source a number of tokens per pass over the mix
(more than a source holds repeats it; fewer takes a part of it, a different part each pass).

The data stage keeps each source's documents together, in its own clean and token shards, and
records the mix in the manifest. The trainer then draws every step's windows from the sources in
a fixed interleaving (:class:`MixOrder`), so the shares hold at every step, not just on average,
and the order stays a pure function of (seed, step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from lmforge.config import load_toml
from lmforge.errors import LmforgeError

TABLES = ("sources", "shares", "tokens", "epochs")
PERIOD = 4096  # samples in one round of the interleaving: shares are kept to 1/4096


@dataclass
class MixSource:
    name: str
    path: str
    share: float | None = None  # relative weight in the training tokens
    tokens: int | None = None  # tokens per pass over the mix
    epochs: float = 1.0  # the most passes over this source's data


@dataclass
class Mix:
    sources: list[MixSource] = field(default_factory=list)
    file: str = ""

    @property
    def mode(self) -> str:
        return "tokens" if self.sources and self.sources[0].tokens is not None else "shares"

    def to_dict(self) -> dict:
        return {"file": self.file, "mode": self.mode,
                "sources": [{"name": s.name, "path": s.path, "share": s.share, "tokens": s.tokens, "epochs": s.epochs}
                            for s in self.sources]}

    @classmethod
    def from_dict(cls, d: dict) -> "Mix":
        return cls([MixSource(**s) for s in d["sources"]], d.get("file", ""))


def load_mix(path: str | Path) -> Mix:
    """Read and check a mix file; every mistake is one line naming the file, table and source."""
    doc = load_toml(path)
    where = str(path)
    unknown = sorted(set(doc) - set(TABLES))
    if unknown:
        raise LmforgeError(f"{where}: unknown table [{unknown[0]}]; a mix file has [sources], then [shares] or "
                           "[tokens], and optionally [epochs]")
    sources = doc.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise LmforgeError(f"{where}: no [sources] table; name each source: name = \"PATH or default or hf:NAME\"")
    for name, src in sources.items():
        if not isinstance(src, str) or not src:
            raise LmforgeError(f"{where}: [sources] {name} = {src!r}; give the source as a string (a path, default, hf:NAME)")
    if ("shares" in doc) == ("tokens" in doc):
        raise LmforgeError(f"{where}: give the weights in exactly one of [shares] or [tokens]")
    kind = "shares" if "shares" in doc else "tokens"
    weights = _weights(doc[kind], kind, sources, where)
    epochs = doc.get("epochs", {})
    if not isinstance(epochs, dict):
        raise LmforgeError(f"{where}: [epochs] must be a table of name = passes")
    _check_names(epochs, "epochs", sources, where)
    out = []
    for name, src in sources.items():
        e = epochs.get(name, 1.0)
        if isinstance(e, bool) or not isinstance(e, (int, float)) or e <= 0:
            raise LmforgeError(f"{where}: [epochs] {name} = {e!r}; must be a positive number of passes")
        w = weights[name]
        out.append(MixSource(name, src, share=w if kind == "shares" else None,
                             tokens=int(w) if kind == "tokens" else None, epochs=float(e)))
    return Mix(out, where)


def _check_names(table: dict, kind: str, sources: dict, where: str) -> None:
    for name in table:
        if name not in sources:
            raise LmforgeError(f"{where}: [{kind}] names '{name}', which [sources] does not define "
                               f"(defined: {', '.join(sources)})")


def _weights(table, kind: str, sources: dict, where: str) -> dict:
    if not isinstance(table, dict):
        raise LmforgeError(f"{where}: [{kind}] must be a table of name = number")
    _check_names(table, kind, sources, where)
    missing = [n for n in sources if n not in table]
    if missing:
        raise LmforgeError(f"{where}: [{kind}] has no weight for '{missing[0]}'; give every source one (0 leaves it out)")
    for name, w in table.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise LmforgeError(f"{where}: [{kind}] {name} = {w!r}; must be a number")
        if w < 0:
            raise LmforgeError(f"{where}: [{kind}] {name} = {w}; weights cannot be negative")
    if sum(table.values()) <= 0:
        raise LmforgeError(f"{where}: the [{kind}] weights sum to zero; give at least one source a positive weight")
    return dict(table)


def window_shares(mix: Mix, windows: list[int], context: int) -> list[float]:
    """Each source's share of the training windows, from the mix and the windows each source holds."""
    if mix.mode == "tokens":
        w = [s.tokens / context for s in mix.sources]
    else:
        w = [s.share for s in mix.sources]
    for s, n, wi in zip(mix.sources, windows, w):
        if wi > 0 and n == 0:
            raise LmforgeError(f"mix source '{s.name}' has a weight but no complete training window of "
                               f"{context + 1} tokens; give it more text or a weight of 0")
    total = sum(w)
    return [x / total for x in w]


def budget_windows(mix: Mix, windows: list[int], shares: list[float], context: int) -> int:
    """Windows in one pass over the mix: as many as the sources' epoch caps allow at these shares
    (shares), or the sum of the sources' token weights (tokens)."""
    if mix.mode == "tokens":
        return max(1, sum(s.tokens for s in mix.sources) // context)
    return max(1, int(min(n * s.epochs / p for s, n, p in zip(mix.sources, windows, shares) if p > 0)))


class MixOrder:
    """Sample id -> token offset of its window, drawing from each source in a fixed interleaving.

    One round of PERIOD samples gives source i about ``shares[i] * PERIOD`` of them, placed by
    largest deficit, so after any number of samples each source has had its share to within
    one window. Within a source, sample k is window ``perm(seed, source, k // n)[k % n]``: each
    pass over the source is a fresh permutation, so a repeated source is seen in a new order
    and a subsampled one takes new windows each pass.
    """

    def __init__(self, starts: list[int], windows: list[int], shares: list[float], context: int, seed: int):
        self.starts, self.windows, self.context, self.seed = starts, windows, context, seed
        counts = _largest_remainder(shares, PERIOD)
        self.assign = _interleave(counts)
        self.per_round = np.array(counts, dtype=np.int64)
        # rank[j]: how many samples of the same source come before position j in a round
        self.rank = np.zeros(PERIOD, dtype=np.int64)
        self.cum = np.zeros((len(counts), PERIOD + 1), dtype=np.int64)
        seen = np.zeros(len(counts), dtype=np.int64)
        for j, i in enumerate(self.assign):
            self.rank[j] = seen[i]
            seen[i] += 1
            self.cum[:, j + 1] = seen

    @lru_cache(maxsize=16)
    def _perm(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, source, epoch]).permutation(self.windows[source])

    def offsets(self, sample_ids: np.ndarray) -> np.ndarray:
        rounds, pos = np.divmod(sample_ids, PERIOD)
        src = self.assign[pos]
        k = rounds * self.per_round[src] + self.rank[pos]
        out = np.empty_like(sample_ids)
        for j, (i, kk) in enumerate(zip(src.tolist(), k.tolist())):
            epoch, w = divmod(kk, self.windows[i])
            out[j] = self.starts[i] + int(self._perm(i, epoch)[w]) * self.context
        return out

    def samples_per_source(self, n_samples: int) -> list[int]:
        """How many of the first ``n_samples`` samples each source gave."""
        rounds, rem = divmod(n_samples, PERIOD)
        return (rounds * self.per_round + self.cum[:, rem]).tolist()


def _largest_remainder(shares: list[float], total: int) -> list[int]:
    raw = [p * total for p in shares]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _interleave(counts: list[int]) -> np.ndarray:
    """Positions of one round: at each, the source furthest behind its target count."""
    total = sum(counts)
    out = np.empty(total, dtype=np.int64)
    seen = [0] * len(counts)
    for j in range(total):
        i = max(range(len(counts)), key=lambda i: (counts[i] * (j + 1) / total - seen[i], -i))
        out[j] = i
        seen[i] += 1
    return out

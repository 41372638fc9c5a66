"""Deterministic data order: every batch is a pure function of (seed, step, rank).

The train split is cut into non-overlapping windows of ``context + 1`` tokens. Each
optimizer step consumes ``global_batch`` window ids in order; epoch ``e`` visits the
windows in a permutation seeded by (seed, e). Because nothing depends on how many
steps ran before, a resumed run, a replay after rollback, or the same global batch
split over a different number of ranks all see exactly the same tokens.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from lmforge.data.mix import Mix, MixOrder, budget_windows, window_shares


class Order:
    """Sample ids 0, 1, 2, ... mapped to item ids: epoch ``e`` visits ``n`` items in a permutation
    seeded by (seed, e), so sample ``i`` is item ``order(i)`` whatever ran before."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __call__(self, sample_ids: np.ndarray) -> np.ndarray:
        epochs, pos = np.divmod(sample_ids, self.n)
        out = np.empty_like(sample_ids)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._order(int(e))[pos[sel]]
        return out


def micro_batch_ids(step: int, rank: int, micro: int, *, batch_size: int, grad_accum: int, world: int) -> np.ndarray:
    """The global sample ids of one micro-batch: each step takes ``batch_size * grad_accum * world``
    in order, so the same global batch split over any number of ranks sees the same samples."""
    global_batch = batch_size * grad_accum * world
    first = step * global_batch + rank * grad_accum * batch_size + micro * batch_size
    return np.arange(first, first + batch_size, dtype=np.int64)


class BatchSource:
    def __init__(self, tokens, context: int, seed: int, mix: dict | None = None, sources: list[dict] | None = None):
        """``tokens``: an object with ``__len__`` and ``window(offset, length)`` (see lmforge.data.shards).
        ``mix`` (the token index's) and ``sources`` (the split's [{"name", "tokens"}] ranges, in order)
        draw windows source by source at the mix's shares (:class:`lmforge.data.mix.MixOrder`)."""
        self.tokens = tokens
        self.context = context
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // context
        if self.n_windows < 1:
            raise ValueError(f"the train split has {len(tokens)} tokens, fewer than one context of {context + 1}")
        self.window_ids = Order(self.n_windows, seed)
        self.mix = self.source_names = None
        if mix is not None:
            self._use_mix(Mix.from_dict(mix), sources or [])

    def _use_mix(self, mix: Mix, sources: list[dict]) -> None:
        have = {s["name"]: s["tokens"] for s in sources}
        starts, pos = {}, 0
        for s in sources:
            starts[s["name"]], pos = pos, pos + s["tokens"]
        names = [s.name for s in mix.sources]
        windows = [max(0, (have.get(n, 0) - 1) // self.context) for n in names]
        shares = window_shares(mix, windows, self.context)
        self.mix = MixOrder([starts.get(n, 0) for n in names], windows, shares, self.context, self.seed)
        self.source_names = names
        self.n_windows = budget_windows(mix, windows, shares, self.context)

    def offsets(self, sample_ids: np.ndarray) -> np.ndarray:
        if self.mix is not None:
            return self.mix.offsets(sample_ids)
        return self.window_ids(sample_ids) * self.context

    def tokens_per_source(self, steps: int, global_batch: int, skipped=()) -> dict | None:
        """Tokens each mix source gave over ``steps`` steps, less the ``skipped`` steps (quarantined)."""
        if self.mix is None:
            return None
        count = self.mix.samples_per_source
        total = np.array(count(steps * global_batch))
        for q in skipped:
            total -= np.array(count((q + 1) * global_batch)) - np.array(count(q * global_batch))
        return {n: int(c) * self.context for n, c in zip(self.source_names, total)}

    def micro_batch(self, step: int, rank: int, micro: int, *, batch_size: int, grad_accum: int, world: int):
        """(x, y) int64 tensors of shape (batch_size, context) for one micro-batch."""
        offsets = self.offsets(micro_batch_ids(step, rank, micro, batch_size=batch_size, grad_accum=grad_accum,
                                               world=world))
        rows = np.stack([self.tokens.window(int(o), self.context + 1) for o in offsets])
        t = torch.from_numpy(rows.astype(np.int64))
        return t[:, :-1], t[:, 1:]

    def epochs_seen(self, steps: int, global_batch: int) -> float:
        return steps * global_batch / self.n_windows


def val_batches(tokens, context: int, batch_size: int, max_batches: int, rank: int = 0, world: int = 1):
    """This rank's share of a fixed val set of ``max_batches * batch_size * world`` windows.

    The windows are spread evenly over the whole val split, so a small val set still samples
    every part of the corpus (the split is in document order). The set depends only on the
    global eval batch, so any split over ranks evaluates the same windows."""
    total = (len(tokens) - 1) // context
    n = min(total, max_batches * batch_size * world)
    ids = np.arange(n, dtype=np.int64) * total // max(n, 1)
    starts = list(range(0, n, batch_size))
    for b in starts[rank::world]:
        rows = np.stack([tokens.window(int(w) * context, context + 1) for w in ids[b : b + batch_size]])
        t = torch.from_numpy(rows.astype(np.int64))
        yield t[:, :-1], t[:, 1:]

"""Token shards: tokenizing the cleaned splits, and reading them back without copying.

``DATA/tokens/{split}-NNNNN.bin`` are raw little-endian arrays (uint16 when the vocabulary
fits, else uint32); every document is followed by the eos token. ``index.json`` lists the
shards with their token counts and is written last, so its presence means complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.rundir import atomic_write_json, commit_temp, hash_file, hash_json, read_manifest

INDEX = "index.json"
BATCH_DOCS = 256


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class _ShardSink:
    def __init__(self, tok_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.dir, self.split, self.dtype, self.cap = tok_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._f is None:
                self._name = f"{self.split}-{len(self.shards):05d}.bin"
                self._f = open(self.dir / f".{self._name}.tmp", "wb")
                self._n = 0
            take = min(len(ids), self.cap - self._n)
            self._f.write(ids[:take].astype(self.dtype, copy=False).tobytes())
            self._n += take
            ids = ids[take:]
            if self._n >= self.cap:
                self._close()

    def _close(self) -> None:
        commit_temp(self._f, self.dir / f".{self._name}.tmp", self.dir / self._name)
        self.shards.append({"file": self._name, "tokens": self._n})
        self._f = None

    def close(self) -> None:
        if self._f is not None and self._n:
            self._close()
        elif self._f is not None:
            self._f.close()
            (self.dir / f".{self._name}.tmp").unlink(missing_ok=True)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def tokenize_data(data_dir, tokenizer_dir, progress: bool = True, shard_tokens: int | None = None) -> dict:
    """Tokenize a data run directory's cleaned splits into shards; returns the updated data manifest."""
    from lmforge.data.prepare import clean_files
    from lmforge.tokenizer.train import load_tokenizer, special_ids

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # encode_batch spreads over every core
    data_dir, tokenizer_dir = Path(data_dir), Path(tokenizer_dir)
    man = read_manifest(data_dir, expect_stage="data")
    tok = load_tokenizer(tokenizer_dir)
    ids = special_ids(tok)
    vocab = tok.get_vocab_size()
    dtype = _dtype_for(vocab)
    cap = shard_tokens or man["config"].get("shard_tokens", 16_000_000)
    tok_dir = data_dir / "tokens"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / INDEX).unlink(missing_ok=True)
    for old in tok_dir.glob("*.bin"):
        old.unlink()
    splits, t0, n_bytes = {}, time.time(), 0
    for split in ("train", "val"):
        sink = _ShardSink(tok_dir, split, dtype, cap)
        files = clean_files(data_dir, split)
        bar = _bar(split, sum(f.stat().st_size for f in files), progress)
        for texts, size in _batches(files):
            enc = tok.encode_batch(texts)
            flat = np.fromiter((i for e in enc for i in (*e.ids, ids["eos"])), dtype=np.int64)
            sink.write(flat)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            if bar:
                bar[0].advance(bar[1], size)
        sink.close()
        if bar:
            bar[0].stop()
        splits[split] = {"tokens": sink.tokens, "shards": sink.shards}
    elapsed = time.time() - t0
    index = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": ids["eos"], "bos_id": ids["bos"], "pad_id": ids["pad"],
             "tokenizer_hash": hash_file(tokenizer_dir / "tokenizer.json"), "splits": splits}
    atomic_write_json(tok_dir / INDEX, index)
    man["inputs"]["tokenizer"] = {"path": str(tokenizer_dir.resolve()), "hash": index["tokenizer_hash"]}
    man["outputs"]["token_index"] = {"path": f"tokens/{INDEX}", "hash": hash_json(index)}
    man["metrics"].update(tokens_train=splits["train"]["tokens"], tokens_val=splits["val"]["tokens"],
                          token_dtype=dtype.name, tokenize_mb_per_s=round(n_bytes / 1e6 / elapsed, 2) if elapsed else None,
                          bytes_per_token=round(n_bytes / max(1, splits["train"]["tokens"] + splits["val"]["tokens"]), 4))
    atomic_write_json(data_dir / "manifest.json", man)
    return man


def _batches(files):
    texts, size = [], 0
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                texts.append(json.loads(line)["text"])
                size += len(line.encode("utf-8"))
                if len(texts) >= BATCH_DOCS:
                    yield texts, size
                    texts, size = [], 0
    if texts:
        yield texts, size


def _bar(split: str, total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    p = Progress(TextColumn(f"tokenize {split}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                 TextColumn("ETA"), TimeRemainingColumn(), transient=True)
    p.start()
    return p, p.add_task(split, total=total)


class SplitView:
    """One split's shards as a single virtual array: ``len()`` and ``window(offset, length)``."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or offset + length > len(self):
            raise IndexError(f"window [{offset}, {offset + length}) outside a split of {len(self)} tokens")
        k = int(np.searchsorted(self.starts, offset, side="right") - 1)
        local = offset - int(self.starts[k])
        part = self.arrays[k][local : local + length]
        if len(part) == length:
            return np.asarray(part)
        pieces, need = [np.asarray(part)], length - len(part)
        while need:
            k += 1
            piece = self.arrays[k][:need]
            pieces.append(np.asarray(piece))
            need -= len(piece)
        return np.concatenate(pieces)


class TokenData:
    """The token shards of a data run directory, memory-mapped."""

    def __init__(self, data_dir):
        self.dir = Path(data_dir) / "tokens"
        path = self.dir / INDEX
        if not path.exists():
            raise LmforgeError(f"{path}: missing; tokenize first with `lmforge data ... --tokenizer DIR`")
        try:
            self.index = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}: not valid JSON ({e.msg})") from None
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eos_id = int(self.index["eos_id"])
        self.index_hash = hash_json(self.index)
        self._views: dict[str, SplitView] = {}

    def split(self, name: str) -> SplitView:
        if name not in self._views:
            entry = self.index["splits"].get(name)
            if entry is None:
                raise LmforgeError(f"{self.dir / INDEX}: no '{name}' split")
            arrays = []
            for sh in entry["shards"]:
                f = self.dir / sh["file"]
                if not f.exists():
                    raise LmforgeError(f"{f}: token shard missing; re-run tokenization")
                expected = sh["tokens"] * self.dtype.itemsize
                if f.stat().st_size != expected:
                    raise LmforgeError(f"{f}: {f.stat().st_size} bytes, expected {expected}; the shard is truncated or "
                                       "corrupted, re-run tokenization")
                arrays.append(np.memmap(f, dtype=self.dtype, mode="r"))
            self._views[name] = SplitView(arrays)
        return self._views[name]

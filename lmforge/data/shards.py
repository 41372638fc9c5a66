"""Token shards: their on-disk format, the writer's sink, and reading them back without copying.

``DATA/tokens/{split}-NNNNN.bin`` are raw little-endian arrays (uint16 when the vocabulary
fits, else uint32); every document is followed by the eos token. ``index.json`` lists the
shards with their token counts and is written last, so its presence means complete; the
data manifest records its path and hash, and :func:`open_tokens` checks both. Tokenizing
itself needs a tokenizer, so it lives a layer up, in :mod:`lmforge.tokenizer.encode`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.rundir import MANIFEST, commit_temp, hash_json, read_manifest

INDEX = "index.json"
SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardSink:
    """Appends token ids to rolling ``{split}-NNNNN.bin`` shards of at most ``cap`` tokens."""

    def __init__(self, tok_dir: Path, split: str, dtype: np.dtype, cap: int):
        self.dir, self.split, self.dtype, self.cap = tok_dir, split, dtype, cap
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
                self._commit()

    def _commit(self) -> None:
        commit_temp(self._f, self.dir / f".{self._name}.tmp", self.dir / self._name)
        self.shards.append({"file": self._name, "tokens": self._n})
        self._f = None

    def close(self) -> None:
        if self._f is not None and self._n:
            self._commit()
        elif self._f is not None:
            self._f.close()
            (self.dir / f".{self._name}.tmp").unlink(missing_ok=True)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


class SplitView:
    """One split's shards as a single virtual array: ``len()`` and ``window(offset, length)``."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` as int64, crossing shard boundaries as needed."""
        if offset < 0 or length < 0 or offset + length > len(self):
            raise IndexError(f"window [{offset}, {offset + length}) outside a split of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.starts, offset, side="right") - 1)
        filled = 0
        while filled < length:
            local = offset + filled - int(self.starts[k])
            piece = self.arrays[k][local : local + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            k += 1
        return out


def empty_tokens_dir(data_dir: Path) -> Path:
    """``DATA/tokens`` with any earlier index and shards removed first, so old shards never look current."""
    tok_dir = Path(data_dir) / "tokens"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / INDEX).unlink(missing_ok=True)
    for old in tok_dir.glob("*.bin"):
        old.unlink()
    return tok_dir


def open_tokens(data_dir) -> tuple[dict, "TokenData"]:
    """(data manifest, token data) of a tokenized data run, through the index the manifest
    records, whose hash must match: a shard set replaced behind the manifest's back fails here."""
    man = read_manifest(data_dir, expect_stage="data")
    entry = man.get("outputs", {}).get("token_index")
    if not entry:
        raise LmforgeError(f"{data_dir}: the data has not been tokenized; run `lmforge data ... --tokenizer DIR` first")
    td = TokenData(Path(data_dir) / entry["path"])
    if entry.get("hash") and td.index_hash != entry["hash"]:
        raise LmforgeError(f"{td.dir / INDEX}: does not match the hash in {Path(data_dir) / MANIFEST}; the token "
                           "shards were replaced after tokenizing; re-run `lmforge data ... --tokenizer DIR --tokenize-only`")
    return man, td


class TokenData:
    """The token shards of a data run directory, memory-mapped.

    Opening checks every shard listed in ``index.json`` exists with the right size, so a
    truncated copy fails here with the file's name instead of mid-training.
    """

    def __init__(self, data_dir_or_index):
        p = Path(data_dir_or_index)
        path = p if p.name == INDEX else p / "tokens" / INDEX
        self.dir = path.parent
        if not path.exists():
            raise LmforgeError(f"{path}: missing; tokenize first with `lmforge data ... --tokenizer DIR`")
        try:
            self.index = json.loads(path.read_text(encoding="utf-8"))
            self.dtype = np.dtype(self.index["dtype"])
            self.vocab_size = int(self.index["vocab_size"])
            self.eos_id = int(self.index["eos_id"])
            self.bos_id = self.index.get("bos_id")
            self.pad_id = self.index.get("pad_id")
            splits = self.index["splits"]
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}: not valid JSON ({e.msg}); re-run tokenization") from None
        except (KeyError, TypeError) as e:
            raise LmforgeError(f"{path}: malformed token index (missing {e}); re-run tokenization") from None
        self.index_hash = hash_json(self.index)
        for name, entry in splits.items():
            for sh in entry["shards"]:
                self._check_shard(sh)
        self._views: dict[str, SplitView] = {}

    def _check_shard(self, sh: dict) -> None:
        f = self.dir / sh["file"]
        if not f.exists():
            raise LmforgeError(f"{f}: token shard missing; re-run tokenization (`lmforge data ... --tokenizer DIR`)")
        expected = sh["tokens"] * self.dtype.itemsize
        if f.stat().st_size != expected:
            raise LmforgeError(f"{f}: {f.stat().st_size} bytes, expected {expected}; the shard is truncated or "
                               "corrupted, re-run tokenization")

    @property
    def splits(self) -> list[str]:
        return list(self.index["splits"])

    def split(self, name: str) -> SplitView:
        if name not in self._views:
            entry = self.index["splits"].get(name)
            if entry is None:
                raise LmforgeError(f"{self.dir / INDEX}: no '{name}' split (have: {', '.join(self.splits)})")
            arrays = [np.memmap(self.dir / sh["file"], dtype=self.dtype, mode="r") for sh in entry["shards"]]
            self._views[name] = SplitView(arrays)
        return self._views[name]

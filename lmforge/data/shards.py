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
from typing import Iterator

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.rundir import atomic_write_json, commit_temp, hash_file, hash_json, read_manifest

INDEX = "index.json"
SPLITS = ("train", "val")
# Text per encode_batch call: big enough that the Rust side keeps both cores busy, small
# enough that the Encoding objects (ids, offsets, token strings) stay a few tens of MB.
BATCH_CHARS = 1 << 20


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class _ShardSink:
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


def tokenize_data(data_dir, tokenizer_dir, progress: bool = True, shard_tokens: int | None = None) -> dict:
    """Tokenize a data run directory's cleaned splits into shards; returns the updated data manifest."""
    from lmforge.tokenizer.train import load_tokenizer, special_ids

    # encode_batch spreads over every core (rayon); honour an explicit "false" from the caller.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    data_dir, tokenizer_dir = Path(data_dir), Path(tokenizer_dir)
    man = read_manifest(data_dir, expect_stage="data")
    if man.get("status") != "complete":
        raise LmforgeError(f"{data_dir}/manifest.json: status '{man.get('status')}'; rerun `lmforge data` first")
    tok = load_tokenizer(tokenizer_dir)
    ids = special_ids(tok)
    vocab = tok.get_vocab_size()
    dtype = dtype_for(vocab)
    cap = shard_tokens or man["config"].get("shard_tokens", 16_000_000)
    if cap < 1:
        raise LmforgeError(f"shard_tokens = {cap}: must be at least 1")
    tok_dir = _empty_tokens_dir(data_dir)
    splits, t0, n_bytes = {}, time.time(), 0
    for split in SPLITS:
        tokens, shards, size = _tokenize_split(tok, ids["eos"], data_dir, split, tok_dir, dtype, cap, progress)
        splits[split] = {"tokens": tokens, "shards": shards}
        n_bytes += size
    elapsed = time.time() - t0
    index = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": ids["eos"], "bos_id": ids["bos"], "pad_id": ids["pad"],
             "tokenizer_hash": hash_file(tokenizer_dir / "tokenizer.json"), "splits": splits}
    atomic_write_json(tok_dir / INDEX, index)
    n_tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    man["inputs"]["tokenizer"] = {"path": str(tokenizer_dir.resolve()), "hash": index["tokenizer_hash"]}
    man["outputs"]["token_index"] = {"path": f"tokens/{INDEX}", "hash": hash_json(index)}
    man["metrics"].update(tokens_train=splits["train"]["tokens"], tokens_val=splits["val"]["tokens"],
                          token_dtype=dtype.name, bytes_per_token=round(n_bytes / max(1, n_tokens), 4),
                          tokenize_mb_per_s=round(n_bytes / 1e6 / elapsed, 2) if elapsed > 0 else None)
    atomic_write_json(data_dir / "manifest.json", man)
    return man


def _empty_tokens_dir(data_dir: Path) -> Path:
    """``DATA/tokens`` with any earlier index removed first, so old shards never look current."""
    tok_dir = data_dir / "tokens"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / INDEX).unlink(missing_ok=True)
    for old in tok_dir.glob("*.bin"):
        old.unlink()
    return tok_dir


def _tokenize_split(tok, eos: int, data_dir: Path, split: str, tok_dir: Path, dtype, cap: int, progress: bool):
    """Stream one split through the tokenizer into shards; returns (tokens, shards, utf-8 bytes read)."""
    from lmforge.data.prepare import clean_files

    files = clean_files(data_dir, split)
    sink = _ShardSink(tok_dir, split, dtype, cap)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips char offsets we never use
    n_bytes = 0
    with _Bar(f"tokenize {split}", sum(f.stat().st_size for f in files), progress) as bar:
        try:
            for texts, file_bytes in _batches(files):
                sink.write(_join_with_eos(encode(texts, add_special_tokens=False), eos))
                n_bytes += sum(len(t.encode("utf-8")) for t in texts)
                bar.advance(file_bytes)
        finally:
            sink.close()
    return sink.tokens, sink.shards, n_bytes


def _join_with_eos(encodings, eos: int) -> np.ndarray:
    lens = [len(e.ids) for e in encodings]
    out = np.empty(sum(lens) + len(lens), dtype=np.int64)
    pos = 0
    for e, n in zip(encodings, lens):
        out[pos : pos + n] = e.ids
        out[pos + n] = eos
        pos += n + 1
    return out


def _batches(files: list[Path]) -> Iterator[tuple[list[str], int]]:
    """Lists of documents of about BATCH_CHARS characters, with the JSONL bytes they came from."""
    texts, chars, size = [], 0, 0
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                texts.append(text)
                chars += len(text)
                size += len(line.encode("utf-8"))
                if chars >= BATCH_CHARS:
                    yield texts, size
                    texts, chars, size = [], 0, 0
    if texts:
        yield texts, size


class _Bar:
    """A rich bytes progress bar with ETA, or nothing when quiet or not on a terminal."""

    def __init__(self, label: str, total: int, enabled: bool):
        self._p = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._p = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                               TextColumn("ETA"), TimeRemainingColumn(), transient=True)
            self._task = self._p.add_task(label, total=total)

    def __enter__(self):
        if self._p:
            self._p.start()
        return self

    def advance(self, n: int) -> None:
        if self._p:
            self._p.advance(self._task, n)

    def __exit__(self, *exc):
        if self._p:
            self._p.stop()


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

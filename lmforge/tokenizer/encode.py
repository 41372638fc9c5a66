"""Tokenizing a data run's cleaned splits into token shards (the format is :mod:`lmforge.data.shards`)."""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.data.cleaned import clean_files, clean_sources
from lmforge.data.prepare import DataConfig, prepare_data
from lmforge.data.shards import INDEX, SPLITS, ShardSink, dtype_for, empty_tokens_dir
from lmforge.errors import LmforgeError
from lmforge.progress import Bar
from lmforge.rundir import MANIFEST, atomic_write_json, hash_file, hash_json, read_manifest
from lmforge.tokenizer.io import TOKENIZER_FILE, load_tokenizer, special_ids
from lmforge.tokenizer.train import train_tokenizer

# Text per encode_batch call: big enough that the Rust side keeps both cores busy, small
# enough that the Encoding objects (ids, offsets, token strings) stay a few tens of MB.
BATCH_CHARS = 1 << 20


def tokenize_data(data_dir, tokenizer_dir, progress: bool = True, shard_tokens: int | None = None,
                  executor=None) -> dict:
    """Tokenize a data run directory's cleaned splits into shards; returns the updated data manifest.

    With an ``executor`` (:mod:`lmforge.data.executor`), each clean file is encoded by its own task
    into a part file, and the parts are joined here, in order, into the same shards."""
    # encode_batch spreads over every core (rayon); honour an explicit "false" from the caller.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    data_dir, tokenizer_dir = Path(data_dir), Path(tokenizer_dir)
    man = read_manifest(data_dir, expect_stage="data")
    if man.get("status") != "complete":
        raise LmforgeError(f"{data_dir / MANIFEST}: status '{man.get('status')}'; rerun `lmforge data` first")
    tok = load_tokenizer(tokenizer_dir)
    ids = special_ids(tok)
    vocab = tok.get_vocab_size()
    dtype = dtype_for(vocab)
    cap = shard_tokens or man["config"].get("shard_tokens", 16_000_000)
    if cap < 1:
        raise LmforgeError(f"shard_tokens = {cap}: must be at least 1")
    tok_dir = empty_tokens_dir(data_dir)
    splits, t0, n_bytes = {}, time.time(), 0
    for split in SPLITS:
        if executor is None:
            tokens, shards, size, per_source = _tokenize_split(tok, ids["eos"], data_dir, split, tok_dir, dtype, cap,
                                                               progress)
        else:
            tokens, shards, size, per_source = _tokenize_split_tasks(executor, tokenizer_dir, ids["eos"], data_dir,
                                                                     split, tok_dir, dtype, cap, progress)
        splits[split] = {"tokens": tokens, "shards": shards, "sources": per_source}
        n_bytes += size
    elapsed = time.time() - t0
    index = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": ids["eos"], "bos_id": ids["bos"], "pad_id": ids["pad"],
             "tokenizer_hash": hash_file(tokenizer_dir / TOKENIZER_FILE), "splits": splits}
    if man.get("mix"):
        index["mix"] = man["mix"]
    atomic_write_json(tok_dir / INDEX, index)
    n_tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    man["inputs"]["tokenizer"] = {"path": str(tokenizer_dir.resolve()), "hash": index["tokenizer_hash"]}
    man["outputs"]["token_index"] = {"path": f"tokens/{INDEX}", "hash": hash_json(index)}
    bpt = n_bytes / max(1, n_tokens)
    for f in man["metrics"].get("filters", {}).values():  # what a removed document would have cost, at this rate
        f["tokens_est"] = round(f["bytes"] / bpt)
    man["metrics"].update(tokens_train=splits["train"]["tokens"], tokens_val=splits["val"]["tokens"],
                          token_dtype=dtype.name, bytes_per_token=round(n_bytes / max(1, n_tokens), 4),
                          tokenize_mb_per_s=round(n_bytes / 1e6 / elapsed, 2) if elapsed > 0 else None)
    atomic_write_json(data_dir / MANIFEST, man)
    return man


def build_token_data(sources: list[str], data_dir, tokenizer_dir, data_cfg: DataConfig | None = None,
                     vocab_size: int = 8192, progress: bool = True, say=lambda msg: None) -> dict:
    """The three steps from raw text to shards a trainer reads: clean ``sources`` into ``data_dir``,
    train a tokenizer on the train split into ``tokenizer_dir``, tokenize. Returns the data manifest."""
    say(f"data: cleaning {', '.join(map(str, sources))} -> {data_dir}")
    prepare_data(sources, data_dir, data_cfg, progress=progress)
    say(f"tokenizer: byte-level BPE, vocab {vocab_size} -> {tokenizer_dir}")
    train_tokenizer(data_dir, tokenizer_dir, vocab_size=vocab_size, progress=progress)
    return tokenize_data(data_dir, tokenizer_dir, progress=progress)


def _tokenize_split(tok, eos: int, data_dir: Path, split: str, tok_dir: Path, dtype, cap: int, progress: bool):
    """Stream one split through the tokenizer into shards; returns (tokens, shards, utf-8 bytes read,
    [{"name", "tokens"}] per source, in order: each source's tokens are one contiguous range)."""
    files = clean_files(data_dir, split)
    names = clean_sources(data_dir, split)
    sink = ShardSink(tok_dir, split, dtype, cap)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips char offsets we never use
    n_bytes, per_source = 0, []
    with Bar(f"tokenize {split}", sum(f.stat().st_size for f in files), in_bytes=True, enabled=progress) as bar:
        try:
            for name, group in _runs(files, names):
                if not per_source or per_source[-1]["name"] != name:
                    per_source.append({"name": name, "tokens": 0})
                for texts, file_bytes in _batches(group):
                    ids = _join_with_eos(encode(texts, add_special_tokens=False), eos)
                    sink.write(ids)
                    per_source[-1]["tokens"] += len(ids)
                    n_bytes += sum(len(t.encode("utf-8")) for t in texts)
                    bar.advance(file_bytes)
        finally:
            sink.close()
    return sink.tokens, sink.shards, n_bytes, per_source


def _tokenize_split_tasks(executor, tokenizer_dir: Path, eos: int, data_dir: Path, split: str, tok_dir: Path, dtype,
                          cap: int, progress: bool):
    """As :func:`_tokenize_split`, with one :func:`encode_task` per clean file."""
    files = clean_files(data_dir, split)
    names = clean_sources(data_dir, split)
    parts = [tok_dir / f".{split}-part-{i:05d}.bin" for i in range(len(files))]
    tasks = [(str(f), str(tokenizer_dir), str(part), dtype.name, eos) for f, part in zip(files, parts)]
    done: list = [None] * len(tasks)
    with Bar(f"tokenize {split}", len(tasks), unit="files", enabled=progress) as bar:
        for i, result in executor.run(encode_task, tasks):
            done[i] = result
            bar.advance()
    sink = ShardSink(tok_dir, split, dtype, cap)
    per_source: list[dict] = []
    try:
        for part, name, result in zip(parts, names, done):
            if not per_source or per_source[-1]["name"] != name:
                per_source.append({"name": name, "tokens": 0})
            sink.write(np.fromfile(part, dtype=dtype))
            per_source[-1]["tokens"] += result["tokens"]
            part.unlink()
    finally:
        sink.close()
    return sink.tokens, sink.shards, sum(r["bytes"] for r in done), per_source


@lru_cache(maxsize=2)
def _cached_tokenizer(tokenizer_dir: str):
    return load_tokenizer(Path(tokenizer_dir))


def encode_task(clean_file: str, tokenizer_dir: str, part: str, dtype_name: str, eos: int) -> dict:
    """Encode one clean file into ``part`` (raw token ids, each document followed by eos)."""
    tok = _cached_tokenizer(tokenizer_dir)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    tokens = n_bytes = 0
    tmp = Path(part + ".tmp")
    with open(tmp, "wb") as f:
        for texts, _ in _batches([Path(clean_file)]):
            ids = _join_with_eos(encode(texts, add_special_tokens=False), eos)
            f.write(ids.astype(dtype_name).tobytes())
            tokens += len(ids)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    tmp.replace(part)
    return {"tokens": tokens, "bytes": n_bytes}


def _runs(files: list[Path], names: list[str]) -> Iterator[tuple[str, list[Path]]]:
    """Consecutive files of the same source, so no batch mixes two sources."""
    start = 0
    for i in range(1, len(files) + 1):
        if i == len(files) or names[i] != names[start]:
            yield names[start], files[start:i]
            start = i


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

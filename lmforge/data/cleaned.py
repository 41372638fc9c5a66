"""Reading a data run's cleaned splits back: what the tokenizer trains on and what tokenizing reads.

The writer is :mod:`lmforge.data.prepare`; the manifest it writes lists each split's JSONL
shards, so readers never guess file names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError
from lmforge.rundir import MANIFEST, read_manifest


def clean_files(data_dir, split: str) -> list[Path]:
    """The cleaned JSONL shards of a split, as the data manifest lists them."""
    man = read_manifest(data_dir, expect_stage="data")
    out = man.get("outputs", {}).get(f"clean_{split}")
    if out is None:
        raise LmforgeError(f"{Path(data_dir) / MANIFEST} lists no '{split}' split; rerun `lmforge data`")
    return [Path(data_dir) / "clean" / f for f in out["files"]]


def clean_sources(data_dir, split: str) -> list[str]:
    """The source name of each of :func:`clean_files`' shards (every shard holds one source's documents)."""
    man = read_manifest(data_dir, expect_stage="data")
    out = man.get("outputs", {}).get(f"clean_{split}", {})
    return out.get("sources") or ["corpus"] * len(out.get("files", []))


def iter_clean(data_dir, split: str) -> Iterator[str]:
    """The cleaned documents of one split, in order, one at a time."""
    for f in clean_files(data_dir, split):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]

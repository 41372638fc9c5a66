"""Compressed inputs: every codec, JSONL and tar archives read as what they hold; damaged
archives counted with their paths while the run goes on; a missing codec package named."""

import bz2
import gzip
import io
import json
import lzma
import sys
import tarfile

import pytest
import zstandard

from conftest import run_cli
from lmforge.data.cleaned import iter_clean
from lmforge.data.prepare import DataConfig, prepare_data
from lmforge.errors import LmforgeError
from test_data import NO_FILTERS, doc

CODECS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
          ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


def kept(out) -> set[str]:
    return set(iter_clean(out, "train")) | set(iter_clean(out, "val"))


def run(src, out):
    return prepare_data([str(src)], out, DataConfig(min_chars=20, val_fraction=0.2, dedup_near=False, filters=NO_FILTERS), progress=False)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_every_codec_reads_as_the_file_it_holds(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    texts = {}
    for i, (suffix, compress) in enumerate(CODECS.items()):
        texts[f"notes{i}.txt{suffix}"] = doc(i)
        (tree / f"notes{i}.txt{suffix}").write_bytes(compress(doc(i).encode()))
        lines = "".join(json.dumps({"text": doc(10 + 2 * i + k)}) + "\n" for k in range(2))
        (tree / f"shard{i}.jsonl{suffix}").write_bytes(compress(lines.encode()))
    members = {"docs/a.txt": doc(30).encode(), "docs/b.md": doc(31).encode(), "blob.bin": b"\x00\x01" * 50}
    (tree / "bundle.tar.gz").write_bytes(gzip.compress(tar_bytes(members)))
    (tree / "bundle2.tar.zst").write_bytes(CODECS[".zst"](tar_bytes({"c.txt": doc(32).encode()})))
    man = run(tree, tmp_path / "out")
    want = {doc(i) for i in range(4)} | {doc(10 + k) for k in range(8)} | {doc(30), doc(31), doc(32)}
    assert kept(tmp_path / "out") == want
    assert man["metrics"]["dropped"]["binary"] == 1  # the tar's binary member, sniffed after decompression
    assert man["metrics"]["dropped"]["corrupt_archive"] == 0


def test_damaged_archives_are_counted_with_their_paths_and_the_run_goes_on(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "good.txt.gz").write_bytes(gzip.compress(doc(1).encode()))
    whole = gzip.compress(("\n".join(doc(i) for i in range(2, 6))).encode())
    (tree / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    (tree / "noise.txt.xz").write_bytes(b"\xfd7zXZ\x00" + b"garbage" * 30)
    lines = "".join(json.dumps({"text": doc(10 + k)}) + "\n" for k in range(40)).encode()
    packed = gzip.compress(lines)  # gzip streams: the lines before the cut decompress
    (tree / "cut.jsonl.gz").write_bytes(packed[: len(packed) * 3 // 4])
    (tree / "cut.txt.bz2").write_bytes(bz2.compress(doc(7).encode())[:50])
    tar = gzip.compress(tar_bytes({f"m{k}.txt": doc(60 + k).encode() for k in range(5)}))
    (tree / "cut.tar.gz").write_bytes(tar[: len(tar) * 2 // 3])
    man = run(tree, tmp_path / "out")
    m = man["metrics"]
    assert m["dropped"]["corrupt_archive"] == 5
    paths = m["dropped_paths"]["corrupt_archive"]
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["cut.jsonl.gz", "cut.tar.gz", "cut.txt.bz2", "cut.txt.gz",
                                                          "noise.txt.xz"]
    texts = kept(tmp_path / "out")
    assert doc(1) in texts
    # what came before the damage is kept: the first JSONL lines and tar members
    assert doc(10) in texts and doc(60) in texts
    assert not any(t.startswith(doc(2)[:40]) for t in texts)  # a half-read plain file is not kept


def test_a_missing_codec_package_is_named(tmp_path, monkeypatch):
    (tmp_path / "a.txt.zst").write_bytes(CODECS[".zst"](doc(1).encode()))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    with pytest.raises(LmforgeError, match=r"a.txt.zst: reading .zst files needs the zstandard package: pip install zstandard"):
        run(tmp_path / "a.txt.zst", tmp_path / "out")


def test_cli_reports_corrupt_archives(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "good.txt.gz").write_bytes(gzip.compress(doc(1).encode()))
    (tree / "bad.txt.gz").write_bytes(gzip.compress(doc(2).encode())[:30])
    res = run_cli("data", tree, "--no-filters", "-o", tmp_path / "out", "--min-chars", "20", "--val-fraction", "0.5")
    assert res.returncode == 0, res.stderr
    assert "dropped: corrupt_archive" in res.stdout

"""Compressed inputs, read transparently: gzip, bzip2, xz and zstandard files, and tar archives.

Corpora arrive compressed (``changelog.Debian.gz``, ``*.jsonl.zst`` dumps, tarballs of text), so
a compressed file is read as the file it holds: ``notes.txt.gz`` is a text document,
``shard.jsonl.zst`` a JSONL file, and every regular member of ``docs.tar.xz`` a document of its
own. A truncated or corrupt archive is not an error that stops a run over millions of files:
the caller counts it (``corrupt_archive``) with its path and goes on. zstandard is an optional
package; a ``.zst`` input without it is an error that says what to install.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from lmforge.errors import LmforgeError

CODECS = (".gz", ".bz2", ".xz", ".zst")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
# A document decompresses into memory; past this it is counted too_long rather than risking a
# decompression bomb (the default max_chars drops anything far smaller anyway).
MAX_DOCUMENT_BYTES = 64 << 20


def corrupt_errors() -> tuple[type[BaseException], ...]:
    """What a damaged stream raises, across the codecs (zstandard's only when it is installed)."""
    errors: tuple = (OSError, EOFError, lzma.LZMAError, zlib.error, tarfile.TarError)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


def codec_of(name: str) -> str | None:
    name = name.lower()
    return next((c for c in CODECS if name.endswith(c)), None)


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def inner_name(name: str) -> str:
    """``a.jsonl.gz`` -> ``a.jsonl``: the name of what a compressed file holds."""
    codec = codec_of(name)
    return name[: -len(codec)] if codec else name


def _zstd(raw: BinaryIO) -> BinaryIO:
    try:
        import zstandard
    except ImportError:
        raise LmforgeError(f"{getattr(raw, 'name', 'input')}: reading .zst files needs the zstandard package: "
                           "pip install zstandard") from None
    return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)


def open_binary(path: Path) -> BinaryIO:
    """``path`` decompressed on the fly by its suffix (as is, when it has none of ours)."""
    codec = codec_of(path.name)
    if codec == ".gz":
        return gzip.open(path, "rb")
    if codec == ".bz2":
        return bz2.open(path, "rb")
    if codec == ".xz":
        return lzma.open(path, "rb")
    if codec == ".zst":
        return _zstd(open(path, "rb"))
    return open(path, "rb")


def open_text(path: Path) -> io.TextIOBase:
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="strict")


def read_document(path: Path) -> bytes | None:
    """The whole (decompressed) file, or None when it decompresses past MAX_DOCUMENT_BYTES.
    Raises one of :func:`corrupt_errors` for a damaged stream."""
    with open_binary(path) as f:
        data = f.read(MAX_DOCUMENT_BYTES + 1)
    return data if len(data) <= MAX_DOCUMENT_BYTES else None


def iter_tar(path: Path) -> Iterator[tuple[str, bytes | None]]:
    """(member name, its bytes or None when too large) for every regular file in a tar archive,
    in archive order, streamed. Raises one of :func:`corrupt_errors` where the archive breaks off,
    after yielding every member before it."""
    raw = _zstd(open(path, "rb")) if path.name.lower().endswith(".tar.zst") else None
    mode = "r|" if raw is not None else "r|*"
    with tarfile.open(path if raw is None else None, mode=mode, fileobj=raw) as tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.size > MAX_DOCUMENT_BYTES:
                yield member.name, None
                continue
            f = tar.extractfile(member)
            yield member.name, f.read() if f is not None else b""

"""The embedded default corpus: the running Python's standard library, source and docs.

It is on every machine that runs lmforge, needs no download, and mixes code with English
prose (docstrings, comments, the bundled documentation topics). The larger variant adds
the installed site-packages' Python sources for scaling experiments that need more tokens
without repeating data.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from lmforge.errors import LmforgeError

TEXT_SUFFIXES = {".py", ".pyi", ".txt", ".rst", ".md", ".toml", ".cfg", ".ini", ".json", ".html", ".c", ".h",
                 ".sh", ".bat", ".ps1", ".xml", ".csv", ".yaml", ".yml", ".css", ".js", ".tcl", ".el"}
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}
VARIANTS = ("stdlib", "stdlib+site")


def _walk(root: Path, suffixes: set[str], skip: set[str]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if p.suffix.lower() in suffixes and not p.is_symlink():
                out.append(p)
    return out


def default_corpus_paths(variant: str = "stdlib") -> list[Path]:
    """The files of the embedded corpus, sorted so that every run reads them in the same order."""
    if variant not in VARIANTS:
        raise LmforgeError(f"unknown default corpus '{variant}'; use one of: {', '.join('default:' + v for v in VARIANTS)}")
    paths = sysconfig.get_paths()
    files = _walk(Path(paths["stdlib"]), TEXT_SUFFIXES, SKIP_DIRS)
    if variant == "stdlib+site":
        for key in ("purelib", "platlib"):
            site = Path(paths[key])
            if site.exists() and site not in [Path(paths["stdlib"])]:
                files += _walk(site, {".py"}, {"__pycache__", ".git"})
        files = sorted(set(files))
    return files



def write_stdlib_sample(dest, max_bytes: int) -> Path:
    """Copy the standard library's top-level modules, in name order, into ``dest`` until about
    ``max_bytes`` of text: a small real corpus for tests and benchmarks."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total > max_bytes:
            break
        text = src.read_text(encoding="utf-8")
        (dest / src.name).write_text(text, encoding="utf-8")
        total += len(text.encode())
    return dest

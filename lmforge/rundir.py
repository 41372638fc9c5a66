"""Run directories and their manifest: the contract between pipeline stages.

Every stage writes ``manifest.json`` into its run directory. Later stages read the
manifests of earlier ones instead of relying on file-name conventions. All writes
go to a temporary file that is fsynced and renamed, so a crash never leaves a file
that looks complete.

A ladder directory (``lmforge ladder plan``) is a group of train runs: ``ladder.json``
lists its rungs, each a train run directory under ``rungs/NAME``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lmforge import __version__
from lmforge.errors import LmforgeError

MANIFEST = "manifest.json"
LADDER_FILE = "ladder.json"


def _umask() -> int:
    """The process umask, read without setting it (os.umask can only swap, which races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask."""
    return 0o777 & ~_umask()


def new_temp(final: Path) -> Path:
    """An empty temp file beside ``final``, with the permissions a plain ``open(final, "w")`` would
    give (mkstemp's 0600 would make every run file private to its owner once renamed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_temp(f, tmp: Path, final: Path) -> None:
    """Flush, fsync and close an open temp file, then rename it to its final name."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON: a NaN or infinity (a loss that was never measured, say) is written as null,
    since ``json.dumps`` would write the bare token ``NaN``, which JSON readers reject."""
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default,
                                       allow_nan=False) + "\n")


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return _finite(o.item())
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def hash_file(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return f"{algo}:{h.hexdigest()}"


def hash_json(obj: Any) -> str:
    """A stable hash of a JSON-able object (sorted keys), for configs and indexes."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def read_manifest(run_dir: str | os.PathLike, expect_stage: str | tuple | None = None) -> dict:
    """Read a run directory's manifest, with errors that say what is wrong and where.
    ``expect_stage``: the stage (or a tuple of stages) the directory must hold."""
    path = Path(run_dir) / MANIFEST
    if not Path(run_dir).exists():
        raise LmforgeError(f"{run_dir}: no such directory")
    if not path.exists():
        raise LmforgeError(f"{path}: missing; is {run_dir} an lmforge run directory? Run the stage that makes it first.")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    wanted = (expect_stage,) if isinstance(expect_stage, str) else expect_stage
    if wanted and m.get("stage") not in wanted:
        raise LmforgeError(
            f"{path}: this is a '{m.get('stage')}' run directory, expected a '{' or '.join(wanted)}' one"
        )
    return m


def is_complete(run_dir: str | os.PathLike, stage: str | None = None) -> bool:
    """Whether ``run_dir`` holds a finished stage (of kind ``stage``, when given): the one
    answer to "can a later stage use this, or must it run again?"."""
    path = Path(run_dir) / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("status") == "complete" and (stage is None or m.get("stage") == stage)


def update_manifest(run_dir: str | os.PathLike, **fields: Any) -> dict:
    """Set top-level ``fields`` of an existing manifest (atomically); returns the new manifest."""
    m = read_manifest(run_dir)
    m.update(fields)
    atomic_write_json(Path(run_dir) / MANIFEST, m)
    return m


def ladder_rungs(path: str | os.PathLike) -> list[Path] | None:
    """The rung run directories a ladder directory holds (finished or not), or None when
    ``path`` is not a ladder."""
    p = Path(path) / LADDER_FILE
    if not p.exists():
        return None
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
        return [Path(path) / "rungs" / r["name"] for r in plan["rungs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LmforgeError(f"{p}: not a valid ladder plan ({e}); recreate it with `lmforge ladder plan`") from None


class Manifest:
    """Collects what a stage did and writes it atomically as ``manifest.json``.

    ``write`` may be called repeatedly: training rewrites its manifest at every checkpoint,
    so a long run always has an up-to-date manifest with ``status: running``.
    """

    def __init__(self, run_dir: str | os.PathLike, stage: str, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.time()
        self.data: dict[str, Any] = {
            "stage": stage,
            "lmforge_version": __version__,
            "status": "running",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config or {},
            "config_hash": hash_json(config or {}),
            "inputs": {},
            "outputs": {},
            "metrics": {},
            "wall_time_s": 0.0,
        }

    def add_input(self, name: str, path: str | os.PathLike, content_hash: str | None = None, **extra) -> None:
        p = Path(path)
        if content_hash is None:
            if p.is_file():
                content_hash = hash_file(p)
            elif (p / MANIFEST).exists():
                content_hash = hash_file(p / MANIFEST)
        self.data["inputs"][name] = {"path": str(p.resolve()), "hash": content_hash, **extra}

    def add_output(self, name: str, path: str | os.PathLike, hash_it: bool = False, **extra) -> None:
        p = Path(path)
        entry: dict[str, Any] = {"path": os.path.relpath(p, self.run_dir) if p.is_absolute() or p.exists() else str(p), **extra}
        if hash_it and p.is_file():
            entry["hash"] = hash_file(p)
        self.data["outputs"][name] = entry

    def set_metrics(self, **metrics: Any) -> None:
        self.data["metrics"].update(metrics)

    def write(self, status: str | None = None) -> Path:
        if status:
            self.data["status"] = status
        self.data["wall_time_s"] = round(time.time() - self._t0, 3)
        path = self.run_dir / MANIFEST
        atomic_write_json(path, self.data)
        return path

    def finish(self) -> Path:
        return self.write(status="complete")

"""A lock file so two processes never write the same run directory's checkpoints."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from lmforge.errors import LmforgeError

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(run_dir, log=print) -> Path:
    """Take the run directory's lock; a lock whose owner is gone (crash, kill -9) is taken over."""
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if pid == me["pid"] and host == me["host"]:
                return path
            if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                log(f"warning: {path}: taking over a stale lock left by process {pid}, which is gone")
                path.unlink(missing_ok=True)
                continue
            if not isinstance(pid, int):
                log(f"warning: {path}: unreadable lock file; taking it over")
                path.unlink(missing_ok=True)
                continue
            raise LmforgeError(
                f"{path}: the run directory is being written by process {pid} on {host}; "
                "wait for it to finish or stop it (if that process is gone, delete the lock file)"
            )
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path


def release(path: Path | None) -> None:
    if path is None:
        return
    try:
        owner = json.loads(path.read_text())
        if owner.get("pid") == os.getpid():
            path.unlink()
    except (OSError, json.JSONDecodeError):
        pass

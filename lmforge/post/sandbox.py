"""Running model-written code: a child process with a timeout, resource limits, its own temp dir, no network.

``run_code(source)`` executes ``source`` in a fresh ``python -I`` process whose working
directory is a private temporary directory, with limits on CPU seconds, address space, file
size and open files, and a wall-clock timeout after which the whole process group is killed.
Inside, an audit hook refuses opening files for writing outside that directory, creating
sockets, and starting processes. That stops the mistakes generated code makes (an endless loop,
a runaway allocation, writing over a file, reaching for the network); it is not a boundary
against code written to escape, which needs an OS sandbox (a container, seccomp, gVisor).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs in the child before the untrusted code; the hook cannot be removed once added.
_PRELUDE = r'''
import os, sys
_root = os.path.realpath(os.getcwd())
def _guard(event, args):
    if event == "open":
        path, mode = args[0], args[1]
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
            writing = True
        if writing and isinstance(path, (str, bytes)):
            p = os.path.realpath(os.fsdecode(path))
            if p != _root and not p.startswith(_root + os.sep):
                raise PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {p}")
    elif event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo"):
        raise PermissionError("sandbox: network access is not allowed")
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "pty.spawn"):
        raise PermissionError("sandbox: starting processes is not allowed")
    elif event in ("os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.chmod", "os.truncate"):
        p = os.path.realpath(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes)) else ""
        if p and p != _root and not p.startswith(_root + os.sep):
            raise PermissionError(f"sandbox: changing files outside the sandbox directory is not allowed: {p}")
sys.addaudithook(_guard)
del _guard
'''


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the code may write
    open_files: int = 64


@dataclass
class Result:
    ok: bool  # exited with status 0
    status: str  # passed | failed | timeout | killed
    returncode: int | None
    stdout: str
    stderr: str


def _limit(limits: Limits):
    def apply() -> None:
        import resource

        os.setsid()  # its own process group, so a timeout kills everything it started
        mb = 1 << 20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_code(source: str, limits: Limits | None = None, stdin: str = "") -> Result:
    """Run Python ``source`` in the sandbox; never raises for anything the code does."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="lmforge-sandbox-") as work:
        script = Path(work) / "main.py"
        script.write_text(_PRELUDE + "\n" + source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "HOME": work,
               "TMPDIR": work, "OMP_NUM_THREADS": "1"}
        p = subprocess.Popen([sys.executable, "-I", "-S", str(script)], cwd=work, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_limit(limits))
        try:
            out, err = p.communicate(stdin, timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            out, err = p.communicate()
            return Result(False, "timeout", None, out, err)
        if p.returncode < 0:  # killed by a signal: the CPU limit (SIGXCPU/SIGKILL) or memory
            return Result(False, "killed", p.returncode, out, err)
        return Result(p.returncode == 0, "passed" if p.returncode == 0 else "failed", p.returncode, out, err)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()

"""One progress display for every stage: a rich bar with ETA on a terminal.

Off a terminal (CI logs, pipes) a bar is silent, unless ``plain`` asks for a periodic line,
which is what long training runs want in a log file. Units: items (files, documents,
steps) or bytes (shown as MB with a transfer rate).
"""

from __future__ import annotations

import sys
import time


class Bar:
    def __init__(self, label: str, total: int | None = None, *, unit: str = "", enabled: bool = True,
                 plain: bool = False, in_bytes: bool = False, start: int = 0, stream=None, transient: bool = True):
        """``total`` None shows a spinner and a count; ``stream`` (stderr by default) decides whether
        this is a terminal; ``plain`` prints ``label done/total info ETA`` lines when it is not."""
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.plain = enabled and plain and not self.tty
        self.start, self.done, self.t0 = start, start, time.perf_counter()
        self._p = None
        if self.tty:
            self._p = self._rich(label, total, unit, in_bytes, transient)
            self._task = self._p.add_task(label, total=total, completed=start, info="")
            self._p.start()

    @staticmethod
    def _rich(label, total, unit, in_bytes, transient):
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

        if total is None:
            cols = [SpinnerColumn(), TextColumn(label), TextColumn("{task.completed} " + unit), TimeElapsedColumn()]
        elif in_bytes:
            cols = [TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn()]
        else:
            cols = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit + " {task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        return Progress(*cols, transient=transient)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._p:
            self._p.advance(self._task, n)

    def update(self, done: int, info: str = "") -> None:
        """Set the position (and a short status text); off a terminal, ``plain`` prints it with an ETA."""
        self.done = done
        if self._p:
            self._p.update(self._task, completed=done, info=info)
        elif self.plain:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(1, done - self.start) * ((self.total or done) - done)
            print(f"{self.label} {done}/{self.total}  {info}  ETA {eta:,.0f}s", file=self.stream, flush=True)

    def note(self, msg: str) -> None:
        """A line above the bar (or a plain line), for events worth reading later."""
        if self._p:
            self._p.console.print(msg)
        elif self.plain:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._p:
            self._p.stop()
            self._p = None


def console():
    """A rich console, wide enough for tables when output goes to a file or a pipe (rich assumes 80 columns there)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)

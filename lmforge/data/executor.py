"""Where the data stage's tasks run: in this process, or on a Ray cluster.

Cleaning, filtering, deduplicating and tokenizing are cut into tasks that are independent
within a stage (one per shard of input, or per partition of the hash space). A task is a plain
top-level function and its arguments; it writes its own outputs under the run's work folder and
returns a small summary. Both executors run the same functions with the same arguments, so a
corpus gives the same documents and the same token shards whichever one ran it.

The local executor (the default) runs tasks in this process, or with ``workers`` > 1 in a pool of
that many processes (``--workers``; 0 means one per core). ``ray`` sends
them to a Ray cluster: ``ray.init()`` starts one on this machine, ``--ray-address HOST:PORT``
joins one that ``ray start --head`` made (every node needs lmforge installed, and the run
directory must be on storage every node can reach).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterator, Sequence

from lmforge.errors import LmforgeError

EXECUTORS = ("local", "ray")


class LocalExecutor:
    """Tasks on this machine: in this process (``workers=1``), or in a pool of worker processes."""

    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)
        self._pool = None

    def run(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """(task number, result) for each task, as each finishes."""
        if self.workers == 1 or len(tasks) < 2:
            for i, args in enumerate(tasks):
                yield i, fn(*args)
            return
        if self._pool is None:
            # spawn, not fork: the parent may hold threads (tokenizers, torch) that a fork would copy mid-state
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_one_thread)
        futures = {self._pool.submit(fn, *args): i for i, args in enumerate(tasks)}
        failure = None
        for fut in as_completed(futures):  # as with Ray: let running tasks finish and save their work
            try:
                result = fut.result()
            except BaseException as e:
                failure = failure or e
                for other in futures:
                    other.cancel()  # the ones not started yet
                continue
            if failure is None:
                yield futures[fut], result
        if failure is not None:
            raise failure

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # a task is one core of work; the pool is the parallelism


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise LmforgeError("--executor ray needs the ray package: pip install ray") from None
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            # Workers inherit this environment; keep each one on one core, as a task is one core of work.
            env = {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}
            kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "runtime_env": env,
                            "configure_logging": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = num_cpus or os.cpu_count()
            try:
                ray.init(**kwargs)
            except Exception as e:  # a wrong address, a cluster that is down
                raise LmforgeError(f"--executor ray: cannot start or join a Ray cluster "
                                   f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); "
                                   "check --ray-address (HOST:PORT of `ray start --head`)") from None

    def run(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """A failed task stops the stage, but only once the tasks already running have finished and
        saved their work, so a rerun redoes as little as possible."""
        remote = self.ray.remote(num_cpus=1, max_retries=2)(fn)  # retried when a worker dies, not on an error
        pending = {remote.remote(*args): i for i, args in enumerate(tasks)}
        failure = None
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayTaskError as e:
                    failure = failure or e
                    continue
                if failure is None:
                    yield i, result
        if failure is not None:
            cause = getattr(failure, "cause", None)
            if isinstance(cause, LmforgeError):
                raise LmforgeError(str(cause)) from None  # the one-line message the local run would give
            raise failure

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def make_executor(name: str, address: str | None = None, workers: int = 1):
    """``workers``: processes on this machine (local), or CPUs of a cluster started here (ray)."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address, workers if workers > 1 else None)
    raise LmforgeError(f"--executor {name}: unknown executor; use one of: {', '.join(EXECUTORS)}")

"""This CPU's peak FLOP/s, measured once (``lmforge hw``) and cached; GPU peaks are in the catalog.

MFU is only as honest as its denominator. Vendor numbers don't exist for a random
CPU, so we time large bf16 and fp32 matmuls on the threads training will use and
cache the result per (cpu model, threads, torch version).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from lmforge.rundir import atomic_write_json

def cache_path() -> Path:
    base = os.environ.get("LMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")
    return Path(base) / "hw.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_key() -> str:
    return f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def bf16_supported_on_cpu() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def measure_matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.5) -> float:
    """Sustained FLOP/s of back-to-back n x n matmuls on this CPU in ``dtype``.

    A mean over a time window, not the best single call, so turbo bursts don't inflate it."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - t0)


def measure_cpu(force: bool = False) -> dict:
    """Measure (or read from cache) the CPU's bf16 and fp32 matmul peaks."""
    path, key = cache_path(), cpu_key()
    cache = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except json.JSONDecodeError:
            cache = {}
    if key in cache and not force:
        return cache[key]
    entry = {
        "device": "cpu",
        "name": cpu_name(),
        "threads": torch.get_num_threads(),
        "fp32": measure_matmul_peak(torch.float32),
        "bf16": measure_matmul_peak(torch.bfloat16) if bf16_supported_on_cpu() else None,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    cache[key] = entry
    atomic_write_json(path, cache)
    return entry

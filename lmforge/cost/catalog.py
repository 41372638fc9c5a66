"""The hardware catalog and the cost of a run: device-hours, kWh, dollars and CO2.

The catalog is the one place device peaks live: MFU, planning and pricing all read it,
so a user's own entry (``~/.config/lmforge/hardware.toml`` or ``--catalog FILE``) reaches
all three. The ``cpu`` entry's peaks are measured on first use (``lmforge hw``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import load_toml
from lmforge.cost.hw import measure_cpu
from lmforge.errors import LmforgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_GRID_KG_PER_KWH = 0.4  # a rough world-average grid intensity
DEFAULT_PUE = 1.2  # datacenter overhead on top of device power


@dataclass
class Hardware:
    name: str
    peak_bf16: float
    peak_fp32: float
    watts: float
    usd_per_hour: float

    def peak(self, precision: str = "bf16") -> float:
        return self.peak_bf16 if precision == "bf16" else self.peak_fp32


def user_catalog_path() -> Path:
    base = os.environ.get("LMFORGE_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "lmforge")
    return Path(base) / "hardware.toml"


def _raw_catalog(extra: str | Path | None = None) -> dict[str, dict]:
    """Built-in entries, then the user's file, then ``extra``; later files override earlier ones."""
    raw = tomllib.loads((Path(__file__).parent / "hardware.toml").read_text())
    for path in (user_catalog_path(), extra):
        if path and Path(path).exists():
            for name, entry in load_toml(path).items():
                raw[name] = {**raw.get(name, {}), **entry}
        elif path and path == extra:
            raise LmforgeError(f"--catalog {extra}: file not found")
    return raw


def _entry(name: str, e: dict) -> Hardware:
    try:
        hw = Hardware(name, float(e["peak_bf16"]), float(e["peak_fp32"]), float(e["watts"]), float(e["usd_per_hour"]))
    except KeyError as k:
        raise LmforgeError(f"hardware catalog entry [{name}] lacks {k}; each needs peak_bf16, peak_fp32, watts, usd_per_hour") from None
    if not hw.peak_fp32:  # 0 means "measure this machine's CPU"
        m = measure_cpu()
        hw.peak_fp32 = m["fp32"]
        hw.peak_bf16 = hw.peak_bf16 or m.get("bf16") or m["fp32"]
    return hw


def _lookup(name: str, extra) -> tuple[str | None, dict]:
    raw = _raw_catalog(extra)
    key = next((k for k in raw if k.lower() == name.lower()), None)
    return key, raw


def check_hardware(name: str, extra: str | Path | None = None, what: str = "hardware") -> str:
    """``name`` if the catalog knows it (or it is ``auto``); otherwise an error listing the known
    names. Cheap: it measures nothing, so configs can call it when they are read."""
    if name == "auto":
        return name
    key, raw = _lookup(name, extra)
    if key is None:
        where = f" ({what})" if what != "hardware" else ""
        raise LmforgeError(f"unknown hardware '{name}'{where}: not in the hardware catalog; known: {', '.join(sorted(raw))} "
                           f"(add it to {user_catalog_path()} with peak_bf16, peak_fp32, watts, usd_per_hour)")
    return key


def get_hardware(name: str, extra: str | Path | None = None) -> Hardware:
    key = check_hardware(name, extra)
    return _entry(key, _lookup(key, extra)[1][key])


def detect_hardware_name(device: torch.device) -> str:
    """The catalog entry for the device training runs on. A GPU the catalog lacks is an error, not
    a $0 line in the ledger: the message says how to add it or name an entry."""
    if device.type != "cuda":
        return "cpu"
    gpu = torch.cuda.get_device_name(device)
    for key in sorted(_raw_catalog(), key=len, reverse=True):
        if key.lower() != "cpu" and key.lower() in gpu.lower():
            return key
    raise LmforgeError(f"the GPU '{gpu}' is not in the hardware catalog; add an entry for it to {user_catalog_path()} "
                       "(peak_bf16, peak_fp32, watts, usd_per_hour) or pass --set train.hardware=NAME")


def device_peak(device: torch.device, hardware: str, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU: the catalog entry of the device the run is on
    (the measured ``cpu`` entry on a CPU; on a GPU the entry ``hardware`` names, or the detected one)."""
    if device.type == "cpu":
        hardware = "cpu"
    hw = get_hardware(detect_hardware_name(device) if hardware == "auto" else hardware)
    return hw.peak(dtype), (f"measured {dtype} matmul peak" if device.type == "cpu" else f"catalog [{hw.name}] {dtype}")


def run_cost(device_hours: float, hw: Hardware, grid_kg_per_kwh: float = DEFAULT_GRID_KG_PER_KWH,
             pue: float = DEFAULT_PUE) -> dict:
    kwh = device_hours * hw.watts / 1000.0 * pue
    return {"hardware": hw.name, "device_hours": device_hours, "kwh": kwh,
            "usd": device_hours * hw.usd_per_hour, "co2_kg": kwh * grid_kg_per_kwh,
            "usd_per_hour": hw.usd_per_hour, "watts": hw.watts, "pue": pue, "grid_kg_per_kwh": grid_kg_per_kwh}

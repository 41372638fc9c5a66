"""The hardware catalog and the cost of a run: device-hours, kWh, dollars and CO2."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import load_toml
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


def load_catalog(extra: str | Path | None = None) -> dict[str, Hardware]:
    """Built-in entries, then the user's file, then ``extra``; later files override earlier ones."""
    raw = tomllib.loads((Path(__file__).parent / "hardware.toml").read_text())
    for path in (user_catalog_path(), extra):
        if path and Path(path).exists():
            for name, entry in load_toml(path).items():
                raw[name] = {**raw.get(name, {}), **entry}
        elif path and path == extra:
            raise LmforgeError(f"--catalog {extra}: file not found")
    out = {}
    for name, e in raw.items():
        try:
            out[name] = Hardware(name, float(e["peak_bf16"]), float(e["peak_fp32"]), float(e["watts"]), float(e["usd_per_hour"]))
        except KeyError as k:
            raise LmforgeError(f"hardware catalog entry [{name}] lacks {k}; each needs peak_bf16, peak_fp32, watts, usd_per_hour") from None
    if "cpu" in out and not out["cpu"].peak_bf16:
        from lmforge.cost.hw import measure_cpu

        m = measure_cpu()
        out["cpu"].peak_fp32 = m["fp32"]
        out["cpu"].peak_bf16 = m.get("bf16") or m["fp32"]
    return out


def get_hardware(name: str, extra: str | Path | None = None) -> Hardware:
    cat = load_catalog(extra)
    for key, hw in cat.items():
        if key.lower() == name.lower():
            return hw
    raise LmforgeError(f"unknown hardware '{name}'; known: {', '.join(sorted(cat))} "
                       f"(add it to {user_catalog_path()} with peak_bf16, peak_fp32, watts, usd_per_hour)")


def detect_hardware_name(device_type: str, device_name: str = "") -> str:
    if device_type == "cuda":
        for k in ("H200", "H100", "A100"):
            if k in device_name:
                return k
        return device_name or "cuda"
    return "cpu"


def run_cost(device_hours: float, hw: Hardware, grid_kg_per_kwh: float = DEFAULT_GRID_KG_PER_KWH,
             pue: float = DEFAULT_PUE) -> dict:
    kwh = device_hours * hw.watts / 1000.0 * pue
    return {"hardware": hw.name, "device_hours": device_hours, "kwh": kwh,
            "usd": device_hours * hw.usd_per_hour, "co2_kg": kwh * grid_kg_per_kwh,
            "usd_per_hour": hw.usd_per_hour, "watts": hw.watts, "pue": pue, "grid_kg_per_kwh": grid_kg_per_kwh}

"""Config plumbing: small dataclasses, filled from TOML files and ``key=value`` overrides.

Every stage owns its own dataclass. This module only knows how to build one from a
nested dict, check types and reject unknown keys with a message that names the key
and the file it came from.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lmforge.errors import LmforgeError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise LmforgeError(f"{p}: config file not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LmforgeError(f"{p}: invalid TOML: {e}") from None


def _coerce_scalar(text: str) -> Any:
    """Parse an override value the way TOML would, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str] | None) -> dict:
    """Turn ``["train.lr=3e-4", "model.depth=6"]`` into a nested dict."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise LmforgeError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=3e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = _coerce_scalar(value.strip())
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        return True, origin(value)
    if origin is dict:
        return isinstance(value, dict), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        if isinstance(value, (str, Path)):
            return True, str(value)
        return False, value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def from_dict(cls: type[T], data: dict, where: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise LmforgeError(f"{where}: [{prefix.rstrip('.') or cls.__name__}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise LmforgeError(f"{where}: unknown key '{name}' (known keys here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, where, prefix=f"{name}.")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            tname = getattr(tp, "__name__", str(tp))
            raise LmforgeError(f"{where}: key '{name}' = {value!r} should be of type {tname}")
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)

"""Config plumbing: small dataclasses, filled from TOML files and ``key=value`` overrides.

Every stage owns its own dataclass and a section name (``data``, ``train``, ``ladder``...).
One rule holds for every verb: a TOML file and ``--set`` use the same dotted keys, rooted
at the section (``[train]`` / ``[train.model]`` in a file, ``--set train.model.depth=4`` on
the command line), and the precedence is

    defaults < --config file < --set < explicit flags

so one file can hold the settings of several stages, and a flag typed on the command
line always wins. :func:`resolve_config` is the only place that merges them.
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


def resolve_config(cls: type[T], section: str, file: str | Path | None = None, sets: list[str] | None = None,
                   flags: dict | None = None, base: dict | None = None) -> T:
    """Build ``cls`` from its ``[section]`` of ``file``, ``--set section.KEY=VALUE`` items and the
    flags the user typed (a nested dict, see :func:`flag_tree`), in that order of precedence.

    ``base`` holds values a caller derives itself (below the file): for example an experiment's
    ladder settings. Keys under other sections are left for other verbs, so a whole-run TOML works.
    """
    table: dict = {}
    if file is not None:
        doc = load_toml(file)
        loose = [k for k, v in doc.items() if not isinstance(v, dict)]
        if loose:
            raise LmforgeError(f"{file}: key '{loose[0]}' is outside any table; settings go under the table of their "
                               f"stage, e.g. [{section}] then {loose[0]} = ...")
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise LmforgeError(f"{file}: '{section}' must be a table, e.g. [{section}]")
    over = parse_overrides(sets)
    stray = sorted(k for k in over if k != section)
    if stray:
        example = f"{section}.{stray[0]}"
        raise LmforgeError(f"--set {stray[0]}...: keys start with the section '{section}', for example --set {example}=...")
    merged = deep_merge(deep_merge(deep_merge(base or {}, table), over.get(section, {})), flags or {})
    where = " / ".join([str(file)] * (file is not None) + ["--set"] * bool(sets)) or "flags"
    return from_dict(cls, merged, where=where, prefix=f"{section}.")


def flag_tree(**dotted: Any) -> dict:
    """``flag_tree(**{"model.depth": 4, "lr": None})`` -> ``{"model": {"depth": 4}}``: the flags a user typed, nested."""
    out: dict = {}
    for key, value in dotted.items():
        if value is None:
            continue
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out

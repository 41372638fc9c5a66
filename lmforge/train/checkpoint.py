"""Crash-safe checkpoints.

A checkpoint is a directory ``checkpoints/step-XXXXXXXX`` with the model (safetensors),
the training state (optimizer, RNG, counters; our own file, loaded with
``weights_only=True``) and ``checksums.json``, written last. The directory is built
under a temporary name and renamed into place, so a crash mid-write never leaves a
directory that looks complete; checksums catch later truncation or bit flips.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.model.io import load_model, load_weights, save_model
from lmforge.rundir import atomic_write_json, hash_file
from lmforge.train import distributed as D

STATE = "state.pt"
CHECKSUMS = "checksums.json"


def ckpt_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir, step: int, model, state: dict, keep: int = 3) -> Path:
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp)
    with open(tmp / STATE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    sums = {p.name: hash_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_json(tmp / CHECKSUMS, {"step": step, "files": sums})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    ckpts = list_checkpoints(root.parent)
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir) -> list[Path]:
    root = ckpt_root(run_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify_checkpoint(ckpt: Path) -> None:
    """Raise LmforgeError if any file is missing or does not match its recorded checksum."""
    sums_path = ckpt / CHECKSUMS
    if not sums_path.exists():
        raise LmforgeError(f"{ckpt}: no {CHECKSUMS}; the checkpoint is incomplete")
    try:
        sums = json.loads(sums_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise LmforgeError(f"{sums_path}: unreadable ({e})") from None
    for name, expected in sums.items():
        p = ckpt / name
        if not p.exists():
            raise LmforgeError(f"{p}: missing from checkpoint")
        if hash_file(p) != expected:
            raise LmforgeError(f"{p}: checksum mismatch; the file is corrupted or truncated")


def load_checkpoint(ckpt: Path, model, sharded: bool = False) -> dict:
    """Verify ``ckpt``, load its weights into ``model`` and return its training state.

    ``sharded``: ``model`` is already sharded with FSDP2; every rank reads the full weights and
    keeps its own shards."""
    verify_checkpoint(ckpt)
    if sharded:
        D.set_full_model_state(model, load_model(ckpt).state_dict())
    else:
        load_weights(model, ckpt / "model.safetensors")
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # checksum passed, so this is a version or format problem
        raise LmforgeError(f"{ckpt / STATE}: cannot load training state ({e})") from None


def newest_valid(run_dir, at_most: int | None = None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint (taken at or before step ``at_most``, when given) that verifies, and
    what was wrong with each newer one passed over."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        if at_most is not None and step_of(ckpt) > at_most:
            continue
        try:
            verify_checkpoint(ckpt)
            return ckpt, skipped
        except LmforgeError as e:
            skipped.append(f"{ckpt.name}: {e}")
    return None, skipped


def latest_valid_checkpoint(run_dir, log=print) -> Path | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    found, skipped = newest_valid(run_dir)
    for s in skipped:
        log(f"warning: skipping checkpoint {s}; falling back to the previous one")
    return found


def rng_state() -> dict:
    # Plain tensors and lists only, so the state file loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(s["python"]) if not isinstance(s["python"], tuple) else s["python"])


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


class Checkpointer:
    """Saves and restores a run: the model, the optimizer, the RNGs, and every stateful part
    (anything with ``state_dict``/``load_state_dict``: the guard, the trainer's progress counters).

    All ranks call ``save`` and ``restore`` (under FSDP gathering and scattering are collectives);
    rank 0 writes. Which checkpoint to use is decided on rank 0 and broadcast, so every rank agrees.
    """

    def __init__(self, run_dir, keep: int, model, pmodel, optimizer, parts: dict, info: D.DistInfo, fsdp: bool):
        self.run_dir, self.keep, self.info, self.fsdp = Path(run_dir), keep, info, fsdp
        self.model, self.pmodel, self.optimizer, self.parts = model, pmodel, optimizer, parts

    def save(self, step: int) -> Path | None:
        state = {"step": step, "optimizer": None, "rng": rng_state(),
                 **{name: part.state_dict() for name, part in self.parts.items()}}
        if self.fsdp:
            # Before the first step the optimizer has no state; asking DCP for it would initialise it with a
            # zero-gradient step, which advances Adam's step count and changes the first real update.
            full = D.gather_full_state(self.pmodel, self.optimizer if self.optimizer.state else None, self.info)
            if not self.info.is_main:
                return None
            state["optimizer"], target = full["optimizer"], full["model"]
        else:
            if not self.info.is_main:
                return None
            state["optimizer"], target = self.optimizer.state_dict(), self.model
        return save_checkpoint(self.run_dir, step, target, state, keep=self.keep)

    def restore(self, ckpt: Path, parts: tuple[str, ...] | None = None) -> dict:
        """Load ``ckpt`` into the model, optimizer and RNGs, and into the named stateful parts (all by
        default); returns the saved state, so a caller can take back a part its own way."""
        state = load_checkpoint(ckpt, self.model, sharded=self.fsdp and self.info.enabled)
        D.load_optimizer_state(self.pmodel, self.optimizer, state["optimizer"], self.fsdp)
        set_rng_state(state["rng"])
        for name in self.parts if parts is None else parts:
            self.parts[name].load_state_dict(state.get(name, {}))
        return state

    def newest_valid_before(self, step: int) -> Path | None:
        """The newest verified checkpoint taken at or before ``step`` (a rollback target), or None."""
        return _agree(newest_valid(self.run_dir, at_most=step)[0] if self.info.is_main else None, self.info)


def agree_on_latest(run_dir, info: D.DistInfo, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies, as rank 0 finds it (corrupt newer ones are reported
    and skipped), on every rank."""
    return _agree(latest_valid_checkpoint(run_dir, log=log) if info.is_main else None, info)


def _agree(ckpt: Path | None, info: D.DistInfo) -> Path | None:
    ckpt = D.broadcast_object(str(ckpt) if ckpt else None, info)
    return Path(ckpt) if ckpt else None

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
import shutil
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.io import load_weights, save_model
from lmforge.rundir import atomic_write_json, hash_file

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
        from lmforge.model.io import load_model
        from lmforge.train.distributed import set_full_model_state

        set_full_model_state(model, load_model(ckpt).state_dict())
    else:
        load_weights(model, ckpt / "model.safetensors")
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # checksum passed, so this is a version or format problem
        raise LmforgeError(f"{ckpt / STATE}: cannot load training state ({e})") from None


def latest_valid_checkpoint(run_dir, log=print) -> Path | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except LmforgeError as e:
            log(f"warning: skipping checkpoint {ckpt.name}: {e}; falling back to the previous one")
    return None

"""Saving and loading model weights as safetensors, with the model config alongside.

A directory holding ``model.safetensors`` and ``model_config.json`` is a complete,
self-describing model. Training runs, checkpoints and imports all use this layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from lmforge.errors import LmforgeError
from lmforge.model.model import GPT, ModelConfig, build_model
from lmforge.rundir import atomic_write_json, file_mode, new_temp

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"


def save_model(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write weights (atomically) and config into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    core = unwrap(model)
    tmp = new_temp(out / WEIGHTS)
    try:
        # save_model dedupes tied tensors (lm_head shares tok_emb) that save_file refuses.
        st_save_model(core, str(tmp))
        os.chmod(tmp, file_mode())  # safetensors writes its file 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(out / CONFIG, dataclasses.asdict(core.cfg))
    return out / WEIGHTS


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    p = Path(model_dir) / CONFIG
    if not p.exists():
        raise LmforgeError(f"{p}: missing; {model_dir} does not hold an lmforge model")
    try:
        return ModelConfig(**json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise LmforgeError(f"{p}: unreadable model config ({e})") from None


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    cfg = load_config(model_dir)
    model = build_model(cfg, device)
    load_weights(model, Path(model_dir) / WEIGHTS)
    return model


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path}: weights file not found")
    try:
        missing, unexpected = st_load_model(unwrap(model), str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LmforgeError(f"{path}: corrupted or truncated weights file ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise LmforgeError(f"{path}: weights do not match the model config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model

"""The training config: one dataclass, read from ``[train]`` in a TOML file and ``--set train.KEY=VALUE``.

The model and the guard are nested tables: ``[train.model]`` / ``--set train.model.depth=4`` and
``[train.guard]`` / ``--set train.guard.loss_z=5``. Precedence, as for every verb, is
defaults < file < --set < flags (:func:`lmforge.config.resolve_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import resolve_config
from lmforge.cost.catalog import check_hardware
from lmforge.errors import LmforgeError
from lmforge.model.model import ModelConfig
from lmforge.rundir import hash_json
from lmforge.train.guard import GuardConfig

SECTION = "train"


@dataclass
class TrainConfig:
    data: str = "runs/data"
    out: str = "runs/train"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=0))
    batch_size: int = 16  # sequences per rank per micro-step
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_frac: float = 0.2  # wsd only: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 16
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 1337
    tensorboard: bool = False
    init_from: str = ""  # an lmforge model dir (e.g. from import-hf) to continue training
    fsdp: bool = False
    device: str = "auto"  # auto | cpu | cuda
    guard: GuardConfig = field(default_factory=GuardConfig)
    hardware: str = "auto"  # a hardware catalog name for cost accounting; auto detects cpu / A100 / H100 / H200
    grid_kg_per_kwh: float = 0.4  # CO2 intensity of the electricity
    inject_nan_at: list = field(default_factory=list)  # fault injection for tests: steps whose loss becomes NaN once

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "max_steps": self.max_steps >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "grad_clip": self.grad_clip >= 0,
            "eval_every": self.eval_every >= 0,
            "ckpt_every": self.ckpt_every >= 0,
            "log_every": self.log_every >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise LmforgeError(f"train.{key} = {getattr(self, key)!r} is out of range")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise LmforgeError(f"train.schedule = {self.schedule!r}: use cosine, wsd or constant")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise LmforgeError(f"train.precision = {self.precision!r}: use auto, bf16 or fp32")
        # Checked now, not when the run's cost is priced after hours of training.
        self.hardware = check_hardware(self.hardware, what="train.hardware")


# Keys that change how a run is observed, not what it computes; --resume may change them.
RESUME_FREE = {"out", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
               "tensorboard", "compile", "max_steps", "device", "inject_nan_at", "hardware", "grid_kg_per_kwh"}


def load_train_config(file: str | Path | None = None, sets: list[str] | None = None, flags: dict | None = None,
                      base: dict | None = None) -> TrainConfig:
    """A TrainConfig from the ``[train]`` table of ``file``, ``--set train.KEY=...`` and typed flags."""
    base = {"model": {"vocab_size": 0}, **(base or {})}  # vocab 0: take it from the tokenizer
    return resolve_config(TrainConfig, SECTION, file, sets, flags, base=base)


def resume_hash(cfg_dict: dict) -> str:
    return hash_json({k: v for k, v in cfg_dict.items() if k not in RESUME_FREE})


def resume_mode(resume) -> str | Path:
    """``"never"``, ``"auto"`` or a checkpoint path, from any accepted spelling: ``True`` means
    ``auto`` and ``False``/``None``/``""`` mean ``never``, so callers test one value."""
    if resume in (False, None, "", "never"):
        return "never"
    if resume in (True, "auto"):
        return "auto"
    p = Path(resume)
    if not p.exists():
        raise LmforgeError(f"--resume {resume}: no such checkpoint directory; use auto, never or a checkpoint path")
    return p

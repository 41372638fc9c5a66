"""Learning-rate schedules: linear warmup, then cosine or warmup-stable-decay (WSD)."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup: int, total: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        # Hold the peak, then decay linearly over the last decay_frac of training.
        decay_start = total - int(decay_frac * total)
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return lr - (lr - min_lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")

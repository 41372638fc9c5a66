"""The training guard: detect loss spikes and divergence, and decide how to recover.

Detection compares each step's loss and gradient norm with a rolling window of recent
healthy steps (a z-score), and flags non-finite values outright. The loop feeds it
values that were already reduced across ranks, so every rank reaches the same verdict.

Recovery, in order: skip the step (no optimizer update); if spikes persist, or on a
non-finite loss, roll back to the newest checkpoint that predates the trouble and
quarantine the batches between that checkpoint and the spike; optionally cool the
learning rate down for a while; give up after ``max_rollbacks`` with a clear report.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmforge.errors import LmforgeError
from lmforge.rundir import atomic_write_json
from lmforge.train.checkpoint import step_of

EVENTS = "events.jsonl"
QUARANTINE = "quarantine.json"


@dataclass
class GuardConfig:
    enabled: bool = True
    window: int = 50  # healthy steps the z-score is measured against
    min_history: int = 20  # no spike verdicts before this many healthy steps
    loss_z: float = 6.0  # loss more than this many sigmas above the window mean is a spike
    # Likewise for the gradient norm. Off by default: at small scale benign grad-norm jumps are common
    # (and clipping already bounds the update), so acting on them discards good batches.
    grad_z: float = 0.0
    min_rel_jump: float = 0.05  # and at least this relative jump, so a very flat window can't flag noise
    max_skips: int = 3  # consecutive skipped steps before rolling back
    max_rollbacks: int = 5  # then give up
    quarantine_window: int = 0  # 0: quarantine from the rollback point to the spike; N: at most the N steps before it
    cooldown_steps: int = 0  # after a rollback, run this many steps at lr * cooldown_factor
    cooldown_factor: float = 0.5
    val_stall_evals: int = 0  # warn when val loss has not improved for this many evals (0 disables)

    def __post_init__(self) -> None:
        bad = []
        if self.window < 2:
            bad.append(("window", "at least 2"))
        if not 0 <= self.min_history <= self.window:
            bad.append(("min_history", f"between 0 and window ({self.window})"))
        if not 0 < self.loss_z <= 1e3:
            bad.append(("loss_z", "in (0, 1000]"))
        if not 0 <= self.grad_z <= 1e3:
            bad.append(("grad_z", "in [0, 1000] (0 disables)"))
        if self.min_rel_jump < 0:
            bad.append(("min_rel_jump", ">= 0"))
        if self.max_skips < 0 or self.max_rollbacks < 0 or self.quarantine_window < 0 or self.cooldown_steps < 0:
            bad.append(("max_skips/max_rollbacks/quarantine_window/cooldown_steps", ">= 0"))
        if not 0 < self.cooldown_factor <= 1:
            bad.append(("cooldown_factor", "in (0, 1]"))
        if bad:
            key, rng = bad[0]
            raise LmforgeError(f"guard.{key} = {getattr(self, key.split('/')[0])!r} is out of range: use a value {rng}")


class SpikeDetector:
    """Rolling statistics of healthy steps; its state travels in checkpoints."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.losses: deque = deque(maxlen=cfg.window)
        self.grads: deque = deque(maxlen=cfg.window)

    @staticmethod
    def _z(x: float, hist: deque) -> tuple[float, float]:
        n = len(hist)
        mean = sum(hist) / n
        var = sum((h - mean) ** 2 for h in hist) / max(1, n - 1)
        return (x - mean) / (math.sqrt(var) + 1e-12), mean

    def verdict(self, loss: float, grad_norm: float) -> tuple[str, str]:
        """('ok' | 'spike' | 'nonfinite', reason)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nonfinite", f"loss {loss}, grad norm {grad_norm}"
        if len(self.losses) < self.cfg.min_history:
            return "ok", ""
        z, mean = self._z(loss, self.losses)
        if z > self.cfg.loss_z and loss > mean * (1 + self.cfg.min_rel_jump):
            return "spike", f"loss {loss:.4f} is {z:.1f} sigma above the recent mean {mean:.4f}"
        if self.cfg.grad_z:
            gz, gmean = self._z(grad_norm, self.grads)
            if gz > self.cfg.grad_z and grad_norm > gmean * (1 + self.cfg.min_rel_jump):
                return "spike", f"grad norm {grad_norm:.3f} is {gz:.1f} sigma above the recent mean {gmean:.3f}"
        return "ok", ""

    def accept(self, loss: float, grad_norm: float) -> None:
        self.losses.append(loss)
        self.grads.append(grad_norm)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grads": list(self.grads)}

    def load_state_dict(self, s: dict) -> None:
        self.losses = deque(s.get("losses", []), maxlen=self.cfg.window)
        self.grads = deque(s.get("grads", []), maxlen=self.cfg.window)


class EventLog:
    """Append-only JSONL timeline of what the guard and the loop did (rank 0 writes)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / EVENTS
        self.enabled = enabled

    def emit(self, event: str, step: int, **detail) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), "step": step, "event": event, **detail}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


def read_events(run_dir) -> list[dict]:
    p = Path(run_dir) / EVENTS
    if not p.exists():
        return []
    out = []
    for ln in p.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue  # a torn last line after kill -9 is expected; the rest is intact
    return out


def load_quarantine(run_dir) -> set[int]:
    p = Path(run_dir) / QUARANTINE
    if not p.exists():
        return set()
    try:
        data = json.loads(p.read_text())
        steps = data["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, int) and s >= 0 for s in steps):
            raise ValueError("'steps' must be a list of non-negative integers")
        return set(steps)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise LmforgeError(
            f"{p}: quarantine file does not parse ({e}); fix it or delete it to train on every batch again"
        ) from None


def save_quarantine(run_dir, steps: set[int], reason: dict) -> None:
    """Persist the quarantined steps, keeping the history of why each range was added."""
    p = Path(run_dir) / QUARANTINE
    history = []
    if p.exists():
        try:
            history = json.loads(p.read_text()).get("events", [])
        except json.JSONDecodeError:
            history = []
    atomic_write_json(p, {"steps": sorted(steps), "events": history + [reason]})


class Guard:
    """The guard of one run: its detector, quarantine, event log and recovery decisions.

    The trainer asks it three things: whether a step's batch is quarantined (:meth:`quarantined`), the
    lr scale in force (:meth:`lr_scale`), and what to do about a step's loss and gradient norm
    (:meth:`judge`: ``"ok"``, ``"skip"`` or ``"rollback"``). For a rollback it names the checkpoint
    to go back to and the steps to quarantine (:meth:`plan_rollback`), and after the trainer has
    restored that checkpoint it takes its own saved state back, keeping the history
    (:meth:`rewind`). Its state travels in checkpoints via ``state_dict``/``load_state_dict``.
    """

    def __init__(self, cfg: GuardConfig, run_dir, events: EventLog, is_main: bool, resume: bool,
                 note: Callable[[str], None] = lambda msg: None):
        self.cfg, self.run_dir, self.events, self.is_main, self.note = cfg, Path(run_dir), events, is_main, note
        self.detector = SpikeDetector(cfg)
        self.quarantine: set[int] = load_quarantine(run_dir) if resume else set()
        self.skips, self.trouble_start, self.rollbacks, self.cooldown_until = 0, -1, 0, 0
        self.recovery_time_s = 0.0
        self.best_val, self.evals_since_best = float("inf"), 0

    # ---------------------------------------------------------------- questions the loop asks

    def quarantined(self, step: int) -> bool:
        """A quarantined batch is never trained on; its step still advances the schedule."""
        return step in self.quarantine

    def lr_scale(self, step: int) -> float:
        return self.cfg.cooldown_factor if step < self.cooldown_until else 1.0

    def judge(self, step: int, loss: float, grad_norm: float) -> str:
        """``"ok"`` (take the optimizer step), ``"skip"`` (drop this batch) or ``"rollback"``.

        ``loss`` and ``grad_norm`` are already reduced across ranks, so every rank decides alike."""
        if not self.cfg.enabled:
            if not math.isfinite(loss):
                raise LmforgeError(f"training diverged at step {step + 1} (loss {loss}); lower --set train.lr, "
                                   "check the data, or enable the guard")
            return "ok"
        verdict, reason = self.detector.verdict(loss, grad_norm)
        if verdict == "ok":
            self.detector.accept(loss, grad_norm)
            if self.skips:
                self.events.emit("recovered", step, after_skips=self.skips)
            self.skips, self.trouble_start = 0, -1
            return "ok"
        if self.trouble_start < 0:
            self.trouble_start = step
        self.events.emit("detected", step, kind=verdict, reason=reason)
        self.note(f"step {step + 1}: {verdict}: {reason}")
        if verdict == "spike" and self.skips < self.cfg.max_skips:
            self.skips += 1
            self.events.emit("skipped", step, consecutive=self.skips)
            # A batch that caused a spike is suspect: replays after a later rollback skip it too.
            self._quarantine({step}, {"from": step, "to": step, "skipped": True})
            return "skip"
        return "rollback"

    def plan_rollback(self, step: int, newest_valid_before: Callable[[int], Path | None]) -> tuple[Path, int, int]:
        """(checkpoint to roll back to, its step, steps quarantined); quarantines the batches from there (or from
        ``quarantine_window`` steps before the trouble) to ``step``. Raises when it gives up."""
        if self.rollbacks >= self.cfg.max_rollbacks:
            self.events.emit("gave_up", step, rollbacks=self.rollbacks)
            raise LmforgeError(
                f"the guard gave up at step {step + 1} after {self.rollbacks} rollbacks; see {self.run_dir}/{EVENTS} "
                f"(`lmforge status {self.run_dir}`), then lower the lr or inspect the quarantined data")
        target = newest_valid_before(self.trouble_start)
        if target is None:
            self.events.emit("gave_up", step, reason="no checkpoint predates the trouble")
            raise LmforgeError(f"the guard found no checkpoint in {self.run_dir} before step {self.trouble_start + 1}; "
                               "raise train.keep_checkpoints")
        back_to = step_of(target)
        window = self.cfg.quarantine_window
        lo = back_to if not window else max(back_to, self.trouble_start - window)
        bad = set(range(lo, step + 1))
        self._quarantine(bad, {"from": lo, "to": step, "rolled_back_to": back_to, "trouble_start": self.trouble_start})
        self.events.emit("rolled_back", step, to_step=back_to, checkpoint=target.name)
        self.events.emit("quarantined", step, steps=[lo, step], count=len(bad))
        self.note(f"rolled back to step {back_to}; quarantined steps {lo + 1}..{step + 1}")
        return target, back_to, len(bad)

    def rewind(self, saved: dict, back_to: int, n_quarantined: int) -> None:
        """Take back the state saved with the checkpoint just restored, keeping what the run has
        been through since (rollbacks, recovery time, quarantine), and start the cooldown."""
        rollbacks, recovery = self.rollbacks + 1, self.recovery_time_s
        self.load_state_dict(saved)
        self.rollbacks, self.recovery_time_s = rollbacks, recovery
        self.skips, self.trouble_start = 0, -1
        self.cooldown_until = back_to + self.cfg.cooldown_steps + n_quarantined

    def watch_val(self, val_loss: float, step: int) -> None:
        """Warn (once per streak) when the val loss has not improved for ``val_stall_evals`` evals."""
        if val_loss < self.best_val:
            self.best_val, self.evals_since_best = val_loss, 0
            return
        self.evals_since_best += 1
        if self.cfg.val_stall_evals and self.evals_since_best == self.cfg.val_stall_evals:
            self.events.emit("val_stall", step, evals=self.evals_since_best, best_val_loss=self.best_val,
                             val_loss=val_loss)
            self.note(f"warning: val loss has not improved for {self.evals_since_best} evals (best {self.best_val:.4f})")

    def _quarantine(self, steps: set[int], reason: dict) -> None:
        self.quarantine |= steps
        if self.is_main:
            save_quarantine(self.run_dir, self.quarantine, reason)

    # ---------------------------------------------------------------- checkpointed state

    _FIELDS = ("skips", "trouble_start", "rollbacks", "cooldown_until", "recovery_time_s", "best_val",
               "evals_since_best")

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), **{k: getattr(self, k) for k in self._FIELDS}}

    def load_state_dict(self, s: dict) -> None:
        self.detector.load_state_dict(s.get("detector", {}))
        for k in self._FIELDS:
            if k in s:
                setattr(self, k, s[k])

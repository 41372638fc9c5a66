"""The training loop: ``train(cfg)``, on one CPU or many GPUs, for any :class:`Workload`.

    setup()       builds the model, optimizer, guard and checkpointer, resumes, writes the manifest
    train_step()  one optimizer step's forward and backward passes, and the signals ranks agree on
    fit()         the loop: quarantine, guard verdicts, rollback, logging, eval, checkpoints, signals
    finish()      the final model and the manifest's metrics and cost

The data and the loss come from a workload (pretraining by default; fine-tuning stages pass
their own), so every stage trains with the same guard, resume, torchrun support and ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmforge.cost.catalog import detect_hardware_name, device_peak, get_hardware, run_cost
from lmforge.cost.hw import bf16_supported_on_cpu
from lmforge.errors import Interrupted, LmforgeError
from lmforge.model.io import load_model, save_model
from lmforge.model.model import build_model, flops_per_token, param_counts
from lmforge.progress import Bar
from lmforge.rundir import MANIFEST, Manifest, read_manifest
from lmforge.train import distributed as D
from lmforge.train import lock as L
from lmforge.train.checkpoint import Checkpointer, agree_on_latest, list_checkpoints, newest_valid
from lmforge.train.config import RESUME_FREE, TrainConfig, resume_hash, resume_mode
from lmforge.train.guard import EVENTS, QUARANTINE, EventLog, Guard
from lmforge.train.metrics import MetricsLog
from lmforge.train.schedule import lr_at
from lmforge.train.workload import Workload, pretraining, resolve_model


@dataclass
class Counters:
    """Where the run stands; saved in every checkpoint, so a resume or a rollback restores it."""

    step: int = 0
    val_loss: float = float("nan")
    last_loss: float = float("nan")  # the last trained step's loss: the final train loss, even after a resume
    train_time_s: float = 0.0
    injected: list = field(default_factory=list)  # fault-injection steps already fired (fire once)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, s: dict) -> None:
        for k, v in s.items():
            if hasattr(self, k):
                setattr(self, k, v)


@dataclass
class Run:
    """The parts of one training run, built by :func:`setup`."""

    cfg: TrainConfig
    info: D.DistInfo
    work: Workload
    model: torch.nn.Module  # the plain model
    pmodel: torch.nn.Module  # the model under DDP / FSDP2
    fwd: torch.nn.Module  # what the step calls: pmodel, compiled when asked
    optimizer: torch.optim.Optimizer
    ctx: object  # the autocast context (or a null one in fp32)
    counters: Counters
    guard: Guard
    ckpt: Checkpointer
    log: MetricsLog
    bar: Bar
    manifest: Manifest | None  # rank 0 only
    flops_per_token: int
    peak: float
    hardware: str
    resumed_from: Path | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)


def train(cfg: TrainConfig, resume: bool | str = False, progress: bool = True,
          workload: Callable[[TrainConfig, D.DistInfo, object], Workload] | None = None, record: dict | None = None) -> dict:
    """Train per ``cfg``; return the finished run's manifest (rank 0) as a dict.

    ``resume``: ``"never"`` (or False) starts fresh; ``"auto"`` (or True) continues from the newest
    valid checkpoint, or starts fresh when there is none; a path resumes from that checkpoint.
    ``workload``: builds what to train on from (cfg, dist info, the ``init_from`` model or None),
    once the ranks are set up (default :func:`pretraining`: next-token prediction on ``cfg.data``).
    ``record``: extra top-level manifest entries (a forecast made before launch, say).
    """
    info = D.setup(cfg.device)
    try:
        with _Stopper() as stopper:
            init = load_model(cfg.init_from) if cfg.init_from else None
            work = (workload or pretraining)(cfg, info, init)
            resolve_model(cfg, work.vocab_size, init)
            lock = L.acquire(cfg.out, log=_warn) if info.is_main else None
            try:
                run = setup(cfg, resume_mode(resume), progress, info, work, init, record or {})
                return fit(run, stopper)
            finally:
                L.release(lock)
    finally:
        D.teardown()


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def pick_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Master weights always stay fp32."""
    if cfg.precision == "fp32":
        return None
    ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else bf16_supported_on_cpu()
    if not ok and cfg.precision == "bf16":
        raise LmforgeError(f"train.precision = 'bf16' but this {device.type} has no bf16 support; use auto or fp32")
    return torch.bfloat16 if ok else None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` (from :func:`pick_precision`), or a null context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices only: norms' gains and (tied) embeddings are left alone, as in most LLM recipes.
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def _resume_point(cfg: TrainConfig, cfg_dict: dict, mode, info: D.DistInfo, stage: str) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after refusing a config that differs from
    the one the run was trained with, or a fresh start over an existing run."""
    run_dir = Path(cfg.out)
    if mode != "never" and (run_dir / MANIFEST).exists():
        old = read_manifest(run_dir, expect_stage=stage)
        if old.get("resume_hash") != resume_hash(cfg_dict):
            diff = sorted(k for k in cfg_dict if k not in RESUME_FREE and old["config"].get(k) != cfg_dict[k])
            raise LmforgeError(
                f"--resume: {run_dir} was trained with a different config (differs in: {', '.join(diff) or 'data'}); "
                "use the original config or a new --out directory")
    if mode == "never":
        if info.is_main and list_checkpoints(run_dir):
            raise LmforgeError(f"{run_dir} already holds a training run; pass --resume auto to continue it or pick a new --out")
        return None
    if mode != "auto":
        return mode
    found = agree_on_latest(run_dir, info, log=_warn)
    if found is None and info.is_main and list_checkpoints(run_dir):
        why = "; ".join(newest_valid(run_dir)[1])
        raise LmforgeError(f"no checkpoint in {run_dir / 'checkpoints'} verifies ({why}); starting over would discard "
                           "the run: delete the checkpoints directory to start over, or train into a new --out")
    return found


def setup(cfg: TrainConfig, mode, progress: bool, info: D.DistInfo, work: Workload, init, record: dict) -> Run:
    """Everything a run needs, resumed from its checkpoint when there is one."""
    run_dir, cfg_dict = Path(cfg.out), dataclasses.asdict(cfg)
    ckpt_path = _resume_point(cfg, cfg_dict, mode, info, work.stage)
    # Every rank builds identical weights; (seed, step, rank) decides the data.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model, info.device)
    if init is not None:
        model.load_state_dict(init.state_dict())
    events = EventLog(run_dir, enabled=info.is_main)
    if mode == "never" and info.is_main:
        (run_dir / EVENTS).unlink(missing_ok=True)
        (run_dir / QUARANTINE).unlink(missing_ok=True)
    guard = Guard(cfg.guard, run_dir, events, info.is_main, resume=mode != "never")
    amp_dtype = pick_precision(cfg, info.device)
    pmodel = D.parallelize(model, info, cfg.fsdp)
    optimizer = build_optimizer(pmodel, cfg)
    counters = Counters()
    ckpt = Checkpointer(run_dir, cfg.keep_checkpoints, model, pmodel, optimizer, {"counters": counters, "guard": guard},
                        info, cfg.fsdp)
    if ckpt_path is not None:
        ckpt.restore(ckpt_path)
    bar = Bar("train", cfg.max_steps, unit="steps", enabled=progress and info.is_main, plain=True, start=counters.step,
              stream=sys.stdout, transient=False)
    guard.note = bar.note
    hardware = detect_hardware_name(info.device) if cfg.hardware == "auto" else cfg.hardware
    peak, peak_desc = device_peak(info.device, cfg.hardware, "bf16" if amp_dtype else "fp32")
    run = Run(cfg, info, work, model, pmodel, torch.compile(pmodel) if cfg.compile else pmodel, optimizer,
              autocast_context(info.device, amp_dtype),
              counters, guard, ckpt, MetricsLog(run_dir, info.is_main, counters.step, cfg.tensorboard), bar,
              None, flops_per_token(cfg.model), peak, hardware, ckpt_path)
    if info.is_main:
        run.manifest = _start_manifest(run, cfg_dict, str(amp_dtype or "fp32"), peak_desc, record)
    run.log.say(f"run: {run_dir}  params {param_counts(cfg.model)['total'] / 1e6:.2f}M  {work.tokens_per_step} tokens/step  "
                f"{cfg.max_steps} steps  precision {amp_dtype or 'fp32'}  world {info.world}"
                + (f"  resumed at step {counters.step} from {ckpt_path.name}" if ckpt_path else ""))
    if ckpt_path is not None:
        events.emit("resumed", counters.step, checkpoint=str(ckpt_path.name))
    elif cfg.guard.enabled:
        ckpt.save(0)  # a rollback target, until keep_checkpoints newer ones push it out
    return run


def _start_manifest(run: Run, cfg_dict: dict, precision: str, peak_desc: str, record: dict) -> Manifest:
    cfg = run.cfg
    man = Manifest(run.run_dir, run.work.stage, cfg_dict)
    man.data["resume_hash"] = resume_hash(cfg_dict)
    for name, entry in run.work.inputs.items():
        man.add_input(name, **entry)
    if cfg.init_from:
        man.add_input("init_from", Path(cfg.init_from) / "model.safetensors")
    counts = param_counts(cfg.model)
    man.set_metrics(params_total=counts["total"], params_non_embedding=counts["non_embedding"],
                    flops_per_token=run.flops_per_token, tokens_per_step=run.work.tokens_per_step,
                    world_size=run.info.world, precision=precision, device=str(run.info.device), peak_flops=run.peak,
                    peak_source=peak_desc, hardware=run.hardware, **run.work.metrics)
    man.data.update(record)
    man.write()
    return man


def train_step(run: Run, step: int, stop_signal: int) -> tuple[float, float, float]:
    """Forward and backward over the step's micro-batches, then clip. Returns (loss, grad norm,
    signal) reduced over ranks in one collective, so every rank acts on the same values."""
    cfg, info = run.cfg, run.info
    inject = step in cfg.inject_nan_at and step not in run.counters.injected
    loss_sum = torch.zeros((), device=info.device)
    for micro in range(cfg.grad_accum):
        batch = [t.to(info.device, non_blocking=True) for t in run.work.micro_batch(step, info.rank, micro)]
        sync = contextlib.nullcontext()
        if info.enabled and not cfg.fsdp and micro < cfg.grad_accum - 1:
            sync = run.pmodel.no_sync()  # gradients are averaged across ranks once, on the last micro-batch
        with sync:
            with run.ctx:
                loss = run.work.loss(run.fwd, batch) / cfg.grad_accum
            if inject:
                loss = loss * float("nan")
            loss.backward()
        loss_sum += loss.detach()
    if inject:
        run.counters.injected.append(step)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.pmodel.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor; the norm over all shards is what counts
        grad_norm = grad_norm.full_tensor()
    signals = torch.stack([loss_sum.float(), grad_norm.float().to(loss_sum.device),
                           torch.tensor(float(stop_signal), device=loss_sum.device)]).double()
    if info.enabled:
        D.all_reduce_sum(signals, info)
        signals[:2] /= info.world
    return float(signals[0]), float(signals[1]), float(signals[2])


def fit(run: Run, stopper: "_Stopper") -> dict:
    """The loop, from the run's current step to ``max_steps``; returns the manifest (rank 0)."""
    cfg, c, guard = run.cfg, run.counters, run.guard
    window = _Window()
    t_run = time.perf_counter()
    run.pmodel.train()
    step = c.step
    while step < cfg.max_steps:
        if guard.quarantined(step):
            step += 1  # never trained on; the step still advances the schedule
            continue
        lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, schedule=cfg.schedule,
                   min_lr_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac) * guard.lr_scale(step)
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        loss, gnorm, stop = train_step(run, step, stopper.signum)
        verdict = guard.judge(step, loss, gnorm)
        if verdict != "ok":
            t_rec = time.perf_counter()
            run.optimizer.zero_grad(set_to_none=True)
            step = step + 1 if verdict == "skip" else rollback(run, step)
            if verdict == "rollback":
                window = _Window()
            guard.recovery_time_s += time.perf_counter() - t_rec
            continue
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        c.last_loss = loss
        window.tokens += run.work.tokens_per_step
        _observe(run, step, lr, loss, gnorm, window)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps or stop:
            c.step = step
            c.train_time_s += time.perf_counter() - t_run
            t_run = time.perf_counter()
            path = run.ckpt.save(step)
            if run.manifest:
                run.manifest.set_metrics(steps_done=step)
                run.manifest.write(status="interrupted" if stop else None)
            if stop:
                run.bar.close()
                run.guard.events.emit("interrupted", step, signal=int(stop) if not run.info.enabled else None)
                raise Interrupted(stopper.signum or 15, step, str(path))
    run.bar.close()
    c.train_time_s += time.perf_counter() - t_run
    return finish(run)


class _Window:
    """Tokens trained since the last logged step, for the throughput readout."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0


def _observe(run: Run, step: int, lr: float, loss: float, gnorm: float, window: _Window) -> None:
    """Log every ``log_every`` steps (and the last), evaluate every ``eval_every`` (and the last)."""
    cfg, last = run.cfg, step == run.cfg.max_steps
    if step % cfg.log_every == 0 or last:
        dt = time.perf_counter() - window.t0
        tps = window.tokens / dt if dt > 0 else 0.0
        mfu = tps * run.flops_per_token / (run.peak * run.info.world) if run.peak else None
        run.log.record(step=step, loss=round(loss, 5), lr=lr, grad_norm=round(gnorm, 4),
                       tokens=step * run.work.tokens_per_step, tokens_per_s=round(tps, 1), mfu=round(mfu, 4) if mfu else None)
        run.bar.update(step, f"loss {loss:.4f}  {tps:,.0f} tok/s" + (f"  MFU {mfu:.1%}" if mfu else ""))
        window.t0, window.tokens = time.perf_counter(), 0
    if (cfg.eval_every and step % cfg.eval_every == 0) or last:
        run.counters.val_loss = run.work.evaluate(run.pmodel, run.ctx)
        run.log.record(step=step, val_loss=round(run.counters.val_loss, 5), **run.work.eval_metrics)
        run.bar.note(f"step {step}: val loss {run.counters.val_loss:.4f}")
        run.guard.watch_val(run.counters.val_loss, step)


def rollback(run: Run, step: int) -> int:
    """Restore the checkpoint the guard picks; the steps since are quarantined. Returns the new step."""
    target, back_to, n_bad = run.guard.plan_rollback(step, run.ckpt.newest_valid_before)
    injected = list(run.counters.injected)  # faults already fired stay fired
    state = run.ckpt.restore(target, parts=("counters",))
    run.counters.injected = injected
    run.guard.rewind(state.get("guard", {}), back_to, n_bad)
    return back_to


def finish(run: Run) -> dict:
    """Save the final model; fill in the manifest's metrics and cost (rank 0)."""
    cfg, c, info = run.cfg, run.counters, run.info
    final_model = D.gather_full_state(run.pmodel, None, info)["model"] if cfg.fsdp else run.model
    if not info.is_main:
        return {}
    save_model(final_model, run.run_dir)
    steps_trained = cfg.max_steps - len([q for q in run.guard.quarantine if q < cfg.max_steps])
    tokens = steps_trained * run.work.tokens_per_step
    flops, hours = tokens * run.flops_per_token, c.train_time_s * info.world / 3600
    man = run.manifest
    man.add_output("model", run.run_dir / "model.safetensors", hash_it=True)
    man.add_output("model_config", run.run_dir / "model_config.json")
    man.add_output("metrics", run.log.path)
    man.set_metrics(
        steps=cfg.max_steps, steps_done=cfg.max_steps, steps_trained=steps_trained, tokens=tokens,
        final_train_loss=c.last_loss, final_val_loss=c.val_loss, epochs=round(run.work.epochs_seen(cfg.max_steps), 4),
        model_flops=flops, train_time_s=round(c.train_time_s, 2),
        tokens_per_s=round(tokens / c.train_time_s, 1) if c.train_time_s > 0 else None,
        mfu=round(flops / c.train_time_s / (run.peak * info.world), 4) if run.peak and c.train_time_s > 0 else None,
        device_hours=round(hours, 6), cost=_cost(run.hardware, cfg.grid_kg_per_kwh, hours),
        **{f"final_{k}": v for k, v in run.work.eval_metrics.items()},
        guard={"rollbacks": run.guard.rollbacks, "quarantined_steps": len(run.guard.quarantine),
               "recovery_time_s": round(run.guard.recovery_time_s, 3)})
    per_source = run.work.tokens_per_source(cfg.max_steps, [q for q in run.guard.quarantine if q < cfg.max_steps])
    if per_source is not None:
        man.set_metrics(tokens_per_source=per_source)
    run.guard.events.emit("finished", cfg.max_steps, val_loss=c.val_loss)
    man.finish()
    run.log.say(f"done: val loss {c.val_loss:.4f}  train loss {c.last_loss:.4f}  {c.train_time_s:.0f}s  run dir {run.run_dir}")
    run.log.close()
    return man.data


def _cost(hardware: str, grid_kg_per_kwh: float, device_hours: float) -> dict:
    cost = run_cost(device_hours, get_hardware(hardware), grid_kg_per_kwh)
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in cost.items()}


class _Stopper:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (preemptible machines)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

"""The training loop: one function, ``train(cfg)``, that runs on one CPU or many GPUs.

Reads the data run directory's token index, builds the model from its config, applies
data parallelism from outside, and writes a ``train`` run directory: manifest,
``metrics.jsonl``, checkpoints, and the final model as safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.model.io import load_model, save_model, unwrap
from lmforge.model.model import ModelConfig, build_model, flops_per_token, param_counts
from lmforge.rundir import Manifest, atomic_write_text, hash_json, read_manifest
from lmforge.train import distributed as D
from lmforge.train.batches import BatchSource, val_batches
from lmforge.train.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from lmforge.train.guard import GuardConfig
from lmforge.train.schedule import lr_at


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
    forecast_fit: str = ""  # a fit.json (lmforge fit): record its forecast for this run and check it at the end
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


# Keys that change how a run is observed, not what it computes; --resume may change them.
_RESUME_FREE = {"out", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
                "tensorboard", "compile", "max_steps", "device", "inject_nan_at", "hardware", "grid_kg_per_kwh", "forecast_fit"}


def config_from_sources(file_cfg: dict, overrides: dict, where: str) -> TrainConfig:
    merged = dict(file_cfg)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    model = merged.setdefault("model", {})
    if isinstance(model, dict):
        model.setdefault("vocab_size", 0)
    return from_dict(TrainConfig, merged, where)


def resume_hash(cfg_dict: dict) -> str:
    return hash_json({k: v for k, v in cfg_dict.items() if k not in _RESUME_FREE})


def pick_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Master weights always stay fp32."""
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        from lmforge.cost.hw import bf16_supported_on_cpu

        ok = bf16_supported_on_cpu()
    if not ok and cfg.precision == "bf16":
        raise LmforgeError(f"train.precision = 'bf16' but this {device.type} has no bf16 support; use auto or fp32")
    return torch.bfloat16 if ok else None


def open_tokens(data_dir: str):
    """The data stage's train/val token views, with the index metadata."""
    from lmforge.data.shards import TokenData

    man = read_manifest(data_dir, expect_stage="data")
    if "token_index" not in man.get("outputs", {}):
        raise LmforgeError(f"{data_dir}: the data has not been tokenized; run `lmforge data ... --tokenizer DIR` first")
    td = TokenData(data_dir)
    return man, td


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
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


@torch.no_grad()
def evaluate(model, val_tokens, cfg: TrainConfig, ctx, info: D.DistInfo) -> float:
    """Mean per-token val loss over a fixed set of val windows, split across ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    for x, y in val_batches(val_tokens, cfg.model.context, cfg.batch_size, cfg.eval_batches, info.rank, info.world):
        x, y = x.to(info.device), y.to(info.device)
        with ctx:
            loss = unwrap(model)(x, y) if not cfg.fsdp else model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    D.all_reduce_sum(total, info)
    model.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _rng_state() -> dict:
    # Plain tensors and lists only, so the state file loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(s["python"]) if not isinstance(s["python"], tuple) else s["python"])


class _Log:
    """Rank-0 console lines and the metrics JSONL."""

    def __init__(self, run_dir: Path, info: D.DistInfo, resume_step: int, tensorboard: bool):
        self.on = info.is_main
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not self.on:
            return
        if resume_step and self.path.exists():
            # Drop records past the checkpoint we resumed from; they will be produced again.
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        elif not resume_step:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                print("warning: tensorboard is not installed; pip install tensorboard", file=sys.stderr)

    def record(self, **rec) -> None:
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def say(self, msg: str) -> None:
        if self.on:
            print(msg, flush=True)

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def _check_fits(cfg: TrainConfig, train_tokens, val_tokens, data_dir: str) -> None:
    need = cfg.batch_size * (cfg.model.context + 1)
    if len(train_tokens) < need:
        raise LmforgeError(
            f"a batch doesn't fit: batch_size {cfg.batch_size} x (context {cfg.model.context} + 1) = {need} tokens, "
            f"but the train split of {data_dir} has {len(train_tokens)}; lower --set batch_size or model.context"
        )
    if len(val_tokens) < cfg.model.context + 1:
        raise LmforgeError(
            f"the val split of {data_dir} has {len(val_tokens)} tokens, less than one context of {cfg.model.context + 1}; "
            "raise the data stage's --val-fraction or lower model.context"
        )


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was written and the process should exit with ``code``."""

    def __init__(self, signum: int, step: int, ckpt: str):
        self.code = 128 + signum
        self.step = step
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint {ckpt}; continue with --resume auto")


class _Stopper:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (preemptible machines)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, resume: bool | str = False, progress: bool = True) -> dict:
    """Train per ``cfg``; return the finished run's manifest (rank 0) as a dict.

    ``resume``: False/"never" starts fresh; True/"auto" continues from the newest valid
    checkpoint (or starts fresh when there is none); a path resumes from that checkpoint.
    """
    info = D.setup(cfg.device)
    try:
        with _Stopper() as stopper:
            return _train(cfg, resume, progress, info, stopper)
    finally:
        D.teardown()


@dataclass
class _State:
    """Everything besides model and optimizer that a checkpoint must carry for an exact resume."""

    step: int = 0
    val_loss: float = float("nan")
    train_time_s: float = 0.0
    skips: int = 0
    trouble_start: int = -1
    rollbacks: int = 0
    cooldown_until: int = 0
    injected: list = field(default_factory=list)
    recovery_time_s: float = 0.0
    best_val: float = float("inf")
    evals_since_best: int = 0


def _resolve_resume(resume, run_dir: Path, info: D.DistInfo) -> Path | None:
    if resume in (False, None, "never", ""):
        return None
    if resume not in (True, "auto"):
        p = Path(resume)
        if not p.exists():
            raise LmforgeError(f"--resume {resume}: no such checkpoint directory")
        return p
    ckpt = latest_valid_checkpoint(run_dir, log=lambda m: print(m, file=sys.stderr)) if info.is_main else None
    ckpt = D.broadcast_object(str(ckpt) if ckpt else None, info)
    return Path(ckpt) if ckpt else None


def _train(cfg: TrainConfig, resume, progress: bool, info: D.DistInfo, stopper: _Stopper) -> dict:
    from lmforge.train import lock as L

    run_dir = Path(cfg.out)
    data_man, td = open_tokens(cfg.data)
    train_tokens, val_tokens = td.split("train"), td.split("val")
    if cfg.model.vocab_size == 0:
        cfg.model = dataclasses.replace(cfg.model, vocab_size=td.vocab_size)
    elif cfg.model.vocab_size < td.vocab_size:
        raise LmforgeError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's {td.vocab_size}")
    init = load_model(cfg.init_from) if cfg.init_from else None
    if init is not None:
        cfg.model = init.cfg
    _check_fits(cfg, train_tokens, val_tokens, cfg.data)
    cfg_dict = dataclasses.asdict(cfg)

    lock = L.acquire(run_dir, log=lambda m: print(m, file=sys.stderr)) if info.is_main else None
    try:
        return _run(cfg, cfg_dict, resume, progress, info, stopper, run_dir, data_man, td,
                    train_tokens, val_tokens, init)
    finally:
        L.release(lock)


def _run(cfg, cfg_dict, resume, progress, info, stopper, run_dir, data_man, td, train_tokens, val_tokens, init):
    from lmforge.train.guard import EventLog, SpikeDetector, load_quarantine, save_quarantine

    if resume not in (False, None, "never", "") and (run_dir / "manifest.json").exists():
        old = read_manifest(run_dir, expect_stage="train")
        if old.get("resume_hash") != resume_hash(cfg_dict):
            diff = sorted(k for k in cfg_dict if k not in _RESUME_FREE and old["config"].get(k) != cfg_dict[k])
            raise LmforgeError(
                f"--resume: {run_dir} was trained with a different config (differs in: {', '.join(diff) or 'data'}); "
                "use the original config or a new --out directory"
            )
    ckpt = _resolve_resume(resume, run_dir, info)
    if ckpt is None and info.is_main and resume in (False, None, "never", "") and list_checkpoints(run_dir):
        raise LmforgeError(f"{run_dir} already holds a training run; pass --resume to continue it or pick a new --out")

    # Every rank builds identical weights; (seed, step, rank) decides the data.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model, info.device)
    if init is not None:
        model.load_state_dict(init.state_dict())

    st = _State()
    detector = SpikeDetector(cfg.guard)
    ckpt_state = None
    if ckpt is not None:
        ckpt_state = load_checkpoint(ckpt, model)
        _restore_state(st, detector, ckpt_state)
    quarantine = load_quarantine(run_dir) if (resume not in (False, None, "never", "")) else set()
    events = EventLog(run_dir, enabled=info.is_main)
    if resume in (False, None, "never", "") and info.is_main:
        (run_dir / "events.jsonl").unlink(missing_ok=True)
        (run_dir / "quarantine.json").unlink(missing_ok=True)

    amp_dtype = pick_precision(cfg, info.device)
    ctx = torch.autocast(info.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    pmodel = D.parallelize(model, info, cfg.fsdp)
    fwd = torch.compile(pmodel) if cfg.compile else pmodel
    optimizer = build_optimizer(pmodel, cfg, info.device)
    if ckpt_state:
        D.load_optimizer_state(pmodel, optimizer, ckpt_state["optimizer"], cfg.fsdp)
        _set_rng_state(ckpt_state["rng"])

    batches = BatchSource(train_tokens, cfg.model.context, cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * info.world * cfg.model.context
    fpt = flops_per_token(cfg.model)
    from lmforge.cost.hw import device_peak

    peak, peak_desc = device_peak(info.device, "bf16" if amp_dtype else "fp32")

    manifest = Manifest(run_dir, "train", cfg_dict) if info.is_main else None
    if manifest:
        manifest.data["resume_hash"] = resume_hash(cfg_dict)
        manifest.add_input("data", cfg.data, corpus_hash=data_man.get("metrics", {}).get("corpus_hash"))
        manifest.data["inputs"]["data"]["token_index_hash"] = td.index_hash
        tok_in = data_man.get("inputs", {}).get("tokenizer")
        if tok_in:
            manifest.data["inputs"]["tokenizer"] = tok_in
        if cfg.init_from:
            manifest.add_input("init_from", Path(cfg.init_from) / "model.safetensors")
        counts = param_counts(cfg.model)
        manifest.set_metrics(params_total=counts["total"], params_non_embedding=counts["non_embedding"],
                             flops_per_token=fpt, tokens_per_step=tokens_per_step, world_size=info.world,
                             precision=str(amp_dtype or "fp32"), device=str(info.device), peak_flops=peak,
                             peak_source=peak_desc)
        if cfg.forecast_fit:
            from lmforge.scaling.forecast import forecast

            fc = forecast(cfg.forecast_fit, counts["non_embedding"], cfg.max_steps * tokens_per_step,
                          fpt * cfg.max_steps * tokens_per_step)
            manifest.data["forecast"] = {**fc, "fit": str(Path(cfg.forecast_fit).resolve())}
            print(f"forecast: final val loss {fc['loss']:.4f} (80% {fc['interval_80'][0]:.4f}-{fc['interval_80'][1]:.4f}, "
                  f"95% {fc['interval_95'][0]:.4f}-{fc['interval_95'][1]:.4f})", flush=True)
            for w in fc["warnings"]:
                print(f"warning: {w}", file=sys.stderr)
        manifest.write()

    def checkpoint(step: int) -> Path | None:
        state = {"step": step, "optimizer": None, "rng": _rng_state(), "detector": detector.state_dict(),
                 "guard_state": dataclasses.asdict(st)}
        if cfg.fsdp:
            # Before the first step the optimizer has no state; asking DCP for it would initialise it with a
            # zero-gradient step, which advances Adam's step count and changes the first real update.
            full = D.gather_full_state(pmodel, optimizer if optimizer.state else None, info)
            if not info.is_main:
                return None
            state["optimizer"], target = full["optimizer"], full["model"]
        else:
            if not info.is_main:
                return None
            state["optimizer"], target = optimizer.state_dict(), model
        return save_checkpoint(run_dir, step, target, state, keep=cfg.keep_checkpoints)

    log = _Log(run_dir, info, st.step, cfg.tensorboard)
    log.say(f"run: {run_dir}  params {param_counts(cfg.model)['total'] / 1e6:.2f}M  "
            f"{tokens_per_step} tokens/step  {cfg.max_steps} steps  precision {amp_dtype or 'fp32'}  world {info.world}"
            + (f"  resumed at step {st.step} from {ckpt.name}" if ckpt_state else ""))
    if ckpt_state:
        events.emit("resumed", st.step, checkpoint=str(ckpt.name))
    elif cfg.guard.enabled:
        checkpoint(0)  # a rollback target always exists

    bar = _progress(cfg.max_steps, st.step, progress and info.is_main)
    t_run = time.perf_counter()
    t_window, tok_window = time.perf_counter(), 0
    loss_val = float("nan")
    pmodel.train()
    step = st.step
    while step < cfg.max_steps:
        if step in quarantine:
            step += 1  # a quarantined batch is never trained on; its step still advances the schedule
            continue
        lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, schedule=cfg.schedule,
                   min_lr_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
        if step < st.cooldown_until:
            lr *= cfg.guard.cooldown_factor
        for g in optimizer.param_groups:
            g["lr"] = lr
        inject = step in cfg.inject_nan_at and step not in st.injected
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(cfg.grad_accum):
            x, y = batches.micro_batch(step, info.rank, micro, batch_size=cfg.batch_size,
                                       grad_accum=cfg.grad_accum, world=info.world)
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if info.enabled and not cfg.fsdp and micro < cfg.grad_accum - 1:
                sync = pmodel.no_sync()
            with sync:
                with ctx:
                    loss = fwd(x, y) / cfg.grad_accum
                if inject:
                    loss = loss * float("nan")
                loss.backward()
            loss_sum += loss.detach()
        if inject:
            st.injected.append(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(pmodel.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor; the norm over all shards is what counts
            grad_norm = grad_norm.full_tensor()
        # One collective carries every signal the ranks must agree on.
        signals = torch.stack([loss_sum.float(), grad_norm.float().to(loss_sum.device),
                               torch.tensor(float(stopper.signum), device=loss_sum.device)]).double()
        if info.enabled:
            D.all_reduce_sum(signals, info)
            signals[:2] /= info.world
        loss_step, gnorm = float(signals[0]), float(signals[1])
        verdict, reason = detector.verdict(loss_step, gnorm) if cfg.guard.enabled else ("ok", "")
        if not cfg.guard.enabled and not math.isfinite(loss_step):
            raise LmforgeError(f"training diverged at step {step + 1} (loss {loss_step}); lower --set lr, check the data, or enable the guard")

        if verdict == "ok":
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            detector.accept(loss_step, gnorm)
            if st.skips:
                events.emit("recovered", step, after_skips=st.skips)
            st.skips, st.trouble_start = 0, -1
        else:
            t_rec = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if st.trouble_start < 0:
                st.trouble_start = step
            events.emit("detected", step, kind=verdict, reason=reason)
            bar.note(f"step {step + 1}: {verdict}: {reason}")
            if verdict == "spike" and st.skips < cfg.guard.max_skips:
                st.skips += 1
                events.emit("skipped", step, consecutive=st.skips)
                # A batch that caused a spike is suspect: replays after a later rollback skip it too.
                quarantine.add(step)
                if info.is_main:
                    save_quarantine(run_dir, quarantine, {"from": step, "to": step, "skipped": True})
                st.recovery_time_s += time.perf_counter() - t_rec
                step += 1
                continue
            step = _rollback(cfg, st, step, run_dir, model, optimizer, pmodel, detector, quarantine, events, info, bar,
                             save_quarantine)
            st.recovery_time_s += time.perf_counter() - t_rec
            t_window, tok_window = time.perf_counter(), 0
            continue

        tok_window += tokens_per_step
        done = step + 1
        step = done
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            loss_val = loss_step
            dt = time.perf_counter() - t_window
            tps = tok_window / dt if dt > 0 else 0.0
            mfu = tps * fpt / (peak * info.world) if peak else None
            log.record(step=done, loss=round(loss_val, 5), lr=lr, grad_norm=round(gnorm, 4),
                       tokens=done * tokens_per_step, tokens_per_s=round(tps, 1), mfu=round(mfu, 4) if mfu else None)
            bar.update(done, loss_val, tps, mfu)
            t_window, tok_window = time.perf_counter(), 0

        last = done == cfg.max_steps
        if (cfg.eval_every and done % cfg.eval_every == 0) or last:
            st.val_loss = evaluate(pmodel, val_tokens, cfg, ctx, info)
            log.record(step=done, val_loss=round(st.val_loss, 5))
            bar.note(f"step {done}: val loss {st.val_loss:.4f}")
            _watch_val(st, cfg, done, events, bar)
        stop = float(signals[2]) > 0
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or last or stop:
            st.step = done
            st.train_time_s += time.perf_counter() - t_run
            t_run = time.perf_counter()
            path = checkpoint(done)
            if stop:
                bar.close()
                events.emit("interrupted", done, signal=int(signals[2]) if not info.enabled else None)
                if manifest:
                    manifest.set_metrics(steps_done=done)
                    manifest.write(status="interrupted")
                raise Interrupted(stopper.signum or 15, done, str(path))
    bar.close()

    st.train_time_s += time.perf_counter() - t_run
    final_model = D.gather_full_state(pmodel, None, info)["model"] if cfg.fsdp else model
    if not info.is_main:
        return {}
    save_model(final_model, run_dir)
    steps_trained = cfg.max_steps - len([q for q in quarantine if q < cfg.max_steps])
    tokens = steps_trained * tokens_per_step
    flops = tokens * fpt
    train_time = st.train_time_s
    manifest.add_output("model", run_dir / "model.safetensors", hash_it=True)
    manifest.add_output("model_config", run_dir / "model_config.json")
    manifest.add_output("metrics", run_dir / "metrics.jsonl")
    manifest.set_metrics(
        steps=cfg.max_steps, steps_trained=steps_trained, tokens=tokens, final_train_loss=loss_val,
        final_val_loss=st.val_loss,
        epochs=round(batches.epochs_seen(cfg.max_steps, cfg.batch_size * cfg.grad_accum * info.world), 4),
        train_tokens_available=len(train_tokens), model_flops=flops, train_time_s=round(train_time, 2),
        tokens_per_s=round(tokens / train_time, 1) if train_time > 0 else None,
        mfu=round(flops / train_time / (peak * info.world), 4) if peak and train_time > 0 else None,
        device_hours=round(train_time * info.world / 3600, 6),
        cost=_cost(cfg, info, train_time * info.world / 3600),
        guard={"rollbacks": st.rollbacks, "quarantined_steps": len(quarantine),
               "recovery_time_s": round(st.recovery_time_s, 3)},
    )
    events.emit("finished", cfg.max_steps, val_loss=st.val_loss)
    manifest.finish()
    if "forecast" in manifest.data:
        from lmforge.scaling.forecast import check_forecast

        chk = check_forecast(run_dir)
        manifest.data["forecast_check"] = chk
        manifest.finish()
        log.say(f"forecast {chk['forecast']:.4f} vs actual {chk['actual']:.4f}: error {chk['error_pct']:+.2f}%, "
                f"{'inside' if chk['in_80'] else 'outside'} the 80% interval")
    log.say(f"done: val loss {st.val_loss:.4f}  train loss {loss_val:.4f}  {train_time:.0f}s  run dir {run_dir}")
    log.close()
    return manifest.data


def _cost(cfg: TrainConfig, info: D.DistInfo, device_hours: float) -> dict:
    from lmforge.cost.catalog import detect_hardware_name, get_hardware, run_cost

    name = cfg.hardware
    if name == "auto":
        dev_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else ""
        name = detect_hardware_name(info.device.type, dev_name)
    try:
        hw = get_hardware(name)
    except LmforgeError as e:
        return {"error": str(e)}
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in run_cost(device_hours, hw, cfg.grid_kg_per_kwh).items()}


def _watch_val(st: _State, cfg: TrainConfig, step: int, events, bar) -> None:
    """Warn (once per streak) when the val loss has not improved for ``guard.val_stall_evals`` evals."""
    if st.val_loss < st.best_val:
        st.best_val, st.evals_since_best = st.val_loss, 0
        return
    st.evals_since_best += 1
    if cfg.guard.val_stall_evals and st.evals_since_best == cfg.guard.val_stall_evals:
        events.emit("val_stall", step, evals=st.evals_since_best, best_val_loss=st.best_val, val_loss=st.val_loss)
        bar.note(f"warning: val loss has not improved for {st.evals_since_best} evals (best {st.best_val:.4f})")


def _restore_state(st: _State, detector, ckpt_state: dict) -> None:
    g = ckpt_state.get("guard_state", {})
    for k, v in g.items():
        if hasattr(st, k):
            setattr(st, k, v)
    st.step = ckpt_state["step"]
    detector.load_state_dict(ckpt_state.get("detector", {}))


def _rollback(cfg, st, step, run_dir, model, optimizer, pmodel, detector, quarantine, events, info, bar, save_quarantine):
    """Roll back to the newest checkpoint before the trouble; quarantine the batches since. Returns the new step."""
    if st.rollbacks >= cfg.guard.max_rollbacks:
        events.emit("gave_up", step, rollbacks=st.rollbacks)
        raise LmforgeError(
            f"the guard gave up at step {step + 1} after {st.rollbacks} rollbacks; see {run_dir}/events.jsonl "
            f"(`lmforge status {run_dir}`), then lower the lr or inspect the quarantined data"
        )
    candidates = [c for c in list_checkpoints(run_dir) if int(c.name.split("-")[1]) <= st.trouble_start]
    target = None
    for c in reversed(candidates):
        try:
            from lmforge.train.checkpoint import verify_checkpoint

            verify_checkpoint(c)
            target = c
            break
        except LmforgeError:
            continue
    target = D.broadcast_object(str(target) if target else None, info)
    if target is None:
        events.emit("gave_up", step, reason="no checkpoint predates the trouble")
        raise LmforgeError(f"the guard found no checkpoint in {run_dir} before step {st.trouble_start + 1}; "
                           "raise train.keep_checkpoints")
    target = Path(target)
    back_to = int(target.name.split("-")[1])
    lo = back_to if not cfg.guard.quarantine_window else max(back_to, st.trouble_start - cfg.guard.quarantine_window)
    bad = set(range(lo, step + 1))
    quarantine |= bad
    if info.is_main:
        save_quarantine(run_dir, quarantine, {"from": lo, "to": step, "rolled_back_to": back_to, "trouble_start": st.trouble_start})
    rollbacks, injected, recovery = st.rollbacks + 1, list(st.injected), st.recovery_time_s
    state = load_checkpoint(target, model, sharded=cfg.fsdp and info.enabled)
    D.load_optimizer_state(pmodel, optimizer, state["optimizer"], cfg.fsdp)
    _set_rng_state(state["rng"])
    _restore_state(st, detector, state)
    st.rollbacks, st.injected, st.recovery_time_s = rollbacks, injected, recovery
    st.skips, st.trouble_start = 0, -1
    st.cooldown_until = back_to + cfg.guard.cooldown_steps + len(bad)
    events.emit("rolled_back", step, to_step=back_to, checkpoint=target.name)
    events.emit("quarantined", step, steps=[lo, step], count=len(bad))
    bar.note(f"rolled back to step {back_to}; quarantined steps {lo + 1}..{step + 1}")
    return back_to


class _progress:
    """A rich progress bar with ETA on a terminal; plain periodic lines otherwise (CI logs)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.total, self.start, self.t0 = total, start, time.perf_counter()

    def update(self, done: int, loss: float, tps: float, mfu: float | None) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  {tps:,.0f} tok/s" + (f"  MFU {mfu:.1%}" if mfu else "")
        if self.bar:
            self.bar.update(self.task, completed=done, info=info)
        else:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(1, done - self.start) * (self.total - done)
            print(f"step {done}/{self.total}  {info}  ETA {eta:,.0f}s", flush=True)

    def note(self, msg: str) -> None:
        if not self.enabled:
            return
        (self.bar.console.print if self.bar else print)(msg)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()

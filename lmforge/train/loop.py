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
from lmforge.train.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
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
                "tensorboard", "compile", "max_steps", "device"}


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
    for i, (x, y) in enumerate(val_batches(val_tokens, cfg.model.context, cfg.batch_size, cfg.eval_batches)):
        if i % info.world != info.rank:
            continue
        x, y = x.to(info.device), y.to(info.device)
        with ctx:
            loss = unwrap(model)(x, y) if not cfg.fsdp else model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    D.all_reduce_sum(total, info)
    model.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


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


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train per ``cfg``; return the finished run's manifest (rank 0) as a dict."""
    info = D.setup(cfg.device)
    try:
        return _train(cfg, resume, progress, info)
    finally:
        D.teardown()


def _train(cfg: TrainConfig, resume: bool, progress: bool, info: D.DistInfo) -> dict:
    run_dir = Path(cfg.out)
    data_man, td = open_tokens(cfg.data)
    train_tokens, val_tokens = td.split("train"), td.split("val")
    if cfg.model.vocab_size == 0:
        cfg.model = dataclasses.replace(cfg.model, vocab_size=td.vocab_size)
    elif cfg.model.vocab_size < td.vocab_size:
        raise LmforgeError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's {td.vocab_size}")
    if cfg.init_from:
        init = load_model(cfg.init_from)
        cfg.model = init.cfg
    _check_fits(cfg, train_tokens, val_tokens, cfg.data)
    cfg_dict = dataclasses.asdict(cfg)

    # Every rank must see the same tokens in the same order; (seed, step, rank) decides them.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model, info.device)
    if cfg.init_from:
        model.load_state_dict(init.state_dict())
        del init

    start_step, ckpt_state = 0, None
    if resume:
        old = read_manifest(run_dir, expect_stage="train")
        if old.get("resume_hash") != resume_hash(cfg_dict):
            diff = sorted(k for k in cfg_dict if k not in _RESUME_FREE and old["config"].get(k) != cfg_dict[k])
            raise LmforgeError(
                f"--resume: {run_dir} was trained with a different config (differs in: {', '.join(diff) or 'data'}); "
                "use the original config or a new --out directory"
            )
        ckpt = latest_valid_checkpoint(run_dir, log=lambda m: print(m, file=sys.stderr)) if info.is_main else None
        ckpt = D.broadcast_object(str(ckpt) if ckpt else None, info)
        if ckpt:
            ckpt_state = load_checkpoint(Path(ckpt), model)
            start_step = ckpt_state["step"]
    elif info.is_main and (run_dir / "manifest.json").exists() and any((run_dir / "checkpoints").glob("step-*")):
        raise LmforgeError(f"{run_dir} already holds a training run; pass --resume to continue it or pick a new --out")

    amp_dtype = pick_precision(cfg, info.device)
    ctx = torch.autocast(info.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    pmodel = D.parallelize(model, info, cfg.fsdp)
    fwd = torch.compile(pmodel) if cfg.compile else pmodel
    optimizer = build_optimizer(pmodel, cfg, info.device)
    if ckpt_state:
        optimizer.load_state_dict(ckpt_state["optimizer"])
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
        if ckpt_state:
            manifest.data["metrics"] = {**ckpt_state.get("metrics", {}), **manifest.data["metrics"]}
        manifest.write()

    log = _Log(run_dir, info, start_step, cfg.tensorboard)
    log.say(f"run: {run_dir}  params {param_counts(cfg.model)['total'] / 1e6:.2f}M  "
            f"{tokens_per_step} tokens/step  {cfg.max_steps} steps  precision {amp_dtype or 'fp32'}  world {info.world}"
            + (f"  resumed at step {start_step}" if start_step else ""))

    bar = _progress(cfg.max_steps, start_step, progress and info.is_main)
    val_loss = ckpt_state.get("val_loss", float("nan")) if ckpt_state else float("nan")
    prev_train_time = ckpt_state.get("train_time_s", 0.0) if ckpt_state else 0.0
    t_run = time.perf_counter()
    t_window, tok_window = time.perf_counter(), 0
    loss_val = float("nan")
    pmodel.train()
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, schedule=cfg.schedule,
                   min_lr_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
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
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(pmodel.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tok_window += tokens_per_step
        done = step + 1

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            loss_val = D.all_reduce_mean(float(loss_sum), info)
            dt = time.perf_counter() - t_window
            tps = tok_window / dt
            mfu = tps * fpt / (peak * info.world) if peak else None
            log.record(step=done, loss=round(loss_val, 5), lr=lr, grad_norm=round(float(grad_norm), 4),
                       tokens=done * tokens_per_step, tokens_per_s=round(tps, 1),
                       mfu=round(mfu, 4) if mfu else None)
            bar.update(done, loss_val, tps, mfu)
            t_window, tok_window = time.perf_counter(), 0
            if not math.isfinite(loss_val):
                raise LmforgeError(f"training diverged at step {done} (loss {loss_val}); lower --set lr or check the data")

        last = done == cfg.max_steps
        if cfg.eval_every and (done % cfg.eval_every == 0 or last) or (last and not cfg.eval_every):
            val_loss = evaluate(pmodel, val_tokens, cfg, ctx, info)
            log.record(step=done, val_loss=round(val_loss, 5))
            bar.note(f"step {done}: val loss {val_loss:.4f}")
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or last:
            train_time = prev_train_time + time.perf_counter() - t_run
            state = {"step": done, "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                     "val_loss": val_loss, "train_time_s": train_time,
                     "metrics": manifest.data["metrics"] if manifest else {}}
            if info.is_main and not cfg.fsdp:
                save_checkpoint(run_dir, done, model, state, keep=cfg.keep_checkpoints)
    bar.close()

    train_time = prev_train_time + time.perf_counter() - t_run
    result = {}
    if info.is_main:
        save_model(model, run_dir)
        steps_done = cfg.max_steps
        tokens = steps_done * tokens_per_step
        flops = tokens * fpt
        manifest.add_output("model", run_dir / "model.safetensors", hash_it=True)
        manifest.add_output("model_config", run_dir / "model_config.json")
        manifest.add_output("metrics", run_dir / "metrics.jsonl")
        manifest.set_metrics(
            steps=steps_done, tokens=tokens, final_train_loss=loss_val, final_val_loss=val_loss,
            epochs=round(batches.epochs_seen(steps_done, cfg.batch_size * cfg.grad_accum * info.world), 4),
            train_tokens_available=len(train_tokens), model_flops=flops, train_time_s=round(train_time, 2),
            tokens_per_s=round(tokens / train_time, 1) if train_time > 0 else None,
            mfu=round(flops / train_time / (peak * info.world), 4) if peak and train_time > 0 else None,
            device_hours=round(train_time * info.world / 3600, 5),
        )
        result = manifest.finish() and manifest.data
        log.say(f"done: val loss {val_loss:.4f}  train loss {loss_val:.4f}  {train_time:.0f}s  run dir {run_dir}")
    log.close()
    return result


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

"""What a training run learns from: the seam between the training loop and its data and loss.

The loop (:mod:`lmforge.train.trainer`) knows nothing about token shards or next-token
prediction. It asks a :class:`Workload` for the micro-batch of a given (step, rank, micro),
which must be a pure function of those so that resume and rollback replay exactly, for the
loss of the model on that batch, and for a validation score. Pretraining is
:func:`pretraining`; fine-tuning stages build their own workload and pass it to ``train``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmforge.data.shards import open_tokens
from lmforge.errors import LmforgeError
from lmforge.model.io import unwrap
from lmforge.train import distributed as D
from lmforge.train.batches import BatchSource, val_batches
from lmforge.train.config import TrainConfig


# The stages whose run directories the training loop writes (their manifests' ``stage``).
TRAINING_STAGES = ("train", "sft", "dpo", "distill")


@dataclass
class Workload:
    vocab_size: int
    micro_batch: Callable[[int, int, int], tuple]  # (step, rank, micro) -> tensors, on the CPU
    loss: Callable[[torch.nn.Module, tuple], torch.Tensor]  # (model, batch on the device) -> mean loss
    evaluate: Callable[[torch.nn.Module, object], float]  # (model, autocast context) -> val loss, same on every rank
    tokens_per_step: int  # for throughput, MFU and the FLOPs the run is charged
    epochs_seen: Callable[[int], float]  # steps -> passes over the training data
    inputs: dict = field(default_factory=dict)  # manifest inputs: name -> Manifest.add_input keyword arguments
    metrics: dict = field(default_factory=dict)  # manifest metrics known before training
    stage: str = "train"  # the manifest's stage: one of TRAINING_STAGES
    eval_metrics: dict = field(default_factory=dict)  # what `evaluate` measured beside the loss, logged with it
    # (steps, skipped steps) -> tokens read per mix source; None without a mix
    tokens_per_source: Callable[[int, list], dict | None] = lambda steps, skipped: None


def next_token_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return model(x, y)


def resolve_model(cfg: TrainConfig, vocab_size: int, init) -> None:
    """Fix ``cfg.model`` before anything is built: an ``init_from`` model's own config wins; a
    vocab of 0 takes the tokenizer's; a vocab smaller than the tokenizer's is an error."""
    if cfg.model.vocab_size == 0:
        cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    elif cfg.model.vocab_size < vocab_size:
        raise LmforgeError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if init is not None:
        cfg.model = init.cfg


def pretraining(cfg: TrainConfig, info: D.DistInfo, init=None) -> Workload:
    """Next-token prediction on a tokenized data run (``cfg.data``); fixes ``cfg.model`` first."""
    data_man, td = open_tokens(cfg.data)
    train_tokens, val_tokens = td.split("train"), td.split("val")
    resolve_model(cfg, td.vocab_size, init)
    _check_fits(cfg, len(train_tokens), len(val_tokens))
    batches = BatchSource(train_tokens, cfg.model.context, cfg.seed, mix=td.index.get("mix"),
                          sources=td.index["splits"]["train"].get("sources"))
    global_batch = cfg.batch_size * cfg.grad_accum * info.world

    def micro_batch(step: int, rank: int, micro: int) -> tuple:
        return batches.micro_batch(step, rank, micro, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                   world=info.world)

    @torch.no_grad()
    def evaluate(model, ctx) -> float:
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

    inputs = {"data": {"path": cfg.data, "corpus_hash": data_man.get("metrics", {}).get("corpus_hash"),
                       "token_index_hash": td.index_hash}}
    tok = data_man.get("inputs", {}).get("tokenizer")
    if tok:
        inputs["tokenizer"] = {"path": tok["path"], "content_hash": tok["hash"]}
    return Workload(vocab_size=td.vocab_size, micro_batch=micro_batch, loss=next_token_loss, evaluate=evaluate,
                    tokens_per_step=global_batch * cfg.model.context,
                    epochs_seen=lambda steps: batches.epochs_seen(steps, global_batch), inputs=inputs,
                    metrics={"train_tokens_available": len(train_tokens)},
                    tokens_per_source=lambda steps, skipped: batches.tokens_per_source(steps, global_batch, skipped))


def _check_fits(cfg: TrainConfig, n_train: int, n_val: int) -> None:
    need = cfg.batch_size * (cfg.model.context + 1)
    if n_train < need:
        raise LmforgeError(
            f"a batch doesn't fit: batch_size {cfg.batch_size} x (context {cfg.model.context} + 1) = {need} tokens, "
            f"but the train split of {cfg.data} has {n_train}; lower --set train.batch_size or train.model.context"
        )
    if n_val < cfg.model.context + 1:
        raise LmforgeError(
            f"the val split of {cfg.data} has {n_val} tokens, less than one context of {cfg.model.context + 1}; "
            "raise the data stage's --val-fraction or lower train.model.context"
        )

"""Supervised fine-tuning: ``sft(cfg)`` trains a base model on conversations.

The conversations are rendered with the chat template, packed into rows of ``context + 1``
tokens and trained on with the loss on assistant tokens only (:mod:`lmforge.post.chats`).
Packed conversations do not see each other: every row carries document ids, from which the
loss function builds per-document positions (RoPE restarts at each conversation) and a
causal mask that stays inside one conversation. The run is an ordinary training run with
its own workload, so the guard, crash-exact resume, torchrun and the cost ledger all apply;
its manifest's stage is ``sft``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.config import resolve_config
from lmforge.errors import LmforgeError
from lmforge.model.io import load_config, unwrap
from lmforge.post.base import resolve_base
from lmforge.post.chats import ChatSet, Packed, chat_token_ids, pack, read_chats, render
from lmforge.rundir import hash_file
from lmforge.train import distributed as D
from lmforge.train.batches import Order, micro_batch_ids
from lmforge.train.config import TrainConfig
from lmforge.train.guard import GuardConfig
from lmforge.train.trainer import train
from lmforge.train.workload import Workload

SECTION = "sft"


@dataclass
class TuneConfig:
    """The keys every fine-tuning stage shares. Defaults suit fine-tuning, not pretraining: a tenth
    of pretraining's lr, a short warmup, no weight decay, two epochs."""

    epochs: float = 2.0
    max_steps: int = 0  # 0: as many as `epochs` takes
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 8  # rows of context + 1 tokens per rank per micro-step
    grad_accum: int = 1
    val_fraction: float = 0.05  # held out for the val metrics
    skip_bad: bool = False
    seed: int = 1337
    precision: str = "auto"
    eval_every: int = 50
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    device: str = "auto"
    hardware: str = "auto"
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise LmforgeError(f"val_fraction = {self.val_fraction}: must be in [0, 1)")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise LmforgeError("epochs must be positive (or set max_steps)")


@dataclass
class SFTConfig(TuneConfig):
    base: str = ""  # an lmforge model directory or an HF directory
    data: str = ""  # conversations: JSONL, parquet, a saved HF dataset or a hub name
    out: str = "runs/sft"
    packing: bool = True  # False: one conversation per row, padded


def load_sft_config(file=None, sets=None, flags=None) -> SFTConfig:
    return resolve_config(SFTConfig, SECTION, file, sets, flags)


# ----------------------------------------------------------------------------- rows


@dataclass
class Rows:
    """Packed rows as tensors: tokens (n, W) int64, mask (n, W) bool, doc (n, W) int32."""

    tokens: torch.Tensor
    mask: torch.Tensor
    doc: torch.Tensor

    @classmethod
    def of(cls, p: Packed) -> "Rows":
        return cls(torch.tensor(p.tokens, dtype=torch.long), torch.tensor(p.mask, dtype=torch.bool),
                   torch.tensor(p.doc, dtype=torch.int32))

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, doc): inputs, targets (-1 where nothing is learned) and the inputs' document ids."""
        t, m, d = self.tokens[ids], self.mask[ids], self.doc[ids]
        return t[:, :-1], torch.where(m[:, 1:], t[:, 1:], -1), d[:, :-1]


def held_out(n: int, val_fraction: float, seed: int, salt: int) -> tuple[list[int], list[int]]:
    """(train, val) indices, in order: a random ``val_fraction`` seeded by (seed, salt) held out,
    at least one when asked. Raises ValueError when nothing would be left to train on."""
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(n_val)
    held = set(np.random.default_rng([seed, salt]).permutation(n)[:n_val].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def split_conversations(chats: ChatSet, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) conversations: a seeded random ``val_fraction`` held out (at least one when asked)."""
    n = len(chats.conversations)
    try:
        train_i, val_i = held_out(n, val_fraction, seed, salt=7)
    except ValueError as e:
        raise LmforgeError(f"{n} conversations cannot spare {e} for validation; add data or set sft.val_fraction = 0") from None
    return [chats.conversations[i] for i in train_i], [chats.conversations[i] for i in val_i]


def doc_attention(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that restart at each document, and the (B, 1, T, T) mask that is causal and
    keeps attention inside one document, from per-token document ids (B, T)."""
    B, T = doc.shape
    idx = torch.arange(T, device=doc.device).expand(B, T)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return idx - first, (same & causal)[:, None]


def packed_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """Mean cross-entropy over the learned tokens, each conversation seeing only itself."""
    x, y, doc = batch
    positions, mask = doc_attention(doc)
    return model(x, y, positions=positions, attn_mask=mask)


def padded_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """One conversation per row, padding after it: plain causal attention is already exact."""
    x, y, _ = batch
    return model(x, y)


def row_workload(cfg: TrainConfig, info: D.DistInfo, train_rows: Rows, val_rows: Rows, packing: bool,
                 stage: str, inputs: dict, metrics: dict, vocab_size: int, loss=None) -> Workload:
    """A workload over fixed rows: every micro-batch a pure function of (seed, step, rank, micro).
    ``loss`` replaces the cross-entropy for training (distillation's mix); evaluation keeps it."""
    order = Order(len(train_rows), cfg.seed)
    global_batch = cfg.batch_size * cfg.grad_accum * info.world
    val_loss = packed_loss if packing else padded_loss
    loss = loss or val_loss

    def micro_batch(step: int, rank: int, micro: int) -> tuple:
        ids = order(micro_batch_ids(step, rank, micro, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                    world=info.world))
        return train_rows.batch(torch.from_numpy(ids))

    @torch.no_grad()
    def evaluate(model, ctx) -> float:
        """Mean loss per learned token over the val rows, split across ranks."""
        if len(val_rows) == 0:
            return float("nan")
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=info.device)
        mine = torch.arange(info.rank, len(val_rows), info.world)
        for ids in mine.split(cfg.batch_size):
            x, y, doc = (t.to(info.device) for t in val_rows.batch(ids))
            n = (y != -1).sum()
            if n == 0:
                continue
            with ctx:
                value = val_loss(model if cfg.fsdp else unwrap(model), (x, y, doc))
            total[0] += value.double() * n
            total[1] += n
        D.all_reduce_sum(total, info)
        model.train()
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    return Workload(vocab_size=vocab_size, micro_batch=micro_batch, loss=loss, evaluate=evaluate,
                    tokens_per_step=global_batch * cfg.model.context,
                    epochs_seen=lambda steps: steps * global_batch / len(train_rows), inputs=inputs, metrics=metrics,
                    stage=stage)


# ----------------------------------------------------------------------------- the stage


def trainer_config(cfg, model_dir: Path, max_steps: int, data: str) -> TrainConfig:
    """The TrainConfig a post-training stage runs under (its own keys mapped onto the loop's)."""
    return TrainConfig(
        data=data, out=str(cfg.out), model=load_config(model_dir), init_from=str(model_dir),
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_steps=max_steps, lr=cfg.lr,
        min_lr_ratio=cfg.min_lr_ratio, warmup_steps=round(cfg.warmup_frac * max_steps), schedule="cosine",
        weight_decay=cfg.weight_decay, precision=cfg.precision, eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every,
        keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, seed=cfg.seed, device=cfg.device,
        guard=cfg.guard, hardware=cfg.hardware)


def steps_for(cfg, n_rows: int, world: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_rows / (cfg.batch_size * cfg.grad_accum * world)))


def sft(cfg: SFTConfig, resume: bool | str = False, progress: bool = True, stage: str = "sft",
        record: dict | None = None, loss=None) -> dict:
    """Fine-tune ``cfg.base`` on the conversations in ``cfg.data``; returns the run's manifest.
    ``stage``, ``record`` and ``loss`` let a stage built on SFT (distillation) name itself, add to the
    manifest and train with its own loss of (model, (x, y, doc))."""
    if not cfg.base or not cfg.data:
        raise LmforgeError("sft needs --base MODEL and --data CHATS")
    chats = read_chats(cfg.data, cfg.skip_bad)  # first: bad data stops the stage before anything is written
    base = resolve_base(cfg.base, cfg.out)
    tok = base.tokenizer()
    ids = chat_token_ids(tok)
    context = load_config(base.model_dir).context
    train_c, val_c = split_conversations(chats, cfg.val_fraction, cfg.seed)
    encode = [render(c, tok, ids) for c in train_c]
    packed, val_packed = pack(encode, context, ids["pad"] or 0, cfg.packing), \
        pack([render(c, tok, ids) for c in val_c], context, ids["pad"] or 0, cfg.packing)
    if not packed.tokens:
        raise LmforgeError(f"{cfg.data}: no conversation fits the model's context of {context} tokens "
                           f"(dropped: {dict(packed.dropped)})")
    train_rows, val_rows = Rows.of(packed), Rows.of(val_packed)
    kept = int((train_rows.doc > 0).sum())  # tokens of the conversations that made it into rows
    metrics = {"conversations": len(chats.conversations), "train_conversations": len(train_c),
               "val_conversations": len(val_c), "skipped_lines": dict(chats.skipped),
               "dropped": {k: packed.dropped[k] + val_packed.dropped[k] for k in packed.dropped | val_packed.dropped},
               "rows": len(train_rows), "packing": cfg.packing,
               "row_fill": round(kept / train_rows.tokens.numel(), 4), "conversation_tokens": kept,
               "learned_tokens": int(train_rows.mask[:, 1:].sum())}
    inputs = {"data": {"path": cfg.data, "content_hash": _data_hash(cfg.data)}, **base.record()}

    def workload(tcfg, info, init):
        return row_workload(tcfg, info, train_rows, val_rows, cfg.packing, stage, inputs, metrics,
                            tok.get_vocab_size(with_added_tokens=True), loss)

    world = D.world_size()
    tcfg = trainer_config(cfg, base.model_dir, steps_for(cfg, len(train_rows), world), str(cfg.data))
    return train(tcfg, resume=resume, progress=progress, workload=workload,
                 record={"sft": dataclasses.asdict(cfg), **(record or {})})


def _data_hash(data: str) -> str | None:
    p = Path(data)
    return hash_file(p) if p.is_file() else None

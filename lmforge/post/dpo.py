"""Preference tuning: ``dpo(cfg)`` trains a policy to prefer the chosen answer of each pair.

Pairs use TRL's preference format: ``prompt`` / ``chosen`` / ``rejected``, each a string or
a list of messages. A pair's chosen and rejected answers are rendered after the same prompt,
packed into one row as two documents, and scored by the sum of the answer's token
log-probabilities (the answer's content and its ``<|end|>``).

The frozen reference is the starting policy. Its log-probabilities are computed once, before
the first step, and cached in the run directory (``ref_logps.safetensors``, keyed by the
policy's weights, the data and the packing), so a resumed or repeated run reads them back
instead of running the reference again. The losses, with d = (policy - reference) log-ratio
of chosen minus that of rejected:

- ``sigmoid`` (DPO): ``-log sigmoid(beta * d)``;
- ``ipo``: ``(d' - 1 / (2 beta))^2`` with d' the same difference of per-token averages;
- ``sigmoid_norm``: DPO on per-token averages (length-normalised).

These are TRL's definitions (``tests/test_post_dpo.py`` checks them against TRL's own loss).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.config import resolve_config
from lmforge.errors import LmforgeError
from lmforge.model.io import load_config, unwrap
from lmforge.post.base import resolve_base
from lmforge.post.chats import ROLES, chat_token_ids, check_messages, pack_groups, records, render
from lmforge.post.sft import Rows, TuneConfig, held_out, steps_for, trainer_config
from lmforge.rundir import file_mode, hash_file, hash_json, new_temp
from lmforge.train import distributed as D
from lmforge.train.batches import Order, micro_batch_ids
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import autocast_context, pick_precision, train
from lmforge.train.workload import Workload

SECTION = "dpo"
LOSSES = ("sigmoid", "ipo", "sigmoid_norm")
REF_CACHE = "ref_logps.safetensors"


@dataclass
class DPOConfig(TuneConfig):
    policy: str = ""  # the starting policy, also the frozen reference: an lmforge or HF model directory
    data: str = ""  # pairs: JSONL, parquet, a saved HF dataset or a hub name
    out: str = "runs/dpo"
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo | sigmoid_norm
    epochs: float = 1.0
    lr: float = 1e-5  # a thirtieth of SFT's: at 1e-4 the measured run (docs/posttraining.md) overfit its pairs
    warmup_frac: float = 0.1
    val_fraction: float = 0.1  # pairs held out for preference accuracy

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise LmforgeError(f"dpo.loss = {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.beta <= 0:
            raise LmforgeError(f"dpo.beta = {self.beta}: must be positive")
        if self.val_fraction <= 0:
            raise LmforgeError(f"dpo.val_fraction = {self.val_fraction}: must be positive; preference accuracy needs held-out pairs")


def load_dpo_config(file=None, sets=None, flags=None) -> DPOConfig:
    return resolve_config(DPOConfig, SECTION, file, sets, flags)


# ----------------------------------------------------------------------------- pairs


@dataclass
class PairSet:
    pairs: list = field(default_factory=list)  # (prompt messages, chosen text, rejected text)
    skipped: Counter = field(default_factory=Counter)


def _as_prompt(value) -> tuple[list | None, str | None]:
    if isinstance(value, str):
        return ([{"role": "user", "content": value}], None) if value.strip() else (None, "'prompt' is empty")
    if isinstance(value, list) and value:
        bad = next((f"prompt[{i}]" for i, m in enumerate(value) if not isinstance(m, dict)
                    or m.get("role") not in ROLES or not isinstance(m.get("content"), str)), None)
        return (None, f"{bad} must be a message with a known role and string content") if bad else \
            ([{"role": m["role"], "content": m["content"]} for m in value], None)
    return None, "'prompt' must be a string or a list of messages"


def _as_answer(value, key: str) -> tuple[str | None, str | None]:
    if isinstance(value, list):  # TRL's conversational form: the answer as assistant messages
        if not value or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in value):
            return None, f"'{key}' as a list must hold assistant messages"
        value = "".join(str(m.get("content", "")) for m in value)
    if not isinstance(value, str) or not value.strip():
        return None, f"'{key}' is empty or not a string"
    return value, None


def check_pair(row) -> tuple[tuple | None, str | None]:
    """The pair in ``row`` as (prompt messages, chosen, rejected), or why it is unusable."""
    if not isinstance(row, dict):
        return None, "a pair must be an object with 'prompt', 'chosen' and 'rejected'"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        return None, f"missing {', '.join(repr(k) for k in missing)}"
    prompt, why = _as_prompt(row["prompt"])
    chosen, why_c = _as_answer(row["chosen"], "chosen")
    rejected, why_r = _as_answer(row["rejected"], "rejected")
    why = why or why_c or why_r
    if why:
        return None, why
    if chosen == rejected:
        return None, "'chosen' equals 'rejected': the pair teaches nothing"
    if check_messages(prompt + [{"role": "assistant", "content": chosen}]):
        return None, check_messages(prompt + [{"role": "assistant", "content": chosen}])
    return (prompt, chosen, rejected), None


def read_pairs(path, skip_bad: bool = False) -> PairSet:
    """Every preference pair in ``path``; a bad one raises ``FILE:LINE: why`` unless ``skip_bad``."""
    out = PairSet()
    for where, row, error in records(path):
        pair, why = (None, error) if error else check_pair(row)
        if pair is not None:
            out.pairs.append(pair)
        elif skip_bad:
            out.skipped["not_json" if error else "bad_pair"] += 1
        else:
            raise LmforgeError(f"{where}: {why}; fix the line or pass --skip-bad to skip and count such lines")
    if not out.pairs:
        raise LmforgeError(f"{path}: no usable pairs" + (f" ({dict(out.skipped)} skipped)" if out.skipped else ""))
    return out


def encode_pair(pair: tuple, tok, ids: dict) -> list[tuple[list[int], list[bool]]]:
    """The pair as four segments that share one copy of the prompt in a row: the prompt but its last
    token; the prompt's last token; the chosen answer; the prompt's last token again, then the
    rejected answer. :func:`shared_prefix_attention` lets each answer see the prompt and not the
    other answer, so both log-probabilities equal those of ``prompt + answer`` computed alone, for
    P + C + R + 1 positions instead of 2P + C + R. Only the answers and their ``<|end|>`` are learned."""
    prompt, chosen, rejected = pair
    p = render(prompt, tok, ids, add_generation_prompt=True)[0]
    segments = [(p[:-1], [False] * (len(p) - 1)), (p[-1:], [False])]
    for answer in (chosen, rejected):
        tokens, mask = render(prompt + [{"role": "assistant", "content": answer}], tok, ids)
        segments.append((tokens[len(p):], mask[len(p):]))
    body, mask = segments[3]
    segments[3] = (p[-1:] + body, [False] + mask)  # the repeated last prompt token predicts the first rejected one
    return segments


def pair_has_target(segments) -> bool:
    return any(segments[2][1]) and any(segments[3][1][1:])


# Which segment may attend to which (rows: query; columns: key), by a token's kind: 0 the prompt but
# its last token, 1 the prompt's last token, 2 chosen, 3 the repeated last token then rejected, 4 padding.
# The rejected branch skips kind 1: its own copy of that token stands in, at the same position.
SEES = torch.tensor([[1, 1, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [1, 1, 1, 0, 0],
                     [1, 0, 0, 1, 0],
                     [0, 0, 0, 0, 1]], dtype=torch.bool)


def shared_prefix_attention(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and the (B, 1, T, T) causal mask for rows of shared-prefix pairs: pair i's
    segments are documents 4i+1 .. 4i+4 (see :func:`encode_pair`), 0 is padding. A token's
    position is the number of tokens it attends to before itself, so each answer continues from
    the end of the prompt."""
    d = doc.long()
    pair = torch.where(d > 0, (d - 1) // 4, -1)
    kind = torch.where(d > 0, (d - 1) % 4, 4)
    T = d.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=d.device).tril()
    see = SEES.to(d.device)[kind[:, :, None], kind[:, None, :]] & (pair[:, :, None] == pair[:, None, :]) & causal
    return see.sum(-1) - 1, see[:, None]


# ----------------------------------------------------------------------------- the loss


def sequence_logps(model, x, y, doc, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, lengths) of shape (B, n_pairs, 2): each answer's summed token log-probability and
    its number of learned tokens. The first chosen token is predicted from the prompt's last
    token (document 4i+2), the rest from the chosen document (4i+3); the rejected answer from 4i+4."""
    positions, mask = shared_prefix_attention(doc)
    logits = model(x, positions=positions, attn_mask=mask)
    learned = y != -1
    tok_logp = -F.cross_entropy(logits.float().flatten(0, 1), y.clamp(min=0).flatten(), reduction="none").view_as(y)
    tok_logp = tok_logp * learned
    B, width = doc.shape[0], 4 * n_pairs + 1
    sums = torch.zeros(B, width, device=x.device).scatter_add_(1, doc.long(), tok_logp)
    lens = torch.zeros(B, width, device=x.device).scatter_add_(1, doc.long(), learned.float())

    def answers(t):
        return torch.stack([t[:, 2::4] + t[:, 3::4], t[:, 4::4]], dim=-1)

    return answers(sums), answers(lens)


def dpo_losses(logps: torch.Tensor, ref: torch.Tensor, lens: torch.Tensor, beta: float, loss: str) -> torch.Tensor:
    """Per-pair losses from (..., 2) chosen/rejected log-probabilities of policy and reference."""
    ratios = logps - ref
    if loss == "sigmoid":
        return -F.logsigmoid(beta * (ratios[..., 0] - ratios[..., 1]))
    avg = ratios / lens.clamp(min=1)
    delta = avg[..., 0] - avg[..., 1]
    if loss == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * delta)


# ----------------------------------------------------------------------------- the reference


@torch.no_grad()
def reference_logps(model, rows: Rows, n_pairs: int, batch_size: int, ctx, info: D.DistInfo) -> torch.Tensor:
    """(n_rows, n_pairs, 2) log-probabilities under ``model``, each rank scoring its share."""
    model.eval()
    out = torch.zeros(len(rows), n_pairs, 2, dtype=torch.float64, device=info.device)
    for ids in torch.arange(info.rank, len(rows), info.world).split(batch_size):
        x, y, doc = (t.to(info.device) for t in rows.batch(ids))
        with ctx:
            out[ids.to(info.device)] = sequence_logps(model, x, y, doc, n_pairs)[0].double()
    D.all_reduce_sum(out, info)
    return out.float().cpu()


def cached_reference(path: Path, key: str, compute, info: D.DistInfo) -> tuple[dict, bool]:
    """The reference log-probabilities from ``path`` when its key matches, else computed and saved
    (atomically, by rank 0). Returns (tensors, whether the cache was used)."""
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return {k: f.get_tensor(k) for k in f.keys()}, True
        except Exception:  # an unreadable cache is recomputed, never trusted
            pass
    tensors = compute()
    if info.is_main:
        tmp = new_temp(path)
        save_file(tensors, str(tmp), metadata={"key": key})
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    return tensors, False


# ----------------------------------------------------------------------------- the stage


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    try:
        return held_out(n, val_fraction, seed, salt=11)
    except ValueError as e:
        raise LmforgeError(f"{n} pairs cannot spare {e} for held-out preference accuracy; add pairs") from None


def _pair_table(rows: Rows) -> tuple[torch.Tensor, int]:
    """(n_rows, n_pairs) validity of each pair slot, and the most pairs in a row."""
    n_docs = rows.doc.max(dim=1).values
    n_pairs = max(1, int(n_docs.max()) // 4)
    valid = torch.arange(n_pairs)[None, :] < (n_docs // 4)[:, None]
    return valid, n_pairs


def dpo(cfg: DPOConfig, resume: bool | str = False, progress: bool = True) -> dict:
    """Preference-tune ``cfg.policy`` on the pairs in ``cfg.data``; returns the run's manifest."""
    if not cfg.policy or not cfg.data:
        raise LmforgeError("dpo needs --policy MODEL and --data PAIRS")
    pairs = read_pairs(cfg.data, cfg.skip_bad)
    base = resolve_base(cfg.policy, cfg.out, flag="--policy")
    tok = base.tokenizer()
    ids = chat_token_ids(tok)
    context = load_config(base.model_dir).context
    train_i, val_i = _split(len(pairs.pairs), cfg.val_fraction, cfg.seed)
    pad = ids["pad"] or 0
    packed = pack_groups([encode_pair(pairs.pairs[i], tok, ids) for i in train_i], context, pad,
                         has_target=pair_has_target)
    val_packed = pack_groups([encode_pair(pairs.pairs[i], tok, ids) for i in val_i], context, pad,
                             has_target=pair_has_target)
    if not packed.tokens or not val_packed.tokens:
        raise LmforgeError(f"{cfg.data}: no pair fits the model's context of {context} tokens in the "
                           f"{'train' if not packed.tokens else 'held-out'} split (dropped: {dict(packed.dropped)})")
    train_rows, val_rows = Rows.of(packed), Rows.of(val_packed)
    train_valid, n_pairs = _pair_table(train_rows)
    val_valid, n_val_pairs = _pair_table(val_rows)
    n_pairs = max(n_pairs, n_val_pairs)
    train_valid = F.pad(train_valid, (0, n_pairs - train_valid.shape[1]))
    val_valid = F.pad(val_valid, (0, n_pairs - val_valid.shape[1]))
    digest = hashlib.sha256()
    for t in (train_rows.tokens, train_rows.mask, train_rows.doc, val_rows.tokens, val_rows.mask, val_rows.doc):
        digest.update(t.numpy().tobytes())
    key = hash_json({"policy": base.weights_hash, "rows": digest.hexdigest(), "precision": cfg.precision})
    metrics = {"pairs": len(pairs.pairs), "train_pairs": int(train_valid.sum()), "val_pairs": int(val_valid.sum()),
               "skipped_lines": dict(pairs.skipped),
               "dropped": dict(packed.dropped + val_packed.dropped), "rows": len(train_rows),
               "row_fill": round(int((train_rows.doc > 0).sum()) / train_rows.tokens.numel(), 4),
               "beta": cfg.beta, "loss": cfg.loss}
    inputs = {"data": {"path": cfg.data, "content_hash": hash_file(cfg.data) if Path(cfg.data).is_file() else None},
              **base.record()}

    def workload(tcfg: TrainConfig, info: D.DistInfo, init) -> Workload:
        ctx = autocast_context(info.device, pick_precision(tcfg, info.device))
        Path(tcfg.out).mkdir(parents=True, exist_ok=True)

        def compute() -> dict:
            ref_model = init.to(info.device)
            return {"train": reference_logps(ref_model, train_rows, n_pairs, tcfg.batch_size, ctx, info).contiguous(),
                    "val": reference_logps(ref_model, val_rows, n_pairs, tcfg.batch_size, ctx, info).contiguous()}

        ref, hit = cached_reference(Path(tcfg.out) / REF_CACHE, key, compute, info)
        metrics["ref_cache"] = "hit" if hit else "computed"
        metrics["ref_forward_rows"] = 0 if hit else len(train_rows) + len(val_rows)
        return preference_workload(tcfg, info, cfg, train_rows, val_rows, ref, (train_valid, val_valid), n_pairs,
                                   inputs, metrics, tok.get_vocab_size(with_added_tokens=True))

    world = D.world_size()
    tcfg = trainer_config(cfg, base.model_dir, steps_for(cfg, len(train_rows), world), str(cfg.data))
    return train(tcfg, resume=resume, progress=progress, workload=workload, record={"dpo": dataclasses.asdict(cfg)})


def preference_workload(tcfg: TrainConfig, info: D.DistInfo, cfg: DPOConfig, train_rows: Rows, val_rows: Rows,
                        ref: dict, valid: tuple, n_pairs: int, inputs: dict, metrics: dict, vocab_size: int) -> Workload:
    order = Order(len(train_rows), tcfg.seed)
    global_batch = tcfg.batch_size * tcfg.grad_accum * info.world
    train_valid, val_valid = valid

    def micro_batch(step: int, rank: int, micro: int) -> tuple:
        ids = torch.from_numpy(order(micro_batch_ids(step, rank, micro, batch_size=tcfg.batch_size,
                                                     grad_accum=tcfg.grad_accum, world=info.world)))
        return (*train_rows.batch(ids), ref["train"][ids], train_valid[ids])

    def loss(model, batch) -> torch.Tensor:
        x, y, doc, ref_logps, ok = batch
        logps, lens = sequence_logps(model, x, y, doc, n_pairs)
        return dpo_losses(logps, ref_logps, lens, cfg.beta, cfg.loss)[ok].mean()

    last = {}

    @torch.no_grad()
    def evaluate(model, ctx) -> float:
        """Held-out loss; also preference accuracy and reward margin, logged beside it."""
        model.eval()
        core = model if tcfg.fsdp else unwrap(model)
        total = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, correct, margin, pairs
        for ids in torch.arange(info.rank, len(val_rows), info.world).split(tcfg.batch_size):
            x, y, doc = (t.to(info.device) for t in val_rows.batch(ids))
            with ctx:
                logps, lens = sequence_logps(core, x, y, doc, n_pairs)
            ok = val_valid[ids].to(info.device)
            r = ref["val"][ids].to(info.device)
            rewards = cfg.beta * (logps.float() - r)
            margin = (rewards[..., 0] - rewards[..., 1])[ok]
            total += torch.stack([dpo_losses(logps.float(), r, lens, cfg.beta, cfg.loss)[ok].sum(),
                                  (margin > 0).sum(), margin.sum(), ok.sum()]).double()
        D.all_reduce_sum(total, info)
        model.train()
        n = max(1.0, float(total[3]))
        last.update(pref_accuracy=round(float(total[1]) / n, 4), reward_margin=round(float(total[2]) / n, 5))
        return float(total[0]) / n

    return Workload(vocab_size=vocab_size, micro_batch=micro_batch, loss=loss, evaluate=evaluate,
                    tokens_per_step=global_batch * tcfg.model.context,
                    epochs_seen=lambda steps: steps * global_batch / len(train_rows), inputs=inputs, metrics=metrics,
                    stage="dpo", eval_metrics=last)

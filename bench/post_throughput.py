"""SFT and DPO training throughput against pretraining, on the same model, side by side.

    python bench/post_throughput.py                  # defaults: depth 4, context 256, batch 8, 5 rounds x 3 steps
    python bench/post_throughput.py --depth 6 --rounds 7

Each variant runs the training step of lmforge/train/trainer.py (forward under autocast, bf16
where the CPU supports it, backward, clip_grad_norm_, AdamW) on rows of context tokens:

  pretrain     next-token loss, causal attention (lmforge train)
  sft-packed   conversations packed into rows, attention and positions per conversation, loss
               on assistant tokens only (lmforge sft, the default)
  sft-padded   one conversation per row, padded (lmforge sft --no-packing)
  dpo          pairs packed into rows with one copy of the prompt (tree attention: each answer sees
               the prompt, not the other answer), each answer's summed log-probability (lmforge dpo)
  dpo-twice    the same pairs as prompt+chosen and prompt+rejected, two documents (the layout lmforge
               dpo used before sharing the prompt), for comparison

Conversation lengths are drawn uniformly from 24..200 tokens (seeded), half of each a prompt;
a pair is a prompt of 12..100 tokens with two answers of 12..100 each. Both are packed with
lmforge.post.chats, so row fill is what the packer achieves. Variants
alternate round-robin (the start rotates each round) so background load hits all alike;
the table reports medians. "slots/s" counts every position of a row (what the model computes);
"tokens/s" counts only conversation tokens (pads excluded): for DPO, chosen and rejected both,
each with its prompt (2P + C + R per pair, however many positions the layout computes).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.cost.hw import bf16_supported_on_cpu  # noqa: E402
from lmforge.model import ModelConfig, build_model  # noqa: E402
from lmforge.post.chats import pack, pack_groups  # noqa: E402
from lmforge.post.dpo import dpo_losses, sequence_logps  # noqa: E402
from lmforge.post.sft import Rows, doc_attention, packed_loss, padded_loss  # noqa: E402
from lmforge.train.workload import next_token_loss  # noqa: E402

VOCAB = 4096


def conversations(n: int, rng: random.Random) -> list[tuple[list[int], list[bool]]]:
    out = []
    for _ in range(n):
        length = rng.randint(24, 200)
        prompt = length // 2
        out.append(([rng.randrange(7, VOCAB) for _ in range(length)], [False] * prompt + [True] * (length - prompt)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    T, B = args.context, args.batch
    bf16 = bf16_supported_on_cpu()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    convs = conversations(40 * B, rng)
    packed = Rows.of(pack(convs, T, 2))
    padded = Rows.of(pack(convs, T, 2, packing=False))
    twice, shared = [], []
    for _ in range(20 * B):  # a prompt, then a chosen and a rejected answer of independent lengths
        prompt = [rng.randrange(7, VOCAB) for _ in range(rng.randint(12, 100))]
        answers = [[rng.randrange(7, VOCAB) for _ in range(rng.randint(12, 100))] for _ in range(2)]
        twice.append([(prompt + a, [False] * len(prompt) + [True] * len(a)) for a in answers])
        shared.append([(prompt[:-1], [False] * (len(prompt) - 1)), (prompt[-1:], [False]),
                       (answers[0], [True] * len(answers[0])), (prompt[-1:] + answers[1], [False] + [True] * len(answers[1]))])
    pairs = Rows.of(pack_groups(shared, T, 2, has_target=lambda g: True))
    pairs_twice = Rows.of(pack_groups(twice, T, 2))
    n_pairs, n_twice = int(pairs.doc.max()) // 4, int(pairs_twice.doc.max()) // 2
    flat = torch.randint(7, VOCAB, (B, T + 1))

    def batch(rows: Rows, i: int):
        return rows.batch(torch.arange(i * B, (i + 1) * B) % len(rows))

    def dpo_loss(model, b):
        x, y, doc = b
        logps, lens = sequence_logps(model, x, y, doc, n_pairs)
        ok = lens[..., 0] > 0
        return dpo_losses(logps, torch.zeros_like(logps), lens, 0.1, "sigmoid")[ok].mean()

    def dpo_twice_loss(model, b):
        x, y, doc = b
        positions, mask = doc_attention(doc)
        logits = model(x, positions=positions, attn_mask=mask)
        learned = y != -1
        lp = -F.cross_entropy(logits.float().flatten(0, 1), y.clamp(min=0).flatten(), reduction="none").view_as(y)
        sums = torch.zeros(B, 2 * n_twice + 1).scatter_add_(1, doc.long(), lp * learned)[:, 1:].view(B, n_twice, 2)
        lens = torch.zeros(B, 2 * n_twice + 1).scatter_add_(1, doc.long(), learned.float())[:, 1:].view(B, n_twice, 2)
        ok = lens[..., 0] > 0
        return dpo_losses(sums, torch.zeros_like(sums), lens, 0.1, "sigmoid")[ok].mean()

    variants = {
        "pretrain": (lambda i: (flat[:, :-1], flat[:, 1:]), next_token_loss, None),
        "sft-packed": (lambda i: batch(packed, i), packed_loss, packed),
        "sft-padded": (lambda i: batch(padded, i), padded_loss, padded),
        "dpo": (lambda i: batch(pairs, i), dpo_loss, pairs),
        "dpo-twice": (lambda i: batch(pairs_twice, i), dpo_twice_loss, pairs_twice),
    }
    cfg = ModelConfig(depth=args.depth, vocab_size=VOCAB, context=T)
    models, opts = {}, {}
    for name in variants:
        torch.manual_seed(0)
        models[name] = build_model(cfg)
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    times: dict[str, list[float]] = {n: [] for n in variants}
    # Counted tokens per position: a shared-prefix pair computes P + C + R + 1 positions and counts
    # 2P + C + R tokens, i.e. its positions plus its P - 1 prompt tokens (document kind 0).
    fill = {n: (float((r.doc[:, :-1] > 0).float().mean()) if r is not None else 1.0) for n, (_, _, r) in variants.items()}
    fill["dpo"] += float(((pairs.doc[:, :-1] > 0) & ((pairs.doc[:, :-1] - 1) % 4 == 0)).float().mean())
    names = list(variants)

    def step(name: str, i: int) -> None:
        make, loss_fn, _ = variants[name]
        b = make(i)
        with amp:
            loss = loss_fn(models[name], b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in names:  # warm up every path once
        step(name, 0)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for i in range(args.steps_per_round):
                step(name, r * args.steps_per_round + i)
            times[name].append((time.perf_counter() - t0) / args.steps_per_round)

    print(f"cpu bf16: {'yes (autocast bf16)' if bf16 else 'no (fp32)'}  threads {torch.get_num_threads()}  "
          f"model depth {args.depth} (d_model {cfg.d_model})  context {T}  batch {B}  vocab {VOCAB}")
    base = B * T / statistics.median(times["pretrain"])
    print(f"{'variant':<12} {'s/step':>8} {'slots/s':>9} {'vs pretrain':>12} {'tokens/slot':>12} {'tokens/s':>9} "
          f"{'vs pretrain':>12}")
    for name in names:
        s = statistics.median(times[name])
        slots = B * T / s
        print(f"{name:<12} {s:8.3f} {slots:9,.0f} {slots / base:12.3f} {fill[name]:12.3f} {slots * fill[name]:9,.0f} "
              f"{slots * fill[name] / base:12.3f}")


if __name__ == "__main__":
    main()

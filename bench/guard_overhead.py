"""What the training guard costs a healthy run: tokens/s with the guard on against off.

    python bench/guard_overhead.py                       # a 3 MB stdlib corpus, depth 3, 6 rounds x 60 steps
    python bench/guard_overhead.py --data runs/default/data --depth 4 --rounds 4 --steps 100

Both variants train the same config from scratch with lmforge.train.trainer.train and write
the same checkpoints (every --ckpt-every steps); the guard adds its per-step spike check and
the step-0 checkpoint that guarantees a rollback target. Runs alternate on/off (the order
flips each round) so background load hits both alike; the table reports medians over rounds
of the steady tokens/s (the loop's own train time) and of the whole call's wall time
(setup, step-0 checkpoint and final eval included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.model.model import ModelConfig  # noqa: E402
from lmforge.train.guard import GuardConfig  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.trainer import train  # noqa: E402


def small_corpus_data(work: Path) -> Path:
    """Tokenized data from ~3 MB of stdlib modules (vocab 2048)."""
    from lmforge.data.corpus import write_stdlib_sample
    from lmforge.data.prepare import DataConfig
    from lmforge.tokenizer.encode import build_token_data

    corpus = write_stdlib_sample(work / "corpus", 3_000_000)
    build_token_data([str(corpus)], work / "data", work / "tok", DataConfig(val_fraction=0.05), vocab_size=2048,
                     progress=False)
    return work / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="", help="a tokenized data run directory (default: build a small one)")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--ckpt-every", type=int, default=20)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else small_corpus_data(work)
        results: dict[str, dict[str, list[float]]] = {"guard on": {"tps": [], "wall": []}, "guard off": {"tps": [], "wall": []}}
        for rnd in range(args.rounds):
            order = ["guard on", "guard off"] if rnd % 2 == 0 else ["guard off", "guard on"]
            for name in order:
                cfg = TrainConfig(data=str(data), out=str(work / f"r{rnd}-{name.replace(' ', '-')}"),
                                  model=ModelConfig(depth=args.depth, vocab_size=0, context=args.context),
                                  batch_size=args.batch, max_steps=args.steps, warmup_steps=10, eval_every=0,
                                  eval_batches=2, ckpt_every=args.ckpt_every, log_every=10, seed=0,
                                  guard=GuardConfig(enabled=name == "guard on"))
                t = time.perf_counter()
                man = train(cfg, progress=False)
                results[name]["wall"].append(time.perf_counter() - t)
                results[name]["tps"].append(man["metrics"]["tokens_per_s"])
            print(f"round {rnd + 1}/{args.rounds}: " + "  ".join(
                f"{n} {results[n]['tps'][-1]:,.0f} tok/s" for n in results), flush=True)

    print()
    print(f"depth {args.depth}, batch {args.batch} x {args.context}, {args.steps} steps per run, checkpoint every "
          f"{args.ckpt_every}, {args.rounds} rounds")
    print(f"{'variant':<10} {'tokens/s':>9} {'range':>15} {'wall s':>7}")
    med = {}
    for n, r in results.items():
        med[n] = (statistics.median(r["tps"]), statistics.median(r["wall"]))
        spread = f"{min(r['tps']):,.0f}-{max(r['tps']):,.0f}"
        print(f"{n:<10} {med[n][0]:>9,.0f} {spread:>15} {med[n][1]:>7.2f}")
    on, off = med["guard on"], med["guard off"]
    print(f"\nguard on / off: tokens/s {on[0] / off[0]:.3f}x, whole-call wall time {on[1] / off[1]:.3f}x")


if __name__ == "__main__":
    main()

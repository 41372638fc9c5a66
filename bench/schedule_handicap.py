"""How much does a ladder rung's schedule handicap it against a long target run?

A rung of a few hundred steps under the ladder's warmup rule spends up to half its steps
warming up; a target of thousands of steps spends 5%. This trains the same rungs under
several schedules and prints their final val losses side by side, so the rule that treats
rungs and targets alike is chosen from measurement (docs/scaling.md, "Schedules").

    python bench/schedule_handicap.py --data runs/scaling2/data           # builds the data if missing
    python bench/schedule_handicap.py --data runs/scaling2/data --rungs d2-1M,d3-2M --out runs/handicap
    python bench/schedule_handicap.py --data runs/scaling2/data --rungs d3-0.82M --aspect 32 --batch-ref 8 \
        --out runs/handicap-a32        # the experiment's model family

Variants (all cosine to 10% unless named wsd):
  floor200   the ladder's rule: warmup max(200 steps, 5%), at most half the run
  frac5      the target's shape: warmup 5% of the steps, no floor
  frac10     warmup 10% of the steps
  wsd        warmup as floor200, hold, then linear decay over the last 20%
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lmforge.data.shards import INDEX, open_tokens
from lmforge.model.model import ModelConfig, param_counts
from lmforge.rundir import is_complete, read_manifest
from lmforge.scaling.ladder import LadderConfig, rung_hparams, rung_warmup
from lmforge.tokenizer.encode import build_token_data
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import train

VARIANTS = {
    "floor200": lambda steps, lc: ("cosine", rung_warmup(steps, lc)),
    "frac5": lambda steps, lc: ("cosine", max(1, round(0.05 * steps))),
    "frac10": lambda steps, lc: ("cosine", max(1, round(0.10 * steps))),
    "wsd": lambda steps, lc: ("wsd", rung_warmup(steps, lc)),
}


def rung_config(name: str, variant: str, data: Path, out: Path, lc: LadderConfig, vocab: int) -> TrainConfig:
    depth, tokens = int(name.split("-")[0][1:]), float(name.split("-")[1].rstrip("M")) * 1e6
    model = ModelConfig(depth=depth, aspect=lc.aspect, vocab_size=vocab, context=lc.context)
    hp = rung_hparams(model, lc)
    steps = max(10, round(tokens / (hp["batch_size"] * lc.context)))
    schedule, warmup = VARIANTS[variant](steps, lc)
    return TrainConfig(data=str(data), out=str(out), model=model, batch_size=hp["batch_size"], max_steps=steps,
                       lr=hp["lr"], warmup_steps=warmup, schedule=schedule, eval_every=0,
                       eval_batches=lc.eval_windows // hp["batch_size"], ckpt_every=max(50, steps // 5),
                       log_every=max(1, steps // 20), seed=lc.seed, precision="fp32", hardware="cpu")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("runs/scaling2/data"))
    ap.add_argument("--source", default="default:stdlib+site")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rungs", default="d2-1M,d3-2M")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("runs/handicap"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--aspect", type=int, default=64, help="model width per layer")
    ap.add_argument("--batch-ref", type=int, default=16, help="the batch size rule's sequences at 1M parameters")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not ((a.data / "tokens" / INDEX).exists() and is_complete(a.data)):
        build_token_data([a.source], a.data, a.data.parent / "tokenizer", vocab_size=a.vocab, say=print)
    _, td = open_tokens(a.data)
    lc = LadderConfig(depths=[2], tokens=[1e6], precision="fp32", aspect=a.aspect, batch_ref=a.batch_ref)
    for name in a.rungs.split(","):
        for variant in a.variants.split(","):
            cfg = rung_config(name, variant, a.data, a.out / f"{name}-{variant}", lc, td.vocab_size)
            if not is_complete(cfg.out, "train"):
                print(f"{name} {variant}: {cfg.max_steps} steps, warmup {cfg.warmup_steps}, {cfg.schedule}", flush=True)
                train(cfg, resume="auto", progress=False)
    results = []  # every finished run under --out, so separate invocations add up to one table
    for name, variant in sorted(tuple(p.parent.name.rsplit("-", 1)) for p in a.out.glob("*/manifest.json")
                                if p.parent.name.rsplit("-", 1)[1] in VARIANTS):
        cfg = rung_config(name, variant, a.data, a.out / f"{name}-{variant}", lc, td.vocab_size)
        if is_complete(cfg.out, "train"):
            m = read_manifest(cfg.out)["metrics"]
            results.append({"rung": name, "variant": variant, "steps": cfg.max_steps, "warmup": cfg.warmup_steps,
                            "schedule": cfg.schedule, "N": param_counts(cfg.model)["non_embedding"],
                            "D": m["tokens"], "val_loss": m["final_val_loss"], "train_time_s": m["train_time_s"]})
    print(f"\n{'rung':8} {'variant':9} {'steps':>6} {'warmup':>6} {'val loss':>9} {'vs floor200':>11}")
    for r in results:
        base = next(x["val_loss"] for x in results if x["rung"] == r["rung"] and x["variant"] == "floor200") \
            if any(x["variant"] == "floor200" and x["rung"] == r["rung"] for x in results) else r["val_loss"]
        print(f"{r['rung']:8} {r['variant']:9} {r['steps']:6d} {r['warmup']:6d} {r['val_loss']:9.4f} "
              f"{(r['val_loss'] - base) / base:+10.2%}")
    (a.out / "handicap.json").write_text(json.dumps({"cpu": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                     "aspect": a.aspect, "batch_ref": a.batch_ref,
                                                     "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

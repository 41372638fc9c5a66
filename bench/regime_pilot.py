"""Where does a small model's loss curve reach its power-law tail?

A ladder can only forecast a target if its rungs sit on the same smooth stretch of the loss
curve as the target. Small models on code first sit on a plateau and then drop steeply (the
rungs of the recorded experiment stopped before the drop, the targets went through it;
docs/scaling.md). This trains one model per depth at constant learning rate after warmup, with
the ladder's size rules, evaluates it often on the ladder's fixed val windows, and prints the val
curve with its local log-log slope, so the onset of the tail can be read off
(:func:`lmforge.scaling.regime.tail_onset`).

    --data is a tokenized data run (`lmforge data ... --tokenizer DIR`, or an experiment's OUT/data).

    python bench/regime_pilot.py --data runs/scaling/data --depths 2 --tokens 16e6
    # two pilots side by side, a core each:
    OMP_NUM_THREADS=1 python bench/regime_pilot.py --data runs/scaling/data --depths 3 --tokens 10e6 &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lmforge.cost.hw import cpu_name
from lmforge.data.shards import open_tokens
from lmforge.model.model import param_counts
from lmforge.rundir import is_complete, read_manifest
from lmforge.scaling.design import run_spec
from lmforge.scaling.experiment import constant_lr_config, pilot_onset
from lmforge.scaling.ladder import LadderConfig
from lmforge.train.trainer import train


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--depths", default="2")
    ap.add_argument("--tokens", type=float, default=12e6, help="train tokens per pilot")
    ap.add_argument("--evals", type=int, default=48, help="val evaluations over the run")
    ap.add_argument("--aspect", type=int, default=32)
    ap.add_argument("--batch-ref", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/pilot"))
    a = ap.parse_args()
    _, td = open_tokens(a.data)
    lc = LadderConfig(depths=[2], tokens=[1e6], precision="fp32", aspect=a.aspect, batch_ref=a.batch_ref)
    rows = []
    for depth in (int(d) for d in a.depths.split(",")):
        spec = run_spec(f"d{depth}-{a.tokens / 1e6:g}M", depth, a.tokens, lc, td.vocab_size)
        cfg = constant_lr_config(spec, lc, a.data, a.out / spec["name"], td.vocab_size, a.evals, lc.eval_windows)
        if not is_complete(cfg.out, "train"):
            print(f"depth {depth}: {cfg.max_steps} steps of {cfg.batch_size} x {cfg.model.context} tokens, "
                  f"lr {cfg.lr:g} constant after {cfg.warmup_steps} warmup steps", flush=True)
            train(cfg, resume="auto", progress=False)
        man = read_manifest(cfg.out)
        curve, onset = pilot_onset(cfg)
        print(f"\ndepth {depth} (N={param_counts(cfg.model)['non_embedding']:,}), "
              f"{man['metrics']['train_time_s']:.0f} s:")
        print(f"{'tokens':>10} {'val loss':>9} {'slope':>7}")
        for (tok, v), g in zip(onset["anchors"], [None] + onset["slopes"]):
            print(f"{tok / 1e6:9.2f}M {v:9.4f} {'' if g is None else f'{g:7.3f}'}")
        at = f"{onset['onset_tokens']:.3g} tokens" if onset["onset_tokens"] else "not reached"
        print(f"tail onset: {at} ({onset['reason']})")
        rows.append({"depth": depth, "N": param_counts(cfg.model)["non_embedding"], "batch_size": cfg.batch_size,
                     "lr": cfg.lr, "curve": curve, "onset": {k: onset[k] for k in ("onset_tokens", "reason", "slopes")},
                     "train_time_s": man["metrics"]["train_time_s"]})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"pilot-d{a.depths.replace(',', '')}.json").write_text(json.dumps(
        {"cpu": cpu_name(), "cores": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "vocab": td.vocab_size,
         "aspect": a.aspect, "batch_ref": a.batch_ref, "pilots": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

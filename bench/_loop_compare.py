"""The whole training loop of this tree against another git ref, side by side.

Each round trains the same small config once with each tree (``python -m lmforge train`` with
that tree first on ``PYTHONPATH``), alternating which goes first, and reads the loop's own
tokens/s from the run manifest (setup excluded) and the wall time of the whole call.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _data(work: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from lmforge.data.corpus import write_stdlib_sample
    from lmforge.data.prepare import DataConfig
    from lmforge.tokenizer.encode import build_token_data

    corpus = write_stdlib_sample(work / "corpus", 3_000_000)
    build_token_data([str(corpus)], work / "data", work / "tok", DataConfig(val_fraction=0.05), vocab_size=2048,
                     progress=False)
    return work / "data"


def compare_loops(ref: str, rounds: int = 4, steps: int = 60, depth: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), ref], check=True)
        try:
            data = _data(work)
            trees = {"this tree": REPO, ref: base}
            res = {name: {"tps": [], "wall": []} for name in trees}
            for rnd in range(rounds):
                order = list(trees) if rnd % 2 == 0 else list(trees)[::-1]
                for name in order:
                    out = work / f"r{rnd}-{list(trees).index(name)}"
                    env = {**os.environ, "PYTHONPATH": str(trees[name])}
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "lmforge", "train", "--data", str(data), "-o", str(out),
                                    "--depth", str(depth), "--steps", str(steps), "-q"], env=env, check=True,
                                   cwd=str(trees[name]))
                    res[name]["wall"].append(time.perf_counter() - t)
                    res[name]["tps"].append(json.loads((out / "manifest.json").read_text())["metrics"]["tokens_per_s"])
                print(f"loop round {rnd + 1}/{rounds}: " + "  ".join(f"{n} {r['tps'][-1]:,.0f} tok/s" for n, r in res.items()),
                      flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    print(f"\nwhole training loop: depth {depth}, batch 16 x 256, {steps} steps per run, {rounds} rounds")
    print(f"{'tree':<12} {'tokens/s':>9} {'range':>15} {'wall s':>7}")
    med = {}
    for n, r in res.items():
        med[n] = (statistics.median(r["tps"]), statistics.median(r["wall"]))
        print(f"{n:<12} {med[n][0]:>9,.0f} {min(r['tps']):>7,.0f}-{max(r['tps']):<7,.0f} {med[n][1]:>7.2f}")
    mine, theirs = med["this tree"], med[ref]
    print(f"this tree / {ref}: tokens/s {mine[0] / theirs[0]:.3f}x, whole-call wall time {mine[1] / theirs[1]:.3f}x")
    return {"ref": ref, "rounds": rounds, "steps": steps, "depth": depth, "results": res,
            "ratio_tokens_per_s": mine[0] / theirs[0], "ratio_wall": mine[1] / theirs[1]}

"""Training throughput on CPU: lmforge's GPT against a plain nanoGPT-style PyTorch GPT.

    python bench/train_throughput.py                    # defaults: 7 rounds x 3 steps, compiled variant included
    python bench/train_throughput.py --no-compile --rounds 5 --threads 2
    python bench/train_throughput.py --against d5213aa   # the whole training loop, this tree vs a git ref

All models have the same shape (6 layers, d_model 384, 6 heads, context 256, batch 16,
vocab 8192 = lmforge's default tokenizer size; about 10.6M non-embedding parameters)
and train with the same step as lmforge/train/trainer.py: forward under autocast (bf16 where
the CPU supports it), backward, clip_grad_norm_, fused AdamW, zero_grad(set_to_none).

  ours        lmforge GPT, bf16 autocast, eager
  ours+compile  the same under torch.compile (with --compile)
  plain-fp32  bench/_plain_gpt.py in fp32
  plain-bf16  bench/_plain_gpt.py under bf16 autocast

Models alternate round-robin (the start rotates each round), so background load hits all
of them alike; each round times --steps-per-round steps of each and the table reports
medians over rounds. The CPU time other processes used during the timed steps is
reported, since a busy machine slows everything and widens the spread.

MFU uses lmforge.model.flops_per_token for ours and the same 6N + 12*L*T*d accounting
for the plain model, against the matmul peaks lmforge.cost.hw.measure_cpu() measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _plain_gpt import PlainGPT  # noqa: E402

from lmforge.cost.hw import bf16_supported_on_cpu, measure_cpu  # noqa: E402
from lmforge.model import ModelConfig, build_model, flops_per_token, param_counts  # noqa: E402

VOCAB, CONTEXT, BATCH, DEPTH = 8192, 256, 16, 6  # depth 6: 6 layers, d_model 384, 6 heads


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    By default glibc serves blocks over 32 MB with fresh mmap()s and unmaps them on free,
    so every large activation of every step is page-faulted in again (about 290k faults a
    step here). Raising the mmap and trim thresholds lets the heap reuse that memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def other_cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system


class Runner:
    def __init__(self, name: str, model: torch.nn.Module, amp: bool, compile: bool, fpt: int):
        self.name, self.model, self.amp, self.fpt = name, model, amp, fpt
        self.fwd = torch.compile(model) if compile else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        self.times: list[float] = []  # seconds per step, one entry per round
        self.others: list[float] = []  # cores busy with other processes, per round
        self.warmup_s = 0.0
        self.loss = float("nan")

    def step(self, x, y) -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            loss = self.fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time ours under torch.compile (default on; its warm-up is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--malloc-tune", action=argparse.BooleanOptionalAction, default=True,
                    help="raise glibc's mmap/trim thresholds for all models (default on; see tune_malloc)")
    ap.add_argument("--remeasure-peak", action="store_true",
                    help="measure the matmul peaks again (lmforge.cost.hw cache) instead of using the cached values")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--against", default="", metavar="REF",
                    help="instead, time the whole training loop (lmforge train) of this tree against git REF, side by side")
    args = ap.parse_args()
    if args.against:
        from _loop_compare import compare_loops

        r = compare_loops(args.against, rounds=args.rounds if args.rounds != 7 else 4)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = tune_malloc() if args.malloc_tune else False
    bf16 = bf16_supported_on_cpu()
    hw = measure_cpu(force=args.remeasure_peak)
    peak_bf16, peak_fp32 = hw.get("bf16"), hw["fp32"]

    cfg = ModelConfig(depth=DEPTH, vocab_size=VOCAB, context=CONTEXT)
    torch.manual_seed(0)
    ours = build_model(cfg)
    plain32 = PlainGPT(VOCAB, CONTEXT, cfg.n_layer, cfg.d_model, cfg.n_head)
    plain16 = PlainGPT(VOCAB, CONTEXT, cfg.n_layer, cfg.d_model, cfg.n_head)
    plain16.load_state_dict(plain32.state_dict())
    runners = [Runner("ours", ours, bf16, False, flops_per_token(cfg))]
    if args.compile:
        ours_c = build_model(cfg)
        ours_c.load_state_dict(ours.state_dict())
        runners.append(Runner("ours+compile", ours_c, bf16, True, flops_per_token(cfg)))
    runners.append(Runner("plain-fp32", plain32, False, False, plain32.flops_per_token(CONTEXT)))
    if bf16:
        runners.append(Runner("plain-bf16", plain16, True, False, plain16.flops_per_token(CONTEXT)))

    tokens_per_step = BATCH * CONTEXT
    print(f"machine: {hw['name']}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"bf16 autocast {'on' if bf16 else 'unavailable: ours runs fp32'}, malloc tuning {'on' if tuned else 'off'}")
    print(f"shape: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context {CONTEXT}, batch {BATCH}, "
          f"vocab {VOCAB}; ours {param_counts(cfg)['total'] / 1e6:.2f}M params "
          f"({param_counts(cfg)['non_embedding'] / 1e6:.2f}M non-embedding), plain "
          f"{sum(p.numel() for p in plain32.parameters()) / 1e6:.2f}M")
    print(f"measured matmul peak: bf16 {peak_bf16 / 1e12 if peak_bf16 else float('nan'):.2f} TFLOP/s, "
          f"fp32 {peak_fp32 / 1e12:.2f} TFLOP/s ({hw['threads']} threads, measured {hw.get('measured', '?')}; "
          "--remeasure-peak to redo it on a quiet machine)")

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=gen),
                torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=gen)) for _ in range(4)]
    for r in runners:  # warm-up: first steps allocate, and compile traces forward and backward
        t = time.perf_counter()
        for i in range(2):
            r.step(*batches[i])
        r.warmup_s = time.perf_counter() - t
        print(f"warm-up {r.name}: {r.warmup_s:.1f}s for the first 2 steps", flush=True)

    k = 0
    for rnd in range(args.rounds):
        order = runners[rnd % len(runners):] + runners[: rnd % len(runners)]
        for r in order:
            b0, o0 = other_cpu_seconds()
            t = time.perf_counter()
            for _ in range(args.steps_per_round):
                r.step(*batches[k % len(batches)])
                k += 1
            dt = time.perf_counter() - t
            b1, o1 = other_cpu_seconds()
            r.times.append(dt / args.steps_per_round)
            r.others.append(max(0.0, (b1 - b0) - (o1 - o0)) / dt)
        print(f"round {rnd + 1}/{args.rounds}: " + "  ".join(f"{r.name} {tokens_per_step / r.times[-1]:.0f}" for r in runners)
              + " tokens/s", flush=True)

    def tps(r: Runner) -> float:
        return tokens_per_step / statistics.median(r.times)

    print()
    print(f"{'model':<14} {'precision':>9} {'tokens/s':>9} {'ms/step':>8} {'slowest-fastest':>16} "
          f"{'of bf16 peak':>12} {'of fp32 peak':>12} {'others':>7}")
    results = {}
    for r in runners:
        v = tps(r)
        lo, hi = tokens_per_step / max(r.times), tokens_per_step / min(r.times)
        of16 = v * r.fpt / peak_bf16 if peak_bf16 else None
        of32 = v * r.fpt / peak_fp32
        prec = "bf16" if r.amp else "fp32"
        print(f"{r.name:<14} {prec:>9} {v:>9.0f} {1e3 * statistics.median(r.times):>8.1f} {f'{lo:.0f}-{hi:.0f}':>16} "
              f"{(f'{100 * of16:.1f}%' if of16 else '-'):>12} {100 * of32:>11.1f}% {statistics.median(r.others):>7.2f}")
        results[r.name] = {"precision": prec, "tokens_per_s": round(v, 1), "ms_per_step": round(1e3 * statistics.median(r.times), 1),
                           "tokens_per_s_range": [round(lo, 1), round(hi, 1)],
                           "frac_bf16_peak": round(of16, 4) if of16 else None, "frac_fp32_peak": round(of32, 4),
                           "flops_per_token": r.fpt, "warmup_s": round(r.warmup_s, 1), "final_loss": round(r.loss, 4),
                           "others_cores": round(statistics.median(r.others), 2)}
    print("MFU is the fraction of the peak of the model's own precision (bf16 rows: bf16 peak; fp32 rows: fp32 peak).")
    print("slowest-fastest: tokens/s of the slowest and fastest round; others: cores that other processes kept busy "
          "while it ran (median over rounds; above ~0.1 the machine was shared and the numbers are low and noisy)")
    by = {r.name: tps(r) for r in runners}
    print()
    for mine in [n for n in ("ours", "ours+compile") if n in by]:
        line = f"{mine}: {by[mine] / by['plain-fp32']:.2f}x plain-fp32"
        if "plain-bf16" in by:
            line += f", {by[mine] / by['plain-bf16']:.2f}x plain-bf16"
        print(line)
    if "ours+compile" in by:
        print(f"compile warm-up: {results['ours+compile']['warmup_s']:.1f}s for the first 2 steps "
              f"(eager: {results['ours']['warmup_s']:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": {"cpu": hw["name"], "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "peak_bf16": peak_bf16, "peak_fp32": peak_fp32, "malloc_tuned": tuned},
            "shape": {"layers": cfg.n_layer, "d_model": cfg.d_model, "heads": cfg.n_head, "context": CONTEXT,
                      "batch": BATCH, "vocab": VOCAB},
            "rounds": args.rounds, "steps_per_round": args.steps_per_round, "results": results}, indent=2))


if __name__ == "__main__":
    main()

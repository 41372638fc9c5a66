"""``lmforge run``: the whole pipeline on one corpus, each stage in its own run directory.

    RUN/data       cleaned, deduplicated, split and tokenized corpus
    RUN/tokenizer  byte-level BPE
    RUN/train      the model, its metrics and checkpoints
    RUN/hf         the model exported in Hugging Face format
    RUN/loss.png   the validation loss curve
    RUN/manifest.json  the stage index, with each stage's manifest hash

A stage whose manifest is complete and whose config matches is not run again, so an
interrupted ``lmforge run`` picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.prepare import DataConfig
from lmforge.data.shards import INDEX, TokenData
from lmforge.export.hf import export_hf
from lmforge.model.generate import SampleConfig
from lmforge.model.model import ModelConfig
from lmforge.model.sampling import sample_texts
from lmforge.rundir import MANIFEST, Manifest, atomic_write_json, hash_file, hash_json, is_complete, read_manifest
from lmforge.tokenizer.encode import build_token_data
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_records
from lmforge.train.trainer import train


@dataclass
class RunConfig:
    """The preset behind ``lmforge run``: sized to finish in about 15 minutes on 2 CPU cores.

    Depth 3 for ~5M tokens is near compute-optimal for that budget: a bigger model would see
    too few tokens to catch up, and on a CPU without bf16 it would not finish in time."""

    sources: list = field(default_factory=lambda: ["default"])
    vocab_size: int = 8192
    depth: int = 3
    context: int = 256
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 50
    eval_every: int = 100
    seed: int = 1337
    samples: list = field(default_factory=lambda: ["def ", "import ", "class ", "The "])
    near_dedup: bool = True
    val_fraction: float = 0.02  # share of documents held out, chosen by content hash


def _stage_done(stage_dir: Path, key: str) -> bool:
    """Complete, and made from the same inputs and settings as this pipeline asks for now."""
    return is_complete(stage_dir) and read_manifest(stage_dir).get("pipeline_key") == key


def _mark(stage_dir: Path, key: str) -> None:
    p = stage_dir / MANIFEST
    man = json.loads(p.read_text())
    man["pipeline_key"] = key
    atomic_write_json(p, man)


def unigram_entropy(data_dir: Path) -> float:
    """Entropy (nats/token) of the train split's unigram distribution: the loss a model that ignores context would reach."""
    td = TokenData(data_dir)
    train = td.split("train")
    counts = np.zeros(td.vocab_size, dtype=np.int64)
    step = 1 << 22
    for off in range(0, len(train), step):
        counts += np.bincount(train.window(off, min(step, len(train) - off)), minlength=td.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def plot_loss(train_dir: Path, out_png: Path, unigram: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_records(train_dir)  # a torn last line (a crash mid-write) does not stop the plot
    tr = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
    tokens_per_step = tr[0][0] / next(r["step"] for r in recs if "loss" in r) if tr else 1
    va = [(r["step"] * tokens_per_step, r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if tr:
        ax.plot(*zip(*tr), color="0.6", lw=1, label="train loss")
    if va:
        ax.plot(*zip(*va), "o-", color="C0", lw=2, label="validation loss")
    if unigram:
        ax.axhline(unigram, color="C3", ls="--", lw=1, label=f"unigram entropy ({unigram:.2f})")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"lmforge: {train_dir}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def run_pipeline(cfg: RunConfig, out: str | Path = "runs/default", progress: bool = True) -> dict:
    """Run every stage; return a summary dict (paths, val loss, samples)."""
    out = Path(out)
    t0 = time.time()
    top = Manifest(out, "run", asdict(cfg))
    data_dir, tok_dir, train_dir, hf_dir = out / "data", out / "tokenizer", out / "train", out / "hf"
    say = print if progress else (lambda *a, **k: None)

    data_cfg = DataConfig(dedup_near=cfg.near_dedup, val_fraction=cfg.val_fraction)
    data_key = hash_json({"sources": cfg.sources, "data": asdict(data_cfg)})
    tok_key = hash_json({"data": data_key, "vocab": cfg.vocab_size})
    if not _stage_done(data_dir, tok_key) or not (data_dir / "tokens" / INDEX).exists():
        build_token_data(cfg.sources, data_dir, tok_dir, data_cfg, cfg.vocab_size, progress=progress,
                         say=lambda msg: say(f"[1-2/5] {msg}"))
        _mark(data_dir, tok_key)
    else:
        say(f"[1-2/5] data and tokenizer: up to date in {data_dir}")

    tcfg = TrainConfig(
        data=str(data_dir), out=str(train_dir),
        model=ModelConfig(depth=cfg.depth, vocab_size=0, context=cfg.context),
        batch_size=cfg.batch_size, max_steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        eval_every=cfg.eval_every, ckpt_every=max(1, cfg.steps // 4), seed=cfg.seed,
    )
    train_key = hash_json({"tok": tok_key, "train": asdict(tcfg)})
    if not _stage_done(train_dir, train_key):
        say(f"[3/5] train: depth {cfg.depth}, {cfg.steps} steps -> {train_dir}")
        train(tcfg, resume="auto" if list_checkpoints(train_dir) else "never", progress=progress)
        _mark(train_dir, train_key)
    else:
        say(f"[3/5] train: up to date in {train_dir}")

    unigram = unigram_entropy(data_dir)
    png = plot_loss(train_dir, out / "loss.png", unigram)
    say("[4/5] samples")
    samples = sample_texts(train_dir, cfg.samples, SampleConfig(max_new_tokens=96, temperature=0.7, top_k=50, top_p=0.95, seed=cfg.seed))
    say(f"[5/5] export: Hugging Face format -> {hf_dir}")
    export_hf(train_dir, hf_dir)

    val = read_manifest(train_dir)["metrics"].get("final_val_loss")
    for name, d in [("data", data_dir), ("tokenizer", tok_dir), ("train", train_dir), ("hf", hf_dir)]:
        top.add_input(name, d, content_hash=hash_file(d / MANIFEST))
    top.add_output("loss_curve", png)
    top.add_output("samples", out / "samples.txt")
    (out / "samples.txt").write_text("".join(f"--- prompt: {p!r}\n{p}{s}\n\n" for p, s in zip(cfg.samples, samples)))
    top.set_metrics(final_val_loss=val, unigram_entropy=round(unigram, 4),
                    val_loss_vs_unigram=round(val / unigram, 4) if val and unigram else None,
                    total_wall_time_s=round(time.time() - t0, 1))
    top.finish()
    return {"run_dir": str(out), "loss_png": str(png), "hf_dir": str(hf_dir), "val_loss": val,
            "unigram_entropy": unigram, "samples": list(zip(cfg.samples, samples))}

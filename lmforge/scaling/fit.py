"""Fitting scaling laws to finished runs, with bootstrap uncertainty.

Two forms:

- ``L(N, D) = E + A / N^alpha + B / D^beta`` (Hoffmann et al. 2022, "approach 3"), fitted
  as Besiroglu et al. (2024) recommend: a Huber loss (delta 1e-3) on the residuals of
  log L, with ``A, B, E`` parameterised in log space so the prediction is a log-sum-exp,
  minimised by L-BFGS from a grid of starting points, keeping the best.
- ``L(C) = a * C^b + c`` in compute alone (b < 0), fitted the same way.

Uncertainty comes from a bootstrap over runs: refit on runs resampled with replacement.
Forecast intervals combine that parameter spread with the fit's own residual scatter.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from lmforge.errors import LmforgeError

HUBER_DELTA = 1e-3
# Bounds keep the optimiser in a physical region; a fitted value on a bound is reported as degenerate.
NDBOUNDS = [(-5.0, 40.0), (-5.0, 40.0), (-5.0, 3.0), (0.01, 2.0), (0.01, 2.0)]  # a, b, e, alpha, beta
CBOUNDS = [(-10.0, 80.0), (-1.5, -0.005), (-5.0, 3.0)]  # log a, b, log c


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def huber_grad(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    return np.clip(r, -delta, delta)


def _softmax_terms(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(sum(exp(terms))) over axis 0 and each term's share of the sum (its gradient)."""
    lse = logsumexp(terms, axis=0)
    return lse, np.exp(terms - lse)


def _nd_terms(theta, logN, logD):
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])


def _nd_log_pred(theta, logN, logD):
    return logsumexp(_nd_terms(theta, logN, logD), axis=0)


def _nd_objective(theta, logN, logD, logL):
    """Huber loss of the log residuals and its analytic gradient (L-BFGS needs no finite differences)."""
    pred, w = _softmax_terms(_nd_terms(theta, logN, logD))
    r = pred - logL
    g = huber_grad(r)
    grad = np.array([g @ w[0], g @ w[1], g @ w[2], -(g * w[0]) @ logN, -(g * w[1]) @ logD])
    return huber(r).sum(), grad


def _c_terms(theta, logC):
    la, b, lc = theta
    return np.stack([la + b * logC, np.full_like(logC, lc)])


def _c_log_pred(theta, logC):
    return logsumexp(_c_terms(theta, logC), axis=0)


def _c_objective(theta, logC, logL):
    pred, w = _softmax_terms(_c_terms(theta, logC))
    r = pred - logL
    g = huber_grad(r)
    return huber(r).sum(), np.array([g @ w[0], (g * w[0]) @ logC, g @ w[1]])


def _best_fit(objective, args, grid, bounds):
    # The Huber loss of log residuals near a good fit is ~1e-7 per run, below L-BFGS-B's default
    # tolerances: unscaled, it stops where it starts (and bootstrap refits never move). Dividing
    # by delta^2 makes the objective O(1) per run without moving its minimum.
    scale = 1.0 / HUBER_DELTA**2

    def scaled(theta, *a):
        f, g = objective(theta, *a)
        return f * scale, g * scale

    best = None
    for x0 in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = minimize(scaled, np.array(x0, dtype=float), args=args, method="L-BFGS-B", jac=True, bounds=bounds,
                           options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})
        if best is None or res.fun < best.fun:
            best = res
    return best


def _nd_grid(logL: np.ndarray):
    e0 = float(np.log(max(np.min(np.exp(logL)) * 0.5, 1e-3)))
    alphas = betas = [0.1, 0.3, 0.6]
    return [(a, b, e, al, be) for a, b, e, al, be in itertools.product([0.0, 5.0, 10.0], [0.0, 5.0, 10.0],
                                                                        [e0 - 1.0, e0, e0 + 0.5], alphas, betas)]


def _c_grid(logC, logL):
    lc0 = float(np.log(np.min(np.exp(logL)) * 0.7))
    return [(la, b, lc) for la, b, lc in itertools.product([0.0, 5.0, 10.0, 20.0], [-0.05, -0.15, -0.4], [lc0 - 1.0, lc0])]


@dataclass
class Point:
    N: float
    D: float
    loss: float
    C: float = 0.0  # training FLOPs; 6ND when unknown
    name: str = ""

    def __post_init__(self):
        if not self.C:
            self.C = 6.0 * self.N * self.D


@dataclass
class ScalingFit:
    form: str  # "ND" or "C"
    params: dict
    stderr: dict
    n_points: int
    rmse_log: float  # root mean square of log-space residuals
    boot: list = field(default_factory=list)  # bootstrap parameter vectors
    warnings: list = field(default_factory=list)
    n_range: tuple = (0.0, 0.0)
    d_range: tuple = (0.0, 0.0)
    c_range: tuple = (0.0, 0.0)

    def predict(self, N: float | None = None, D: float | None = None, C: float | None = None) -> float:
        return float(np.exp(self._log_pred(self._theta(), N, D, C)))

    def _theta(self):
        p = self.params
        if self.form == "ND":
            return [math.log(p["A"]), math.log(p["B"]), math.log(p["E"]), p["alpha"], p["beta"]]
        return [math.log(p["a"]), p["b"], math.log(p["c"])]

    def _log_pred(self, theta, N, D, C):
        if self.form == "ND":
            if N is None or D is None:
                raise LmforgeError("this fit is L(N, D): give both --params and --tokens")
            return float(_nd_log_pred(theta, np.array([math.log(N)]), np.array([math.log(D)]))[0])
        if C is None:
            C = 6.0 * N * D
        return float(_c_log_pred(theta, np.array([math.log(C)]))[0])

    def interval(self, N=None, D=None, C=None, levels=(0.8, 0.95), seed: int = 0) -> dict:
        """Point forecast and central intervals from the bootstrap plus residual scatter."""
        rng = np.random.default_rng(seed)
        centre = self.predict(N, D, C)
        if not self.boot:
            return {"loss": centre, **{f"{int(l * 100)}%": (centre, centre) for l in levels}}
        logs = np.array([self._log_pred(th, N, D, C) for th in self.boot])
        logs = logs + rng.normal(0.0, self.rmse_log, size=logs.shape)
        out = {"loss": centre}
        for level in levels:
            lo, hi = np.quantile(np.exp(logs), [(1 - level) / 2, (1 + level) / 2])
            out[f"{int(round(level * 100))}%"] = (float(lo), float(hi))
        return out

    def extrapolation(self, N=None, D=None, C=None) -> dict:
        """How far beyond the fitted range a query lies, as multiples of the largest fitted value."""
        C = C or (6.0 * N * D if N and D else None)
        out = {}
        if N:
            out["N"] = N / self.n_range[1]
        if D:
            out["D"] = D / self.d_range[1]
        if C:
            out["C"] = C / self.c_range[1]
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["boot"] = [list(map(float, b)) for b in self.boot]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ScalingFit":
        d = dict(d)
        for k in ("n_range", "d_range", "c_range"):
            d[k] = tuple(d.get(k, (0.0, 0.0)))
        return cls(**d)


def _check_points(points: list[Point], form: str) -> None:
    bad = [p.name or f"#{i}" for i, p in enumerate(points) if not (np.isfinite(p.loss) and p.loss > 0)]
    if bad:
        raise LmforgeError(f"runs with a NaN or non-positive final loss cannot be fitted: {', '.join(bad)}; drop or rerun them")
    if len(points) < 5:
        raise LmforgeError(f"a scaling fit needs at least 5 finished runs, got {len(points)}; add rungs to the ladder")
    if form == "ND":
        if len({round(p.N) for p in points}) < 2:
            raise LmforgeError("every run has the same model size, so the N exponent cannot be fitted; "
                               "add rungs of other depths or fit --form C")
        if len({round(p.D) for p in points}) < 2:
            raise LmforgeError("every run saw the same number of tokens, so the D exponent cannot be fitted; "
                               "vary the token budgets or fit --form C")


def fit_nd(points: list[Point], n_boot: int = 200, seed: int = 0) -> ScalingFit:
    _check_points(points, "ND")
    logN = np.log([p.N for p in points])
    logD = np.log([p.D for p in points])
    logL = np.log([p.loss for p in points])
    best = _best_fit(_nd_objective, (logN, logD, logL), _nd_grid(logL), NDBOUNDS)
    theta = best.x
    boot = _bootstrap(lambda idx, x0: _best_fit(_nd_objective, (logN[idx], logD[idx], logL[idx]), [x0], NDBOUNDS).x,
                      len(points), theta, n_boot, seed)
    names = ["A", "B", "E", "alpha", "beta"]
    params = _nd_params(theta)
    stderr = _stderr(boot, _nd_params, names)
    resid = _nd_log_pred(theta, logN, logD) - logL
    fit = ScalingFit("ND", params, stderr, len(points), float(np.sqrt(np.mean(resid**2))), [list(b) for b in boot],
                     n_range=(float(np.exp(logN.min())), float(np.exp(logN.max()))),
                     d_range=(float(np.exp(logD.min())), float(np.exp(logD.max()))),
                     c_range=(min(p.C for p in points), max(p.C for p in points)))
    fit.warnings = _degeneracy(theta, NDBOUNDS, ["log A", "log B", "log E", "alpha", "beta"], fit.rmse_log, len(points), 5)
    return fit


def fit_c(points: list[Point], n_boot: int = 200, seed: int = 0) -> ScalingFit:
    _check_points(points, "C")
    logC = np.log([p.C for p in points])
    logL = np.log([p.loss for p in points])
    best = _best_fit(_c_objective, (logC, logL), _c_grid(logC, logL), CBOUNDS)
    theta = best.x
    boot = _bootstrap(lambda idx, x0: _best_fit(_c_objective, (logC[idx], logL[idx]), [x0], CBOUNDS).x,
                      len(points), theta, n_boot, seed)
    params = _c_params(theta)
    resid = _c_log_pred(theta, logC) - logL
    fit = ScalingFit("C", params, _stderr(boot, _c_params, ["a", "b", "c"]), len(points),
                     float(np.sqrt(np.mean(resid**2))), [list(b) for b in boot],
                     n_range=(min(p.N for p in points), max(p.N for p in points)),
                     d_range=(min(p.D for p in points), max(p.D for p in points)),
                     c_range=(float(np.exp(logC.min())), float(np.exp(logC.max()))))
    fit.warnings = _degeneracy(theta, CBOUNDS, ["log a", "b", "log c"], fit.rmse_log, len(points), 3)
    return fit


def _nd_params(theta) -> dict:
    a, b, e, alpha, beta = map(float, theta)
    return {"A": math.exp(a), "B": math.exp(b), "E": math.exp(e), "alpha": alpha, "beta": beta}


def _c_params(theta) -> dict:
    la, b, lc = map(float, theta)
    return {"a": math.exp(la), "b": b, "c": math.exp(lc)}


def _bootstrap(refit, n: int, theta, n_boot: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        if len(set(idx.tolist())) < 3:
            continue
        out.append(np.asarray(refit(idx, theta)))
    return out


def _stderr(boot, to_params, names) -> dict:
    if not boot:
        return {k: float("nan") for k in names}
    vals = [to_params(b) for b in boot]
    return {k: float(np.std([v[k] for v in vals], ddof=1)) for k in names}


def _degeneracy(theta, bounds, names, rmse_log, n, k) -> list[str]:
    warns = []
    for v, (lo, hi), name in zip(theta, bounds, names):
        span = hi - lo
        if v - lo < 1e-3 * span or hi - v < 1e-3 * span:
            warns.append(f"{name} = {v:.4g} sits on its bound [{lo}, {hi}]: the data do not pin it down")
    if n < 2 * k:
        warns.append(f"only {n} runs for {k} parameters: expect wide intervals; add rungs")
    if rmse_log > 0.02:
        warns.append(f"poor fit: log-loss residuals have RMS {rmse_log:.3f} (> 0.02); check for failed or mis-tuned runs")
    return warns


# Published L(N, D) fits, for planning before any ladder of your own has run (``--fit chinchilla``).
# Losses are in nats per token on the papers' own data (MassiveText), so they size runs, they do
# not forecast your loss. Ranges are the model sizes and token counts the papers trained.
REFERENCE_FITS = {
    "chinchilla": {  # Hoffmann et al. 2022, approach 3
        "params": {"A": 406.4, "B": 410.7, "E": 1.69, "alpha": 0.34, "beta": 0.28},
        "n_range": (7e7, 1.6e10), "d_range": (5e9, 5e11)},
    "chinchilla-replication": {  # Besiroglu et al. 2024, refitted to Hoffmann et al.'s data
        "params": {"A": 482.01, "B": 2085.43, "E": 1.8172, "alpha": 0.3478, "beta": 0.3658},
        "n_range": (7e7, 1.6e10), "d_range": (5e9, 5e11)},
}


def reference_fit(name: str) -> ScalingFit:
    ref = REFERENCE_FITS[name]
    n, d = ref["n_range"], ref["d_range"]
    return ScalingFit("ND", dict(ref["params"]), {k: float("nan") for k in ref["params"]}, 0, 0.0,
                      n_range=n, d_range=d, c_range=(6 * n[0] * d[0], 6 * n[1] * d[1]))


def backtest(points: list[Point], holdout: int = 1) -> list[dict]:
    """Refit without the ``holdout`` largest-compute runs and predict each of them: how well the
    law extrapolates inside the ladder, before trusting it outside."""
    ranked = sorted(points, key=lambda p: p.C)
    train, held = ranked[:-holdout], ranked[-holdout:]
    fit = fit_nd(train, n_boot=0)
    out = []
    for p in held:
        pred = fit.predict(p.N, p.D)
        out.append({"name": p.name, "actual": p.loss, "predicted": pred, "error_pct": 100 * (p.loss - pred) / p.loss,
                    "compute_vs_fitted": p.C / max(q.C for q in train)})
    return out


def compute_optimal(fit: ScalingFit, C: float, flops_per_param_token: float = 6.0) -> dict:
    """N and D minimising L(N, D) subject to C = k * N * D (k = 6 by default).

    Setting dL/dN = 0 along the constraint gives alpha*A/N^alpha = beta*B/D^beta, whose
    solution is N = G * (C/k)^(beta/(alpha+beta)), D = (C/k) / N, with
    G = (alpha*A / (beta*B))^(1/(alpha+beta)).
    """
    if fit.form != "ND":
        raise LmforgeError("compute-optimal sizing needs an L(N, D) fit; refit with --form ND")
    p = fit.params
    A, B, alpha, beta = p["A"], p["B"], p["alpha"], p["beta"]
    ND = C / flops_per_param_token
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    N = G * ND ** (beta / (alpha + beta))
    D = ND / N
    return {"N": N, "D": D, "C": C, "tokens_per_param": D / N, "loss": fit.predict(N, D)}

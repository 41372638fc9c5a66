"""Fitting scaling laws to finished runs, choosing between them, and forecasting with honest intervals.

Forms (``lmforge.scaling.forms``): ``ND``, ``L = E + A/N^alpha + B/D^beta`` (Hoffmann et al.
2022, "approach 3"); ``kaplan``, ``L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D`` (Kaplan et
al. 2020); and ``C``, ``L = a*C^b + c`` in compute alone. Each is fitted as Besiroglu et al.
(2024) recommend: a Huber loss (delta 1e-3) on the residuals of log L, scale parameters in log
space, L-BFGS-B with analytic gradients from several starting points, keeping the best; a
bootstrap over runs gives standard errors.

A law that fits its ladder can still extrapolate badly: a ladder of two model sizes once
forecast 2.67 for a run that reached 2.07, with a +-2% interval. So the choice of form and the
width of a forecast's interval both come from backtests, refits that predict runs they did not
see: the top-compute rungs, and every rung of the largest model size (``select_form``,
``calibrate``, ``CalibratedLaw.interval``).

Refits (bootstrap resamples, dropped sizes, backtest splits) are the same runs with different
weights, so each form's refits run together as one batch (``_refit``); the fit on all the runs
(and any refit still crawling along a flat valley) is finished by L-BFGS-B.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.stats import norm

from lmforge.errors import LmforgeError
from lmforge.scaling.forms import C_FORM, ND, Form, get_form

HUBER_DELTA = 1e-3
# Bounds keep the optimiser in a physical region; a fitted value on a bound is reported as degenerate.
NDBOUNDS = list(ND.bounds)  # log A, log B, log E, alpha, beta
CBOUNDS = list(C_FORM.bounds)  # log a, b, log c


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    m = np.minimum(a, delta)  # 0.5 r^2 inside delta, delta * (|r| - delta/2) outside
    return m * (a - 0.5 * m)


def huber_grad(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    return np.clip(r, -delta, delta)


def _polish(form: Form, X, logL, x0, weights=None, maxiter: int = 2000) -> np.ndarray:
    """L-BFGS-B from ``x0`` on the (weighted) Huber loss of the log residuals."""
    # The Huber loss of log residuals near a good fit is ~1e-7 per run, below L-BFGS-B's default
    # tolerances: unscaled, it stops where it starts. Dividing by delta^2 makes the objective
    # O(1) per run without moving its minimum.
    c = (np.ones(len(logL)) if weights is None else np.asarray(weights, dtype=float)) / HUBER_DELTA**2

    def objective(theta):
        pred, jac = form.pred_jac(theta, X)
        r = pred - logL
        return c @ huber(r), jac @ (c * huber_grad(r))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minimize(objective, form.clip(x0), method="L-BFGS-B", jac=True, bounds=form.bounds,
                        options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-9}).x


def _refit(form: Form, X, logL, counts, starts, maxiter: int = 500, rtol: float = 1e-10):
    """Minimise ``sum_i counts[b, i] * huber(r_i)`` for every row b at once, from ``starts[b]``.

    Bootstrap resamples, dropped model sizes and backtest splits are all the same runs with
    different weights, so hundreds of refits share one prediction per iteration; one at a time,
    L-BFGS-B spends ~100 iterations of Python overhead on each. The method is Levenberg-Marquardt
    on the Huber loss's quadratic majoriser (iteratively reweighted least squares: weight 1
    inside delta, delta/|r| outside), with coordinates on a bound held there while the gradient
    pushes outwards. Returns the parameters (B, k) and the losses (B,).
    """
    lo, hi = np.array(form.bounds).T
    counts = np.asarray(counts, dtype=float)
    theta = np.clip(np.array(starts, dtype=float), lo, hi)
    B, k = theta.shape

    def evaluate(th, c):
        pred, jac = form.pred_jac(th.T[:, :, None], X)
        r = pred - logL
        return r, jac, (c * huber(r)).sum(axis=1)

    r, jac, f = evaluate(theta, counts)
    lam = np.full(B, 0.1)  # cautious first steps keep a warm-started refit near its start's basin
    quiet = np.zeros(B, dtype=int)  # consecutive accepted steps that barely moved the loss
    active = np.ones(B, dtype=bool)
    eye = np.eye(k)
    for _ in range(maxiter):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        ra, ja, c, th = r[idx], jac[:, idx], counts[idx], theta[idx]
        w = c * (HUBER_DELTA / np.maximum(np.abs(ra), HUBER_DELTA))
        g = np.einsum("kbn,bn->bk", ja, w * ra)  # the Huber loss's own gradient
        H = np.einsum("kbn,bn,jbn->bkj", ja, w, ja)
        held = ((th <= lo) & (g > 0)) | ((th >= hi) & (g < 0))
        d = np.diagonal(H, axis1=1, axis2=2)
        d = np.maximum(d, 1e-12 * d.max(axis=1, keepdims=True) + 1e-300)
        A = H + lam[idx, None, None] * d[:, :, None] * eye
        A = np.where(held[:, :, None] | held[:, None, :], eye, A)
        step = np.linalg.solve(A, np.where(held, 0.0, -g)[:, :, None])[:, :, 0]
        new = np.clip(th + step, lo, hi)
        r2, jac2, f2 = evaluate(new, c)
        better = f2 < f[idx]
        moved = np.where(better, (f[idx] - f2) / np.maximum(f[idx], 1e-300), 0.0)
        acc = idx[better]
        theta[acc], r[acc], jac[:, acc], f[acc] = new[better], r2[better], jac2[:, better], f2[better]
        lam[idx] = np.where(better, np.maximum(lam[idx] / 10, 1e-12), lam[idx] * 10)
        calm = better & (moved <= rtol)
        quiet[idx] = np.where(calm, quiet[idx] + 1, np.where(better, 0, quiet[idx]))
        active[idx] = (quiet[idx] < 3) & (lam[idx] < 1e10)
    # Most refits converge in tens of iterations; the few still crawling along a flat valley
    # (a form that misfits the data has long ones) go faster with L-BFGS-B's curvature memory.
    for b in np.flatnonzero(active):
        theta[b] = _polish(form, X, logL, theta[b], counts[b])
        f[b] = counts[b] @ huber(form.log_pred(theta[b], X) - logL)
    return theta, f


def _fit_theta(form: Form, X, logL, starts) -> np.ndarray:
    """The best of the refits from ``starts``, polished by L-BFGS-B."""
    thetas, f = _refit(form, X, logL, np.ones((len(starts), len(logL))), starts)
    return _polish(form, X, logL, thetas[int(np.argmin(f))])


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
    form: str  # "ND" (Chinchilla's form; the name predates the others), "kaplan" or "C"
    params: dict
    stderr: dict
    n_points: int
    rmse_log: float  # root mean square of log-space residuals
    boot: list = field(default_factory=list)  # bootstrap parameter vectors
    warnings: list = field(default_factory=list)
    n_range: tuple = (0.0, 0.0)
    d_range: tuple = (0.0, 0.0)
    c_range: tuple = (0.0, 0.0)
    # The fitted vector itself: params can overflow a float (Kaplan's N_c at a tiny exponent
    # ratio), the log-space vector cannot, so predictions from a reloaded fit stay exact.
    theta: list = field(default_factory=list)

    def __post_init__(self):
        if not self.theta:
            self.theta = [float(v) for v in get_form(self.form).to_theta(self.params)]

    def predict(self, N: float | None = None, D: float | None = None, C: float | None = None) -> float:
        return float(np.exp(self._log_pred(self._theta(), N, D, C)))

    def _theta(self):
        return np.asarray(self.theta, dtype=float)

    def _log_pred(self, theta, N, D, C):
        form = get_form(self.form)
        if form.inputs == "ND":
            if N is None or D is None:
                raise LmforgeError("this fit is L(N, D): give both --params and --tokens")
            X = np.array([[math.log(N)], [math.log(D)]])
        else:
            X = np.array([[math.log(C if C is not None else 6.0 * N * D)]])
        return float(form.log_pred(theta, X)[0])

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


def _check_points(points: list[Point], inputs: str) -> None:
    bad = [p.name or f"#{i}" for i, p in enumerate(points) if not (np.isfinite(p.loss) and p.loss > 0)]
    if bad:
        raise LmforgeError(f"runs with a NaN or non-positive final loss cannot be fitted: {', '.join(bad)}; drop or rerun them")
    if len(points) < 5:
        raise LmforgeError(f"a scaling fit needs at least 5 finished runs, got {len(points)}; add rungs to the ladder")
    if inputs == "ND":
        if len({round(p.N) for p in points}) < 2:
            raise LmforgeError("every run has the same model size, so the N exponent cannot be fitted; "
                               "add rungs of other depths or fit --form C")
        if len({round(p.D) for p in points}) < 2:
            raise LmforgeError("every run saw the same number of tokens, so the D exponent cannot be fitted; "
                               "vary the token budgets or fit --form C")


def _design(points: list[Point], form: Form) -> tuple[np.ndarray, np.ndarray]:
    if form.inputs == "ND":
        X = np.log([[p.N for p in points], [p.D for p in points]])
    else:
        X = np.log([[p.C for p in points]])
    return X, np.log([p.loss for p in points])


def fit_form(points: list[Point], form: str = "ND", n_boot: int = 200, seed: int = 0, n_starts: int = 5) -> ScalingFit:
    """Fit one form (``ND``, ``kaplan`` or ``C``) from its ``n_starts`` best projected starting points,
    with ``n_boot`` bootstrap refits (each warm-started from the fit) for standard errors."""
    f = get_form(form)
    _check_points(points, f.inputs)
    X, logL = _design(points, f)
    theta = _fit_theta(f, X, logL, f.starts(X, logL, n_starts))
    return _make_fit(f, points, X, logL, theta, _bootstrap(f, X, logL, theta, n_boot, seed))


def _make_fit(f: Form, points: list[Point], X, logL, theta, boot) -> ScalingFit:
    resid = f.log_pred(theta, X) - logL
    fit = ScalingFit(f.name, f.to_params(theta), _stderr(boot, f), len(points), float(np.sqrt(np.mean(resid**2))),
                     [list(map(float, b)) for b in boot],
                     n_range=(min(p.N for p in points), max(p.N for p in points)),
                     d_range=(min(p.D for p in points), max(p.D for p in points)),
                     c_range=(min(p.C for p in points), max(p.C for p in points)), theta=[float(t) for t in theta])
    fit.warnings = _degeneracy(theta, f.bounds, f.coords, fit.rmse_log, len(points), f.k)
    return fit


def fit_nd(points: list[Point], n_boot: int = 200, seed: int = 0) -> ScalingFit:
    return fit_form(points, "ND", n_boot, seed)


def fit_kaplan(points: list[Point], n_boot: int = 200, seed: int = 0) -> ScalingFit:
    return fit_form(points, "kaplan", n_boot, seed)


def fit_c(points: list[Point], n_boot: int = 200, seed: int = 0) -> ScalingFit:
    return fit_form(points, "C", n_boot, seed)


def _boot_counts(n: int, n_boot: int, seed: int) -> list[np.ndarray]:
    """How often each of n runs appears in each resample (resamples of fewer than 3 distinct runs dropped)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        if len(set(idx.tolist())) >= 3:
            out.append(np.bincount(idx, minlength=n).astype(float))
    return out


def _bootstrap(form: Form, X, logL, theta, n_boot: int, seed: int) -> list:
    """Refits on runs resampled with replacement, each warm-started from ``theta``."""
    counts = _boot_counts(len(logL), n_boot, seed)
    return list(_refit(form, X, logL, counts, np.tile(theta, (len(counts), 1)))[0]) if counts else []


def _run_batch(form: Form, X, logL, jobs) -> dict:
    """Run ``jobs``, a list of (key, counts, start), as one batch; returns key -> [(theta, loss), ...]."""
    out = {}
    if jobs:
        thetas, f = _refit(form, X, logL, [j[1] for j in jobs], [j[2] for j in jobs])
        for (key, _, _), th, fv in zip(jobs, thetas, f):
            out.setdefault(key, []).append((th, fv))
    return out


def _best(results) -> np.ndarray:
    return min(results, key=lambda r: r[1])[0]


def _stderr(boot, form: Form) -> dict:
    if not boot:
        return {k: float("nan") for k in form.params}
    vals = [form.to_params(b) for b in boot]
    return {k: float(np.std([v[k] for v in vals], ddof=1)) for k in form.params}


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


def backtest(points: list[Point], holdout: int = 1, form: str = "ND") -> list[dict]:
    """Refit without the ``holdout`` largest-compute runs and predict each of them: how well the
    law extrapolates inside the ladder, before trusting it outside."""
    ranked = sorted(points, key=lambda p: p.C)
    train, held = ranked[:-holdout], ranked[-holdout:]
    fit = fit_form(train, form, n_boot=0)
    out = []
    for p in held:
        pred = fit.predict(p.N, p.D, p.C)
        out.append({"name": p.name, "actual": p.loss, "predicted": pred, "error_pct": 100 * (p.loss - pred) / p.loss,
                    "compute_vs_fitted": p.C / max(q.C for q in train)})
    return out


def compute_optimal(fit: ScalingFit, C: float, flops_per_param_token: float = 6.0) -> dict:
    """N and D minimising L(N, D) subject to C = k * N * D (k = 6 by default).

    For ``ND``, setting dL/dN = 0 along the constraint gives alpha*A/N^alpha = beta*B/D^beta,
    whose solution is N = G * (C/k)^(beta/(alpha+beta)), D = (C/k) / N, with
    G = (alpha*A / (beta*B))^(1/(alpha+beta)). Other L(N, D) forms are minimised numerically
    over log N; both Kaplan's bracket and ND are convex there, so the minimum is unique.
    """
    form = get_form(fit.form)
    if form.inputs != "ND":
        raise LmforgeError("compute-optimal sizing needs an L(N, D) fit; refit with --form ND")
    nd = C / flops_per_param_token
    if fit.form == "ND":
        p = fit.params
        A, B, alpha, beta = p["A"], p["B"], p["alpha"], p["beta"]
        G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
        N = G * nd ** (beta / (alpha + beta))
    else:
        theta = fit._theta()
        hi = math.log(nd)  # N from 1 to C/k: every split with at least one parameter and one token

        def loss_at(logN):
            return fit._log_pred(theta, math.exp(logN), nd / math.exp(logN), None)

        res = minimize_scalar(loss_at, bounds=(0.0, hi), method="bounded", options={"xatol": 1e-9})
        if min(res.x, hi - res.x) < 1e-3 * hi:
            raise LmforgeError(f"the fitted {fit.form} law keeps improving towards a one-token (or one-parameter) "
                               f"run at {C:.3g} FLOPs: it has no compute-optimal size; refit with more rungs")
        N = math.exp(res.x)
    D = nd / N
    return {"N": N, "D": D, "C": C, "tokens_per_param": D / N, "loss": fit.predict(N, D)}


# --- Choosing the form and sizing the interval, both from backtests ---

HOLDOUT_FRACTION = 0.25  # of the runs, by compute, that the top-compute backtest predicts
# A form is clearly worse when its backtest error is both COMPETITIVE_RATIO times the best
# form's and COMPETITIVE_MARGIN percentage points above it; closer than that, a handful of
# held-out runs cannot tell two forms apart, so both stay in the interval.
COMPETITIVE_RATIO = 2.0
COMPETITIVE_MARGIN = 0.5


def _unfittable(points: list[Point], idx) -> str | None:
    """Why the runs ``idx`` cannot carry an L(N, D) fit, or None."""
    if len(idx) < 5:
        return f"only {len(idx)} runs would be left to fit"
    if len({round(points[i].N) for i in idx}) < 2:
        return "one model size would be left"
    if len({round(points[i].D) for i in idx}) < 2:
        return "one token budget would be left"
    return None


REACH_MIN = 1.5  # a backtest's held-out runs lie at least this far beyond what it fits


def _splits(points: list[Point], holdout_fraction: float = HOLDOUT_FRACTION) -> list[dict]:
    """The two backtests: the top-compute rungs predicted from the rest (extrapolation in C), and
    every rung of the largest model predicted from the smaller ones (extrapolation in N)."""
    n = len(points)
    order = sorted(range(n), key=lambda i: points[i].C)
    top = {"name": "top_compute", "axis": "C"}
    for k in range(max(1, round(holdout_fraction * n)), 0, -1):
        # A designed ladder puts several rungs at the same cap: hold out every run within REACH_MIN
        # of the held-out ones, or the backtest would "extrapolate" by 1.0x and measure nothing.
        floor = points[order[-k]].C / REACH_MIN
        held = [i for i in order if points[i].C > floor]
        train = [i for i in order if points[i].C <= floor]
        if _unfittable(points, train) is None:
            top.update(train=sorted(train), held=sorted(held))
            break
    else:
        top["skipped"] = (f"holding out the largest runs (and those within {REACH_MIN}x of them) leaves too little: "
                          f"{_unfittable(points, order[:-1])}")
    sizes = sorted({round(p.N) for p in points})
    big = [i for i, p in enumerate(points) if round(p.N) == sizes[-1]]
    rest = [i for i in range(n) if i not in big]
    depth = {"name": "largest_N", "axis": "N"}
    if len(sizes) < 3:
        depth["skipped"] = (f"only {len(sizes)} model sizes: holding out the largest leaves one, "
                            "which cannot fit the N term")
    elif _unfittable(points, rest):
        depth["skipped"] = f"holding out the largest model leaves too little: {_unfittable(points, rest)}"
    else:
        depth.update(train=rest, held=big)
    return [top, depth]


def _beyond(points: list[Point], i: int, train) -> dict:
    return {"C": points[i].C / max(points[j].C for j in train), "N": points[i].N / max(points[j].N for j in train)}


def _weights(n: int, idx) -> np.ndarray:
    w = np.zeros(n)
    w[list(idx)] = 1.0
    return w


def _size_drops(points: list[Point], idx) -> list[tuple[float, np.ndarray]]:
    """(N, weights) for the runs ``idx`` with each model size left out in turn, where what is left can be fitted."""
    out = []
    for size in sorted({round(points[i].N) for i in idx}):
        keep = [i for i in idx if round(points[i].N) != size]
        if _unfittable(points, keep) is None:
            out.append((next(points[i].N for i in idx if round(points[i].N) == size), _weights(len(points), keep)))
    return out


def _check_forms(forms) -> list[Form]:
    out = [get_form(f) for f in forms]
    if not out or any(f.inputs != "ND" for f in out):
        raise LmforgeError(f"form selection compares L(N, D) laws; got {', '.join(forms) or 'none'}")
    return out


def _select(points: list[Point], forms, n_starts: int, full: bool = False):
    """select_form's report, the splits, each form's parameters on each split and, with ``full``,
    on all the runs: the cold fits of one form all run as one batch."""
    splits = _splits(points)
    live = [s for s in splits if "skipped" not in s]
    n = len(points)
    report = {"best": None, "competitive": [], "backtests": {}, "forms": {}, "warnings": []}
    for s in splits:
        meta = {"axis": s["axis"], "skipped": s.get("skipped")}
        if "skipped" not in s:
            meta.update(held_out=[points[i].name for i in s["held"]], n_train=len(s["train"]),
                        reach=max(_beyond(points, i, s["train"])[s["axis"]] for i in s["held"]))
        report["backtests"][s["name"]] = meta
    split_thetas, full_thetas = {}, {}
    for form in _check_forms(forms):
        X, logL = _design(points, form)
        jobs = [(s["name"], _weights(n, s["train"]), st) for s in live
                for st in form.starts(X[:, s["train"]], logL[s["train"]], n_starts)]
        if full:
            jobs += [("", np.ones(n), st) for st in form.starts(X, logL, n_starts)]
        res = _run_batch(form, X, logL, jobs)
        split_thetas[form.name] = {s["name"]: _best(res[s["name"]]) for s in live}
        if full:
            full_thetas[form.name] = _polish(form, X, logL, _best(res[""]))
        per = {}
        for s in live:
            th = split_thetas[form.name][s["name"]]
            rows = []
            for i in s["held"]:
                p = points[i]
                pred = float(np.exp(form.log_pred(th, X[:, [i]])[0]))
                rows.append({"name": p.name, "N": p.N, "D": p.D, "C": p.C, "actual": p.loss, "predicted": pred,
                             "error_pct": 100 * (p.loss - pred) / p.loss, "log_error": math.log(p.loss / pred),
                             "beyond": _beyond(points, i, s["train"])})
            per[s["name"]] = {"mape": float(np.mean([abs(r["error_pct"]) for r in rows])), "points": rows}
        report["forms"][form.name] = {"mape": float(np.mean([b["mape"] for b in per.values()])) if per else None,
                                      "backtests": per}
    names = list(report["forms"])
    if live:
        scores = {f: report["forms"][f]["mape"] for f in names}
        best = min(names, key=lambda f: scores[f])
        report["best"] = best
        report["competitive"] = [f for f in names if scores[f] <= max(COMPETITIVE_RATIO * scores[best],
                                                                      scores[best] + COMPETITIVE_MARGIN)]
    else:
        report["best"], report["competitive"] = names[0], names
        report["warnings"].append(f"no backtest was possible ({'; '.join(s['skipped'] for s in splits)}): "
                                  f"{names[0]} is used untested, and every form stays in the interval")
    for s in splits:
        if "skipped" in s:
            report["warnings"].append(f"backtest {s['name']} skipped: {s['skipped']}")
    return report, splits, split_thetas, full_thetas


def select_form(points: list[Point], forms=("ND", "kaplan"), n_starts: int = 5) -> dict:
    """Choose the L(N, D) form that best predicts runs it was not fitted on.

    Two backtests: ``top_compute`` refits without the largest ~25% of runs by compute and
    predicts them; ``largest_N`` refits without every run of the largest model size and predicts
    them (skipped with fewer than 3 sizes). The best form has the lowest mean, over backtests,
    of the mean absolute percentage error; in-sample residuals play no part, since the more
    flexible form always wins those. Returns::

        {"best": "kaplan", "competitive": ["kaplan", "ND"],   # forms not clearly worse than the best
         "backtests": {"top_compute": {"axis": "C", "held_out": [names], "n_train": 9,
                                       "reach": 3.1,          # largest held-out C / largest fitted C
                                       "skipped": None}, "largest_N": {...}},
         "forms": {"ND": {"mape": 1.9, "backtests": {"top_compute": {"mape": 0.8, "points": [
                      {"name", "N", "D", "C", "actual", "predicted", "error_pct", "log_error",
                       "beyond": {"C": ratio, "N": ratio}}]}, ...}}, ...},
         "warnings": [...]}
    """
    _check_points(points, "ND")
    return _select(points, forms, n_starts)[0]


def _resid_sd(form: Form, theta, X, logL) -> float:
    """Scatter of a new run about the law: the RMS log residual, corrected for the parameters fitted."""
    r = form.log_pred(theta, X) - logL
    return float(np.sqrt(r @ r / max(len(r) - form.k, 1)))


def _spread(centre: float, boot, drops, alts) -> dict:
    """The log-space standard deviations behind an interval, but for the run scatter and the
    backtest terms; ``depths`` is None when fewer than two sizes could be left out."""
    boot = np.asarray(boot, dtype=float)
    drops = np.asarray(drops, dtype=float)
    g = len(drops)
    return {
        # a quantile half-range, not the SD: a few bootstrap refits land on a degenerate fit
        "bootstrap": float(np.subtract(*np.quantile(boot, [0.8413, 0.1587])) / 2) if len(boot) >= 2 else 0.0,
        # the grouped jackknife: (g - 1)/g times the squared spread of the g leave-one-size-out fits
        "depths": float(np.sqrt((g - 1) / g * np.sum((drops - drops.mean()) ** 2))) if g >= 2 else None,
        "forms": float(np.sqrt(np.mean((np.asarray(alts) - centre) ** 2))) if len(alts) else 0.0,
    }


def _sigma(parts: dict, resid: float, extra: float = 0.0) -> float:
    # The bootstrap and the size jackknife are two estimates of one thing, how far the fitted law
    # moves with the data it was given, so they are pooled, not added (added, they count it
    # twice). The bootstrap treats runs as independent; the jackknife also sees what one model
    # size shares across its runs (its own tuning, its own luck), which a real ladder has. A
    # jackknife over three or four sizes is a noisy, upward-skewed estimate, so the pooling is a
    # geometric mean: one inflated estimate does not set the width on its own.
    boot, depths = parts["bootstrap"], parts["depths"]
    fit_var = boot**2 if depths is None else boot * depths
    return float(np.sqrt(fit_var + parts["forms"] ** 2 + resid**2 + extra**2))


_AXIS = {"C": "compute", "N": "model size"}


def _excess(err, sd) -> float:
    """The log error a backtest saw beyond its intervals: mean(err^2 - sd^2) less its own
    standard error when the intervals are right (sd^2 * sqrt(2/n)), so that three or four runs
    missing by chance do not pass for a misfit; the root of what is left, or 0."""
    err, sd = np.asarray(err), np.asarray(sd)
    return float(np.sqrt(max(0.0, float(np.mean(err**2 - sd**2) - np.mean(sd**2) * math.sqrt(2 / len(err))))))


def _levels_key(level: float) -> str:
    return f"{int(round(level * 100))}%"


@dataclass
class CalibratedLaw:
    """Everything a forecast interval needs, fitted once and stored as JSON (see ``calibrate``)."""

    chosen: str
    competitive: list
    fits: dict  # form -> ScalingFit, each with its bootstrap parameter vectors
    depth_refits: list  # the chosen form refitted with each model size left out: [{"N", "theta"}]
    selection: dict  # select_form's report; the chosen form's backtest points also carry "sigma_log"
    backtests: dict  # name -> {"axis", "reach", "excess_log", "resolution_log", "skipped"}
    warnings: list = field(default_factory=list)

    def _form(self) -> Form:
        return get_form(self.chosen)

    def interval(self, N: float, D: float, C: float | None = None, levels=(0.8, 0.95)) -> dict:
        """Point forecast and central intervals for a run of N parameters and D tokens (C FLOPs).

        In log space the interval is centred on the chosen form's prediction, with a standard
        deviation that adds in quadrature: the bootstrap spread pooled (geometric mean) with the
        jackknife over model sizes; the spread of the other competitive forms' predictions; the
        scatter of runs about the law; and, for each backtest, its excess (the error it saw
        beyond what its own interval allowed) times w, the query's log-distance beyond the
        largest fitted value over the backtest's (on its axis: compute for ``top_compute``, N for
        ``largest_N``; 0 inside the fitted range). The first three are computed at the query
        itself, so they grow with distance on their own; a misfit of the form is only seen by
        the backtests, up to their reach, and is taken to grow in proportion to log-distance.
        Beyond the reach (w > 1) a misfit too small for the backtest to resolve (its intervals'
        width over the square root of its runs) grows too: ``resolution * (w - 1)`` is added,
        which is what widens a far extrapolation whose backtests looked clean.
        """
        C = C or 6.0 * N * D
        fit = self.fits[self.chosen]
        form = self._form()
        X = np.array([[math.log(N)], [math.log(D)]])
        centre = float(form.log_pred(fit._theta(), X)[0])
        preds = {f: self.fits[f].predict(N, D) for f in self.fits}
        parts = _spread(centre, [form.log_pred(np.asarray(b), X)[0] for b in fit.boot],
                        [form.log_pred(np.asarray(d["theta"]), X)[0] for d in self.depth_refits],
                        [math.log(preds[f]) for f in self.competitive if f != self.chosen])
        resid = fit.rmse_log * math.sqrt(fit.n_points / max(fit.n_points - form.k, 1))
        ext = {"N": N / fit.n_range[1], "D": D / fit.d_range[1], "C": C / fit.c_range[1]}
        widening, excess, beyond, warns = {}, 0.0, 0.0, list(self.warnings)
        for name, b in self.backtests.items():
            ax = b["axis"]
            far = math.log(max(ext[ax], 1.0))
            if b.get("skipped"):
                if far > 0:
                    warns.append(f"the query is {ext[ax]:.3g}x the largest fitted {_AXIS[ax]}, and no backtest "
                                 f"measured how far off the law gets when extrapolating in {ax} ({b['skipped']}); "
                                 "the interval leaves that error out")
                continue
            reach = math.log(b["reach"])
            w = far / reach if reach > 0 else 1.0
            widening[ax] = w
            excess += (b["excess_log"] * w) ** 2
            if w > 1:
                beyond += (b["resolution_log"] * (w - 1)) ** 2
                warns.append(f"the query is {ext[ax]:.3g}x the largest fitted {_AXIS[ax]}, but the {name} backtest "
                             f"reached only {b['reach']:.3g}x: the interval grows that backtest's error {w:.2g}-fold "
                             "(the ratio of log-distances) and allows for misfit it was too small to see, but nothing "
                             "has tested the law that far out")
        sigma = _sigma(parts, resid, math.sqrt(excess + beyond))
        at_reach = _sigma(parts, resid, math.sqrt(sum((b["excess_log"] * min(widening.get(b["axis"], 0.0), 1.0)) ** 2
                                                      for b in self.backtests.values() if not b.get("skipped"))))
        out = {"form": self.chosen, "loss": math.exp(centre)}
        for level in levels:
            z = float(norm.ppf(0.5 + level / 2))
            out[_levels_key(level)] = (math.exp(centre - z * sigma), math.exp(centre + z * sigma))
        out.update(sigma_log=sigma, components={**parts, "residual": resid, "backtest_excess": math.sqrt(excess),
                                                "beyond_backtests": math.sqrt(beyond)},
                   forms=preds, competitive=list(self.competitive),
                   depth_refits=[{"N": d["N"], "loss": float(np.exp(form.log_pred(np.asarray(d["theta"]), X)[0]))}
                                 for d in self.depth_refits],
                   backtest_coverage=self.coverage(levels), widening=widening,
                   widening_factor=sigma / at_reach if at_reach > 0 else 1.0, extrapolation=ext, warnings=warns)
        return out

    def coverage(self, levels=(0.8, 0.95)) -> dict:
        """How often each backtest's own interval (built, like the forecast's, from the runs it kept,
        before any backtest term) held the run it predicted: {"80%": fraction or None, ..., "n": runs}."""
        pts = [p for b in self.selection["forms"][self.chosen]["backtests"].values() for p in b["points"]
               if "sigma_log" in p]
        out = {}
        for level in levels:
            z = float(norm.ppf(0.5 + level / 2))
            out[_levels_key(level)] = (float(np.mean([abs(p["log_error"]) <= z * p["sigma_log"] for p in pts]))
                                       if pts else None)
        out["n"] = len(pts)
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["fits"] = {f: fit.to_json() for f, fit in self.fits.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CalibratedLaw":
        d = dict(d)
        d["fits"] = {f: ScalingFit.from_json(v) for f, v in d["fits"].items()}
        return cls(**d)


def calibrate(points: list[Point], forms=("ND", "kaplan"), n_boot: int = 100, n_boot_backtest: int = 30,
              n_starts: int = 5, seed: int = 0) -> CalibratedLaw:
    """Fit every form, choose one by backtest (``select_form``), and measure how far off the
    chosen form's intervals were on the backtests, for ``CalibratedLaw.interval`` to use.

    Each backtest builds the interval the forecast would have, from the runs it kept (bootstrap
    of ``n_boot_backtest`` refits, size jackknife, competitive forms, residual scatter), and
    records each held-out run's log error and that interval's standard deviation (``sigma_log``
    on the chosen form's points in ``selection``). The error beyond those SDs is the backtest's
    excess (``_excess``): zero when the intervals held, the form's misfit when they did not.
    Competitive forms get ``n_boot`` bootstrap refits each; a clearly worse form is fitted once,
    for the record, since the interval does not use it.
    """
    _check_points(points, "ND")
    report, splits, split_thetas, full_thetas = _select(points, forms, n_starts, full=True)
    chosen, competitive = report["best"], report["competitive"]
    live = [s for s in splits if "skipped" not in s]
    n = len(points)
    fits, res = {}, {}
    for name, theta in full_thetas.items():
        form = get_form(name)
        X, logL = _design(points, form)
        # every warm-started refit of this form in one batch: the bootstrap (of the forms the
        # interval uses), and for the chosen form the size jackknife and each backtest's own
        # bootstrap and jackknife
        jobs = [("boot", c, theta) for c in _boot_counts(n, n_boot if name in competitive else 0, seed)]
        if name == chosen:
            jobs += [(("drop", N), c, theta) for N, c in _size_drops(points, range(n))]
            for s in live:
                tr, th = s["train"], split_thetas[name][s["name"]]
                for c in _boot_counts(len(tr), n_boot_backtest, seed):
                    w = np.zeros(n)
                    w[tr] = c
                    jobs.append((("boot", s["name"]), w, th))
                jobs += [(("drop", s["name"], N), c, th) for N, c in _size_drops(points, tr)]
        res[name] = _run_batch(form, X, logL, jobs)
        fits[name] = _make_fit(form, points, X, logL, theta, [r[0] for r in res[name].get("boot", [])])
    form = get_form(chosen)
    X, logL = _design(points, form)
    res = res[chosen]
    drops = [{"N": key[1], "theta": list(map(float, r[0][0]))} for key, r in res.items()
             if key[0] == "drop" and len(key) == 2]
    backtests = {}
    for s in splits:
        if "skipped" in s:
            backtests[s["name"]] = {"axis": s["axis"], "reach": None, "excess_log": None, "resolution_log": None,
                                    "skipped": s["skipped"]}
            continue
        tr, th = s["train"], split_thetas[chosen][s["name"]]
        boot = [r[0] for r in res.get(("boot", s["name"]), [])]
        sub_drops = [r[0][0] for key, r in res.items() if key[0] == "drop" and len(key) == 3 and key[1] == s["name"]]
        resid = _resid_sd(form, th, X[:, tr], logL[tr])
        errs = []
        for i, row in zip(s["held"], report["forms"][chosen]["backtests"][s["name"]]["points"]):
            Xi = X[:, [i]]
            centre = float(form.log_pred(th, Xi)[0])
            alts = [get_form(f).log_pred(split_thetas[f][s["name"]], Xi)[0] for f in competitive if f != chosen]
            parts = _spread(centre, [form.log_pred(b, Xi)[0] for b in boot],
                            [form.log_pred(d, Xi)[0] for d in sub_drops], alts)
            row["sigma_log"] = _sigma(parts, resid)
            errs.append((row["log_error"], row["sigma_log"]))
        e, sd = np.array(errs).T
        backtests[s["name"]] = {"axis": s["axis"], "reach": report["backtests"][s["name"]]["reach"],
                                "excess_log": _excess(e, sd),
                                # the smallest mean misfit its n runs could have told from noise
                                "resolution_log": float(np.sqrt(np.mean(sd**2) / len(sd))), "skipped": None}
    warns = list(report["warnings"]) + [f"{chosen}: {w}" for w in fits[chosen].warnings]
    return CalibratedLaw(chosen, competitive, fits, drops, report, backtests, warns)


def forecast_interval(points: list[Point], N: float, D: float, C: float | None = None, levels=(0.8, 0.95),
                      forms=("ND", "kaplan"), n_boot: int = 100, seed: int = 0) -> dict:
    """``calibrate(points).interval(N, D, C, levels)``: the forecast for one run, from scratch.

    Returns {"form", "loss", "80%": (lo, hi), "95%": (lo, hi), "sigma_log", "components": {
    "bootstrap", "depths", "forms", "residual", "backtest_excess", "beyond_backtests"} (log-space
    SDs; depths None without three sizes), "forms": {form: prediction}, "competitive",
    "depth_refits": [{"N", "loss"}], "backtest_coverage": {"80%", "95%", "n"}, "widening": {axis:
    w} (query log-distance over the backtest's), "widening_factor" (sigma over sigma had the
    query been no further out than the backtests), "extrapolation": {"N", "D", "C"} (ratios to
    the largest fitted), "warnings"}. To forecast again without refitting, keep
    ``calibrate(points).to_json()`` and call ``CalibratedLaw.from_json(d).interval(...)``.
    """
    return calibrate(points, forms, n_boot=n_boot, seed=seed).interval(N, D, C, levels)

"""The functional forms a scaling law can take, as a registry the fitter works through.

Each form gives log L and its Jacobian in a parameterisation chosen for the optimiser (scales
in log space, so every prediction is a log-sum-exp), the bounds of that parameterisation, the
conversion to and from the published parameters, and its starting points.

- ``ND``: ``L = E + A/N^alpha + B/D^beta`` (Hoffmann et al. 2022). Additive, so the loss gap
  between two model sizes is the same at every token count.
- ``kaplan``: ``L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D`` (Kaplan et al. 2020). The size
  term is raised with the data term, so the gap between sizes grows with D: a small model
  starves for capacity sooner. No irreducible term: the law tends to a pure power law in N at
  large D. The variant with an irreducible term, ``E + [...]^alpha_D``, was tried on the
  recorded two-depth ladder (docs/scaling.md): it fitted no better than the pure form (log
  residual RMS 0.61% against 0.59%) and sent alpha_N to 7, a fifth parameter a small ladder
  cannot pin down. The pure form is kept; where the data bend towards a floor, ``ND`` has one,
  and the backtests choose between them.
- ``C``: ``L = a*C^b + c`` in compute alone.

Starting points come from variable projection: on a grid of exponents the law is linear in its
scale parameters, which a non-negative least-squares solve (on relative residuals, close to the
log residuals the fit minimises) settles exactly. The best few of those seed the local fit, so
a handful of local searches covers what a blind grid over every parameter needs hundreds for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lmforge.errors import LmforgeError

# Scale parameters whose NNLS coefficient is zero start on their lower bound instead of at log 0.
_TINY = 1e-300


def lse(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(sum(exp(terms))) over axis 0 and each term's share of the sum (its gradient).

    Written out rather than taken from scipy: the fitter calls it hundreds of thousands of times
    on a dozen points, where scipy's argument handling costs more than the arithmetic."""
    m = terms.max(axis=0)
    ex = np.exp(terms - m)
    s = ex.sum(axis=0)
    return m + np.log(s), ex / s


def lse2(t0, t1) -> tuple[np.ndarray, np.ndarray]:
    """``lse`` of two terms, and the first term's share (the second's is one minus it)."""
    d = t0 - t1
    e = np.exp(-np.abs(d))
    share0 = np.where(d >= 0, 1.0, e) / (1.0 + e)
    return np.maximum(t0, t1) + np.log1p(e), share0


@dataclass(frozen=True)
class Form:
    name: str
    inputs: str  # "ND": the law reads log N and log D; "C": log C
    params: tuple  # published parameter names, in the order ScalingFit.params stores them
    coords: tuple  # names of the fitted coordinates, for warnings
    bounds: tuple  # (lo, hi) for each fitted coordinate
    # (theta, X) -> (log L, d log L / d theta with shape (k, n)); a batch of B laws at once when
    # theta has shape (k, B, 1): then (B, n) and (k, B, n)
    pred_jac: Callable
    to_params: Callable  # theta -> published parameters
    to_theta: Callable  # published parameters -> theta
    exponent_grid: Callable  # (X, logL) -> array (G, e) of exponents to project on
    project: Callable  # (exponents (G, e), X, logL) -> thetas (G, k), the scale parameters solved for

    @property
    def k(self) -> int:
        return len(self.bounds)

    def log_pred(self, theta, X) -> np.ndarray:
        return self.pred_jac(np.asarray(theta, dtype=float), X)[0]

    def clip(self, theta) -> np.ndarray:
        lo, hi = np.array(self.bounds).T
        return np.clip(np.asarray(theta, dtype=float), lo, hi)

    def starts(self, X, logL, n: int) -> list[np.ndarray]:
        """The ``n`` best projected starting points, by squared log residual."""
        thetas = self.clip(self.project(np.asarray(self.exponent_grid(X, logL), dtype=float), X, logL))
        r = self.log_pred(thetas.T[:, :, None], X) - logL
        score = np.where(np.isfinite(r).all(axis=1), np.sum(r * r, axis=1), np.inf)
        return [thetas[i] for i in np.argsort(score, kind="stable")[:n] if np.isfinite(score[i])]


def _solve_scales(cols: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative c_j with sum_j c_j exp(cols[g, j]) ~= exp(target[g]) in relative terms, for
    every grid point g at once; returns log c with shape (G, m).

    Every column is divided by its run's target (so residuals are relative) and rescaled by its
    own maximum: the raw features can span 100 orders of magnitude. With two or three columns
    the non-negative least-squares optimum is the best of the plain least-squares solutions on
    each subset of columns whose coefficients all come out non-negative, so every subset is
    solved for the whole grid in one batched call."""
    z = cols - np.asarray(target)[..., None, :]
    zmax = z.max(axis=2)
    A = np.exp(z - zmax[..., None]).transpose(0, 2, 1)  # (G, n, m)
    G, n, m = A.shape
    best, best_res = np.zeros((G, m)), np.full(G, np.inf)
    for size in range(1, m + 1):
        for S in map(list, itertools.combinations(range(m), size)):
            As = A[:, :, S]
            M = As.transpose(0, 2, 1) @ As
            M += 1e-12 * np.trace(M, axis1=1, axis2=2)[:, None, None] * np.eye(size)
            c = np.linalg.solve(M, As.sum(axis=1)[..., None])[..., 0]
            res = np.sum(((As @ c[..., None])[..., 0] - 1.0) ** 2, axis=1)
            take = (c >= 0).all(axis=1) & (res < best_res)
            full = np.zeros((G, m))
            full[:, S] = c
            best[take], best_res[take] = full[take], res[take]
    return np.log(np.maximum(best, _TINY)) - zmax


# --- L = E + A/N^alpha + B/D^beta; theta = (log A, log B, log E, alpha, beta) ---

def _nd_pred_jac(theta, X):
    a, b, e, alpha, beta = theta
    logN, logD = X
    s, w = lse(np.stack([a - alpha * logN, b - beta * logD, e + np.zeros_like(logN)]))
    return s, np.stack([w[0], w[1], w[2], -w[0] * logN, -w[1] * logD])


def _nd_project(ex, X, logL):
    logN, logD = X
    alpha, beta = ex[:, :1], ex[:, 1:]
    cols = np.stack([-alpha * logN, -beta * logD, np.zeros((len(ex), len(logN)))], axis=1)
    return np.column_stack([_solve_scales(cols, logL), ex])


def _nd_to_params(theta) -> dict:
    a, b, e, alpha, beta = map(float, theta)
    return {"A": float(np.exp(a)), "B": float(np.exp(b)), "E": float(np.exp(e)), "alpha": alpha, "beta": beta}


def _nd_to_theta(p) -> list:
    return [float(np.log(p["A"])), float(np.log(p["B"])), float(np.log(p["E"])), p["alpha"], p["beta"]]


_EXPONENTS = np.geomspace(0.03, 1.5, 12)

ND = Form("ND", "ND", ("A", "B", "E", "alpha", "beta"), ("log A", "log B", "log E", "alpha", "beta"),
          ((-5.0, 40.0), (-5.0, 40.0), (-5.0, 3.0), (0.01, 2.0), (0.01, 2.0)),
          _nd_pred_jac, _nd_to_params, _nd_to_theta,
          lambda X, logL: list(itertools.product(_EXPONENTS, _EXPONENTS)), _nd_project)


# --- L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D ---
# theta = (p log N_c, log D_c, p, alpha_D) with p = alpha_N/alpha_D: inside the bracket both
# terms are then linear in log N and log D, as in ND, and N_c and p do not trade off against
# each other through a product the optimiser has to untangle.

def _kaplan_pred_jac(theta, X):
    c1, c2, p, ad = theta
    logN, logD = X
    s, u0 = lse2(c1 - p * logN, c2 - logD)
    au0 = ad * u0
    return ad * s, np.stack([au0, ad - au0, -au0 * logN, s])


def _kaplan_project(ex, X, logL):
    # L^(1/alpha_D) = K1 N^-p + K2 / D is linear in K1 = N_c^p and K2 = D_c.
    logN, logD = X
    p, ad = ex[:, :1], ex[:, 1:]
    cols = np.stack([-p * logN, np.broadcast_to(-logD, (len(ex), len(logD)))], axis=1)
    return np.column_stack([_solve_scales(cols, logL / ad), ex])


def _kaplan_to_params(theta) -> dict:
    c1, c2, p, ad = map(float, theta)
    with np.errstate(over="ignore"):  # a tiny alpha_N/alpha_D puts N_c past float range: inf, reported as such
        return {"N_c": float(np.exp(c1 / p)), "D_c": float(np.exp(c2)), "alpha_N": p * ad, "alpha_D": ad}


def _kaplan_to_theta(q) -> list:
    p = q["alpha_N"] / q["alpha_D"]
    return [p * float(np.log(q["N_c"])), float(np.log(q["D_c"])), p, q["alpha_D"]]


KAPLAN = Form("kaplan", "ND", ("N_c", "D_c", "alpha_N", "alpha_D"),
              ("p*log N_c", "log D_c", "alpha_N/alpha_D", "alpha_D"),
              # a small alpha_D needs a large bracket (log L / alpha_D), hence the wide scale bounds
              ((-20.0, 400.0), (-20.0, 400.0), (0.02, 20.0), (0.005, 2.0)),
              _kaplan_pred_jac, _kaplan_to_params, _kaplan_to_theta,
              lambda X, logL: list(itertools.product(np.geomspace(0.1, 10.0, 11), np.geomspace(0.01, 1.0, 12))),
              _kaplan_project)


# --- L = a*C^b + c; theta = (log a, b, log c) ---

def _c_pred_jac(theta, X):
    la, b, lc = theta
    (logC,) = X
    s, w0 = lse2(la + b * logC, lc + np.zeros_like(logC))
    return s, np.stack([w0, w0 * logC, 1.0 - w0])


def _c_project(ex, X, logL):
    (logC,) = X
    b = ex[:, :1]
    la, lc = _solve_scales(np.stack([b * logC, np.zeros((len(ex), len(logC)))], axis=1), logL).T
    return np.column_stack([la, ex[:, 0], lc])


C_FORM = Form("C", "C", ("a", "b", "c"), ("log a", "b", "log c"), ((-10.0, 80.0), (-1.5, -0.005), (-5.0, 3.0)),
              _c_pred_jac,
              lambda th: {"a": float(np.exp(th[0])), "b": float(th[1]), "c": float(np.exp(th[2]))},
              lambda q: [float(np.log(q["a"])), q["b"], float(np.log(q["c"]))],
              lambda X, logL: -np.geomspace(0.005, 1.5, 24)[:, None], _c_project)

FORMS = {f.name: f for f in (ND, KAPLAN, C_FORM)}


def get_form(name: str) -> Form:
    try:
        return FORMS[name]
    except KeyError:
        raise LmforgeError(f"unknown scaling-law form {name!r}; known: {', '.join(FORMS)}") from None

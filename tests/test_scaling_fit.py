import math

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.scaling.fit import Point, ScalingFit, compute_optimal, fit_c, fit_nd

TRUE = dict(A=400.0, B=2000.0, E=1.7, alpha=0.34, beta=0.28)


def law(N, D, p=TRUE):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def synthetic(noise=0.003, seed=0):
    rng = np.random.default_rng(seed)
    pts = []
    for N in [1e6, 3e6, 1e7, 3e7, 1e8]:
        for mult in [1, 2, 5, 10, 20]:
            D = 20 * N * mult
            pts.append(Point(N=N, D=D, loss=law(N, D) * math.exp(rng.normal(0, noise)), name=f"N{N:.0e}x{mult}"))
    return pts


def test_fit_recovers_known_parameters():
    fit = fit_nd(synthetic(), n_boot=30)
    p = fit.params
    assert p["E"] == pytest.approx(TRUE["E"], rel=0.05)
    assert p["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
    assert p["beta"] == pytest.approx(TRUE["beta"], abs=0.05)
    # extrapolation 10x beyond the largest run stays accurate
    N, D = 1e9, 2e10
    assert fit.predict(N, D) == pytest.approx(law(N, D), rel=0.01)
    iv = fit.interval(N, D)
    assert iv["95%"][0] <= iv["80%"][0] <= iv["loss"] <= iv["80%"][1] <= iv["95%"][1]
    assert all(v > 0 for v in fit.stderr.values())
    assert fit.rmse_log < 0.01 and not any("poor fit" in w for w in fit.warnings)


def test_fit_is_exact_without_noise():
    fit = fit_nd(synthetic(noise=0.0), n_boot=0)
    for k, v in TRUE.items():
        assert fit.params[k] == pytest.approx(v, rel=0.02), k


def test_compute_only_fit():
    pts = [Point(N=0, D=0, C=C, loss=1.8 + 50.0 * C ** -0.12) for C in np.logspace(15, 19, 8)]
    fit = fit_c(pts, n_boot=20)
    assert fit.params["b"] == pytest.approx(-0.12, abs=0.01)
    assert fit.params["c"] == pytest.approx(1.8, rel=0.03)
    assert fit.predict(C=1e20) == pytest.approx(1.8 + 50.0 * 1e20 ** -0.12, rel=0.005)


def test_compute_optimal_satisfies_first_order_condition():
    fit = fit_nd(synthetic(noise=0.0), n_boot=0)
    C = 1e21
    opt = compute_optimal(fit, C)
    assert 6 * opt["N"] * opt["D"] == pytest.approx(C, rel=1e-9)
    p = fit.params
    # dL/dN along D = C/(6N) vanishes: alpha*A/N^alpha == beta*B/D^beta
    assert p["alpha"] * p["A"] / opt["N"] ** p["alpha"] == pytest.approx(p["beta"] * p["B"] / opt["D"] ** p["beta"], rel=1e-6)
    # and it is a minimum: nearby allocations of the same compute do worse
    for f in (0.8, 1.25):
        N = opt["N"] * f
        assert fit.predict(N, C / 6 / N) > opt["loss"]


@pytest.mark.parametrize("case, needle", [
    ("few", "at least 5 finished runs"),
    ("same_size", "same model size"),
    ("nan", "NaN or non-positive final loss"),
])
def test_degenerate_input_is_refused(case, needle):
    pts = synthetic()
    if case == "few":
        pts = pts[:4]
    elif case == "same_size":
        pts = [p for p in pts if p.N == 1e7]
    else:
        pts[3].loss = float("nan")
    with pytest.raises(LmforgeError, match=needle):
        fit_nd(pts, n_boot=0)


def test_parameter_on_bound_and_poor_fit_warn():
    rng = np.random.default_rng(1)
    pts = [Point(N=N, D=20 * N * m, loss=3.0 + rng.normal(0, 0.3)) for N in [1e6, 1e7, 1e8] for m in [1, 5]]
    fit = fit_nd(pts, n_boot=0)
    assert any("bound" in w for w in fit.warnings)
    assert any("poor fit" in w for w in fit.warnings)


def test_json_round_trip():
    fit = fit_nd(synthetic(), n_boot=5)
    again = ScalingFit.from_json(fit.to_json())
    assert again.predict(1e9, 1e10) == fit.predict(1e9, 1e10)
    assert again.interval(1e9, 1e10) == fit.interval(1e9, 1e10)


def test_backtest_holds_out_the_largest_runs():
    from lmforge.scaling.fit import backtest

    pts = synthetic(noise=0.0)
    bt = backtest(pts, holdout=2)
    largest = sorted(pts, key=lambda p: p.C)[-2:]
    assert [b["name"] for b in bt] == [p.name for p in largest]
    for b in bt:
        assert b["compute_vs_fitted"] >= 1 and abs(b["error_pct"]) < 0.5
    # a law that bends away from the ladder shows up as a backtest error
    bent = [Point(N=p.N, D=p.D, loss=p.loss * (1.1 if p in largest else 1.0), name=p.name) for p in pts]
    assert all(b["error_pct"] > 5 for b in backtest(bent, holdout=2))

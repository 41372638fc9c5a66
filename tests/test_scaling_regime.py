"""The tail check: a loss curve is on its power-law tail once its log-log slope only falls."""

import math

import pytest

from lmforge.scaling.regime import log_anchors, slopes, tail_onset


def power_law(tokens, E=1.8, B=40.0, b=0.3):
    return E + B * tokens ** -b


def grid(lo=1e5, hi=2e7, n=48):
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def test_a_pure_power_law_is_on_its_tail_from_the_start():
    curve = [(t, power_law(t)) for t in grid()]
    out = tail_onset(curve)
    assert out["onset_tokens"] == curve[0][0]
    assert all(b <= a for a, b in zip(out["slopes"], out["slopes"][1:]))


def with_drop(t, at=4e6, width=0.35, depth=0.6):
    """A plateau that drops by ``depth`` nats around ``at`` tokens (a logistic in log tokens), then the tail."""
    return power_law(t) + depth / (1 + math.exp((math.log(t) - math.log(at)) / width * 4))


def test_a_late_drop_moves_the_onset_past_it():
    curve = [(t, with_drop(t)) for t in grid()]
    out = tail_onset(curve)
    assert out["onset_tokens"] is not None
    assert 4e6 < out["onset_tokens"] < 1.2e7, out["reason"]
    # From the onset on the slope only falls.
    k = [t for t, _ in out["anchors"]].index(out["onset_tokens"])
    tail = out["slopes"][k:]
    assert all(b <= a for a, b in zip(tail, tail[1:]))


def test_a_curve_still_steepening_at_its_end_has_no_onset():
    curve = [(t, with_drop(t, at=2.2e7)) for t in grid()]
    out = tail_onset(curve)
    assert out["onset_tokens"] is None
    assert "train the pilot longer" in out["reason"]


def test_the_warmup_is_ignored():
    curve = [(t, with_drop(t, at=4e6)) for t in grid()]
    # A warmup bump at the start (loss rising for a moment) must not count as the last rise.
    curve[1] = (curve[1][0], curve[0][1] + 0.5)
    assert tail_onset(curve, after_tokens=1e6)["onset_tokens"] == tail_onset(
        [c for c in curve if c[0] >= 1e6])["onset_tokens"]


def test_anchors_are_half_a_doubling_apart_and_slopes_match_a_known_power():
    curve = [(t, 5.0 * t ** -0.25) for t in grid(1e5, 1e7, 200)]
    a = log_anchors(curve)
    assert all(t1 >= t0 * math.sqrt(2) for (t0, _), (t1, _) in zip(a, a[1:]))
    assert slopes(a) == pytest.approx([0.25] * (len(a) - 1), rel=1e-9)


def test_too_short_a_curve_is_an_error():
    with pytest.raises(ValueError, match="evaluate more often"):
        tail_onset([(1e5, 5.0), (2e5, 4.0)])

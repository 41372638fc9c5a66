"""Is a loss curve on its power-law tail yet?

A scaling law ``L = E + A/N^a + B/D^b`` describes the smooth tail of training. Small models on
code reach it late: their loss first sits on a plateau, then drops steeply when they learn to
copy from their context, and only then bends smoothly. Rungs that stop before the drop forecast
a target that went through it far too pessimistically (docs/scaling.md, the second experiment).

On a power-law tail the local log-log slope ``g = -dlnL/dlnD`` only falls as D grows (the loss
approaches its floor). A rise in ``g`` means the curve is steepening: a transition, not a tail.
:func:`tail_onset` reads a val curve taken at constant learning rate and says where the last
rise ended, which is where a rung's budget has to start.
"""

from __future__ import annotations

import math

RATIO = math.sqrt(2.0)  # anchors half a doubling apart: long enough to average out eval noise
RISE = 0.10  # a slope 10% above the one before it counts as steepening


def log_anchors(curve: list[tuple[float, float]], ratio: float = RATIO) -> list[tuple[float, float]]:
    """Points of ``curve`` (tokens, loss) thinned to roughly geometric spacing by ``ratio``."""
    pts = sorted((float(t), float(v)) for t, v in curve if t > 0 and v > 0)
    out = pts[:1]
    for t, v in pts[1:]:
        if t >= out[-1][0] * ratio:
            out.append((t, v))
    return out


def slopes(anchors: list[tuple[float, float]]) -> list[float]:
    """The local log-log slope ``-dlnL/dlnD`` between consecutive anchors."""
    return [-(math.log(v1) - math.log(v0)) / (math.log(t1) - math.log(t0))
            for (t0, v0), (t1, v1) in zip(anchors, anchors[1:])]


def tail_onset(curve: list[tuple[float, float]], after_tokens: float = 0.0, rise: float = RISE) -> dict:
    """Where the curve's last steepening ended: the tokens from which its slope only falls.

    ``curve``: (tokens, val loss) from one run at constant learning rate. ``after_tokens``: ignore
    the curve before this (the warmup). Returns ``onset_tokens`` (None when the curve was still
    steepening at its end, so the pilot was too short), the anchors' ``slopes`` and a ``reason``.
    """
    anchors = log_anchors([(t, v) for t, v in curve if t >= after_tokens])
    if len(anchors) < 4:
        raise ValueError(f"a val curve with {len(anchors)} points half a doubling apart cannot show its tail; "
                         "evaluate more often or train longer")
    g = slopes(anchors)
    rises = [k for k in range(1, len(g)) if g[k] > g[k - 1] * (1 + rise) and g[k] > 0]
    if not rises:
        return {"onset_tokens": anchors[0][0], "slopes": g, "anchors": anchors,
                "reason": "the slope falls from the first point on: already on the tail"}
    k = rises[-1]
    while k + 1 < len(g) and g[k + 1] >= g[k]:  # climb to the top of the last rise
        k += 1
    # The tail starts once the slope has fallen back by as much as a rise must climb; a slope that
    # merely stops rising at the end of the curve may still be in the middle of the drop.
    settled = next((j for j in range(k + 1, len(g)) if g[j] * (1 + rise) <= g[k]), None)
    if settled is None:
        return {"onset_tokens": None, "slopes": g, "anchors": anchors,
                "reason": f"still steep at {anchors[-1][0]:.3g} tokens, the end of the curve (slope {g[-1]:.3f}, "
                          f"steepest {g[k]:.3f}): train the pilot longer"}
    return {"onset_tokens": anchors[settled][0], "slopes": g, "anchors": anchors,
            "reason": f"steepest at {anchors[k][0]:.3g}-{anchors[k + 1][0]:.3g} tokens (slope {g[k]:.3f}), "
                      f"{g[settled]:.3f} from {anchors[settled][0]:.3g}"}

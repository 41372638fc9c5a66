"""The ladder designed from its targets keeps every rule in docs/scaling.md, "Designing the ladder"."""

import math

import pytest

from lmforge.errors import LmforgeError
from lmforge.model.model import ModelConfig, param_counts
from lmforge.scaling.design import design_ladder, pick_target_depths, smallest_feasible
from lmforge.scaling.ladder import LadderConfig, plan_ladder

VOCAB = 4096


def family(**kw):
    return LadderConfig(**{"aspect": 32, "precision": "fp32", "warmup_frac": 0.0, **kw})


@pytest.mark.parametrize("targets, depths", [([2.5e14, 4.2e14], [3, 4]), ([1e15, 3e15], None), ([6e14, 1.5e15], [3, 5])])
def test_designed_ladder_keeps_the_rules(targets, depths):
    d = design_ladder(targets, family(), VOCAB, max_tokens=1e9, target_depths=depths)
    rungs = plan_ladder(d["ladder"], "unused", VOCAB)
    t_depths = [t["depth"] for t in d["targets"]]
    ladder_depths = sorted({r["depth"] for r in rungs})
    # three or more depths that bracket the targets, each target's own depth among them
    assert len(ladder_depths) >= 3 and set(t_depths) <= set(ladder_depths)
    assert min(ladder_depths) < min(t_depths) and max(ladder_depths) >= max(t_depths)
    # three budgets per depth, each rung trained for the minimum steps, the budgets spanning 2x or more
    for depth in ladder_depths:
        mine = sorted(r["D"] for r in rungs if r["depth"] == depth)
        assert len(mine) == 3 and mine[-1] >= 1.9 * mine[0]
    assert min(r["steps"] for r in rungs) >= 200
    # compute: each rung under 1/10 and the ladder under 1/3 of the smallest target
    assert max(r["flops"] for r in rungs) <= min(targets) / 10 and max(r["flops"] for r in rungs) <= max(targets) / 25
    assert sum(r["flops"] for r in rungs) <= min(targets) / 3
    # each target spends its budget (to a whole step) on the size rules' batch and the one warmup rule
    for t, C in zip(d["targets"], targets):
        assert t["flops"] == pytest.approx(C, rel=0.01)
        assert t["warmup_steps"] == 200 and t["D"] == t["steps"] * t["batch_size"] * 256
    assert all(r["warmup_steps"] == min(200, r["steps"] // 2) for r in rungs)


def test_target_depths_nearest_twenty_tokens_per_param_and_distinct():
    cfg = family()
    picked = pick_target_depths([1e15, 1e15], cfg, VOCAB, max_tokens=1e12)
    assert len(set(picked)) == 2

    def ratio(depth, C):
        from lmforge.model.model import flops_per_token
        m = ModelConfig(depth=depth, aspect=32, vocab_size=VOCAB, context=256)
        return C / flops_per_token(m) / param_counts(m)["non_embedding"]

    first = picked[0]
    dist = lambda d: abs(math.log(ratio(d, 1e15) / 20))  # noqa: E731
    assert all(dist(first) <= dist(d) for d in range(2, 30))
    # one epoch at most: with little data the target moves to a deeper model that needs fewer tokens
    short = pick_target_depths([1e15], cfg, VOCAB, max_tokens=1e15 / 3e7)
    assert short[0] > first


def test_auto_depths_move_shallower_when_the_ladder_cannot_keep_the_rules():
    d = design_ladder([2.5e14, 4.2e14], family(), VOCAB, max_tokens=1e9)
    assert [t["depth"] for t in d["targets"]] == [3, 4]
    assert "moved to [3, 4]" in d["notes"][0]


def test_targets_too_small_get_an_error_that_says_what_to_do():
    with pytest.raises(LmforgeError, match="raise --target-flops"):
        design_ladder([1e13, 2e13], family(), VOCAB, max_tokens=1e9, target_depths=[3, 4])
    with pytest.raises(LmforgeError, match="--target-flops"):
        design_ladder([], family(), VOCAB, max_tokens=1e9)
    with pytest.raises(LmforgeError, match="distinct depth"):
        design_ladder([1e15, 2e15], family(), VOCAB, max_tokens=1e9, target_depths=[4, 4])


def test_min_tokens_keeps_every_rung_on_the_tail_and_the_pilot_inside_the_ladder_budget():
    onset, pilot = 3e6, 1.2e13
    d = design_ladder([1.5e15, 2.5e15], family(), VOCAB, max_tokens=1e10, target_depths=[3, 4], min_tokens=onset,
                      reserved=pilot)
    rungs = plan_ladder(d["ladder"], "unused", VOCAB)
    assert min(r["D"] for r in rungs) >= onset
    assert sum(r["flops"] for r in rungs) + pilot <= 1.5e15 / 3
    # The same targets without the floor start their rungs far lower.
    free = plan_ladder(design_ladder([1.5e15, 2.5e15], family(), VOCAB, max_tokens=1e10, target_depths=[3, 4])["ladder"],
                       "unused", VOCAB)
    assert min(r["D"] for r in free) < onset / 4


def test_smallest_feasible_scales_the_targets_until_the_rules_hold():
    targets = [2.5e14, 4.2e14]
    with pytest.raises(LmforgeError, match="tokens \\(where the loss curve reaches its tail\\)"):
        design_ladder(targets, family(), VOCAB, max_tokens=1e10, target_depths=[3, 4], min_tokens=4e6)
    scale, d = smallest_feasible(targets, family(), VOCAB, max_tokens=1e10, target_depths=[3, 4], min_tokens=4e6)
    assert scale > 1
    assert [t["flops"] for t in d["targets"]] == pytest.approx([c * scale for c in targets], rel=0.01)
    with pytest.raises(LmforgeError):  # one step smaller does not keep the rules
        design_ladder([c * scale / 1.25 for c in targets], family(), VOCAB, max_tokens=1e10, target_depths=[3, 4],
                      min_tokens=4e6)
    assert smallest_feasible(targets, family(), VOCAB, max_tokens=1e10, target_depths=[3, 4], min_tokens=4e6,
                             max_scale=2) is None

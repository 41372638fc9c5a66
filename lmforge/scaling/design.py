"""Design a ladder from the targets it must forecast (docs/scaling.md, "Designing the ladder").

The rules, in order:

1. **Target depths.** A target given only its compute gets the depth on the dial whose run
   of that compute sees the nearest to 20 tokens per parameter (in log distance), within one
   epoch of the data. Targets share no depth: a later target moves to the nearest free one.
2. **Depths bracket the targets' N.** The ladder holds every depth from one below the
   shallowest target (never below 2; depth 1 has a different loss curve) to one above the
   deepest, so each target's own depth is measured, at small D. The depth above is dropped
   when its smallest budget cannot be trained for ``min_steps`` under the rung cap (the
   targets are then bracketed from below and at their own depth, and the design says so).
3. **Budgets.** Each depth gets ``per_depth`` token budgets, evenly spaced in log from
   ``min_steps`` steps up to the rung cap, spanning at least ``min_span`` (2x); a depth whose
   cap allows less cannot be used. The shallow depths, cheap per token, reach far in D; the
   deep ones pin down N.
4. **Compute.** No rung above ``1/rung_share`` of the smallest target's compute (nor, with two
   targets or more, above ``1/top_share`` of the largest's), and the whole ladder at most
   ``1/ladder_share`` of the smallest (less ``reserved``: the pilot's compute): the cap starts at
   the first and shrinks by 5% at a time until the second holds.
5. **On the tail.** With ``min_tokens`` (where a pilot's loss curve reached its power-law tail,
   :mod:`lmforge.scaling.regime`) no rung trains on fewer tokens than that.

Every rung and target gets the same size rules for lr, batch and warmup
(``rung_hparams``, ``rung_warmup``).
"""

from __future__ import annotations

import math
from dataclasses import replace

from lmforge.errors import LmforgeError
from lmforge.model.model import ModelConfig, flops_per_token, param_counts
from lmforge.scaling.ladder import LadderConfig, rung_hparams, rung_warmup

TOKENS_PER_PARAM = 20.0  # where a target's depth is chosen before any fit exists (Hoffmann et al. 2022)


def family_model(depth: int, cfg: LadderConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(depth=depth, aspect=cfg.aspect, vocab_size=cfg.vocab_size or vocab_size, context=cfg.context)


def run_spec(name: str, depth: int, tokens: float, cfg: LadderConfig, vocab_size: int) -> dict:
    """A run at ``depth`` on about ``tokens`` tokens, with the size rules' hyperparameters."""
    model = family_model(depth, cfg, vocab_size)
    hp = rung_hparams(model, cfg)
    tokens_per_step = hp["batch_size"] * cfg.context
    steps = max(10, round(tokens / tokens_per_step))
    N, fpt = param_counts(model)["non_embedding"], flops_per_token(model)
    D = steps * tokens_per_step
    return {"name": name, "depth": depth, "N": N, "D": D, "steps": steps, "flops": fpt * D, "flops_per_token": fpt,
            "tokens_per_param": D / N, "lr": hp["lr"], "batch_size": hp["batch_size"],
            "warmup_steps": rung_warmup(steps, cfg)}


def ladder_flops(budgets: dict, cfg: LadderConfig, vocab_size: int) -> float:
    """The compute of every rung of per-depth token ``budgets`` ({"depth": [tokens, ...]})."""
    return sum(run_spec("", int(d), t, cfg, vocab_size)["flops"] for d, bs in budgets.items() for t in bs)


def pick_target_depths(target_flops: list[float], cfg: LadderConfig, vocab_size: int, max_tokens: float,
                       max_depth: int = 48) -> list[int]:
    """Rule 1: per target, the depth nearest 20 tokens per parameter, all distinct, within one epoch."""
    taken: list[int] = []
    for C in target_flops:
        options = []
        for depth in range(2, max_depth + 1):
            model = family_model(depth, cfg, vocab_size)
            D = C / flops_per_token(model)
            if D <= max_tokens and depth not in taken:
                options.append((abs(math.log(D / param_counts(model)["non_embedding"] / TOKENS_PER_PARAM)), -depth, depth))
        if not options:
            raise LmforgeError(f"no free depth can spend a target of {C:.3g} FLOPs within the {max_tokens:.3g} train "
                               "tokens the data holds (one epoch); add data or lower --target-flops")
        taken.append(min(options)[2])
    return taken


def _depth_budgets(depth: int, cap: float, cfg: LadderConfig, vocab_size: int, per_depth: int, min_steps: int,
                   min_span: float, min_tokens: float = 0.0):
    """Rule 3 for one depth: ``per_depth`` budgets evenly spaced in log tokens from ``min_steps``
    steps (and ``min_tokens``) up to the most whole steps under ``cap``, spanning at least
    ``min_span``; or None."""
    model = family_model(depth, cfg, vocab_size)
    tokens_per_step = rung_hparams(model, cfg)["batch_size"] * cfg.context
    low = max(min_steps * tokens_per_step, math.ceil(min_tokens / tokens_per_step) * tokens_per_step)
    top = math.floor(cap / flops_per_token(model) / tokens_per_step) * tokens_per_step
    if top < low * min_span:
        return None
    return [low * (top / low) ** (j / (per_depth - 1)) for j in range(per_depth)]


def design_ladder(target_flops: list[float], cfg: LadderConfig, vocab_size: int, max_tokens: float,
                  target_depths: list[int] | None = None, **rules) -> dict:
    """The ladder config (depths and per-depth budgets filled in), the targets, and notes on how
    the rules applied. Raises when the targets are too small for a ladder that keeps the rules.

    Without ``target_depths`` the depths come from rule 1; when the ladder for those cannot keep
    the other rules, every target moves one depth shallower until it can (noted)."""
    if not target_flops or any(c <= 0 for c in target_flops):
        raise LmforgeError("--target-flops: give one or more positive budgets, e.g. 1.7e14,2.7e14")
    if target_depths:
        d = _design(target_flops, list(target_depths), cfg, vocab_size, **rules)
        d["notes"] += [f"{t['name']} would see {t['D'] / max_tokens:.2g} epochs of the {max_tokens:.3g} train tokens: "
                       "repeated data the ladder never saw; add data or choose a deeper target"
                       for t in d["targets"] if t["D"] > max_tokens]
        return d
    picked = pick_target_depths(target_flops, cfg, vocab_size, max_tokens)
    depths = list(picked)
    while True:
        try:
            d = _design(target_flops, depths, cfg, vocab_size, **rules)
        except LmforgeError:
            if min(depths) <= 2:
                raise
            depths = [x - 1 for x in depths]
            continue
        if depths != picked:
            d["notes"].insert(0, f"target depths {picked} (nearest 20 tokens/param) moved to {depths}: the ladder "
                                 "for the deeper ones could not keep the rules")
        return d


def _design(target_flops: list[float], depths_t: list[int], cfg: LadderConfig, vocab_size: int, per_depth: int = 3,
            min_steps: int = 200, rung_share: float = 10.0, ladder_share: float = 3.0, min_span: float = 2.0,
            top_share: float = 25.0, min_tokens: float = 0.0, reserved: float = 0.0) -> dict:
    if len(depths_t) != len(target_flops) or len(set(depths_t)) != len(depths_t) or min(depths_t) < 2:
        raise LmforgeError(f"target depths {depths_t}: give one distinct depth of at least 2 per target budget")
    smallest = min(target_flops)
    lo, hi = max(2, min(depths_t) - 1), max(depths_t) + 1
    # With two targets or more, the largest is also a far test: at least top_share x every rung.
    top_cap = max(target_flops) / top_share if len(target_flops) > 1 else math.inf
    cap, notes = smallest / rung_share, []
    while cap * per_depth >= run_spec("", lo, 1, cfg, vocab_size)["flops"]:
        budgets, dropped = {}, []
        for depth in range(lo, hi + 1):
            b = _depth_budgets(depth, cap, cfg, vocab_size, per_depth, min_steps, min_span, min_tokens)
            if b is None and depth > max(depths_t):
                dropped.append(depth)
            elif b is None:
                budgets = None
                break
            else:
                budgets[str(depth)] = b
        if budgets is not None and cap <= top_cap:
            total = ladder_flops(budgets, cfg, vocab_size)
            if total + reserved <= smallest / ladder_share:
                break
        cap *= 0.95
    else:
        budgets = None
    if budgets is None:
        floor = f" and {min_tokens:.3g} tokens (where the loss curve reaches its tail)" if min_tokens else ""
        raise LmforgeError(f"targets of {', '.join(f'{c:.3g}' for c in target_flops)} FLOPs are too small for a ladder "
                           f"with {per_depth} budgets of at least {min_steps} steps{floor} at depths {lo}-{max(depths_t)} under "
                           f"the rules (each rung <= 1/{rung_share:g}, the ladder <= 1/{ladder_share:g} of the smallest "
                           "target); raise --target-flops or use a smaller model family (ladder.aspect)")
    if len(budgets) < 3:
        raise LmforgeError(f"the ladder for targets at depths {depths_t} holds only depths {list(budgets)}; it needs three "
                           "that bracket the targets: raise --target-flops or give deeper --target-depths")
    if dropped:
        floor = f" or {min_tokens:.3g} tokens" if min_tokens else ""
        notes.append(f"depth {dropped[0]} (above the deepest target) dropped: its rungs would train fewer than "
                     f"{min_steps} steps{floor} under the cap, so the deepest target is bracketed at its own depth")
    lcfg = replace(cfg, depths=[int(d) for d in budgets], budgets=budgets)
    targets = [run_spec(f"target{i + 1}-d{d}", d, C / flops_per_token(family_model(d, cfg, vocab_size)), cfg, vocab_size)
               for i, (C, d) in enumerate(zip(target_flops, depths_t))]
    return {"ladder": lcfg, "targets": targets, "rung_cap_flops": cap, "notes": notes}


def smallest_feasible(target_flops: list[float], cfg: LadderConfig, vocab_size: int, max_tokens: float,
                      target_depths: list[int] | None = None, step: float = 1.25, max_scale: float = 1e4,
                      **rules) -> tuple[float, dict] | None:
    """The smallest factor (in steps of ``step``) by which every target budget must grow, keeping
    their ratios, for a ladder that keeps the rules; and that design. None past ``max_scale``."""
    scale = 1.0
    while scale <= max_scale:
        try:
            return scale, design_ladder([c * scale for c in target_flops], cfg, vocab_size, max_tokens,
                                        target_depths=target_depths, **rules)
        except LmforgeError:
            scale *= step
    return None

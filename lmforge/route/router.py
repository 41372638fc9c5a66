"""The router at serving time: one model name, two tiers, a policy, and fallback when a tier fails.

A local tier runs on the server's own engine; an endpoint tier is called over HTTP with its key
from the environment. Each answer says which tier gave it, whether it escalated, whether it fell
back after a failure, and what it cost at the tiers' prices.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.route.config import RouterConfig, Tier
from lmforge.route.policy import Classifier, confidence, threshold_for_rate
from lmforge.serve.api import ApiError, Params
from lmforge.serve.app import Answer, generate_once, prompt_text


@dataclass
class TierReply:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] = field(default_factory=list)


class TierError(Exception):
    pass


def call_endpoint(tier: Tier, kind: str, p: Params, max_tokens: int | None) -> TierReply:
    """One OpenAI-compatible call (blocking; run it in a thread). Any failure is a TierError."""
    body = {"model": tier.model, "temperature": p.temperature, "top_p": p.top_p}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if p.stop:
        body["stop"] = p.stop
    if kind == "chat":
        body.update(messages=p.prompts[0], logprobs=True)
        path = "/chat/completions"
    else:
        body.update(prompt=p.prompts[0], logprobs=0)
        path = "/completions"
    headers = {"Content-Type": "application/json"}
    key = tier.api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(tier.url.rstrip("/") + path, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=tier.timeout_s) as r:
            out = json.loads(r.read())
        ch = out["choices"][0]
        use = out.get("usage") or {}
        if kind == "chat":
            text = ch["message"]["content"] or ""
            lps = [t["logprob"] for t in ((ch.get("logprobs") or {}).get("content") or [])]
        else:
            text = ch["text"]
            lps = [x for x in ((ch.get("logprobs") or {}).get("token_logprobs") or []) if x is not None]
        return TierReply(text, ch.get("finish_reason") or "stop", int(use.get("prompt_tokens", 0)),
                         int(use.get("completion_tokens", 0)), lps)
    except urllib.error.HTTPError as e:
        raise TierError(f"tier {tier.name}: HTTP {e.code} from {tier.url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise TierError(f"tier {tier.name}: {tier.url} unreachable ({getattr(e, 'reason', e)})") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise TierError(f"tier {tier.name}: malformed answer from {tier.url} ({e})") from None


def check_endpoint(tier: Tier) -> None:
    """Fail at startup, not at the first request, when an endpoint tier cannot be reached."""
    req = urllib.request.Request(tier.url.rstrip("/") + "/models",
                                 headers={"Authorization": f"Bearer {tier.api_key()}"} if tier.api_key() else {})
    try:
        urllib.request.urlopen(req, timeout=min(10.0, tier.timeout_s)).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise LmforgeError(f"router tier {tier.name}: {tier.url} refused the key "
                               f"(set {tier.api_key_env or 'api_key_env'})") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise LmforgeError(f"router tier {tier.name}: {tier.url} is unreachable ({getattr(e, 'reason', e)}); "
                           "start it or fix 'url' in the router file") from None


class Router:
    """A virtual served model (``name``) in front of two tiers."""

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.classifier = Classifier(cfg.classifier) if cfg.policy == "classifier" else None
        self.threshold = cfg.threshold

    def describe(self) -> str:
        c = self.cfg
        rule = (f"classifier {c.classifier}, P(large) >= {self.threshold}" if c.policy == "classifier" else
                f"cascade, escalate when {c.confidence} logprob < {self.threshold:.3f}" if self.threshold is not None
                else f"cascade, threshold set for {c.target_escalation:.0%} escalation")
        tiers = " -> ".join(f"{t.name} ({t.model if t.local else t.url}, ${t.usd_per_mtok:g}/1M)" for t in c.tiers)
        return f"router over {tiers}; {rule}"

    def local_models(self) -> dict[str, str]:
        """Served-model name -> model directory for the local tiers (the server loads them)."""
        return {t.name: t.model for t in self.cfg.tiers if t.local}

    def check(self) -> None:
        for t in self.cfg.tiers:
            if not t.local:
                check_endpoint(t)

    async def calibrate(self, models: dict, prompts: list[str]) -> float:
        """Set the cascade's threshold so that ``target_escalation`` of ``prompts`` escalate."""
        confs = []
        for text in prompts:
            p = Params(model=self.name, prompts=[text], max_tokens=None, temperature=0.0)
            reply = await self._call(self.cfg.small, "completions", p, models)
            confs.append(confidence(reply.logprobs, self.cfg.confidence))
        self.threshold = threshold_for_rate(confs, self.cfg.target_escalation)
        return self.threshold

    async def _call(self, tier: Tier, kind: str, p: Params, models: dict) -> TierReply:
        if tier.local:
            m = models.get(tier.name)
            if m is None:
                raise TierError(f"tier {tier.name}: not loaded")
            try:
                c = await generate_once(m, kind, p, logprobs=True)
            except ApiError as e:
                raise TierError(f"tier {tier.name}: {e.message}") from None
            return TierReply(c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens,
                             [x["logprob"] for x in (c.logprobs or [])])
        return await asyncio.to_thread(call_endpoint, tier, kind, p, p.max_tokens)

    def decide_first(self, kind: str, p: Params) -> tuple[Tier, float | None]:
        if self.classifier is None:
            return self.cfg.small, None
        prob = float(self.classifier.p_large([prompt_text(kind, p)])[0])
        return (self.cfg.large if prob >= self.threshold else self.cfg.small), prob

    async def complete(self, kind: str, p: Params, models: dict) -> Answer:
        """Answer through the policy; a failing tier falls back to the other, at most ``max_retries`` times."""
        small, large = self.cfg.small, self.cfg.large
        tier, score = self.decide_first(kind, p)
        escalated, fallback, spent, errors = tier is large, False, 0.0, []
        tries = 0
        reply = None
        while reply is None:
            try:
                reply = await self._call(tier, kind, p, models)
            except TierError as e:
                errors.append(str(e))
                if tries >= self.cfg.max_retries:
                    raise ApiError(502, "; ".join(errors) + " (no tier left to fall back to)", "upstream_error",
                                   code="tier_failed") from None
                tries += 1
                tier, fallback = (large if tier is small else small), True
                continue
            spent += tier.cost(reply.prompt_tokens, reply.completion_tokens)
            if self.classifier is None and tier is small and not fallback:
                score = confidence(reply.logprobs, self.cfg.confidence)
                if score < self.threshold:
                    escalated = True
                    try:
                        up = await self._call(large, kind, p, models)
                        spent += large.cost(up.prompt_tokens, up.completion_tokens)
                        reply, tier = up, large
                    except TierError as e:  # the small answer stands, and the answer says so
                        errors.append(str(e))
                        fallback = True
        headers = {"x-lmforge-tier": tier.name}
        if fallback:
            headers["x-lmforge-fallback"] = "true"
        extra = {"tier": tier.name, "escalated": escalated, "fallback": fallback, "cost_usd": round(spent, 10)}
        if score is not None:
            extra["router_score"] = round(score, 4)
        if errors:
            extra["errors"] = errors
        return Answer(reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens, headers, extra,
                      spent)

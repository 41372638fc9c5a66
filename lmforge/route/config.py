"""The router file: tiers (cheapest first) and the policy that picks one per request.

```toml
name = "coder"                  # the one model name clients see
policy = "cascade"              # cascade | classifier
confidence = "mean"             # cascade: mean | min token log-probability of the small tier's answer
threshold = -2.0                # cascade: escalate when confidence < threshold
# or: target_escalation = 0.3 with calibration = "prompts.jsonl": the threshold is the confidence
#     quantile that escalates that share of the calibration prompts, measured at startup
# classifier = "router-clf.json"   # policy = "classifier": `lmforge router train` output; threshold = P(large)
max_retries = 1                 # extra attempts on another tier when one fails or times out

[[tiers]]
name = "small"
model = "runs/default/train"    # a local model ...
usd_per_mtok = 0.02             # price per million output tokens (input: usd_per_mtok_in, default the same)

[[tiers]]
name = "large"
url = "http://127.0.0.1:9000/v1"   # ... or an OpenAI-compatible endpoint
model = "big"                      # the model name the endpoint serves
api_key_env = "LARGE_API_KEY"      # the key is read from this environment variable
usd_per_mtok = 2.0
timeout_s = 30
```

Every mistake is a one-line error naming the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import load_toml
from lmforge.errors import LmforgeError

TOP_KEYS = {"name", "policy", "confidence", "threshold", "target_escalation", "calibration", "classifier",
            "max_retries", "tiers"}
TIER_KEYS = {"name", "model", "url", "api_key_env", "usd_per_mtok", "usd_per_mtok_in", "timeout_s", "max_tokens"}


@dataclass
class Tier:
    name: str
    model: str  # local: a model directory; upstream: the served model's name
    url: str | None = None  # None: local
    api_key_env: str | None = None
    usd_per_mtok: float = 0.0
    usd_per_mtok_in: float | None = None
    timeout_s: float = 30.0

    @property
    def local(self) -> bool:
        return self.url is None

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        p_in = self.usd_per_mtok if self.usd_per_mtok_in is None else self.usd_per_mtok_in
        return (prompt_tokens * p_in + completion_tokens * self.usd_per_mtok) / 1e6


@dataclass
class RouterConfig:
    name: str
    tiers: list[Tier]
    policy: str = "cascade"
    confidence: str = "mean"
    threshold: float | None = None
    target_escalation: float | None = None
    calibration: Path | None = None
    classifier: Path | None = None
    max_retries: int = 1
    path: Path = field(default_factory=lambda: Path("router.toml"))

    @property
    def small(self) -> Tier:
        return self.tiers[0]

    @property
    def large(self) -> Tier:
        return self.tiers[-1]


def _num(raw: dict, key: str, where: str, lo: float, hi: float, default=None, integer=False):
    v = raw.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise LmforgeError(f"{where}: '{key}' must be {'an integer' if integer else 'a number'}, not {v!r}")
    if not lo <= v <= hi:
        raise LmforgeError(f"{where}: '{key}' = {v} is out of range [{lo}, {hi}]")
    return v


def _tier(raw, path: Path, i: int) -> Tier:
    where = f"{path} [[tiers]] #{i + 1}"
    if not isinstance(raw, dict):
        raise LmforgeError(f"{where}: a tier is a table with name, model (and url for an endpoint)")
    unknown = set(raw) - TIER_KEYS
    if unknown:
        raise LmforgeError(f"{where}: unknown key '{sorted(unknown)[0]}'; known: {', '.join(sorted(TIER_KEYS))}")
    for key in ("name", "model"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise LmforgeError(f"{where}: '{key}' is missing (a tier needs a name and a model)")
    url = raw.get("url")
    if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
        raise LmforgeError(f"{where} ({raw['name']}): 'url' must be an http(s) URL such as http://host:8000/v1")
    if url is None and not Path(raw["model"]).exists():
        raise LmforgeError(f"{where} ({raw['name']}): model {raw['model']} does not exist (a local tier names a "
                           "model directory; an endpoint tier also needs 'url')")
    if raw.get("api_key_env") and url is None:
        raise LmforgeError(f"{where} ({raw['name']}): 'api_key_env' is for endpoint tiers (with 'url')")
    return Tier(raw["name"], raw["model"], url, raw.get("api_key_env"),
                float(_num(raw, "usd_per_mtok", where, 0, 1e6, 0.0)),
                _num(raw, "usd_per_mtok_in", where, 0, 1e6),
                float(_num(raw, "timeout_s", where, 0.1, 3600, 30.0)))


def load_router(path: str | Path) -> RouterConfig:
    path = Path(path)
    raw = load_toml(path)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise LmforgeError(f"{path}: unknown key '{sorted(unknown)[0]}'; known: {', '.join(sorted(TOP_KEYS))}")
    tiers = raw.get("tiers")
    if not isinstance(tiers, list) or len(tiers) != 2:
        raise LmforgeError(f"{path}: 'tiers' must list exactly two [[tiers]] tables, the cheap one first "
                           f"(found {len(tiers) if isinstance(tiers, list) else 0})")
    tiers = [_tier(t, path, i) for i, t in enumerate(tiers)]
    if tiers[0].name == tiers[1].name:
        raise LmforgeError(f"{path}: the two tiers are both named '{tiers[0].name}'")
    name = raw.get("name", "router")
    if not isinstance(name, str) or not name:
        raise LmforgeError(f"{path}: 'name' must be a non-empty string (the model name clients use)")
    policy = raw.get("policy", "cascade")
    if policy not in ("cascade", "classifier"):
        raise LmforgeError(f"{path}: policy = {policy!r}; use cascade or classifier")
    conf = raw.get("confidence", "mean")
    if conf not in ("mean", "min"):
        raise LmforgeError(f"{path}: confidence = {conf!r}; use mean or min")
    cfg = RouterConfig(name, tiers, policy, conf, max_retries=_num(raw, "max_retries", str(path), 0, 5, 1, True),
                       path=path)
    if policy == "classifier":
        clf = raw.get("classifier")
        if not isinstance(clf, str) or not (path.parent / clf).exists() and not Path(clf).exists():
            raise LmforgeError(f"{path}: policy = classifier needs 'classifier', the file `lmforge router train` "
                               f"wrote (not found: {clf})")
        cfg.classifier = Path(clf) if Path(clf).exists() else path.parent / clf
        cfg.threshold = _num(raw, "threshold", str(path), 0.0, 1.0, 0.5)
        return cfg
    cfg.threshold = _num(raw, "threshold", str(path), -100.0, 0.0)
    cfg.target_escalation = _num(raw, "target_escalation", str(path), 0.0, 1.0)
    if (cfg.threshold is None) == (cfg.target_escalation is None):
        raise LmforgeError(f"{path}: a cascade needs either 'threshold' (a log-probability, <= 0) or "
                           "'target_escalation' (a share in [0, 1]) with 'calibration' prompts, not both")
    if cfg.target_escalation is not None:
        cal = raw.get("calibration")
        if not isinstance(cal, str):
            raise LmforgeError(f"{path}: 'target_escalation' needs 'calibration', a JSONL file of prompts")
        cfg.calibration = Path(cal) if Path(cal).exists() else path.parent / cal
        if not cfg.calibration.exists():
            raise LmforgeError(f"{path}: calibration file {cal} not found")
    return cfg

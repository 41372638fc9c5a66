"""The usage ledger: one JSONL line per finished request, per API key's user, priced at the catalog's rate.

Each line is written whole and flushed, so a crash loses at most the request in flight; the
per-user totals ``GET /v1/usage`` returns are kept in memory and show a user only their own rows.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

from lmforge.cost.ledger import USAGE_FILE


class UsageLog:
    def __init__(self, serve_dir: Path, recent: int = 100):
        serve_dir.mkdir(parents=True, exist_ok=True)
        self.path = serve_dir / USAGE_FILE
        self._lock = threading.Lock()
        self._totals: dict[str, dict] = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0,
                                                             "completion_tokens": 0, "usd": 0.0})
        self._recent: dict[str, deque] = defaultdict(lambda: deque(maxlen=recent))

    def record(self, row: dict) -> None:
        row = {"time": round(time.time(), 3), **row}
        line = json.dumps(row, separators=(",", ":")) + "\n"
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
            t = self._totals[row["user"]]
            t["requests"] += 1
            t["prompt_tokens"] += row["prompt_tokens"]
            t["completion_tokens"] += row["completion_tokens"]
            t["usd"] += row["usd"]
            self._recent[row["user"]].append(row)

    def for_user(self, user: str) -> dict:
        with self._lock:
            return {"user": user, **dict(self._totals[user]), "recent": list(self._recent[user])}

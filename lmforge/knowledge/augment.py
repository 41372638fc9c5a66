"""Retrieval in the prompt: the top chunks for each user turn, quoted under a token budget.

The quoted material goes into the system message, marked as data rather than instructions
(:func:`lmforge.knowledge.index.format_quoted`), and the answer carries a citation for every
chunk the model was shown: source path, chunk id and character offsets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmforge.errors import LmforgeError
from lmforge.knowledge.index import Index, format_quoted, open_index


@dataclass
class Knowledge:
    index: Index
    count_tokens: Callable[[str], int]
    budget_tokens: int
    k: int = 4
    path: Path = Path()
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> str:
        return f"{self.path}: top {self.k} chunks per user turn, at most {self.budget_tokens} tokens"

    def augment(self, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        """``messages`` with the retrieved material added to the system message, and the citations."""
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "").strip()
        if not query:
            return messages, []
        with self._lock:  # one SQLite connection, shared by the server's threads
            hits = self.index.search(query, self.k)
        text, citations = format_quoted(hits, self.budget_tokens, self.count_tokens)
        if not text:
            return messages, []
        if messages and messages[0]["role"] == "system":
            system = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
            return [system, *messages[1:]], citations
        return [{"role": "system", "content": text}, *messages], citations


def open_knowledge(path, count_tokens: Callable[[str], int], context: int, k: int = 4,
                   budget_tokens: int | None = None) -> Knowledge:
    """A :class:`Knowledge` over the index at ``path``; by default the quotes may take a third of the context."""
    budget = budget_tokens if budget_tokens is not None else context // 3
    if budget < 16:
        raise LmforgeError(f"--knowledge {path}: a budget of {budget} tokens cannot hold a quotation; "
                           f"give --knowledge-tokens (the model's context is {context})")
    return Knowledge(open_index(path), count_tokens, budget, k, Path(path))

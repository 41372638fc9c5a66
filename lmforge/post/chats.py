"""Chat data in the ``messages`` format (OpenAI, TRL): read, validate, render, mask.

One conversation per JSONL line: ``{"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}]}``. A bad line is an error naming the file and line, or, with
``skip_bad``, a counted skip; nothing is skipped silently.

Rendering follows the tokenizer's chat template (``<|role|>content<|end|>`` per turn) piece
by piece, so every token is known to belong to a role: the loss mask marks the assistant's
content and its closing ``<|end|>``, which teaches the model to stop. The chat tokens are
atomic in the tokenizer, so the pieces tokenize exactly as the whole rendered text does
(``tests/test_post_chats.py`` checks it token by token).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.tokenizer.io import SPECIAL_NAMES, SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")


@dataclass
class ChatSet:
    conversations: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> lines skipped with skip_bad


def check_messages(messages) -> str | None:
    """Why ``messages`` is not a usable conversation, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with 'role' and 'content'"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role = {m.get('role')!r}: use one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"messages[{i}].content is empty or not a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: nothing to learn from"
    return None


def records(path):
    """``(where, row, error)`` for each record of a JSONL file, a parquet file, a saved HF dataset
    directory (``datasets.save_to_disk``) or an HF hub dataset name (its train split); ``where``
    is ``FILE:LINE`` or ``FILE:row N`` and ``error`` says why a JSONL line is not JSON."""
    p = Path(path)
    if p.suffix == ".parquet" and p.is_file():
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield f"{p}:row {i}", row, None
    elif p.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(p))
        except (FileNotFoundError, ValueError) as e:
            raise LmforgeError(f"{p}: not a saved Hugging Face dataset ({e}); give JSONL, parquet or a dataset directory") from None
        ds = ds["train"] if hasattr(ds, "keys") else ds
        for i, row in enumerate(ds):
            yield f"{p}:row {i}", row, None
    elif p.exists():
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{p}:{lineno}", json.loads(line), None
                except json.JSONDecodeError as e:
                    yield f"{p}:{lineno}", None, f"not JSON ({e.msg})"
    elif "/" in str(path) and not str(path).startswith((".", "/")) and str(path).count("/") == 1:
        from datasets import load_dataset

        try:
            ds = load_dataset(str(path), split="train")
        except Exception as e:  # the hub client raises many kinds; all mean "could not get it"
            raise LmforgeError(f"{path}: not a local file and not loadable from the Hugging Face hub "
                               f"({type(e).__name__}); give a JSONL or parquet file") from None
        for i, row in enumerate(ds):
            yield f"{path}:row {i}", row, None
    else:
        raise LmforgeError(f"{p}: no such file; give a JSONL or parquet file, a saved dataset directory or a hub name")


def read_chats(path, skip_bad: bool = False) -> ChatSet:
    """Every conversation in ``path`` (see :func:`records`); a bad one raises ``FILE:LINE: why``
    unless ``skip_bad``, which counts it by reason."""
    out = ChatSet()
    for where, row, error in records(path):
        if error:
            why, reason = error, "not_json"
        else:
            why = "'messages' is missing" if not isinstance(row, dict) or "messages" not in row else \
                check_messages(row["messages"])
            reason = "bad_messages"
        if why is None:
            out.conversations.append([{"role": m["role"], "content": m["content"]} for m in row["messages"]])
        elif skip_bad:
            out.skipped[reason] += 1
        else:
            raise LmforgeError(f"{where}: {why}; fix the line or pass --skip-bad to skip and count such lines")
    if not out.conversations:
        raise LmforgeError(f"{path}: no usable conversations" + (f" ({dict(out.skipped)} skipped)" if out.skipped else ""))
    return out


def chat_token_ids(tok) -> dict:
    """The ids of the chat tokens, or an error saying the tokenizer cannot render chats."""
    ids = {name: tok.token_to_id(t) for name, t in zip(SPECIAL_NAMES, SPECIAL_TOKENS)}
    missing = [t for name, t in zip(SPECIAL_NAMES, SPECIAL_TOKENS) if ids[name] is None and name != "pad"]
    if missing:
        raise LmforgeError(f"the tokenizer lacks the chat tokens {', '.join(missing)}; train it with "
                           "`lmforge tokenizer` (which adds them) or use a base model whose tokenizer has them")
    return ids


def render(messages: list, tok, ids: dict, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained on (the
    assistant's content and its closing ``<|end|>``)."""
    tokens, mask = [], []
    for m in messages:
        body = tok.encode(m["content"], add_special_tokens=False).ids
        learn = m["role"] == "assistant"
        tokens += [ids[m["role"]], *body, ids["end"]]
        mask += [False] + [learn] * (len(body) + 1)
    if add_generation_prompt:
        tokens.append(ids["assistant"])
        mask.append(False)
    return tokens, mask


@dataclass
class Packed:
    """Rows of exactly ``context + 1`` tokens (inputs and shifted targets come from one row).

    ``mask`` marks the tokens trained on; ``doc`` numbers the conversations in a row (0 is
    padding), so attention can stay inside a conversation and positions restart at each."""
    tokens: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    doc: list = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


SORT_BLOCK = 1024


def pack(encoded: list[tuple[list[int], list[bool]]], context: int, pad_id: int, packing: bool = True) -> Packed:
    """Pack rendered conversations into rows, first fit in order, never splitting one
    (``packing=False``: one conversation per row, padded).

    A conversation longer than a row is dropped and counted (``too_long``), not truncated:
    cutting it would drop the end of the assistant's answer and its ``<|end|>``, and teach the
    model not to stop. One with nothing to learn after the shift (``no_target``) is dropped too.
    Packing is first fit decreasing within blocks of ``SORT_BLOCK`` conversations, which keeps
    it linear in the data."""
    return pack_groups([[e] for e in encoded], context, pad_id, packing)


def pack_groups(groups: list[list[tuple[list[int], list[bool]]]], context: int, pad_id: int,
                packing: bool = True, has_target=None) -> Packed:
    """:func:`pack` for groups of sequences that must share a row (a preference pair's chosen and
    rejected answers): each sequence is its own document, numbered in order within the row, so
    the i-th group in a row holds documents ``k*i + 1 .. k*i + k`` when every group has k.
    ``has_target(group)`` says whether a group has something to learn (default: every sequence
    has a learned token after its first)."""
    width = context + 1
    out, rows = Packed(), []  # rows: [tokens, mask, doc, n_docs]
    kept = []
    for group in groups:
        if sum(len(t) for t, _ in group) > width:
            out.dropped["too_long"] += 1
        elif not (has_target(group) if has_target else all(any(m[1:]) for _, m in group)):
            out.dropped["no_target"] += 1
        else:
            kept.append(group)
    for i in range(0, len(kept), SORT_BLOCK if packing else 1):
        block = kept[i:i + SORT_BLOCK] if packing else kept[i:i + 1]
        # First fit decreasing within the block: the big ones first leave gaps the small ones fill.
        block = sorted(block, key=lambda g: -sum(len(t) for t, _ in g))
        free = np.zeros(0, dtype=np.int64)  # room left in this block's rows
        first_row = len(rows)
        for group in block:
            size = sum(len(t) for t, _ in group)
            fits = np.flatnonzero(free >= size)
            if len(fits):
                j = int(fits[0])
            else:
                j, free = len(free), np.append(free, width)
                rows.append([[], [], [], 0])
            free[j] -= size
            row = rows[first_row + j]
            for tokens, mask in group:
                row[3] += 1
                row[0] += tokens
                row[1] += mask
                row[2] += [row[3]] * len(tokens)
    for toks, msk, doc, _ in rows:
        pad = width - len(toks)
        out.tokens.append(toks + [pad_id] * pad)
        out.mask.append(msk + [False] * pad)
        out.doc.append(doc + [0] * pad)
    return out

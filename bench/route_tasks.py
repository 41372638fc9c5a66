"""Executable code tasks of graded difficulty, for measuring a router on pass/fail quality.

    python bench/route_tasks.py -o runs/route-tasks            # train.jsonl, tasks_train.jsonl, tasks_test.jsonl

Each task asks for a function that computes an expression described in words, in prefix form
("the sum of the product of x and 3 and y"), and is checked by running the answer against four
doctest examples (``lmforge.post.tasks.task_program``, the same check as ``lmforge eval --tasks
doctest:``). The description's nesting depth (1 to 4 operations deep) is the difficulty: reading a
deeper description needs more of the model, so a small and a large model differ in *which*
tasks they pass, which is what a router can exploit.

- ``train.jsonl``: ``{"text": prompt + answer}`` documents for pretraining both tiers
  (``lmforge run -s train.jsonl``);
- ``tasks_train.jsonl`` / ``tasks_test.jsonl``: held-out tasks in post-training's task format
  (prompt, entry_point, reference, doctest), whose expressions never occur in ``train.jsonl``.
  The first calibrates the cascade and trains the classifier, the second is what is reported.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BINARY = {"sum": ("the sum of {} and {}", "({} + {})"),
          "difference": ("the difference of {} and {}", "({} - {})"),
          "product": ("the product of {} and {}", "({} * {})"),
          "larger": ("the larger of {} and {}", "max({}, {})"),
          "smaller": ("the smaller of {} and {}", "min({}, {})")}
UNARY = {"square": ("the square of {}", "({} ** 2)"),
         "abs": ("the absolute value of {}", "abs({})"),
         "twice": ("twice {}", "(2 * {})"),
         "negation": ("the negation of {}", "(-{})")}
# One function name: what a task tests is reading the description. With ten names to copy from the
# prompt, the depth-3 and depth-4 tiers here wrote the right expression under the wrong name on
# most tasks after 8.2M tokens, while depth 2 did not, which measures name copying, not reading.
NAMES = ["f"]
ARGS = ["x", "y", "z", "a", "b", "n"]


def expression(rng: random.Random, depth: int, args: list[str]) -> tuple[str, str]:
    """(words, code) of a random expression exactly ``depth`` operations deep."""
    if depth == 0:
        leaf = rng.choice(args) if rng.random() < 0.7 else str(rng.randint(1, 9))
        return leaf, leaf
    if rng.random() < 0.3:
        words, code = UNARY[rng.choice(sorted(UNARY))]
        w, c = expression(rng, depth - 1, args)
        return words.format(w), code.format(c)
    words, code = BINARY[rng.choice(sorted(BINARY))]
    deep = rng.randint(0, 1)  # which operand carries the full depth
    parts = [expression(rng, depth - 1 if i == deep else rng.randint(0, depth - 1), args) for i in range(2)]
    return words.format(parts[0][0], parts[1][0]), code.format(parts[0][1], parts[1][1])


def task(rng: random.Random, depth: int) -> dict:
    args = sorted(rng.sample(ARGS, rng.randint(1, 3)), key=ARGS.index)
    name = rng.choice(NAMES)
    words, code = expression(rng, depth, args)
    body = code[1:-1] if code.startswith("(") and code.endswith(")") and _balanced(code[1:-1]) else code
    sig = ", ".join(args)
    prompt = f"Write a function {name}({sig}) that returns {words}.\n"
    reference = f"def {name}({sig}):\n    return {body}\n"
    env: dict = {}
    exec(reference, env)  # our own generated expression, to compute the doctest's answers
    lines = []
    for _ in range(4):
        vals = [rng.randint(-6, 6) for _ in args]
        lines += [f">>> {name}({', '.join(map(str, vals))})", str(env[name](*vals))]
    return {"prompt": prompt, "entry_point": name, "reference": reference, "doctest": "\n".join(lines) + "\n",
            "depth": depth, "expression": body}


def _balanced(s: str) -> bool:
    level = 0
    for ch in s:
        level += {"(": 1, ")": -1}.get(ch, 0)
        if level < 0:
            return False
    return level == 0


def answer_text(t: dict) -> str:
    """How a tier is taught to answer: the function in a fenced block (``code_of`` reads it)."""
    return f"```python\n{t['reference']}```\n"


def make(out: Path, n_train: int, n_test: int, seed: int) -> dict:
    rng = random.Random(seed)
    held, tests = set(), {"tasks_train.jsonl": [], "tasks_test.jsonl": []}
    for name, n in (("tasks_train.jsonl", n_test // 2), ("tasks_test.jsonl", n_test)):
        while len(tests[name]) < n:
            t = task(rng, 1 + len(tests[name]) % 4)
            if t["expression"] not in held:
                held.add(t["expression"])
                t["id"] = f"{name.split('.')[0]}:{len(tests[name])}:depth{t['depth']}"
                tests[name].append(t)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tests.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = 0
    with open(out / "train.jsonl", "w") as f:
        while kept < n_train:
            t = task(rng, rng.randint(1, 4))
            if t["expression"] in held:
                continue
            f.write(json.dumps({"text": t["prompt"] + answer_text(t)}) + "\n")
            kept += 1
    return {"train": kept, **{k: len(v) for k, v in tests.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=Path("runs/route-tasks"))
    ap.add_argument("--train", type=int, default=200_000, help="training documents")
    ap.add_argument("--test", type=int, default=400, help="held-out tasks reported (half as many more calibrate)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make(a.out, a.train, a.test, a.seed))


if __name__ == "__main__":
    main()

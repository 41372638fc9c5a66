"""bench/route_tasks.py, the graded code tasks the router is measured on: every task can be
passed and failed, the depths are what they say, and no held-out expression is trained on."""

import ast
import importlib.util
import json
from pathlib import Path

from lmforge.post.sandbox import Limits
from lmforge.post.tasks import check_task

spec = importlib.util.spec_from_file_location("route_tasks", Path(__file__).parents[1] / "bench" / "route_tasks.py")
route_tasks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(route_tasks)


def nesting(node) -> int:
    """Operations on the longest path from the expression's root to a leaf."""
    if isinstance(node, (ast.Name, ast.Constant)):
        return 0
    kids = {ast.BinOp: lambda n: [n.left, n.right], ast.UnaryOp: lambda n: [n.operand],
            ast.Call: lambda n: n.args}[type(node)](node)
    return 1 + max(nesting(k) for k in kids)


def test_tasks_are_executable_graded_and_held_out(tmp_path):
    info = route_tasks.make(tmp_path, n_train=2000, n_test=24, seed=1)
    assert info == {"train": 2000, "tasks_train.jsonl": 12, "tasks_test.jsonl": 24}
    tasks = [json.loads(line) for name in ("tasks_train.jsonl", "tasks_test.jsonl")
             for line in (tmp_path / name).read_text().splitlines()]
    train = (tmp_path / "train.jsonl").read_text()
    for t in tasks:
        assert check_task(t, Limits(timeout_s=10, cpu_s=5)) == ""  # the reference passes, a stub fails
        assert nesting(ast.parse(t["expression"], mode="eval").body) == t["depth"]
        assert f"return {t['expression']}\n" not in train
    assert sorted({t["depth"] for t in tasks}) == [1, 2, 3, 4]
    assert len({t["expression"] for t in tasks}) == len(tasks)

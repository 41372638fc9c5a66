"""The fault-injection soak: every scenario of tests/test_reliability.py, longer and repeated.

    python -m pytest -m slow tests/test_soak.py -s          # prints the figures docs/reliability.md records
    LMFORGE_SOAK_REPORT=soak.json python -m pytest -m slow tests/test_soak.py

About 15 minutes on 2 CPU cores. Each scenario counts the faults it injected, whether the
run survived them with no human action, the time lost to recovery, and the final val loss
against a clean run of the same config.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reliability import poison, same_weights
from lmforge.train.guard import read_events

pytestmark = pytest.mark.slow

STEPS, BATCH, CTX, DEPTH, CKPT_EVERY = 800, 16, 64, 2, 25
REPORT: dict = {}


def train_args(data_dir, out, *extra):
    return ["train", "--data", str(data_dir), "-o", str(out), "--depth", str(DEPTH), "--steps", str(STEPS), "-q",
            "--resume", "auto", "--set", f"train.model.context={CTX}", "--set", f"train.batch_size={BATCH}",
            "--set", "train.precision='fp32'", "--set", f"train.ckpt_every={CKPT_EVERY}", "--set", "train.eval_every=400", "--set", "train.eval_batches=16",
            "--set", "train.log_every=10", "--set", "train.seed=0", *extra]


def lmforge(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=1200, **kw)


def manifest(run):
    return json.loads((Path(run) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def clean_run(medium_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "clean"
    t = time.time()
    res = lmforge(train_args(medium_data[0], out))
    assert res.returncode == 0, res.stderr
    return out, time.time() - t


def record(name, **figures):
    REPORT[name] = figures
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    path = os.environ.get("LMFORGE_SOAK_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2))


def loss_diff(run, clean):
    a, b = manifest(clean)["metrics"]["final_val_loss"], manifest(run)["metrics"]["final_val_loss"]
    return round(100 * (b - a) / a, 3)


def interrupt_repeatedly(data_dir, run, sig, n, rnd):
    """Start the run n times and send ``sig`` at a random moment once it trains; return (sent, attempt seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sent, spent = 0, 0.0
    for _ in range(n):
        t = time.time()
        p = subprocess.Popen([sys.executable, "-m", "lmforge", *map(str, train_args(data_dir, run))], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = run / "metrics.jsonl"
        size0 = log.stat().st_size if log.exists() else 0
        t_end = time.time() + 120
        while time.time() < t_end and p.poll() is None and not (log.exists() and log.stat().st_size != size0):
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 3.0))
        if p.poll() is None:
            p.send_signal(sig)
            sent += 1
        p.wait()
        spent += time.time() - t
    return sent, spent


def test_soak_kill_9(medium_data, clean_run, tmp_path):
    clean, clean_s = clean_run
    run = tmp_path / "killed"
    kills, spent = interrupt_repeatedly(medium_data[0], run, signal.SIGKILL, 10, random.Random(11))
    t = time.time()
    res = lmforge(train_args(medium_data[0], run))
    spent += time.time() - t
    assert res.returncode == 0, res.stderr
    assert kills >= 8 and same_weights(clean, run)
    record("kill -9", faults=kills, survived=True, bitwise_identical=True,
           time_lost_s=round(spent - clean_s, 1), clean_run_s=round(clean_s, 1), final_loss_diff_pct=loss_diff(run, clean))


def test_soak_sigterm(medium_data, clean_run, tmp_path):
    clean, clean_s = clean_run
    run = tmp_path / "termed"
    terms, spent = interrupt_repeatedly(medium_data[0], run, signal.SIGTERM, 5, random.Random(12))
    ev = read_events(run)
    assert sum(e["event"] == "interrupted" for e in ev) == terms
    t = time.time()
    res = lmforge(train_args(medium_data[0], run))
    spent += time.time() - t
    assert res.returncode == 0, res.stderr
    assert same_weights(clean, run)
    record("SIGTERM", faults=terms, survived=True, bitwise_identical=True, time_lost_s=round(spent - clean_s, 1),
           final_loss_diff_pct=loss_diff(run, clean))


def test_soak_poisoned_spans(medium_data, clean_run, tmp_path):
    clean, _ = clean_run
    spans = [range(150, 153), range(420, 425), range(690, 698)]
    poisoned = sorted(s for span in spans for s in span)
    bad = poison(medium_data[0], tmp_path / "bad", poisoned, batch=BATCH, ctx=CTX)
    res = lmforge(train_args(bad, tmp_path / "healed"))
    assert res.returncode == 0, res.stderr
    m = manifest(tmp_path / "healed")
    assert m["metrics"]["epochs"] < 1
    q = set(json.loads((tmp_path / "healed" / "quarantine.json").read_text())["steps"])
    # the stated superset: a rollback quarantines every step from the checkpoint it returns to
    # (the newest one before the span) up to the spike, so a span that starts between checkpoints
    # takes the clean steps before it along; beyond that, at most a few natural outliers
    window = {s for span in spans for s in range(span.start // CKPT_EVERY * CKPT_EVERY, span.stop)}
    assert set(poisoned) <= q and len(q - window) <= 5, sorted(q)
    diff = loss_diff(tmp_path / "healed", clean)
    assert abs(diff) < 1.0
    record("poisoned data", faults=len(spans), poisoned_steps=len(poisoned), quarantined_steps=len(q),
           rollback_window_steps=len((q & window) - set(poisoned)), other_quarantined=len(q - window), rollbacks=m["metrics"]["guard"]["rollbacks"], survived=True,
           time_lost_s=m["metrics"]["guard"]["recovery_time_s"], final_loss_diff_pct=diff)


def test_soak_nan_and_inf(medium_data, clean_run, tmp_path):
    clean, _ = clean_run
    steps = [120, 333, 601]
    res = lmforge(train_args(medium_data[0], tmp_path / "nan", "--set", f"train.inject_nan_at={steps}"))
    assert res.returncode == 0, res.stderr
    m = manifest(tmp_path / "nan")
    assert m["metrics"]["guard"]["rollbacks"] == len(steps)
    diff = loss_diff(tmp_path / "nan", clean)
    assert abs(diff) < 1.0
    record("NaN loss", faults=len(steps), rollbacks=m["metrics"]["guard"]["rollbacks"],
           quarantined_steps=m["metrics"]["guard"]["quarantined_steps"], survived=True,
           time_lost_s=m["metrics"]["guard"]["recovery_time_s"], final_loss_diff_pct=diff)


def test_soak_corrupt_checkpoints(medium_data, clean_run, tmp_path):
    """Stop the run, damage its newest checkpoint, resume: each resume falls back one checkpoint and the
    finished run is still bitwise identical to the clean one."""
    clean, _ = clean_run
    run = tmp_path / "corrupt"
    rnd = random.Random(13)
    faults = 0
    for i in range(3):
        interrupt_repeatedly(medium_data[0], run, signal.SIGTERM, 1, rnd)
        newest = sorted((run / "checkpoints").glob("step-*"))[-1] / "state.pt"
        blob = newest.read_bytes()
        j = rnd.randrange(len(blob))
        newest.write_bytes(blob[: len(blob) // 2] if i % 2 else blob[:j] + bytes([blob[j] ^ 0xFF]) + blob[j + 1:])
        faults += 1
    res = lmforge(train_args(medium_data[0], run))
    assert res.returncode == 0, res.stderr
    fallbacks = res.stderr.count("falling back to the previous one")
    assert fallbacks >= 1
    assert same_weights(clean, run)
    record("corrupt checkpoint", faults=faults, survived=True, bitwise_identical=True,
           final_loss_diff_pct=loss_diff(run, clean))


def test_soak_torchrun_poisoned_rank(medium_data, tmp_path):
    bad = poison(medium_data[0], tmp_path / "bad", [300, 301, 302, 500], rank=1, world=2, batch=BATCH // 2, ctx=CTX)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "lmforge", *train_args(bad, tmp_path / "r", "--set", f"train.batch_size={BATCH // 2}")],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    q = set(json.loads((tmp_path / "r" / "quarantine.json").read_text())["steps"])
    assert {300, 301, 302, 500} <= q
    m = manifest(tmp_path / "r")
    record("poisoned rank under torchrun", faults=4, world=2, quarantined_steps=len(q), survived=True,
           time_lost_s=m["metrics"]["guard"]["recovery_time_s"])

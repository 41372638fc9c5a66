"""Fault injection: kill -9, poisoned data, NaN, corrupt checkpoints, SIGTERM, a poisoned rank."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, signal_when
from lmforge.errors import LmforgeError
from lmforge.model.io import load_model
from lmforge.model.model import ModelConfig
from lmforge.train.batches import BatchSource
from lmforge.train.guard import GuardConfig, read_events
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import train

CTX, BATCH = 32, 8


def cfg_for(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), model=ModelConfig(depth=1, vocab_size=0, context=CTX),
                batch_size=BATCH, max_steps=80, lr=3e-3, warmup_steps=5, eval_every=40, eval_batches=4,
                ckpt_every=10, keep_checkpoints=3, log_every=1, precision="fp32", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def same_weights(a, b) -> bool:
    wa, wb = load_model(a).state_dict(), load_model(b).state_dict()
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def poison(data_dir: Path, dest: Path, steps, rank=None, world=1, batch=BATCH, ctx=CTX) -> Path:
    """Copy the data dir, then overwrite every window the given steps train on with random tokens."""
    from lmforge.data.shards import TokenData

    shutil.copytree(data_dir, dest)
    td = TokenData(dest)
    idx = json.loads((dest / "tokens" / "index.json").read_text())
    shards = idx["splits"]["train"]["shards"]
    src = BatchSource(td.split("train"), ctx, seed=0)
    rng = np.random.default_rng(1)
    offsets = []
    for s in steps:
        ranks = [rank] if rank is not None else range(world)
        for r in ranks:
            first = s * batch * world + r * batch
            offsets += [int(w) * ctx for w in src.window_ids(np.arange(first, first + batch))]
    # Map global token offsets to (shard, local offset); write through a memmap per shard.
    bounds = np.cumsum([0] + [sh["tokens"] for sh in shards])
    for off in offsets:
        k = int(np.searchsorted(bounds, off, side="right") - 1)
        mm = np.memmap(dest / "tokens" / shards[k]["file"], dtype=idx["dtype"], mode="r+")
        local = off - bounds[k]
        # CTX tokens, not CTX + 1: the next window's first token stays clean, so only these steps are poisoned.
        n = min(ctx, len(mm) - local)
        mm[local : local + n] = rng.integers(7, idx["vocab_size"], size=n)
        mm.flush()
        del mm
    return dest


# 1. kill -9 at random points, resume each time: bitwise identical to an uninterrupted run
def test_kill_9_then_resume_is_bitwise_identical(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    args = ["train", "--data", data_dir, "--depth", "1", "--steps", "150", "-q", "--resume", "auto",
            "--set", f"train.model.context={CTX}", "--set", f"train.batch_size={BATCH}", "--set", "train.precision='fp32'",
            "--set", "train.ckpt_every=5", "--set", "train.eval_every=50", "--set", "train.seed=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args), "-o", str(tmp_path / "ref")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    rnd = random.Random(7)
    kills = 0
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "lmforge", *map(str, args), "-o", str(run)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until this attempt is training (its metrics log grows), then kill at a random moment.
        size0 = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0
        t_end = time.time() + 60
        while time.time() < t_end and p.poll() is None:
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size != size0:
                break
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills == 3  # every attempt was killed mid-training, none finished on its own
    final = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args), "-o", str(run)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert same_weights(tmp_path / "ref", run)
    assert sum(e["event"] == "resumed" for e in read_events(run)) >= 1


# 2. poisoned data: the run heals itself, quarantines the poisoned steps, and ends near a clean run
def test_poisoned_batches_are_quarantined(medium_data, tmp_path):
    data_dir, _ = medium_data
    poisoned_steps = [240, 241, 242, 243, 244]
    bad = poison(data_dir, tmp_path / "bad_data", poisoned_steps, batch=16, ctx=64)
    # Past the chaotic early phase (where any perturbation moves the final loss by percents), and under one
    # epoch, so the poisoned windows are drawn at the poisoned steps and nowhere else.
    kw = dict(max_steps=600, batch_size=16, model=ModelConfig(depth=2, vocab_size=0, context=64), eval_every=300,
              eval_batches=16, log_every=10)
    clean = train(cfg_for(data_dir, tmp_path / "clean", **kw), progress=False)
    healed = train(cfg_for(bad, tmp_path / "healed", **kw), progress=False)
    assert healed["metrics"]["epochs"] < 1
    q = set(json.loads((tmp_path / "healed" / "quarantine.json").read_text())["steps"])
    assert set(poisoned_steps) <= q
    # The spike is caught on its first step, so the quarantine is the poisoned steps (skipped, then rolled
    # back over) plus at most a few natural outlier batches the detector also skipped.
    assert len(q - set(poisoned_steps)) <= 3, q
    kinds = [e["event"] for e in read_events(tmp_path / "healed")]
    assert "detected" in kinds and "quarantined" in kinds and kinds[-1] == "finished"
    a, b = clean["metrics"]["final_val_loss"], healed["metrics"]["final_val_loss"]
    assert abs(a - b) / a < 0.01, (a, b)


# 3. injected NaN: rollback, then finish
def test_injected_nan_rolls_back_and_finishes(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    man = train(cfg_for(data_dir, tmp_path / "r", inject_nan_at=[33]), progress=False)
    assert man["status"] == "complete"
    ev = read_events(tmp_path / "r")
    rb = [e for e in ev if e["event"] == "rolled_back"]
    assert len(rb) == 1 and rb[0]["to_step"] == 30
    q = json.loads((tmp_path / "r" / "quarantine.json").read_text())["steps"]
    assert q == [30, 31, 32, 33]
    assert man["metrics"]["guard"]["rollbacks"] == 1 and np.isfinite(man["metrics"]["final_val_loss"])


def test_guard_gives_up_with_a_report(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    cfg = cfg_for(data_dir, tmp_path / "r", inject_nan_at=[12, 25], guard=GuardConfig(max_rollbacks=1))
    with pytest.raises(LmforgeError, match="gave up at step 26 after 1 rollbacks"):
        train(cfg, progress=False)
    assert read_events(tmp_path / "r")[-1]["event"] == "gave_up"
    res = run_cli("status", tmp_path / "r")
    assert res.returncode == 0 and "gave_up" in res.stdout and "failed" in res.stdout


# 4. a corrupt newest checkpoint: resume falls back to the previous one and says so
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_falls_back(tiny_data, tmp_path, damage):
    data_dir, _ = tiny_data
    run = tmp_path / "r"
    train(cfg_for(data_dir, run, max_steps=30), progress=False)
    f = run / "checkpoints" / "step-00000030" / "state.pt"
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    res = run_cli("train", "--data", data_dir, "-o", run, "--depth", "1", "--steps", "40", "-q", "--resume", "auto",
                  "--set", f"train.model.context={CTX}", "--set", f"train.batch_size={BATCH}", "--set", "train.precision='fp32'",
                  "--set", "train.warmup_steps=5", "--set", "train.eval_every=40", "--set", "train.eval_batches=4", "--set", "train.ckpt_every=10",
                  "--set", "train.log_every=1", "--set", "train.seed=0")
    assert res.returncode == 0, res.stderr
    assert "skipping checkpoint step-00000030" in res.stderr and "falling back to the previous one" in res.stderr
    assert [e for e in read_events(run) if e["event"] == "resumed"][-1]["checkpoint"] == "step-00000020"


# 5. under torchrun, a poisoned rank gives one decision on every rank and the run finishes
def test_torchrun_poisoned_rank_consistent_decision(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    bad = poison(data_dir, tmp_path / "bad", [120, 121, 122], rank=1, world=2, batch=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "lmforge", "train", "--data", str(bad), "-o", str(tmp_path / "r"), "--depth", "1",
                          "--steps", "160", "-q", "--set", f"train.model.context={CTX}", "--set", "train.batch_size=4",
                          "--set", "train.precision='fp32'", "--set", "train.ckpt_every=10", "--set", "train.eval_every=80",
                          "--set", "train.seed=0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    q = set(json.loads((tmp_path / "r" / "quarantine.json").read_text())["steps"])
    assert {120, 121, 122} <= q and len(q) <= 10
    ev = read_events(tmp_path / "r")
    assert any(e["event"] == "detected" and e["step"] == 120 for e in ev)
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["status"] == "complete" and man["metrics"]["world_size"] == 2


# 6. SIGTERM mid-run: a clean checkpoint and exit code, then an exact continuation
def test_sigterm_checkpoints_and_resume_is_exact(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    args = ["train", "--data", str(data_dir), "--depth", "1", "--steps", "400", "-q", "--resume", "auto",
            "--set", f"train.model.context={CTX}", "--set", f"train.batch_size={BATCH}", "--set", "train.precision='fp32'",
            "--set", "train.ckpt_every=1000", "--set", "train.eval_every=200", "--set", "train.seed=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([sys.executable, "-m", "lmforge", *args, "-o", str(tmp_path / "ref")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "r"
    code, err = signal_when([*args, "-o", run], run / "metrics.jsonl", signal.SIGTERM, 0.2, contains='"loss"')
    assert code == 128 + signal.SIGTERM, err
    assert "interrupted by signal 15" in err
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "interrupted"
    step = man["metrics"]["steps_done"]
    assert 0 < step < 400 and (run / "checkpoints" / f"step-{step:08d}").exists()
    fin = subprocess.run([sys.executable, "-m", "lmforge", *args, "-o", str(run)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert fin.returncode == 0, fin.stderr
    assert same_weights(tmp_path / "ref", run)


# ---- bad input ----

def test_unparseable_quarantine_file(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    train(cfg_for(data_dir, tmp_path / "r", max_steps=10), progress=False)
    (tmp_path / "r" / "quarantine.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="quarantine.json: quarantine file does not parse"):
        train(cfg_for(data_dir, tmp_path / "r", max_steps=20), resume="auto", progress=False)


@pytest.mark.parametrize("kw, key", [(dict(loss_z=-1.0), "guard.loss_z"), (dict(window=1), "guard.window"),
                                     (dict(cooldown_factor=2.0), "guard.cooldown_factor")])
def test_detector_thresholds_out_of_range(kw, key):
    with pytest.raises(LmforgeError, match=key):
        GuardConfig(**kw)


def test_cli_threshold_out_of_range(tiny_data, tmp_path):
    res = run_cli("train", "--data", tiny_data[0], "-o", tmp_path / "r", "--set", "train.guard.loss_z=0", "-q")
    assert res.returncode == 2 and "guard.loss_z = 0.0 is out of range" in res.stderr


def test_lock_held_by_a_live_process_is_refused_and_stale_lock_recovered(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    run = tmp_path / "r"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (run / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(LmforgeError, match=f"being written by process {sleeper.pid}"):
            train(cfg_for(data_dir, run, max_steps=5), progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    man = train(cfg_for(data_dir, run, max_steps=5), progress=False)  # owner gone: the stale lock is taken over
    assert man["status"] == "complete" and not (run / ".lock").exists()


def test_status_shows_the_timeline(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    train(cfg_for(data_dir, tmp_path / "r", max_steps=40, inject_nan_at=[25]), progress=False)
    res = run_cli("status", tmp_path / "r", "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    kinds = [e["event"] for e in s["events"]]
    # the NaN at step 25: detected, rolled back to step 20, steps 20..25 quarantined, then the run finished
    assert kinds[kinds.index("detected"):] == ["detected", "rolled_back", "quarantined", "finished"], kinds
    rb = s["events"][kinds.index("rolled_back")]
    assert (rb["step"], rb["to_step"]) == (25, 20) and s["quarantined_steps"] == list(range(20, 26))
    assert s["health"] == "recovered: 0 skipped steps, 1 rollbacks" and s["status"] == "complete"
    table = run_cli("status", tmp_path / "r")
    assert table.returncode == 0 and "rolled_back" in table.stdout and "quarantined: 6 batch steps (20..25)" in table.stdout


def test_validation_stall_is_reported(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    # An lr too small to move fp32 weights: the val loss cannot improve, so the stall warning must fire once.
    train(cfg_for(data_dir, tmp_path / "r", max_steps=30, eval_every=5, lr=1e-12,
                  guard=GuardConfig(val_stall_evals=2)), progress=False)
    stalls = [e for e in read_events(tmp_path / "r") if e["event"] == "val_stall"]
    assert len(stalls) == 1 and stalls[0]["step"] == 15 and stalls[0]["evals"] == 2

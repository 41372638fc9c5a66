"""Two CPU processes under torchrun (DDP over gloo) follow the same loss curve as one process
with the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest


def losses(run_dir):
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    return [r["loss"] for r in recs if "loss" in r], [r["val_loss"] for r in recs if "val_loss" in r]


COMMON = ["--depth", "1", "--steps", "12", "-q", "--set", "model.context=32", "--set", "precision='fp32'",
          "--set", "log_every=1", "--set", "eval_every=6", "--set", "eval_batches=4", "--set", "warmup_steps=2"]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_torchrun_two_processes_match_one(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lmforge", "train", "--data", str(data_dir), "-o", str(tmp_path / "one"),
                             *COMMON, "--set", "batch_size=8"], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "lmforge", "train", "--data", str(data_dir), "-o", str(tmp_path / "two"),
                            *COMMON, "--set", "batch_size=4"], capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    (l1, v1), (l2, v2) = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 12 and len(v1) == len(v2) == 2
    for a, b in zip(l1 + v1, l2 + v2):
        assert abs(a - b) <= 2e-4 * abs(a), (l1, l2)
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["metrics"]["world_size"] == 2 and man["status"] == "complete"

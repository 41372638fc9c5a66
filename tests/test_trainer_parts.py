"""The trainer's parts one by one: the guard's knobs, the checkpointer's choices, gradient
accumulation, and the edge cases of resume."""

import json
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.model import ModelConfig, build_model
from lmforge.rundir import MANIFEST
from lmforge.train import distributed as D
from lmforge.train.checkpoint import Checkpointer, save_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.guard import EventLog, Guard, GuardConfig, SpikeDetector, read_events
from lmforge.train.schedule import lr_at
from lmforge.train.trainer import train
from test_train import tiny_cfg


def metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]


def strict_json(path):
    """json.loads accepts NaN; a manifest must not contain it."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_quarantine_window_limits_what_a_rollback_quarantines(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data[0], tmp_path / "r", max_steps=40, ckpt_every=10, inject_nan_at=[33],
                   guard=GuardConfig(quarantine_window=2))
    man = train(cfg, progress=False)
    q = json.loads((tmp_path / "r" / "quarantine.json").read_text())["steps"]
    # rolled back to step 30, but only the 2 steps before the trouble (and the trouble itself) are quarantined
    assert q == [31, 32, 33]
    assert man["metrics"]["guard"]["rollbacks"] == 1


def test_cooldown_cuts_the_lr_after_a_rollback(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data[0], tmp_path / "r", max_steps=50, ckpt_every=10, inject_nan_at=[33],
                   guard=GuardConfig(cooldown_steps=5, cooldown_factor=0.5))
    train(cfg, progress=False)
    steps = [r["step"] - 1 for r in metrics(tmp_path / "r") if "lr" in r]  # 0-based steps, in log order
    lrs = {r["step"] - 1: r["lr"] for r in metrics(tmp_path / "r") if "lr" in r}
    base = lambda s: lr_at(s, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.max_steps, schedule=cfg.schedule,
                           min_lr_ratio=cfg.min_lr_ratio)
    # back to step 30, steps 30..33 quarantined (logged once before the NaN, never replayed);
    # the cooldown runs to 30 + 5 + 4 = 39
    assert 33 not in lrs and all(steps.count(s) == 1 for s in (30, 31, 32))
    for s in range(34, 39):
        assert lrs[s] == pytest.approx(0.5 * base(s))
    for s in (39, 40):
        assert lrs[s] == pytest.approx(base(s))



def test_grad_z_flags_a_gradient_spike_only_when_enabled():
    history = [(2.0 - 0.001 * i, 1.0 + 0.01 * (i % 5)) for i in range(30)]
    for grad_z, expected in ((0.0, "ok"), (6.0, "spike")):
        det = SpikeDetector(GuardConfig(grad_z=grad_z))
        for loss, g in history:
            det.accept(loss, g)
        verdict, reason = det.verdict(1.97, 10.0)  # an ordinary loss, a gradient norm 10x the window's
        assert verdict == expected
        if expected == "spike":
            assert reason.startswith("grad norm 10.000")


def test_guard_state_round_trips_and_rewind_keeps_history(tmp_path):
    events = EventLog(tmp_path, enabled=True)
    g = Guard(GuardConfig(max_skips=0, cooldown_steps=3), tmp_path, events, is_main=True, resume=False)
    for i in range(25):
        assert g.judge(i, 2.0 - 0.01 * i, 1.0) == "ok"
    saved = g.state_dict()
    assert g.judge(25, float("nan"), 1.0) == "rollback"
    ckpt = tmp_path / "checkpoints" / "step-00000020"
    target, back_to, n_bad = g.plan_rollback(26, lambda step: ckpt if step >= 20 else None)
    assert (target, back_to, n_bad) == (ckpt, 20, 7) and g.quarantine == set(range(20, 27))
    g.recovery_time_s = 1.5
    g.rewind(saved, back_to, n_bad)
    assert g.rollbacks == 1 and g.recovery_time_s == 1.5 and g.trouble_start == -1
    assert g.cooldown_until == 20 + 3 + 7 and g.lr_scale(29) == 0.5 and g.lr_scale(30) == 1.0
    h = Guard(GuardConfig(), tmp_path, events, is_main=True, resume=True)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict() and h.quarantine == g.quarantine  # the quarantine file is read back


def test_rollback_past_a_pruned_or_corrupt_checkpoint(tmp_path):
    """keep_checkpoints=2 has pruned step 0; a corrupt step 20 makes step 10 the target; with 10
    corrupt too, nothing predates the trouble and the guard gives up with a clear message."""
    model = build_model(ModelConfig(depth=1, vocab_size=64, context=8))
    opt = torch.optim.AdamW(model.parameters())
    for step in (0, 10, 20):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    assert not (tmp_path / "checkpoints" / "step-00000000").exists()
    ck = Checkpointer(tmp_path, 2, model, model, opt, {}, D.DistInfo(), fsdp=False)
    (tmp_path / "checkpoints" / "step-00000020" / "state.pt").write_bytes(b"damaged")
    g = Guard(GuardConfig(), tmp_path, EventLog(tmp_path), is_main=True, resume=False)
    g.trouble_start = 25
    assert g.plan_rollback(27, ck.newest_valid_before)[:2] == (tmp_path / "checkpoints" / "step-00000010", 10)
    (tmp_path / "checkpoints" / "step-00000010" / "model.safetensors").write_bytes(b"damaged")
    g.trouble_start = 25
    with pytest.raises(LmforgeError, match="found no checkpoint .* before step 26; raise train.keep_checkpoints"):
        g.plan_rollback(27, ck.newest_valid_before)
    assert read_events(tmp_path)[-1]["event"] == "gave_up"


def test_grad_accum_matches_one_big_batch(tiny_data, tmp_path):
    one = train(tiny_cfg(tiny_data[0], tmp_path / "one", batch_size=8, max_steps=6), progress=False)
    acc = train(tiny_cfg(tiny_data[0], tmp_path / "acc", batch_size=4, grad_accum=2, max_steps=6), progress=False)
    l1 = [r["loss"] for r in metrics(tmp_path / "one") if "loss" in r]
    l2 = [r["loss"] for r in metrics(tmp_path / "acc") if "loss" in r]
    assert len(l1) == len(l2) == 6
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-4 * a, (l1, l2)
    assert one["metrics"]["tokens"] == acc["metrics"]["tokens"]


def test_resume_that_lands_on_max_steps_writes_valid_json(tiny_data, tmp_path):
    first = train(tiny_cfg(tiny_data[0], tmp_path / "r", max_steps=16), progress=False)
    again = train(tiny_cfg(tiny_data[0], tmp_path / "r", max_steps=16), resume="auto", progress=False)
    man = strict_json(tmp_path / "r" / MANIFEST)
    assert man["status"] == "complete"
    assert again["metrics"]["final_train_loss"] == first["metrics"]["final_train_loss"]
    assert math.isfinite(again["metrics"]["final_val_loss"])


def test_a_checkpoint_rewrites_the_manifest_while_running(tiny_data, tmp_path):
    import signal
    from conftest import signal_when

    args = ["train", "--data", tiny_data[0], "--depth", "1", "--steps", "400", "-q", "-o", tmp_path / "r",
            "--set", "train.model.context=32", "--set", "train.batch_size=4", "--set", "train.ckpt_every=3",
            "--set", "train.precision='fp32'"]
    signal_when(args, tmp_path / "r" / "metrics.jsonl", signal.SIGTERM, 0.5, contains='"loss"')
    man = strict_json(tmp_path / "r" / MANIFEST)
    assert man["metrics"]["steps_done"] >= 3


def test_hardware_is_checked_when_the_config_is_read_and_gpus_come_from_the_catalog(tmp_path, monkeypatch):
    from lmforge.cost.catalog import detect_hardware_name, device_peak

    monkeypatch.setenv("LMFORGE_CONFIG", str(tmp_path))
    with pytest.raises(LmforgeError, match=r"unknown hardware 'B300' \(train.hardware\): not in the hardware catalog"):
        TrainConfig(hardware="B300")
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B300 SXM")
    with pytest.raises(LmforgeError, match="the GPU 'NVIDIA B300 SXM' is not in the hardware catalog; add an entry"):
        detect_hardware_name(gpu)
    # a user's catalog entry names the GPU, prices it and is the MFU denominator
    (tmp_path / "hardware.toml").write_text("[B300]\npeak_bf16 = 2.25e15\npeak_fp32 = 7.5e13\nwatts = 1100\n"
                                            "usd_per_hour = 6.0\n")
    assert TrainConfig(hardware="b300").hardware == "B300"
    assert detect_hardware_name(gpu) == "B300"
    assert device_peak(gpu, "auto", "bf16")[0] == 2.25e15
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert detect_hardware_name(gpu) == "H100" and device_peak(gpu, "auto", "bf16")[0] == 989e12

import json
import shutil

import pytest
import torch

from conftest import run_cli
from lmforge.errors import LmforgeError
from lmforge.model.io import load_model
from lmforge.model.model import ModelConfig
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import train


def tiny_cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), model=ModelConfig(depth=1, vocab_size=0, context=32),
                batch_size=4, max_steps=16, lr=3e-3, warmup_steps=2, eval_every=8, eval_batches=2,
                ckpt_every=8, log_every=1, precision="fp32", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir):
    return load_model(run_dir).state_dict()


def test_train_writes_a_complete_run_dir(tiny_data, tmp_path):
    data_dir, tok_dir = tiny_data
    man = train(tiny_cfg(data_dir, tmp_path / "run", max_steps=30, eval_every=10), progress=False)
    assert man["status"] == "complete" and man["stage"] == "train"
    m = man["metrics"]
    assert m["steps"] == 30 and m["tokens"] == 30 * 4 * 32
    assert m["final_val_loss"] < 6.0  # below log(512) = 6.24: it learned something
    assert m["model_flops"] == m["tokens"] * m["flops_per_token"]
    assert man["inputs"]["tokenizer"]["path"] == str(tok_dir.resolve())
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert [r["step"] for r in recs if "val_loss" in r] == [10, 20, 30]
    assert load_model(tmp_path / "run").cfg.vocab_size == 512


def test_resume_is_exact(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    train(tiny_cfg(data_dir, tmp_path / "straight"), progress=False)
    run = tmp_path / "interrupted"
    train(tiny_cfg(data_dir, run), progress=False)
    # Pretend the run died after the step-8 checkpoint.
    shutil.rmtree(run / "checkpoints" / "step-00000016")
    (run / "model.safetensors").unlink()
    train(tiny_cfg(data_dir, run), resume=True, progress=False)
    a, b = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_different_config_is_refused(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    train(tiny_cfg(data_dir, tmp_path / "r", max_steps=8), progress=False)
    with pytest.raises(LmforgeError, match=r"--resume: .* different config \(differs in: lr\)"):
        train(tiny_cfg(data_dir, tmp_path / "r", max_steps=8, lr=1e-3), resume=True, progress=False)


def test_rerun_without_resume_is_refused(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    train(tiny_cfg(data_dir, tmp_path / "r", max_steps=8), progress=False)
    with pytest.raises(LmforgeError, match="already holds a training run; pass --resume"):
        train(tiny_cfg(data_dir, tmp_path / "r", max_steps=8), progress=False)


def test_corrupt_newest_checkpoint_falls_back(tiny_data, tmp_path, capsys):
    data_dir, _ = tiny_data
    run = tmp_path / "r"
    train(tiny_cfg(data_dir, run), progress=False)
    newest = run / "checkpoints" / "step-00000016" / "model.safetensors"
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    train(tiny_cfg(data_dir, run, max_steps=16), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping checkpoint step-00000016" in err and "checksum mismatch" in err


def test_init_from_continues_an_existing_model(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    train(tiny_cfg(data_dir, tmp_path / "a", max_steps=4), progress=False)
    man = train(tiny_cfg(data_dir, tmp_path / "b", max_steps=4, init_from=str(tmp_path / "a")), progress=False)
    assert "init_from" in man["inputs"]
    assert man["metrics"]["final_val_loss"] < json.loads((tmp_path / "a" / "manifest.json").read_text())["metrics"]["final_val_loss"]


# ---- bad input through the CLI: one line, exit code 2, no traceback ----

def _one_line_error(res, needle):
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def test_cli_n_head_not_dividing_width(tiny_data, tmp_path):
    res = run_cli("train", "--data", tiny_data[0], "-o", tmp_path / "r", "--depth", "2", "--set", "train.model.n_head=3", "-q")
    _one_line_error(res, "model.n_head = 3 does not divide model.d_model = 128")


def test_cli_batch_that_does_not_fit(tiny_data, tmp_path):
    res = run_cli("train", "--data", tiny_data[0], "-o", tmp_path / "r", "--depth", "1", "--set", "train.batch_size=100000", "-q")
    _one_line_error(res, "a batch doesn't fit")


def test_cli_unknown_config_key(tiny_data, tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[train]\nmax_steps = 3\n[train.model]\ndepht = 2\n")
    res = run_cli("train", "--data", tiny_data[0], "-o", tmp_path / "r", "-c", cfg, "-q")
    _one_line_error(res, f"{cfg}: unknown key 'train.model.depht'")
    cfg.write_text("max_steps = 3\n")  # the layout before sections: refused, not ignored
    res = run_cli("train", "--data", tiny_data[0], "-o", tmp_path / "r", "-c", cfg, "-q")
    _one_line_error(res, f"{cfg}: key 'max_steps' is outside any table; settings go under the table of their stage, e.g. [train]")


def test_corrupted_only_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    run = tmp_path / "r"
    train(tiny_cfg(data_dir, run, max_steps=8, ckpt_every=8), progress=False)
    for step in (0, 8):  # the step-0 rollback target and the final checkpoint
        ck = run / "checkpoints" / f"step-{step:08d}" / "state.pt"
        ck.write_bytes(ck.read_bytes()[:100])
    # every checkpoint is bad: resuming names the damage instead of silently starting over
    with pytest.raises(LmforgeError, match="no checkpoint in .* verifies .*step-00000008.*checksum mismatch"):
        train(tiny_cfg(data_dir, run, max_steps=16, ckpt_every=8), resume="auto", progress=False)


def test_cli_truncated_model_file(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    run = tmp_path / "r"
    train(tiny_cfg(data_dir, run, max_steps=2), progress=False)
    w = run / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    res = run_cli("sample", run, "-p", "def ", "-n", "4")
    _one_line_error(res, "corrupted or truncated weights file")


def test_cli_resume_with_different_config(tiny_data, tmp_path):
    args = ["train", "--data", tiny_data[0], "-o", tmp_path / "r", "--depth", "1", "--steps", "2", "-q",
            "--set", "train.batch_size=2", "--set", "train.model.context=16", "--set", "train.precision='fp32'"]
    assert run_cli(*args).returncode == 0
    res = run_cli(*args, "--resume", "auto", "--set", "train.lr=0.01")
    _one_line_error(res, "different config (differs in: lr)")


def test_compiled_training_follows_the_eager_loss_curve(tiny_data, tmp_path, monkeypatch):
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    data_dir, _ = tiny_data
    eager = train(tiny_cfg(data_dir, tmp_path / "eager", max_steps=6, eval_every=0, log_every=1), progress=False)
    compiled_calls = []
    real_compile = torch.compile

    def counting_compile(model, *a, **k):
        compiled_calls.append(type(model).__name__)
        return real_compile(model, *a, **k)

    monkeypatch.setattr(torch, "compile", counting_compile)
    comp = train(tiny_cfg(data_dir, tmp_path / "compiled", max_steps=6, eval_every=0, log_every=1, compile=True),
                 progress=False)
    assert comp["status"] == "complete" and compiled_calls  # the compiled path really ran
    a = [json.loads(ln)["loss"] for ln in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    b = [json.loads(ln)["loss"] for ln in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-3 * x for x, y in zip(a, b)), (a, b)
    assert eager["metrics"]["final_val_loss"] == pytest.approx(comp["metrics"]["final_val_loss"], rel=1e-3)

import numpy as np
import pytest
import torch

from lmforge.config import parse_overrides
from lmforge.errors import LmforgeError
from lmforge.train.batches import BatchSource, val_batches
from lmforge.train.config import TrainConfig, load_train_config, resume_mode
from lmforge.train.schedule import lr_at


class ArrayTokens:
    def __init__(self, arr):
        self.arr = arr

    def __len__(self):
        return len(self.arr)

    def window(self, off, n):
        return self.arr[off : off + n]


def test_cosine_and_wsd_schedules():
    kw = dict(lr=1.0, warmup=10, total=100, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(99, **kw, schedule="cosine") == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, **kw, schedule="wsd", decay_frac=0.2) == 1.0
    assert lr_at(90, **kw, schedule="wsd", decay_frac=0.2) == pytest.approx(0.55)
    vals = [lr_at(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_batches_are_a_pure_function_of_seed_step_rank():
    src = BatchSource(ArrayTokens(np.arange(10_000)), context=16, seed=3)
    a = src.micro_batch(7, 0, 0, batch_size=4, grad_accum=1, world=1)[0]
    fresh = BatchSource(ArrayTokens(np.arange(10_000)), context=16, seed=3)
    assert torch.equal(a, fresh.micro_batch(7, 0, 0, batch_size=4, grad_accum=1, world=1)[0])
    other_seed = BatchSource(ArrayTokens(np.arange(10_000)), context=16, seed=4)
    assert not torch.equal(a, other_seed.micro_batch(7, 0, 0, batch_size=4, grad_accum=1, world=1)[0])


def test_global_batch_is_the_same_for_any_split_over_ranks():
    src = BatchSource(ArrayTokens(np.arange(5_000)), context=8, seed=0)
    one = src.micro_batch(3, 0, 0, batch_size=8, grad_accum=1, world=1)[0]
    two = torch.cat([src.micro_batch(3, r, 0, batch_size=4, grad_accum=1, world=2)[0] for r in range(2)])
    accum = torch.cat([src.micro_batch(3, 0, m, batch_size=2, grad_accum=4, world=1)[0] for m in range(4)])
    assert torch.equal(one, two) and torch.equal(one, accum)


def test_targets_are_inputs_shifted_and_epochs_cover_every_window():
    src = BatchSource(ArrayTokens(np.arange(1 + 8 * 10)), context=8, seed=1)
    x, y = src.micro_batch(0, 0, 0, batch_size=10, grad_accum=1, world=1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert sorted(int(r[0]) for r in x) == [8 * i for i in range(10)]  # one epoch = each window once


def test_val_batches_are_fixed():
    toks = ArrayTokens(np.arange(1000))
    a = [x for x, _ in val_batches(toks, 16, 4, 3)]
    b = [x for x, _ in val_batches(toks, 16, 4, 3)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b))
    # split over 2 ranks with half the per-rank batch: the same windows, just dealt out
    halves = [x for r in range(2) for x, _ in val_batches(toks, 16, 2, 3, rank=r, world=2)]
    assert sorted(map(tuple, torch.cat(halves).tolist())) == sorted(map(tuple, torch.cat(a).tolist()))
    # the 12 windows are spread over the whole split, not taken from its start
    starts = sorted(int(r[0]) for r in torch.cat(a))
    assert starts[0] == 0 and starts[-1] > 1000 * 0.8 and len(set(starts)) == 12


def test_config_rejects_unknown_keys_and_bad_types(tmp_path):
    toml = tmp_path / "cfg.toml"
    toml.write_text("[train.model]\ndept = 3\n")
    with pytest.raises(LmforgeError, match="cfg.toml: unknown key 'train.model.dept'"):
        load_train_config(toml)
    with pytest.raises(LmforgeError, match="key 'train.lr' = 'fast' should be of type float"):
        load_train_config(sets=["train.lr=fast"])
    with pytest.raises(LmforgeError, match="train.schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(LmforgeError, match=r"unknown hardware 'B300' \(train.hardware\): not in the hardware catalog; known: A100"):
        load_train_config(sets=["train.hardware='B300'"])


def test_one_precedence_defaults_file_set_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[data]\nmin_chars = 3\n[train]\nlr = 2e-3\nwarmup_steps = 7\nseed = 5\n[train.model]\ndepth = 3\n")
    cfg = load_train_config(toml, ["train.lr=1e-3", "train.model.n_kv_head=1", "train.seed=6"], {"seed": 9})
    assert (cfg.lr, cfg.warmup_steps, cfg.seed) == (1e-3, 7, 9)  # --set beats the file, a flag beats --set
    assert cfg.model.depth == 3 and cfg.model.n_kv_head == 1 and cfg.model.vocab_size == 0
    assert cfg.max_steps == TrainConfig.max_steps  # untouched keys keep their defaults
    with pytest.raises(LmforgeError, match="--set lr...: keys start with the section 'train'"):
        load_train_config(sets=["lr=1e-3"])


def test_resume_mode_has_one_spelling(tmp_path):
    assert resume_mode(True) == resume_mode("auto") == "auto"
    assert resume_mode(False) == resume_mode(None) == resume_mode("") == resume_mode("never") == "never"
    assert resume_mode(str(tmp_path)) == tmp_path
    with pytest.raises(LmforgeError, match="--resume nowhere: no such checkpoint directory"):
        resume_mode("nowhere")


def test_parse_overrides_requires_key_value():
    with pytest.raises(LmforgeError, match="--set 'lr'"):
        parse_overrides(["lr"])


def test_run_files_get_the_permissions_a_plain_write_would(tmp_path):
    """Atomic writes go through a temp file; it must not leave run files private (mkstemp's 0600)."""
    import os
    import stat

    from lmforge.export.hf import _staging
    from lmforge.model.io import save_model
    from lmforge.model.model import ModelConfig, build_model
    from lmforge.rundir import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        save_model(build_model(ModelConfig(depth=1, vocab_size=64, context=8)), tmp_path / "model")
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain_dir").mkdir()
        staged = tmp_path / "staged"
        with _staging(staged) as d:
            (d / "f.txt").write_text("x")
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o644
    for f in (tmp_path / "m.json", tmp_path / "model" / "model.safetensors", tmp_path / "model" / "model_config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == plain, f
    assert stat.S_IMODE(staged.stat().st_mode) == stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode) == 0o755

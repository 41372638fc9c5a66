"""The ladder, fit, forecast, plan and cost ledger on real (micro) training runs."""

import json
import re
import shutil
import signal

import pytest

from conftest import run_cli, signal_when
from lmforge.cost.ledger import ledger
from lmforge.errors import LmforgeError
from lmforge.model.model import ModelConfig, flops_per_token, param_counts
from lmforge.scaling.design import design_ladder
from lmforge.scaling.experiment import PILOT_FILE, ExperimentConfig, ladder_base, run_experiment
from lmforge.scaling.forecast import best_depth, check_forecast, depth_options, fit_runs, forecast, load_fit, plan_compute
from lmforge.scaling.ladder import (LadderConfig, create_ladder, load_ladder, plan_ladder, run_ladder, rung_warmup,
                                   target_limits)
from lmforge.train.guard import read_events

CTX = 32


def micro_ladder_cfg(**kw):
    base = dict(depths=[1, 2], tokens=[2560, 5120, 10240], context=CTX, eval_windows=64, precision="fp32", seed=0)
    base.update(kw)
    return LadderConfig(**base)


@pytest.fixture(scope="module")
def micro_ladder(tiny_data, tmp_path_factory):
    """Six finished micro rungs (2 depths x 3 token budgets) and their fit."""
    data_dir, _ = tiny_data
    lad = tmp_path_factory.mktemp("ladder") / "ladder"
    create_ladder(lad, micro_ladder_cfg(), str(data_dir))
    run_ladder(lad, progress=False)
    fit_runs([lad], lad, n_boot=20)
    return lad


def test_plan_keeps_rungs_under_the_target_and_follows_the_size_rules(tiny_data):
    cfg = LadderConfig(depths=[1, 2, 3, 4], tokens=[1e6, 2e6, 4e6, 8e6], eval_windows=1024)
    target = 5e14
    # warmup: 5% of the steps, at least 200, at most half the run
    assert [rung_warmup(n, cfg) for n in (100, 300, 489, 4000, 10000)] == [50, 150, 200, 200, 500]
    rungs = plan_ladder(cfg, str(tiny_data[0]), 4096, **target_limits(target))
    assert len(rungs) >= 8
    assert max(r["flops"] for r in rungs) <= target / 10
    assert sum(r["flops"] for r in rungs) <= target / 3
    by_depth = {r["depth"]: r for r in rungs}
    # lr ~ 1/width (capped at lr_ref), batch a power of two that grows with N, warmup a share of the steps
    # with a floor
    assert by_depth[3]["lr"] == pytest.approx(cfg.lr_ref * cfg.d_ref / 192)
    assert by_depth[1]["lr"] == cfg.lr_ref
    batches = [by_depth[d]["batch_size"] for d in sorted(by_depth)]
    assert batches == sorted(batches) and all(b & (b - 1) == 0 for b in batches)
    for r in rungs:
        assert r["warmup_steps"] == rung_warmup(r["steps"], cfg)
        assert r["flops"] == r["flops_per_token"] * r["D"]
        assert cfg.eval_windows % r["batch_size"] == 0  # every rung is scored on the same val windows


def test_multipliers_are_tokens_per_parameter(tiny_data):
    cfg = LadderConfig(depths=[2], multipliers=[1, 2, 5, 10])
    rungs = plan_ladder(cfg, str(tiny_data[0]), 4096)
    for r, m in zip(rungs, [1, 2, 5, 10]):
        assert r["D"] / r["N"] == pytest.approx(20 * m, rel=0.01)


def test_budget_below_the_smallest_rung_is_refused(tiny_data):
    with pytest.raises(LmforgeError, match="below even the smallest rung"):
        plan_ladder(LadderConfig(depths=[2]), str(tiny_data[0]), 4096, budget_flops=1e6)
    res = run_cli("ladder", "plan", "--data", tiny_data[0], "-o", "/tmp/never-written", "--depths", "2",
                  "--target-flops", "1e6")
    assert res.returncode == 2 and "below even the smallest rung" in res.stderr
    res = run_cli("ladder", "plan", "--data", tiny_data[0], "--depths", "one,two")
    assert res.returncode == 2 and "--depths 'one,two': expected comma-separated numbers" in res.stderr


def test_micro_ladder_runs_end_to_end_and_resumes_an_interrupted_rung(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    lad = tmp_path / "ladder"
    create_ladder(lad, micro_ladder_cfg(depths=[1], tokens=[2560, 51200, 5120]), str(data_dir))
    names = [r["name"] for r in load_ladder(lad)["rungs"]]
    assert names == ["d1-0.00256M", "d1-0.00512M", "d1-0.0512M"]  # smallest compute first
    # Interrupt the run while the last rung trains: its log exists, the first two rungs are done.
    last = lad / "rungs" / names[2]
    # SIGTERM once the last rung has logged its first training step: it is mid-run, whatever the machine's speed
    code, err = signal_when(["ladder", "run", lad, "-q"], last / "metrics.jsonl", signal.SIGTERM, 0.0,
                            contains='"loss"')
    assert code == 128 + signal.SIGTERM, err
    assert json.loads((last / "manifest.json").read_text())["status"] == "interrupted"
    done_before = {n: (lad / "rungs" / n / "manifest.json").read_text() for n in names[:2]}

    res = run_cli("ladder", "run", lad)
    assert res.returncode == 0, res.stderr
    for n in names[:2]:  # finished rungs are skipped, not retrained
        assert (lad / "rungs" / n / "manifest.json").read_text() == done_before[n]
    assert any(e["event"] == "resumed" for e in read_events(last))
    assert json.loads((last / "manifest.json").read_text())["status"] == "complete"
    assert "[ladder 3/3]" in res.stdout and "[ladder 1/3]" not in res.stdout


def test_fit_forecast_and_compute_only_law_from_the_micro_ladder(micro_ladder):
    nd, c, d = load_fit(micro_ladder)
    assert nd.n_points == 6 and len(d["points"]) == 6
    assert d["model"] == {"vocab_size": 512, "context": CTX, "aspect": 64}
    rungs = {r["name"]: r for r in load_ladder(micro_ladder)["rungs"]}
    for p in d["points"]:  # each point is the rung's manifest, not a recomputation
        m = json.loads((micro_ladder / "rungs" / p["name"] / "manifest.json").read_text())["metrics"]
        assert (p["N"], p["D"], p["loss"], p["C"]) == (m["params_non_embedding"], m["tokens"], m["final_val_loss"],
                                                       m["model_flops"])
        assert p["D"] == rungs[p["name"]]["D"]
    # the law reproduces the runs it was fitted on
    for p in d["points"]:
        assert nd.predict(p["N"], p["D"]) == pytest.approx(p["loss"], rel=0.05)
    fc = forecast(micro_ladder, 4e5, 2e4)
    assert fc["interval_95"][0] <= fc["interval_80"][0] <= fc["loss"] <= fc["interval_80"][1] <= fc["interval_95"][1]
    res = run_cli("forecast", "--fit", micro_ladder, "--params", "4e5", "--tokens", "2e4")
    assert res.returncode == 0 and f"{fc['loss']:.4f}" in res.stdout


def test_forecast_far_outside_the_fitted_range_warns(micro_ladder):
    fc = forecast(micro_ladder, 4e9, 1e12)
    assert any("far outside the fitted range" in w and "N is" in w for w in fc["warnings"])
    res = run_cli("forecast", "--fit", micro_ladder, "--params", "4e9", "--tokens", "1e12")
    assert res.returncode == 0 and "warning: forecast far outside the fitted range" in res.stdout


def test_fit_refuses_runs_that_never_finished(micro_ladder, tmp_path):
    lad = tmp_path / "lad"
    shutil.copytree(micro_ladder, lad)
    m = lad / "rungs" / "d2-0.01024M" / "manifest.json"
    man = json.loads(m.read_text())
    man["status"] = "interrupted"
    m.write_text(json.dumps(man))
    res = run_cli("fit", lad)
    assert res.returncode == 2 and "cannot fit on runs that never finished" in res.stderr and "d2-0.01024M" in res.stderr


def test_fit_refuses_runs_on_different_tokenizers(micro_ladder, tmp_path):
    lad = tmp_path / "lad"
    shutil.copytree(micro_ladder, lad)
    m = lad / "rungs" / "d1-0.00256M" / "manifest.json"
    man = json.loads(m.read_text())
    man["inputs"]["tokenizer"]["hash"] = "sha256:" + "0" * 64
    m.write_text(json.dumps(man))
    with pytest.raises(LmforgeError, match="different data, tokenizers"):
        fit_runs([lad], tmp_path / "fit")


def test_depth_plan_is_the_best_depth_for_the_budget(micro_ladder):
    nd, _, _ = load_fit(micro_ladder)
    C = 1e12
    opts = depth_options(nd, C, 512, CTX)
    pick = best_depth(nd, C, 512, CTX)
    assert pick["loss"] == min(o["loss"] for o in opts)
    cfg = ModelConfig(depth=pick["depth"], vocab_size=512, context=CTX)
    assert pick["D"] * flops_per_token(cfg) == pytest.approx(C) and pick["N"] == param_counts(cfg)["non_embedding"]
    plan = plan_compute(micro_ladder, flops=C, hardware="cpu")
    assert plan["depth_plan"]["depth"] == pick["depth"]
    with pytest.raises(LmforgeError, match="too small for even the smallest model"):
        plan_compute(micro_ladder, flops=1e6, hardware="cpu")


def test_unknown_hardware_is_refused(micro_ladder):
    res = run_cli("plan", "--fit", micro_ladder, "--flops", "1e20", "--hardware", "TPU-v9")
    assert res.returncode == 2 and "unknown hardware 'TPU-v9'" in res.stderr and "H100" in res.stderr


def test_reverse_plan_gpt4_scale():
    # 25,000 A100s for 100 days at 35% MFU (the public back-of-envelope for GPT-4)
    r = plan_compute(None, gpus=25_000, days=100, hardware="A100", mfu=0.35)
    assert r["flops"] == pytest.approx(25_000 * 100 * 86_400 * 312e12 * 0.35)
    assert r["device_hours"] == pytest.approx(25_000 * 100 * 24)
    assert r["wall_days"] == pytest.approx(100)


def test_ledger_sums_match_the_manifests(micro_ladder):
    L = ledger([micro_ladder])
    mans = [json.loads((micro_ladder / "rungs" / r["name"] / "manifest.json").read_text())
            for r in load_ladder(micro_ladder)["rungs"]]
    assert len(L["runs"]) == len(mans) == 6
    assert L["total"]["flops"] == pytest.approx(sum(m["metrics"]["model_flops"] for m in mans))
    assert L["total"]["usd"] == pytest.approx(sum(m["metrics"]["cost"]["usd"] for m in mans))
    assert L["total"]["kwh"] == pytest.approx(sum(m["metrics"]["cost"]["kwh"] for m in mans))
    for m in mans:  # every run records its cost
        assert {"model_flops", "train_time_s", "mfu", "device_hours", "cost"} <= set(m["metrics"])
        assert {"kwh", "usd", "co2_kg", "hardware"} <= set(m["metrics"]["cost"])
    res = run_cli("cost", micro_ladder, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["total"]["flops"] == pytest.approx(L["total"]["flops"])


def test_a_run_with_a_forecast_checks_itself(micro_ladder, tiny_data, tmp_path):
    from lmforge.scaling.forecast import train_with_forecast
    from lmforge.scaling.ladder import rung_train_config

    plan = load_ladder(micro_ladder)
    rung = dict(plan["rungs"][-1], steps=60, D=60 * plan["rungs"][-1]["batch_size"] * CTX)
    cfg = rung_train_config(rung, LadderConfig(**plan["config"]), str(tiny_data[0]), tmp_path / "target")
    man = train_with_forecast(cfg, micro_ladder / "fit.json", progress=False)
    assert man["forecast"]["loss"] > 0 and man["forecast"]["C"] == man["metrics"]["model_flops"]
    chk = check_forecast(tmp_path / "target")
    assert chk == man["forecast_check"]
    assert chk["error_pct"] == pytest.approx(100 * (chk["actual"] - chk["forecast"]) / chk["actual"])
    res = run_cli("forecast", "--check", tmp_path / "target")
    assert res.returncode == 0 and f"error {chk['error_pct']:+.2f}%" in res.stdout


def test_experiment_preset_forecasts_before_the_targets_and_resumes(medium_data, tmp_path):
    """`lmforge ladder experiment` at micro scale: design, ladder, fit, two forecasts before either target, report."""

    corpus = medium_data[0].parent / "corpus"  # ~1.5M train tokens: the targets stay within one epoch
    # No pilot: at this scale its tail starts beyond any rung these targets allow
    # (test_experiment_pilot_sizes_the_rungs_or_names_the_budgets_that_would_do).
    cfg = ExperimentConfig(sources=[str(corpus)], vocab_size=512, target_flops=[3e11, 5e11], target_depths=[2, 3],
                           aspect=16, min_steps=10, context=64, eval_windows=64, n_boot=10, pilot=False)
    out = tmp_path / "exp"
    r = run_experiment(out, cfg, progress=False)
    plan = load_ladder(out / "ladder")
    assert sorted(plan["config"]["depths"]) == [2, 3, 4] and len(plan["rungs"]) == 9
    largest = max(g["flops"] for g in plan["rungs"])
    assert largest <= 3e11 / 10 and plan["total_flops"] <= 3e11 / 3
    made = json.loads((out / "forecast.json").read_text())
    assert len(r["targets"]) == 2 and [t["depth"] for t in r["targets"]] == [2, 3]
    for entry, t in zip(made["targets"], r["targets"]):
        man = json.loads((out / t["name"] / "manifest.json").read_text())
        # every forecast was on disk before any target launched, and each run recorded its own
        assert made["made_at"] <= t["launched_at"] <= man["created"]
        assert man["forecast"]["loss"] == pytest.approx(entry["forecast"]["loss"]) == pytest.approx(t["forecast"])
        assert t["actual"] == man["metrics"]["final_val_loss"] and man["metrics"]["epochs"] <= 1
        assert t["error_pct"] == pytest.approx(100 * (t["actual"] - t["forecast"]) / t["actual"])
    assert r["targets"][1]["largest_rung_ratio"] >= 25 and r["targets"][0]["largest_rung_ratio"] >= 10
    assert r["corpus_hash"] and r["fit"]["form"] in ("ND", "kaplan") and r["machine"]["cpu"] and r["precision"]
    assert {g["name"] for g in r["rungs"]} == {g["name"] for g in plan["rungs"]}
    assert (out / "scaling.png").exists() and "| forecast |" in (out / "report.md").read_text()
    stamp = (out / "forecast.json").read_text()
    again = run_experiment(out, cfg, progress=False)  # everything done: nothing reruns, the forecasts stay
    assert (out / "forecast.json").read_text() == stamp and again["targets"] == r["targets"]
    with pytest.raises(LmforgeError, match="different config"):
        run_experiment(out, ExperimentConfig(**{**cfg.__dict__, "target_flops": [4e11, 5e11]}), progress=False)


def test_experiment_pilot_sizes_the_rungs_or_names_the_budgets_that_would_do(medium_data, tmp_path):
    """The pilot finds where the loss curve reaches its tail; targets too small for rungs past it get an
    error that names the smallest budgets (same ratios) that would do, and the pilot is not rerun."""
    corpus = medium_data[0].parent / "corpus"
    cfg = ExperimentConfig(sources=[str(corpus)], vocab_size=512, target_flops=[3e11, 5e11], target_depths=[2, 3],
                           aspect=16, min_steps=10, context=64, eval_windows=64, n_boot=10, pilot_evals=24)
    out = tmp_path / "exp"
    with pytest.raises(LmforgeError, match=r"The smallest targets in the same ratios .* --target-flops ") as e:
        run_experiment(out, cfg, progress=False)
    pilot = json.loads((out / PILOT_FILE).read_text())
    assert pilot["onset_tokens"] > 0 and len(pilot["curve"]) >= 20
    # The pilot trained the smallest target's depth on a sixth of its compute.
    assert pilot["depth"] == 2 and 0.9 * 3e11 / 6 <= pilot["flops"] <= 3e11 / 6
    suggested = [float(x) for x in re.search(r"--target-flops ([0-9.e+]+),([0-9.e+]+):", str(e.value)).groups()]
    assert suggested[0] > 3e11 and suggested[1] / suggested[0] == pytest.approx(5 / 3, rel=0.1)
    d = design_ladder(suggested, ladder_base(cfg), 512, max_tokens=1e9, target_depths=[2, 3], min_steps=10,
                      min_tokens=pilot["onset_tokens"], reserved=pilot["flops"])
    assert all(t >= pilot["onset_tokens"] for bs in d["ladder"].budgets.values() for t in bs)
    stamp = (out / PILOT_FILE).read_text()
    with pytest.raises(LmforgeError, match="smallest targets"):
        run_experiment(out, cfg, progress=False)
    assert (out / PILOT_FILE).read_text() == stamp


def test_ladder_plan_designs_from_targets(tiny_data, tmp_path):
    res = run_cli("ladder", "plan", "--data", tiny_data[0], "-o", tmp_path / "lad", "--target-flops", "2e13,4e13",
                  "--design", "--target-depths", "2,3", "--set", "ladder.aspect=16", "--context", "64",
                  "--set", "ladder.eval_windows=64")
    assert res.returncode == 0, res.stderr
    plan = load_ladder(tmp_path / "lad")
    assert sorted({r["depth"] for r in plan["rungs"]}) == [2, 3, 4] and len(plan["rungs"]) == 9
    assert max(r["flops"] for r in plan["rungs"]) <= 2e13 / 10 and plan["total_flops"] <= 2e13 / 3
    assert "target2-d3: depth 3" in res.stdout and "epochs of the" in res.stdout  # the tiny data is far too small
    res = run_cli("ladder", "plan", "--data", tiny_data[0], "-o", tmp_path / "lad2", "--design")
    assert res.returncode == 2 and "--design needs --target-flops" in res.stderr


def test_ladder_plan_reads_its_config_file_and_flags_still_win(tiny_data, tmp_path):
    conf = tmp_path / "ladder.toml"
    conf.write_text('[ladder]\ndepths = [1, 2]\nmultipliers = [1, 3]\ncontext = 32\nhardware = "cpu"\nbatch_ref = 4\n'
                    'eval_windows = 64\n')
    res = run_cli("ladder", "plan", "--data", tiny_data[0], "-o", tmp_path / "lad", "-c", conf)
    assert res.returncode == 0, res.stderr
    plan = load_ladder(tmp_path / "lad")
    assert plan["config"]["depths"] == [1, 2] and plan["config"]["multipliers"] == [1, 3]
    assert plan["config"]["context"] == 32 and len(plan["rungs"]) == 4
    res = run_cli("ladder", "plan", "--data", tiny_data[0], "-o", tmp_path / "lad2", "-c", conf, "--depths", "1",
                  "--set", "ladder.multipliers=[2]")
    assert res.returncode == 0, res.stderr
    plan = load_ladder(tmp_path / "lad2")
    assert plan["config"]["depths"] == [1] and plan["config"]["multipliers"] == [2] and plan["config"]["context"] == 32

"""`lmforge run`: every stage in one call, each in its own run directory, resumable."""

import json

from conftest import make_corpus, run_cli
from lmforge.pipeline import RunConfig, run_pipeline


def test_run_pipeline_end_to_end_and_rerun_skips_finished_stages(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    # 15% held out: a corpus of 18 modules needs more than the default 2% to have a val split at all
    cfg = RunConfig(sources=[str(corpus)], vocab_size=512, depth=1, context=64, batch_size=8, steps=240,
                    val_fraction=0.15, samples=["def ", "class "])
    r = run_pipeline(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "run"
    top = json.loads((out / "manifest.json").read_text())
    assert top["stage"] == "run" and top["status"] == "complete"
    assert set(top["inputs"]) == {"data", "tokenizer", "train", "hf"}
    for stage in ("data", "tokenizer", "train", "hf"):
        # the top manifest pins each stage's manifest by hash
        from lmforge.rundir import hash_file

        assert top["inputs"][stage]["hash"] == hash_file(out / stage / "manifest.json")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["val_loss"] < 0.9 * r["unigram_entropy"]
    assert len(r["samples"]) == 2 and all(isinstance(s, str) for _, s in r["samples"])
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(r["hf_dir"])).__name__ == "LlamaForCausalLM"

    before = {s: (out / s / "manifest.json").read_text() for s in ("data", "tokenizer", "train")}
    res = run_cli("run", "-o", out, "--source", corpus, "--vocab-size", "512", "--depth", "1", "--steps", "240",
                  "--context", "64", "--batch-size", "8", "--val-fraction", "0.15")
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stdout
    for s, text in before.items():  # nothing retrained or re-cleaned
        assert (out / s / "manifest.json").read_text() == text
    for line in ("run directory:", "val loss curve:", "HF export:", "samples:"):
        assert line in res.stdout


def test_loss_plot_survives_a_torn_metrics_line(tmp_path):
    from lmforge.pipeline import plot_loss

    recs = [{"step": s, "tokens": 64 * s, "loss": 5.0 / s} for s in range(1, 6)] + [{"step": 5, "val_loss": 1.1}]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "tok'  # a crash mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    png = plot_loss(tmp_path, tmp_path / "loss.png")
    assert png.stat().st_size > 1000

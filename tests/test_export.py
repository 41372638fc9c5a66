"""HF export/import: logit parity with transformers, round trips, atomicity, and bad input.

Everything is built locally (tiny tokenizer, tiny models); nothing is downloaded.
"""

import json
import subprocess
import sys

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.export.hf import export_hf, import_hf
from lmforge.model.io import load_model, save_model
from lmforge.model.model import ModelConfig, build_model

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
VOCAB = 320  # model vocab; the tokenizer has at most 300 tokens


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A byte-level BPE saved the way the tokenizer stage saves it (PreTrainedTokenizerFast.save_pretrained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def hello(world):\n    return world + 1\n", "the quick brown fox jumps over the lazy dog"] * 20,
                            trainer=trainer)
    out = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                            additional_special_tokens=SPECIALS[3:]).save_pretrained(str(out))
    return out


def make_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{"depth": 2, "d_model": 128, "vocab_size": VOCAB, "context": 64, "n_head": 4, "n_kv_head": 2,
                         "rope_theta": 5000.0, "norm_eps": 1e-6, **kw})
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm mapping would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def fake_run(tmp_path, tok_dir, name="run", **kw):
    """A directory laid out like a train run: final model + manifest recording the tokenizer."""
    model = make_model(**kw)
    run = tmp_path / name
    save_model(model, run)
    (run / "manifest.json").write_text(json.dumps({"stage": "train", "config": {"model": vars(model.cfg)},
                                                   "inputs": {"tokenizer": {"path": str(tok_dir)}}}))
    return run, model


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else out.logits


@pytest.mark.parametrize("tie", [True, False])
def test_export_matches_transformers_logits(tok_dir, tmp_path, tie):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    run, model = fake_run(tmp_path, tok_dir, tie_embeddings=tie)
    out = export_hf(run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.config.rope_parameters["rope_theta"] == 5000.0 and hf.config.tie_word_embeddings is tie
    x = torch.randint(0, VOCAB, (2, 40))
    torch.testing.assert_close(logits(hf, x), logits(model, x), atol=1e-4, rtol=0)

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.model_max_length == 64
    text = "def hello(fox): return 1"
    assert tok.decode(tok(text)["input_ids"]) == text
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and ("lm_head.weight" in f.keys()) is not tie
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "export" and man["status"] == "complete"
    assert man["inputs"]["model"]["hash"].startswith("sha256:") and man["inputs"]["tokenizer"]["hash"].startswith("sha256:")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 6]  # eos, and <|end|> for chat turns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temp dirs left behind


def test_export_bfloat16(tok_dir, tmp_path):
    from safetensors.torch import load_file

    run, _ = fake_run(tmp_path, tok_dir)
    out = export_hf(run, tmp_path / "hf", dtype="bfloat16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_import_round_trip(tok_dir, tmp_path):
    run, model = fake_run(tmp_path, tok_dir, tie_embeddings=False)
    back = import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "imported")
    again = load_model(back).eval()
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.cfg == model.cfg
    x = torch.randint(0, VOCAB, (1, 30))
    assert torch.equal(logits(model, x), logits(again, x))
    # The import records its tokenizer like a train run does, so it exports again without --tokenizer.
    man = json.loads((back / "manifest.json").read_text())
    assert man["stage"] == "import" and man["inputs"]["tokenizer"]["path"] == str((back / "tokenizer").resolve())
    assert (back / "tokenizer" / "tokenizer.json").exists()
    again_hf = export_hf(back, tmp_path / "hf2")
    assert json.loads((again_hf / "config.json").read_text())["eos_token_id"] == 1


def test_export_finds_tokenizer_from_checkpoint_and_replaces_earlier_export(tok_dir, tmp_path):
    run, model = fake_run(tmp_path, tok_dir)
    ckpt = run / "checkpoints" / "step-00000010"
    save_model(model, ckpt)
    out = export_hf(ckpt, run / "hf")
    (out / "stale.txt").write_text("from an earlier export")
    export_hf(run, run / "hf")  # replacing an earlier export is allowed
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("tie,shard", [(False, False), (True, True)])
def test_import_of_a_transformers_llama(tmp_path, tie, shard):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=20000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "llama", max_shard_size="100KB" if shard else "1GB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").exists() is shard
    ours = load_model(import_hf(tmp_path / "llama", tmp_path / "imp")).eval()
    assert (ours.cfg.n_kv_head, ours.cfg.context, ours.cfg.rope_theta, ours.cfg.norm_eps) == (2, 128, 20000.0, 1e-5)
    x = torch.randint(0, 300, (2, 50))
    torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=1e-4, rtol=0)


LLAMA = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 1,
         "intermediate_size": 128, "vocab_size": 10}


def hf_dir(tmp_path, name, config=None, tensors=None, files=()):
    from safetensors.torch import save_file

    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(d / "model.safetensors"))
    for f in files:
        (d / f).write_bytes(b"\x80\x04junk")
    return d


def llama_tensors(extra=None, **shape_overrides):
    sd = {"model.embed_tokens.weight": torch.zeros(10, 64), "model.norm.weight": torch.ones(64),
          "lm_head.weight": torch.zeros(10, 64)}
    p = "model.layers.0."
    for n in "qkvo":
        sd[p + f"self_attn.{n}_proj.weight"] = torch.zeros(64, 64)
    sd.update({p + "mlp.gate_proj.weight": torch.zeros(128, 64), p + "mlp.up_proj.weight": torch.zeros(128, 64),
               p + "mlp.down_proj.weight": torch.zeros(64, 128), p + "input_layernorm.weight": torch.ones(64),
               p + "post_attention_layernorm.weight": torch.ones(64)})
    sd.update({k: torch.zeros(v) for k, v in shape_overrides.items()})
    return {**sd, **(extra or {})}


def test_import_accepts_the_minimal_fixture(tmp_path):
    out = import_hf(hf_dir(tmp_path, "ok", LLAMA, llama_tensors()), tmp_path / "o")
    assert load_model(out).cfg.d_model == 64


@pytest.mark.parametrize("config,tensors,files,match", [
    (LLAMA, None, ["pytorch_model.bin"], "safetensors only"),
    (None, None, [], r"config\.json: missing"),
    ({"model_type": "gpt2"}, None, [], "model_type 'gpt2' is not supported"),
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, None, [], "rope_scaling.rope_type = 'llama3'"),
    ({**LLAMA, "rope_parameters": {"rope_type": "yarn"}}, None, [], "rope_parameters.rope_type = 'yarn'"),
    ({**LLAMA, "attention_bias": True}, None, [], "attention_bias = true is not supported"),
    ({k: v for k, v in LLAMA.items() if k != "intermediate_size"}, None, [], "'intermediate_size' is missing"),
    ({**LLAMA, "head_dim": 32}, None, [], "head_dim = 32"),
    ({**LLAMA, "num_key_value_heads": 3, "num_attention_heads": 4}, None, [], r"config\.json: model\.n_kv_head"),
    (LLAMA, None, [], "no model.safetensors"),
    (LLAMA, "bias", [], r"no counterpart.*q_proj\.bias"),
    (LLAMA, "short", [], "tensor 'lm_head.weight' is missing"),
    (LLAMA, "shape", [], "do not match config.json"),
])
def test_import_refuses_bad_input(tmp_path, config, tensors, files, match):
    sd = {"bias": lambda: llama_tensors({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
          "short": lambda: {k: v for k, v in llama_tensors().items() if k != "lm_head.weight"},
          "shape": lambda: llama_tensors(**{"model.layers.0.mlp.down_proj.weight": (64, 96)})}
    d = hf_dir(tmp_path, "src", config, sd[tensors]() if tensors else None, files)
    with pytest.raises(LmforgeError, match=match):
        import_hf(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_missing_dir(tmp_path):
    with pytest.raises(LmforgeError, match="no such directory"):
        import_hf(tmp_path / "nope", tmp_path / "out")


def test_export_refuses_to_overwrite_other_directories(tok_dir, tmp_path):
    run, _ = fake_run(tmp_path, tok_dir)
    with pytest.raises(LmforgeError, match="not an earlier `lmforge export` output"):
        export_hf(run, run)  # would otherwise delete the training run
    assert (run / "model.safetensors").exists()
    with pytest.raises(LmforgeError, match="not an earlier `lmforge import` output"):
        import_hf(export_hf(run, tmp_path / "hf"), run)


def test_export_bad_tokenizer_and_dtype(tok_dir, tmp_path):
    run, _ = fake_run(tmp_path, tok_dir, vocab_size=280)  # smaller than the tokenizer's 300 tokens
    with pytest.raises(LmforgeError, match="has 300 tokens but the model's vocab_size is 280"):
        export_hf(run, tmp_path / "hf")
    (run / "manifest.json").unlink()
    with pytest.raises(LmforgeError, match="pass --tokenizer DIR"):
        export_hf(run, tmp_path / "hf")
    with pytest.raises(LmforgeError, match="--dtype int8"):
        export_hf(run, tmp_path / "hf", dtype="int8", tokenizer_dir=tok_dir)
    assert not (tmp_path / "hf").exists()


def test_export_crash_leaves_previous_export_intact(tok_dir, tmp_path, monkeypatch):
    import lmforge.export.hf

    run, _ = fake_run(tmp_path, tok_dir)
    out = export_hf(run, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lmforge.export.hf, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_hf(run, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


def test_cli_functions(tok_dir, tmp_path):
    """The verbs through typer, independent of whether every other stage's CLI imports yet."""
    import typer
    from typer.testing import CliRunner

    from lmforge.export.cli import export_cmd, import_hf_cmd

    app = typer.Typer()
    app.command("export")(export_cmd)
    app.command("import-hf")(import_hf_cmd)
    runner = CliRunner()
    assert "Example: lmforge export" in runner.invoke(app, ["export", "--help"]).output
    assert "Example: lmforge import-hf" in runner.invoke(app, ["import-hf", "--help"]).output
    run, _ = fake_run(tmp_path, tok_dir)
    res = runner.invoke(app, ["export", str(run), "--format", "onnx"])
    assert isinstance(res.exception, LmforgeError) and str(res.exception) == "--format onnx: unknown format; supported: hf, gguf"
    res = runner.invoke(app, ["export", str(run), "--format", "gguf", "-o", str(tmp_path / "g")])
    assert res.exit_code == 0 and (tmp_path / "g" / "model.gguf").exists()
    res = runner.invoke(app, ["export", str(run)])
    assert res.exit_code == 0 and (run / "hf" / "config.json").exists()
    res = runner.invoke(app, ["import-hf", str(run / "hf"), "-o", str(tmp_path / "imp")])
    assert res.exit_code == 0 and (tmp_path / "imp" / "model_config.json").exists()


def test_full_cli_unknown_format(tok_dir, tmp_path):
    run, _ = fake_run(tmp_path, tok_dir)
    res = subprocess.run([sys.executable, "-m", "lmforge", "export", str(run), "--format", "onnx"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip() == "error: --format onnx: unknown format; supported: hf, gguf"

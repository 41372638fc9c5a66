import json

import pytest
import torch

from conftest import run_cli
from lmforge.errors import LmforgeError
from lmforge.export.hf import export_hf, import_hf
from lmforge.model.io import load_model, save_model
from lmforge.model.model import ModelConfig, build_model


def fake_run(tmp_path, tok_dir, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{"depth": 2, "vocab_size": 512, "context": 64, "n_head": 4, "n_kv_head": 2, "rope_theta": 5000.0, **kw})
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial norms so a mapping slip would show
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    run = tmp_path / "run"
    save_model(model, run)
    (run / "manifest.json").write_text(json.dumps({"stage": "train", "inputs": {"tokenizer": {"path": str(tok_dir)}}}))
    return run, model


@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_logits_match(tiny_data, tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    run, model = fake_run(tmp_path, tiny_data[1], tie_embeddings=tie)
    out = export_hf(run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        ours = model.eval()(x)
        theirs = hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == 1 and tok.bos_token_id == 0 and tok.pad_token_id == 2
    assert json.loads((out / "manifest.json").read_text())["stage"] == "export"


def test_export_then_import_round_trips(tiny_data, tmp_path):
    run, model = fake_run(tmp_path, tiny_data[1], tie_embeddings=False)
    back = import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "imported")
    again = load_model(back)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (back / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((back / "manifest.json").read_text())["inputs"]["tokenizer"]["path"].endswith("tokenizer")


def test_import_of_a_transformers_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=20000.0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    ours = load_model(import_hf(tmp_path / "llama", tmp_path / "imp")).eval()
    x = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4)


def test_import_refuses_pickles_and_missing_config(tmp_path):
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 128, "vocab_size": 10}))
    (tmp_path / "pkl" / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(LmforgeError, match="safetensors only"):
        import_hf(tmp_path / "pkl", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="config.json: missing"):
        import_hf(tmp_path / "empty", tmp_path / "o")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(LmforgeError, match="model_type 'gpt2' is not supported"):
        import_hf(tmp_path / "gpt2", tmp_path / "o")


def test_cli_unknown_format(tiny_data, tmp_path):
    run, _ = fake_run(tmp_path, tiny_data[1])
    res = run_cli("export", run, "--format", "onnx")
    assert res.returncode == 2 and res.stderr.strip() == "error: --format onnx: unknown format; supported: hf"

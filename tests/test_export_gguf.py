"""GGUF export: read back with the gguf package: metadata, vocabulary, merges, and every tensor;
the q/k row order is checked against RoPE itself, not only against our own permutation."""

import json

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.export.gguf import export_gguf, gguf_name, rope_pairs
from lmforge.export.hf import to_hf_state_dict
from lmforge.model.model import apply_rope, rope_tables
from test_export import fake_run, tok_dir  # noqa: F401  (tok_dir is a fixture)

gguf = pytest.importorskip("gguf", reason="pip install gguf (the test extra installs it)")


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def dequant(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])


def test_gguf_export_reads_back(tok_dir, tmp_path):  # noqa: F811
    cfg_path = tok_dir / "tokenizer_config.json"
    c = json.loads(cfg_path.read_text())
    run, model = fake_run(tmp_path, tok_dir)
    c["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    local_tok = tmp_path / "tok"
    local_tok.mkdir()
    for f in tok_dir.iterdir():
        (local_tok / f.name).write_bytes(f.read_bytes())
    (local_tok / "tokenizer_config.json").write_text(json.dumps(c))
    path = export_gguf(run, tmp_path / "g", dtype="f32", tokenizer_dir=local_tok)
    fields, tensors = read(path)
    cfg = model.cfg
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.n_layer and fields["llama.embedding_length"] == cfg.d_model
    assert fields["llama.attention.head_count"] == cfg.n_head and fields["llama.attention.head_count_kv"] == cfg.n_kv_head
    assert fields["llama.context_length"] == cfg.context and fields["llama.feed_forward_length"] == cfg.d_ff
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields["tokenizer.chat_template"] == c["chat_template"]
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = {i: t for t, i in spec["model"]["vocab"].items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for i, t in vocab.items())
    assert fields["tokenizer.ggml.eos_token_id"] == 1 and fields["tokenizer.ggml.bos_token_id"] == 0
    types = fields["tokenizer.ggml.token_type"]
    assert types[1] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert all(types[i] == gguf.TokenType.UNUSED for i in range(len(vocab), cfg.vocab_size))  # embedding rows past the tokenizer
    assert len(fields["tokenizer.ggml.merges"]) == len(spec["model"]["merges"])
    hf = to_hf_state_dict(model)
    assert set(tensors) == {gguf_name(k) for k in hf}  # tied: no output.weight
    for k, t in hf.items():
        want = t.numpy()
        if "q_proj" in k or "k_proj" in k:
            want = rope_pairs(want, cfg.n_head if "q_proj" in k else cfg.n_kv_head)
        assert np.array_equal(dequant(tensors[gguf_name(k)]), want), k


def pair_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE the way llama.cpp applies it: dims (2i, 2i+1) rotate together at frequency i."""
    T, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    a, b = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = a * ang.cos() - b * ang.sin()
    out[:, 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_permuted_rows_make_pair_rope_equal_ours():
    """q from the permuted weights, rotated the llama.cpp way, is our rotated q, reordered: the
    attention scores (dot products within a head) are therefore the same."""
    torch.manual_seed(0)
    n_head, hd, dim, T = 2, 8, 16, 5
    w = torch.randn(n_head * hd, dim)
    x = torch.randn(T, dim)
    cos, sin = rope_tables(hd, T, 10000.0)
    ours = torch.stack([apply_rope((x @ w.T)[:, h * hd:(h + 1) * hd], cos, sin) for h in range(n_head)], 1)
    wp = torch.from_numpy(rope_pairs(w.numpy(), n_head))
    theirs = torch.stack([pair_rope((x @ wp.T)[:, h * hd:(h + 1) * hd], 10000.0) for h in range(n_head)], 1)
    scores_ours = torch.einsum("thd,shd->hts", ours, ours)
    scores_theirs = torch.einsum("thd,shd->hts", theirs, theirs)
    assert torch.allclose(scores_ours, scores_theirs, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_gguf_dtypes(tok_dir, tmp_path, dtype, tol):  # noqa: F811
    run, model = fake_run(tmp_path, tok_dir, tie_embeddings=False)
    _, tensors = read(export_gguf(run, tmp_path / "g", dtype=dtype))
    assert "output.weight" in tensors
    w = to_hf_state_dict(model)["model.layers.0.mlp.down_proj.weight"].numpy()
    got = dequant(tensors["blk.0.ffn_down.weight"])
    assert np.abs(got - w).max() <= tol * np.abs(w).max()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32


def test_gguf_bad_dtype(tok_dir, tmp_path):  # noqa: F811
    run, _ = fake_run(tmp_path, tok_dir)
    with pytest.raises(LmforgeError, match="--dtype q4: GGUF takes f32, f16, bf16, q8_0"):
        export_gguf(run, tmp_path / "g", dtype="q4")


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_lmforge(tok_dir, tmp_path):  # noqa: F811
    """llama.cpp itself, through llama-cpp-python (built from source: CMAKE_BUILD_PARALLEL_LEVEL=2
    pip install llama-cpp-python, about 13 minutes on 2 cores), loads the export and decodes
    greedily to the same tokens as lmforge."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds from source)")
    from lmforge.model.generate import SampleConfig, generate
    from lmforge.tokenizer.io import load_tokenizer

    run, model = fake_run(tmp_path, tok_dir, tie_embeddings=False)
    path = export_gguf(run, tmp_path / "g", dtype="f32")
    tok = load_tokenizer(tok_dir)
    prompt = tok.encode("def hello(world):").ids
    ours = generate(model, [prompt], SampleConfig(max_new_tokens=12, temperature=0.0))[0]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.cfg.context, verbose=False)
    assert llm.tokenize("def hello(world):".encode(), add_bos=False, special=False) == prompt
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == len(ours):
            break
    assert theirs == ours

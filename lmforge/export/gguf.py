"""GGUF export: an lmforge model as a file llama.cpp (and everything built on it) loads.

The layout is llama.cpp's "llama" architecture: the same tensors as the Hugging Face export
(:func:`lmforge.export.hf.to_hf_state_dict`) under GGUF names, with one change. Our RoPE (like
Hugging Face's) rotates the two halves of each head; llama.cpp's rotates adjacent pairs, so the
rows of q and k are reordered per head (the inverse of the permutation that turns a pair-layout
checkpoint into a half-layout one). The byte-level BPE tokenizer goes in as GPT-2-style vocab
and merges, special tokens typed CONTROL, and the chat template rides along.

Weights: f32, f16, bf16 or q8_0; 1-D tensors (norm gains) stay f32, as llama.cpp expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.export.hf import check_replaceable, _staging, tokenizer_special_ids, to_hf_state_dict
from lmforge.model.io import load_model
from lmforge.rundir import Manifest, hash_file
from lmforge.tokenizer.io import SPECIAL_TOKENS, TOKENIZER_FILE, tokenizer_dir_for

GGUF_FILE = "model.gguf"
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_LAYER[rest.rsplit('.', 1)[0]]}.weight"


def rope_pairs(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from half-split rotation (dims i and i + d/2 rotate together) to the
    adjacent-pair rotation llama.cpp uses (dims 2i and 2i + 1)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _vocab(tok_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their GGUF types, merges "a b") from a byte-level BPE tokenizer.json."""
    from gguf import TokenType

    spec = json.loads((tok_dir / TOKENIZER_FILE).read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LmforgeError(f"{tok_dir / TOKENIZER_FILE}: GGUF export supports byte-level BPE tokenizers, "
                           f"not {model.get('type')}")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {a["id"]: a["content"] for a in spec.get("added_tokens", [])}
    by_id.update(special)
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if i in special or by_id[i] in SPECIAL_TOKENS else TokenType.NORMAL)
        else:  # the model's embedding is wider than the tokenizer: rows no text maps to
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _tensor(name: str, t: torch.Tensor, dtype: str):
    """(array, raw dtype for the writer or None)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    a = t.detach().float().numpy()
    if a.ndim == 1 or dtype == "f32":
        return a.astype(np.float32), None
    if dtype == "f16":
        return a.astype(np.float16), None
    if dtype == "bf16":
        return quantize(a, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if a.shape[-1] % 32:
        raise LmforgeError(f"{name}: q8_0 packs rows in blocks of 32, and this tensor's rows are {a.shape[-1]} wide; "
                           "export with --dtype f16")
    return quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def export_gguf(model_dir, out_dir, dtype: str = "f16", tokenizer_dir=None) -> Path:
    """Write ``out_dir/model.gguf`` (with a manifest) for the lmforge model in ``model_dir``."""
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF export needs the gguf package: pip install gguf") from None
    if dtype not in GGUF_DTYPES:
        raise LmforgeError(f"--dtype {dtype}: GGUF takes {', '.join(GGUF_DTYPES)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_replaceable(out_dir, "export")
    model = load_model(model_dir)
    cfg = model.cfg
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else tokenizer_dir_for(model_dir)
    ids = tokenizer_special_ids(tok_dir, cfg.vocab_size)
    tokens, types, merges = _vocab(tok_dir, cfg.vocab_size)
    chat = tok_dir / "tokenizer_config.json"
    template = json.loads(chat.read_text()).get("chat_template") if chat.exists() else None
    with _staging(out_dir) as tmp:
        w = gguf.GGUFWriter(str(tmp / GGUF_FILE), "llama")
        w.add_name(model_dir.resolve().name)
        w.add_context_length(cfg.context)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # ByteLevel with its default regex is GPT-2's pre-tokenizer
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for name in ("bos", "eos", "pad"):
            if ids.get(name) is not None:
                getattr(w, f"add_{name}_token_id")(ids[name])
        w.add_add_bos_token(False)  # lmforge never adds bos; documents start after an eos
        if template:
            w.add_chat_template(template)
        tensors = to_hf_state_dict(model)
        for hf_name, t in tensors.items():
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.n_head if "q_proj" in hf_name else cfg.n_kv_head
                t = torch.from_numpy(rope_pairs(t.numpy(), heads))
            arr, raw = _tensor(hf_name, t, dtype)
            w.add_tensor(gguf_name(hf_name), arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        man = Manifest(tmp, "export", {"format": "gguf", "dtype": dtype, "source": str(model_dir.resolve())})
        man.add_input("model", model_dir / "model.safetensors")
        man.add_input("tokenizer", tok_dir, content_hash=hash_file(tok_dir / TOKENIZER_FILE))
        man.add_output("gguf", tmp / GGUF_FILE, hash_it=True)
        man.set_metrics(special_ids=ids, tensors=len(tensors), vocab_size=cfg.vocab_size)
        man.finish()
    return out_dir / GGUF_FILE

"""Hugging Face export and import: lmforge's GPT <-> ``LlamaForCausalLM``.

The architectures are the same function; only names differ, plus our fused ``wqkv`` and
``w13`` matrices, which are split (export) or concatenated (import). RoPE uses the same
half-split layout, so no weight permutation is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.io import load_model, save_model
from lmforge.model.model import GPT, ModelConfig, build_model
from lmforge.rundir import Manifest, atomic_write_json, hash_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = b.attn.wqkv.weight.split([q_dim, kv_dim, kv_dim], dim=0)
        gate, up = b.mlp.w13.weight.split(cfg.d_ff, dim=0)
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": b.attn.wo.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": b.mlp.w2.weight,
            p + "input_layernorm.weight": b.attn_norm.weight, p + "post_attention_layernorm.weight": b.mlp_norm.weight,
        })
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    def take(name):
        if name not in sd:
            raise LmforgeError(f"the checkpoint lacks tensor '{name}'; is it a Llama-architecture model?")
        return sd[name]

    out = {"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        out[f"blocks.{i}.attn.wqkv.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], 0)
        out[f"blocks.{i}.attn.wo.weight"] = take(p + "self_attn.o_proj.weight")
        out[f"blocks.{i}.mlp.w13.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0)
        out[f"blocks.{i}.mlp.w2.weight"] = take(p + "mlp.down_proj.weight")
        out[f"blocks.{i}.attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[f"blocks.{i}.mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    return out


def hf_config(cfg: ModelConfig, special: dict | None = None, dtype: str = "float32") -> dict:
    special = special or {}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.context, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad"),
        "torch_dtype": dtype, "dtype": dtype,
    }


def _tokenizer_dir(model_dir: Path) -> Path | None:
    for cand in (model_dir / "manifest.json",):
        if cand.exists():
            tok = json.loads(cand.read_text()).get("inputs", {}).get("tokenizer", {}).get("path")
            if tok:
                return Path(tok)
    return None


def export_hf(model_dir, out_dir, dtype: str = "float32", tokenizer_dir=None) -> Path:
    """Write a Hugging Face ``LlamaForCausalLM`` directory; the rename into place is atomic."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise LmforgeError(f"--dtype {dtype}: use float32, bfloat16 or float16")
    model = load_model(model_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else _tokenizer_dir(model_dir)
    special = {}
    if tok_dir is not None:
        if not (tok_dir / "tokenizer.json").exists():
            raise LmforgeError(f"{tok_dir}/tokenizer.json: not found; pass --tokenizer DIR")
        from lmforge.tokenizer.train import load_tokenizer, special_ids

        special = special_ids(load_tokenizer(tok_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        sd = {k: v.to(getattr(torch, dtype)) for k, v in to_hf_state_dict(model).items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(model.cfg, special, dtype))
        atomic_write_json(tmp / "generation_config.json", {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
                                                            "pad_token_id": special.get("pad"), "do_sample": True,
                                                            "temperature": 0.8, "top_p": 0.95})
        if tok_dir is not None:
            for f in TOKENIZER_FILES:
                if (tok_dir / f).exists():
                    shutil.copy2(tok_dir / f, tmp / f)
        man = Manifest(tmp, "export", {"format": "hf", "dtype": dtype})
        man.add_input("model", model_dir / "model.safetensors")
        if tok_dir is not None:
            man.add_input("tokenizer", tok_dir / "tokenizer.json")
        man.add_output("model", tmp / "model.safetensors", hash_it=True)
        man.add_output("config", tmp / "config.json")
        man.finish()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(load_file(str(hf_dir / f)))
        return sd
    if list(hf_dir.glob("*.bin")) or list(hf_dir.glob("*.pt")):
        raise LmforgeError(f"{hf_dir}: only pickle weights (.bin/.pt) found; lmforge loads safetensors only, since "
                           "unpickling can run arbitrary code. Convert the checkpoint to safetensors first")
    raise LmforgeError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def config_from_hf(c: dict, where: str) -> ModelConfig:
    if c.get("model_type") != "llama":
        raise LmforgeError(f"{where}: model_type '{c.get('model_type')}' is not supported; lmforge imports Llama-architecture models")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise LmforgeError(f"{where}: rope scaling '{rope.get('rope_type') or rope.get('type')}' is not supported")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise LmforgeError(f"{where}: {key} = true is not supported (lmforge models have no biases)")
    if c.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{where}: hidden_act '{c['hidden_act']}' is not supported (SwiGLU uses silu)")
    n_head = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_head
    if head_dim * n_head != c["hidden_size"]:
        raise LmforgeError(f"{where}: head_dim * num_attention_heads != hidden_size is not supported")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    return ModelConfig(depth=c["num_hidden_layers"], n_layer=c["num_hidden_layers"], d_model=c["hidden_size"],
                       n_head=n_head, n_kv_head=c.get("num_key_value_heads") or n_head, d_ff=c["intermediate_size"],
                       vocab_size=c["vocab_size"], context=c.get("max_position_embeddings", 2048),
                       tie_embeddings=bool(c.get("tie_word_embeddings", False)), rope_theta=float(theta),
                       norm_eps=float(c.get("rms_norm_eps", 1e-6)))


def import_hf(hf_dir, out_dir) -> Path:
    """Convert a local Llama-architecture HF checkpoint into an lmforge model directory."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"{hf_dir}: no such directory")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise LmforgeError(f"{cfg_path}: missing; is {hf_dir} a Hugging Face model directory?")
    cfg = config_from_hf(json.loads(cfg_path.read_text()), str(cfg_path))
    sd = from_hf_state_dict({k: v.float() for k, v in _load_hf_weights(hf_dir).items()}, cfg)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise LmforgeError(f"{hf_dir}: weights missing for {missing[:3]}")
    save_model(model, out_dir)
    man = Manifest(out_dir, "import", {"source": str(hf_dir.resolve())})
    man.add_input("hf_config", cfg_path)
    if any((hf_dir / f).exists() for f in TOKENIZER_FILES):
        tdir = out_dir / "tokenizer"
        tdir.mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            if (hf_dir / f).exists():
                shutil.copy2(hf_dir / f, tdir / f)
        if (tdir / "tokenizer.json").exists():
            man.data["inputs"]["tokenizer"] = {"path": str(tdir.resolve()), "hash": hash_file(tdir / "tokenizer.json")}
    man.add_output("model", out_dir / "model.safetensors", hash_it=True)
    man.finish()
    return out_dir

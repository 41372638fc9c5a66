"""Hugging Face export and import: lmforge's GPT <-> ``LlamaForCausalLM``.

The architectures compute the same function; only tensor names differ, plus our fused
``wqkv`` and ``w13`` matrices, which are split (export) or concatenated (import). RoPE
uses the same half-split (rotate_half) layout, so no q/k row permutation is needed.

Both directions build their output under a temporary sibling directory and rename it
into place, so an interrupted export or import never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.io import load_model, save_model, unwrap
from lmforge.model.model import ModelConfig, build_model
from lmforge.rundir import MANIFEST, Manifest, atomic_write_json, dir_mode, file_mode, hash_file
from lmforge.tokenizer.io import TOKENIZER_FILE, load_tokenizer, tokenizer_dir_for

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The names lmforge tokenizers give their special tokens; used when a tokenizer_config.json does not say.
LMFORGE_SPECIALS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}


# ----------------------------------------------------------------------------- weights


def _layer_names(i: int) -> dict[str, str]:
    """lmforge name -> HF name for the unfused per-layer tensors."""
    p, q = f"blocks.{i}.", f"model.layers.{i}."
    return {
        p + "attn.wo.weight": q + "self_attn.o_proj.weight",
        p + "mlp.w2.weight": q + "mlp.down_proj.weight",
        p + "attn_norm.weight": q + "input_layernorm.weight",
        p + "mlp_norm.weight": q + "post_attention_layernorm.weight",
    }


def to_hf_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` tensors of ``model``: fresh contiguous copies (safetensors refuses shared storage)."""
    model = unwrap(model)
    cfg, ours = model.cfg, model.state_dict()
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    sd = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["norm.weight"]}
    for i in range(cfg.n_layer):
        q = f"model.layers.{i}."
        sd.update(zip((q + "self_attn.q_proj.weight", q + "self_attn.k_proj.weight", q + "self_attn.v_proj.weight"),
                      ours[f"blocks.{i}.attn.wqkv.weight"].split([q_dim, kv_dim, kv_dim], dim=0)))
        sd.update(zip((q + "mlp.gate_proj.weight", q + "mlp.up_proj.weight"),
                      ours[f"blocks.{i}.mlp.w13.weight"].split(cfg.d_ff, dim=0)))
        sd.update({hf: ours[name] for name, hf in _layer_names(i).items()})
    if not cfg.tie_embeddings:  # tied models leave lm_head out; HF re-ties it from tie_word_embeddings
        sd["lm_head.weight"] = ours["lm_head.weight"]
    return {k: v.detach().to(dtype or v.dtype, copy=True).contiguous() for k, v in sd.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """lmforge tensors from HF Llama ones. Tensors with no place in our model (biases, extra
    modules) are an error rather than silently dropped: the result would compute something else."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise LmforgeError(f"{where}: tensor '{name}' is missing; is this a Llama-architecture checkpoint?")
        used.add(name)
        return sd[name]

    out = {"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    for i in range(cfg.n_layer):
        q = f"model.layers.{i}."
        out[f"blocks.{i}.attn.wqkv.weight"] = torch.cat([take(q + f"self_attn.{n}_proj.weight") for n in "qkv"])
        out[f"blocks.{i}.mlp.w13.weight"] = torch.cat([take(q + "mlp.gate_proj.weight"), take(q + "mlp.up_proj.weight")])
        out.update({name: take(hf) for name, hf in _layer_names(i).items()})
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store a copy anyway; the tie wins, as in transformers
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    # Old transformers saved the RoPE frequencies; we recompute them from rope_theta.
    extra = sorted(k for k in set(sd) - used if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise LmforgeError(f"{where}: tensors with no counterpart in lmforge's model ({', '.join(extra[:3])}"
                           f"{', ...' if len(extra) > 3 else ''}); biases and extra layers are not supported")
    return out


# ----------------------------------------------------------------------------- configs


def hf_config(cfg: ModelConfig, special_ids: dict | None = None, dtype: str = "float32") -> dict:
    """A ``LlamaConfig`` dict for ``cfg``.

    transformers 5 reads RoPE from ``rope_parameters``, 4.x from ``rope_theta``: both are written
    (same value) so either loads it right. The dtype goes under transformers 5's ``dtype`` only;
    its old name ``torch_dtype`` draws a deprecation warning on every load, and 4.x only uses
    it for ``torch_dtype="auto"``.
    """
    ids = special_ids or {}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.context, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "initializer_range": cfg.init_std, "use_cache": True,
        "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad"),
        "dtype": dtype,
    }


def _get(c: dict, key: str, where: str, default=None):
    if key in c and c[key] is not None:
        return c[key]
    if default is None:
        raise LmforgeError(f"{where}: required key '{key}' is missing")
    return default


def _rope_theta(c: dict, where: str) -> float:
    """rope_theta from either config spelling; any RoPE scaling (linear, dynamic, yarn, llama3) is refused
    because our RoPE tables implement only the default rotation."""
    theta = c.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        d = c.get(key) or {}
        if not isinstance(d, dict):
            raise LmforgeError(f"{where}: '{key}' must be an object, got {d!r}")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise LmforgeError(f"{where}: {key}.rope_type = '{kind}' is not supported; lmforge implements only default RoPE")
        theta = d.get("rope_theta", theta)
    return float(theta if theta is not None else 10000.0)


def config_from_hf(c: dict, where: str) -> ModelConfig:
    """ModelConfig for a Llama ``config.json`` dict; unsupported features raise, naming ``where`` and the key.

    max_position_embeddings becomes ``context`` as is. The RoPE tables are context-sized
    (context * head_dim * 8 bytes: 128 MiB at 131072 x 128), which is affordable, and capping
    it would silently change what the model accepts.
    """
    if c.get("model_type") != "llama":
        raise LmforgeError(f"{where}: model_type '{c.get('model_type')}' is not supported; lmforge imports "
                           "Llama-architecture models (model_type 'llama')")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise LmforgeError(f"{where}: {key} = true is not supported (lmforge models have no biases)")
    if c.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{where}: hidden_act = '{c['hidden_act']}' is not supported (lmforge's SwiGLU uses silu)")
    d_model, n_head = _get(c, "hidden_size", where), _get(c, "num_attention_heads", where)
    if c.get("head_dim") and c["head_dim"] * n_head != d_model:
        raise LmforgeError(f"{where}: head_dim = {c['head_dim']} with num_attention_heads = {n_head} does not give "
                           f"hidden_size = {d_model}; lmforge requires head_dim = hidden_size / num_attention_heads")
    n_layer = _get(c, "num_hidden_layers", where)
    try:
        return ModelConfig(depth=n_layer, n_layer=n_layer, d_model=d_model, n_head=n_head,
                           n_kv_head=c.get("num_key_value_heads") or n_head, d_ff=_get(c, "intermediate_size", where),
                           vocab_size=_get(c, "vocab_size", where), context=_get(c, "max_position_embeddings", where, 2048),
                           tie_embeddings=bool(c.get("tie_word_embeddings", False)), rope_theta=_rope_theta(c, where),
                           norm_eps=float(_get(c, "rms_norm_eps", where, 1e-6)), init_std=float(c.get("initializer_range", 0.02)))
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"{where}: invalid value ({e})") from None


# ----------------------------------------------------------------------------- directories


def check_replaceable(out_dir: Path, stage: str, flag: str = "--out") -> None:
    """Only an empty directory or an earlier output of the same stage may be replaced: never let a
    typo like ``-o runs/d4`` delete a training run."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    try:
        prev = json.loads((out_dir / MANIFEST).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        prev = None
    if prev != stage:
        raise LmforgeError(f"{flag} {out_dir}: exists and is not an earlier `lmforge {stage}` output; "
                           "choose another directory or delete it")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """Yield a temp sibling of ``out_dir``; on success swap it into place, on failure delete it.

    A non-empty directory cannot be renamed over, so an old output is first renamed aside:
    at every moment ``out_dir`` is either absent, the old complete output or the new one.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp's 0700 would make the export private
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _token_name(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def tokenizer_special_ids(tok_dir: Path, vocab_size: int) -> dict:
    """bos/eos/pad ids, as tokenizer_config.json names them (else lmforge's names), after checking that
    every token id fits the model's embedding."""
    path = tok_dir / TOKENIZER_FILE
    tok = load_tokenizer(tok_dir)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise LmforgeError(f"{path}: has {n} tokens but the model's vocab_size is {vocab_size}; "
                           "pass the --tokenizer the model was trained with")
    names = dict(LMFORGE_SPECIALS)
    tcfg = tok_dir / "tokenizer_config.json"
    if tcfg.exists():
        try:
            c = json.loads(tcfg.read_text())
        except ValueError:
            raise LmforgeError(f"{tcfg}: not valid JSON") from None
        names.update({k: _token_name(c[f"{k}_token"]) for k in names if c.get(f"{k}_token")})
    return {k: tok.token_to_id(v) for k, v in names.items()}


def _write_tokenizer(tok_dir: Path, dst: Path, context: int) -> None:
    """Copy the tokenizer files, with model_max_length set to the model's context so that HF
    truncation matches what the model accepts. A bare tokenizer.json gets a minimal config so
    AutoTokenizer can load it and knows the special tokens."""
    for f in TOKENIZER_FILES:
        if (tok_dir / f).exists():
            shutil.copy2(tok_dir / f, dst / f)
    tcfg = dst / "tokenizer_config.json"
    c = json.loads(tcfg.read_text()) if tcfg.exists() else {
        "tokenizer_class": "PreTrainedTokenizerFast", **{f"{k}_token": v for k, v in LMFORGE_SPECIALS.items()}}
    c["model_max_length"] = context
    if (tok_dir / "chat_template.jinja").exists():
        # In the config too: transformers 4.x reads the template only from here.
        c["chat_template"] = (tok_dir / "chat_template.jinja").read_text()
    atomic_write_json(tcfg, c)


# ----------------------------------------------------------------------------- export / import


def export_hf(model_dir, out_dir, dtype: str = "float32", tokenizer_dir=None) -> Path:
    """Write ``out_dir`` as a Hugging Face ``LlamaForCausalLM`` directory with the tokenizer.

    ``model_dir``: a train run, an import, a checkpoint, or any directory ``save_model`` wrote.
    The tokenizer comes from ``tokenizer_dir`` or else the run manifest's ``inputs.tokenizer``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise LmforgeError(f"--dtype {dtype}: unknown; use one of {', '.join(DTYPES)}")
    check_replaceable(out_dir, "export")
    model = load_model(model_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else tokenizer_dir_for(model_dir)
    special = tokenizer_special_ids(tok_dir, model.cfg.vocab_size)
    with _staging(out_dir) as tmp:
        save_file(to_hf_state_dict(model, DTYPES[dtype]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", file_mode())  # safetensors writes its file 0600
        atomic_write_json(tmp / "config.json", hf_config(model.cfg, special, dtype))
        # Same sampling defaults as `lmforge sample`; generation also stops at a chat turn's end.
        end = load_tokenizer(tok_dir).token_to_id("<|end|>")
        atomic_write_json(tmp / "generation_config.json", {
            "bos_token_id": special["bos"], "eos_token_id": [special["eos"], end] if end is not None else special["eos"],
            "pad_token_id": special["pad"],
            "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95})
        _write_tokenizer(tok_dir, tmp, model.cfg.context)
        man = Manifest(tmp, "export", {"format": "hf", "dtype": dtype, "source": str(model_dir.resolve())})
        man.add_input("model", model_dir / "model.safetensors")
        man.add_input("tokenizer", tok_dir, content_hash=hash_file(tok_dir / "tokenizer.json"))
        man.add_output("model", tmp / "model.safetensors", hash_it=True)
        man.add_output("config", tmp / "config.json", hash_it=True)
        man.set_metrics(special_ids=special)
        man.finish()
    return out_dir


def _safetensors_files(hf_dir: Path) -> list[Path]:
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise LmforgeError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        for n in names:
            if not (hf_dir / n).exists():
                raise LmforgeError(f"{index}: lists shard {n}, which is missing from {hf_dir}")
        return [hf_dir / n for n in names]
    if any(p.suffix in PICKLE_SUFFIXES for p in hf_dir.iterdir()):
        raise LmforgeError(f"{hf_dir}: only pickle weights (.bin/.pt) found; lmforge loads safetensors only, since "
                           "unpickling can run arbitrary code. Convert the checkpoint to model.safetensors first")
    raise LmforgeError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def _load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            # lmforge keeps float32 master weights; bf16/fp16 checkpoints convert exactly.
            sd.update({k: v.float() for k, v in load_file(str(f)).items()})
        except (SafetensorError, OSError, ValueError) as e:
            raise LmforgeError(f"{f}: corrupted or truncated safetensors file ({str(e).splitlines()[0]})") from None
    return sd


def import_hf(hf_dir, out_dir) -> Path:
    """Convert a local Llama-architecture HF checkpoint into an lmforge model directory.

    Tokenizer files, if present, go to ``out_dir/tokenizer`` and are recorded as
    ``inputs.tokenizer`` in the manifest, as a train run records its tokenizer.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"{hf_dir}: no such directory")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise LmforgeError(f"{cfg_path}: missing; is {hf_dir} a Hugging Face model directory?")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise LmforgeError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(raw, str(cfg_path))
    files = _safetensors_files(hf_dir)
    check_replaceable(out_dir, "import")
    model = build_model(cfg)
    try:
        model.load_state_dict(from_hf_state_dict(_load_tensors(files), cfg, str(hf_dir)))
    except RuntimeError as e:  # shape mismatches between config.json and the tensors
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
        raise LmforgeError(f"{hf_dir}: tensors do not match {cfg_path.name} ({detail})") from None
    with _staging(out_dir) as tmp:
        save_model(model, tmp)
        man = Manifest(tmp, "import", {"source": str(hf_dir.resolve()), "model": vars(cfg)})
        man.add_input("hf_config", cfg_path)
        for f in files:
            man.add_input(f"hf_weights:{f.name}", f)
        if (hf_dir / "tokenizer.json").exists():
            (tmp / "tokenizer").mkdir()
            for f in TOKENIZER_FILES:
                if (hf_dir / f).exists():
                    shutil.copy2(hf_dir / f, tmp / "tokenizer" / f)
            # The path it will have after the rename, which is what later stages read.
            man.data["inputs"]["tokenizer"] = {"path": str(out_dir.resolve() / "tokenizer"),
                                               "hash": hash_file(hf_dir / "tokenizer.json")}
        man.add_output("model", tmp / "model.safetensors", hash_it=True)
        man.set_metrics(special_ids={k: raw.get(f"{k}_token_id") for k in ("bos", "eos", "pad")})
        man.finish()
    return out_dir

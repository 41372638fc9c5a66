"""Text in, text out: the tokenizer and model glue behind ``lmforge sample``."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.model.generate import SampleConfig, generate
from lmforge.model.io import load_model
from lmforge.rundir import read_manifest


def tokenizer_dir_for(run_dir: str | Path) -> Path:
    """The tokenizer a run was trained with, as its manifest records it."""
    man = read_manifest(run_dir)
    tok = man.get("inputs", {}).get("tokenizer", {}).get("path")
    if not tok:
        raise LmforgeError(f"{run_dir}/manifest.json records no tokenizer; pass --tokenizer DIR")
    return Path(tok)


def sample_texts(run_dir, prompts: list[str], cfg: SampleConfig, tokenizer_dir=None) -> list[str]:
    from tokenizers import Tokenizer

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else tokenizer_dir_for(run_dir)
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.exists():
        raise LmforgeError(f"{tok_file}: not found; pass --tokenizer DIR")
    tok = Tokenizer.from_file(str(tok_file))
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    pad = tok.token_to_id("<|pad|>") or 0
    model = load_model(run_dir)
    # A document boundary (eos) is what precedes every training document, so it is the natural start token.
    start = [eos] if eos is not None else [bos]
    ids = [start + tok.encode(p).ids for p in prompts]
    outs = generate(model, ids, cfg, eos_id=eos, pad_id=pad)
    return [tok.decode(o) for o in outs]

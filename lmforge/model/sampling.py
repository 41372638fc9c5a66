"""Text in, text out: the tokenizer and model glue behind ``lmforge sample``."""

from __future__ import annotations

from pathlib import Path

from lmforge.model.generate import SampleConfig, generate
from lmforge.model.io import load_model
from lmforge.tokenizer.io import load_tokenizer, tokenizer_dir_for


def sample_texts(run_dir, prompts: list[str], cfg: SampleConfig, tokenizer_dir=None) -> list[str]:
    tok = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else tokenizer_dir_for(run_dir))
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    pad = tok.token_to_id("<|pad|>") or 0
    model = load_model(run_dir)
    # A document boundary (eos) is what precedes every training document, so it is the natural start token.
    start = [eos] if eos is not None else [bos]
    ids = [start + tok.encode(p).ids for p in prompts]
    outs = generate(model, ids, cfg, eos_id=eos, pad_id=pad)
    return [tok.decode(o) for o in outs]

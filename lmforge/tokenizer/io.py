"""Loading a tokenizer, its special tokens, and finding the tokenizer a model was trained with.

The special tokens come first, with fixed ids, so that every lmforge tokenizer agrees on
them: document boundaries (bos, eos), padding, and the chat roles post-training uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.rundir import MANIFEST

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_NAMES = ["bos", "eos", "pad", "system", "user", "assistant", "end"]
TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(tokenizer_dir):
    """The ``tokenizers.Tokenizer`` saved in a tokenizer directory (or a model directory that holds one)."""
    from tokenizers import Tokenizer

    p = Path(tokenizer_dir) / TOKENIZER_FILE
    if not p.exists():
        raise LmforgeError(f"{p}: not found; train one with `lmforge tokenizer DATA -o {tokenizer_dir}` "
                           "or pass the --tokenizer the model was trained with")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise LmforgeError(f"{p}: not a valid tokenizer file ({str(e).splitlines()[0][:200]})") from None


def special_ids(tok) -> dict:
    """``{"bos": 0, "eos": 1, "pad": 2, "system": 3, ...}``; None for a token the tokenizer lacks (eos is required)."""
    out = {name: tok.token_to_id(token) for name, token in zip(SPECIAL_NAMES, SPECIAL_TOKENS)}
    if out["eos"] is None:
        raise LmforgeError("the tokenizer has no <|eos|> token; train it with `lmforge tokenizer`")
    return out


def tokenizer_dir_for(model_dir) -> Path:
    """The tokenizer recorded in the nearest manifest: the model directory itself (a train run, an
    import) or up to two levels above it (a checkpoint ``RUN/checkpoints/step-N``)."""
    model_dir = Path(model_dir)
    for d in (model_dir, model_dir.parent, model_dir.parent.parent):
        if (d / MANIFEST).exists():
            try:
                tok = json.loads((d / MANIFEST).read_text()).get("inputs", {}).get("tokenizer", {}).get("path")
            except (ValueError, AttributeError):
                raise LmforgeError(f"{d / MANIFEST}: not a valid manifest") from None
            if tok:
                return Path(tok)
            break
    raise LmforgeError(f"{model_dir}: no manifest records the tokenizer this model was trained with; pass --tokenizer DIR")

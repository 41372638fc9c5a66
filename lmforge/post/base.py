"""The model a post-training stage starts from, and the tokenizer that goes with it.

A base is an lmforge model directory (a train, SFT or DPO run, a checkpoint, an ``import-hf``
directory) or a Hugging Face Llama directory (an ``lmforge export``, say), which is imported
into the run directory first so that the stage always starts from an lmforge model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.export.hf import import_hf
from lmforge.model.io import CONFIG, WEIGHTS
from lmforge.rundir import hash_file
from lmforge.tokenizer.io import TOKENIZER_FILE, load_tokenizer, tokenizer_dir_for


@dataclass
class Base:
    model_dir: Path  # an lmforge model directory
    tok_dir: Path
    source: str  # what the user named
    weights_hash: str

    def tokenizer(self):
        return load_tokenizer(self.tok_dir)

    def record(self) -> dict:
        """Manifest inputs naming the base model and its tokenizer."""
        return {"base": {"path": self.model_dir / WEIGHTS, "content_hash": self.weights_hash},
                "tokenizer": {"path": self.tok_dir, "content_hash": hash_file(self.tok_dir / TOKENIZER_FILE)}}


def resolve_base(model, run_dir, flag: str = "--base") -> Base:
    """An lmforge model directory for ``model``; an HF directory is imported into ``run_dir/base``."""
    model, run_dir = Path(model), Path(run_dir)
    if (model / CONFIG).exists():
        return Base(model, tokenizer_dir_for(model), str(model), hash_file(model / WEIGHTS))
    if (model / "config.json").exists():
        dst = run_dir / "base"
        if not (dst / CONFIG).exists():
            import_hf(model, dst)
        if not (dst / "tokenizer" / TOKENIZER_FILE).exists():
            raise LmforgeError(f"{model}: has no tokenizer.json; a chat model needs the tokenizer it was trained with")
        return Base(dst, dst / "tokenizer", str(model), hash_file(dst / WEIGHTS))
    raise LmforgeError(f"{flag} {model}: neither an lmforge model (no {CONFIG}) nor a Hugging Face model (no config.json); "
                       "give a train run, an `lmforge import-hf` directory or an HF export")

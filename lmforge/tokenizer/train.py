"""``lmforge tokenizer``: train a byte-level BPE on a data run's cleaned train split.

The output directory holds ``tokenizer.json`` plus the config files that let
``transformers.AutoTokenizer.from_pretrained(DIR)`` load it with bos/eos/pad set and the
chat template. The special tokens and their fixed ids are in :mod:`lmforge.tokenizer.io`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.cleaned import iter_clean
from lmforge.errors import LmforgeError
from lmforge.rundir import MANIFEST, Manifest, read_manifest
from lmforge.tokenizer.io import SPECIAL_TOKENS, special_ids

BYTE_ALPHABET = 256
# ~40 MB of text trains a vocabulary of a few thousand merges to within a hair of what the
# whole corpus gives, in well under a minute on two cores; more mostly costs time.
DEFAULT_MAX_TRAIN_BYTES = 40_000_000
VAL_SAMPLE_BYTES = 4_000_000
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class TokenizerConfig:
    """Settings of the tokenizer stage: a TOML ``[tokenizer]`` table and ``--set tokenizer.KEY=VALUE``."""

    vocab_size: int = 8192
    min_frequency: int = 2
    max_train_mb: float = DEFAULT_MAX_TRAIN_BYTES / 1e6  # 0: the whole train split

    def __post_init__(self):
        if self.vocab_size < min_vocab_size():
            raise LmforgeError(f"--vocab-size {self.vocab_size} is too small (tokenizer.vocab_size): the {len(SPECIAL_TOKENS)} "
                               f"special tokens and {BYTE_ALPHABET} byte tokens need at least {min_vocab_size()}")
        if self.min_frequency < 1:
            raise LmforgeError(f"--min-frequency {self.min_frequency} (tokenizer.min_frequency): must be at least 1")
        if self.max_train_mb < 0:
            raise LmforgeError(f"--max-train-mb {self.max_train_mb} (tokenizer.max_train_mb): must be >= 0 "
                               "(0 means all of the train split)")


def min_vocab_size() -> int:
    """Special tokens, the 256 byte tokens, and at least one merge."""
    return len(SPECIAL_TOKENS) + BYTE_ALPHABET + 1


def _train_texts(data_dir, max_bytes: int | None):
    """The train split's documents, stopping once ``max_bytes`` of UTF-8 have been handed out."""
    seen = 0
    for text in iter_clean(data_dir, "train"):
        yield text
        seen += len(text.encode("utf-8"))
        if max_bytes and seen >= max_bytes:
            return


def train_tokenizer(data_dir, out_dir, vocab_size: int = 8192, min_frequency: int = 2,
                    max_train_bytes: int | None = DEFAULT_MAX_TRAIN_BYTES, progress: bool = True) -> dict:
    """Train a byte-level BPE on ``data_dir``'s train split and save it to ``out_dir``; returns the manifest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < min_vocab_size():
        raise LmforgeError(f"--vocab-size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and "
                           f"{BYTE_ALPHABET} byte tokens need at least {min_vocab_size()}")
    if min_frequency < 1:
        raise LmforgeError(f"--min-frequency {min_frequency}: must be at least 1")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    data_man = read_manifest(data_dir, expect_stage="data")
    if data_man.get("status") != "complete":
        raise LmforgeError(f"{data_dir / MANIFEST}: status '{data_man.get('status')}'; rerun `lmforge data` first")
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a crash while saving must not look complete
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress and sys.stderr.isatty())
    tok.train_from_iterator(_train_texts(data_dir, max_train_bytes), trainer=trainer)
    train_seconds = time.time() - t0
    _save(tok, out_dir)
    ids = special_ids(tok)
    man = Manifest(out_dir, "tokenizer", {"vocab_size": vocab_size, "min_frequency": min_frequency,
                                          "max_train_bytes": max_train_bytes, "special_tokens": SPECIAL_TOKENS})
    # The corpus hash, not the manifest's: tokenizing later rewrites the data manifest, not the corpus.
    man.add_input("data", data_dir, content_hash=data_man["metrics"].get("corpus_hash"))
    man.add_output("tokenizer", out_dir / "tokenizer.json", hash_it=True)
    bpt = bytes_per_token(tok, data_dir)
    man.set_metrics(vocab_size=tok.get_vocab_size(), special_ids=ids, bytes_per_token=bpt, val_bytes_per_token=bpt,
                    train_seconds=round(train_seconds, 2))
    man.finish()
    return man.data


def _save(tok, out_dir: Path) -> None:
    """tokenizer.json plus the transformers config files (bos/eos/pad, chat template)."""
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def bytes_per_token(tok, data_dir, max_bytes: int = VAL_SAMPLE_BYTES) -> float | None:
    """Compression on (the first ``max_bytes`` of) the val split: UTF-8 bytes per token, higher is better."""
    n_bytes = 0
    batch: list[str] = []
    for text in iter_clean(data_dir, "val"):
        batch.append(text)
        n_bytes += len(text.encode("utf-8"))
        if n_bytes >= max_bytes:
            break
    if not batch:
        return None  # an empty val split (tiny corpora); JSON has no NaN
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    return round(n_bytes / max(1, n_tokens), 4)

"""``lmforge tokenizer``: train a byte-level BPE on a data run's cleaned train split.

The special tokens come first, with fixed ids, so that every lmforge tokenizer agrees on
them: document boundaries (bos, eos), padding, and the chat roles post-training uses.
"""

from __future__ import annotations

import sys
import time
from itertools import islice
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.rundir import Manifest, hash_file, read_manifest

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BYTE_ALPHABET = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def min_vocab_size() -> int:
    return len(SPECIAL_TOKENS) + BYTE_ALPHABET + 1


def load_tokenizer(tokenizer_dir):
    from tokenizers import Tokenizer

    p = Path(tokenizer_dir) / "tokenizer.json"
    if not p.exists():
        raise LmforgeError(f"{p}: not found; train one with `lmforge tokenizer DATA -o {tokenizer_dir}`")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise LmforgeError(f"{p}: not a valid tokenizer file ({e})") from None


def special_ids(tok) -> dict:
    names = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "system": "<|system|>", "user": "<|user|>",
             "assistant": "<|assistant|>", "end": "<|end|>"}
    out = {k: tok.token_to_id(v) for k, v in names.items()}
    if out["eos"] is None:
        raise LmforgeError("the tokenizer has no <|eos|> token; train it with `lmforge tokenizer`")
    return out


def _texts(data_dir, max_bytes: int | None):
    from lmforge.data.prepare import iter_clean

    seen = 0
    for text in iter_clean(data_dir, "train"):
        yield text
        seen += len(text)
        if max_bytes and seen >= max_bytes:
            return


def train_tokenizer(data_dir, out_dir, vocab_size: int = 8192, min_frequency: int = 2,
                    max_train_bytes: int | None = 40_000_000, progress: bool = True) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < min_vocab_size():
        raise LmforgeError(f"--vocab-size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and "
                           f"{BYTE_ALPHABET} byte tokens need at least {min_vocab_size()}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    read_manifest(data_dir, expect_stage="data")
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress and sys.stderr.isatty())
    tok.train_from_iterator(_texts(data_dir, max_train_bytes), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    bpt = bytes_per_token(tok, data_dir)
    man = Manifest(out_dir, "tokenizer", {"vocab_size": vocab_size, "min_frequency": min_frequency,
                                          "max_train_bytes": max_train_bytes, "special_tokens": SPECIAL_TOKENS})
    man.add_input("data", data_dir)
    man.add_output("tokenizer", out_dir / "tokenizer.json", hash_it=True)
    man.set_metrics(vocab_size=tok.get_vocab_size(), special_ids=special_ids(tok), val_bytes_per_token=bpt,
                    train_seconds=round(time.time() - t0, 2))
    man.finish()
    return man.data


def bytes_per_token(tok, data_dir, max_docs: int = 2000) -> float:
    """Compression on the val split: UTF-8 bytes per token (higher is better)."""
    from lmforge.data.prepare import iter_clean

    texts = list(islice(iter_clean(data_dir, "val"), max_docs))
    if not texts:
        return float("nan")
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    return round(sum(len(t.encode("utf-8")) for t in texts) / max(1, n_tokens), 4)

"""The tokenizer stage: byte-level BPE, fixed special ids, transformers loading, bad input."""

import json
import shutil

import pytest

from conftest import run_cli
from lmforge.errors import LmforgeError
from lmforge.tokenizer.io import SPECIAL_TOKENS, load_tokenizer, special_ids
from lmforge.tokenizer.train import min_vocab_size, train_tokenizer
from test_data import one_line_error

TEXT = "def f(x):\n    return x  # café, naïve, 日本語 and emoji 🙂\n"


def test_special_tokens_have_fixed_ids(tiny_data):
    assert SPECIAL_TOKENS == ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = load_tokenizer(tiny_data[1])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert special_ids(tok) == {"bos": 0, "eos": 1, "pad": 2, "system": 3, "user": 4, "assistant": 5, "end": 6}
    assert tok.get_vocab_size() == 512


def test_byte_level_round_trip(tiny_data):
    tok = load_tokenizer(tiny_data[1])
    enc = tok.encode(TEXT)
    assert tok.decode(enc.ids) == TEXT  # any text survives, even characters never seen in training
    assert tok.encode("<|user|>hi<|end|>").ids[0] == 4  # special tokens are atomic


def test_tokenizer_loads_in_transformers(tiny_data):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok_dir = tiny_data[1]
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        t = cls.from_pretrained(str(tok_dir))
        assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (0, 1, 2)
        assert t.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(7))
        assert t.decode(t(TEXT)["input_ids"]) == TEXT
    chat = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>hi<|end|><|assistant|>"


def test_manifest_records_input_and_compression(tiny_data):
    data_dir, tok_dir = tiny_data
    man = json.loads((tok_dir / "manifest.json").read_text())
    data_man = json.loads((data_dir / "manifest.json").read_text())
    assert man["stage"] == "tokenizer" and man["status"] == "complete"
    assert man["config"]["vocab_size"] == 512 and man["config"]["special_tokens"] == SPECIAL_TOKENS
    assert man["inputs"]["data"]["hash"] == data_man["metrics"]["corpus_hash"]
    assert man["outputs"]["tokenizer"]["hash"].startswith("sha256:")
    m = man["metrics"]
    assert m["special_ids"]["eos"] == 1 and m["vocab_size"] == 512
    assert 1.5 < m["bytes_per_token"] < 8  # a 512-token vocabulary compresses code a little


def test_max_train_bytes_caps_the_training_text(tiny_data, tmp_path):
    from lmforge.tokenizer.train import _train_texts

    texts = list(_train_texts(tiny_data[0], 10_000))
    assert sum(len(t.encode()) for t in texts[:-1]) < 10_000 <= sum(len(t.encode()) for t in texts)
    man = train_tokenizer(tiny_data[0], tmp_path / "t", vocab_size=300, max_train_bytes=10_000, progress=False)
    assert man["config"]["max_train_bytes"] == 10_000 and man["metrics"]["vocab_size"] <= 300


def test_vocab_too_small(tiny_data, tmp_path):
    with pytest.raises(LmforgeError, match=rf"--vocab-size 100 is too small.*at least {min_vocab_size()}"):
        train_tokenizer(tiny_data[0], tmp_path / "t", vocab_size=100, progress=False)
    assert min_vocab_size() == 264


def test_bad_data_dir(tmp_path):
    with pytest.raises(LmforgeError, match="no such directory"):
        train_tokenizer(tmp_path / "nope", tmp_path / "t", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="manifest.json: missing"):
        train_tokenizer(tmp_path / "empty", tmp_path / "t", progress=False)


def test_unfinished_data_run_is_refused(tiny_data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(tiny_data[0], copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["status"] = "running"
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(LmforgeError, match="status 'running'"):
        train_tokenizer(copy, tmp_path / "t", progress=False)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"tokenizer\.json: not found; train one"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not a valid tokenizer file"):
        load_tokenizer(tmp_path)


def test_cli_vocab_too_small(tiny_data, tmp_path):
    one_line_error(run_cli("tokenizer", tiny_data[0], "-o", tmp_path / "t", "--vocab-size", "100", "-q"),
                   "--vocab-size 100 is too small", "at least 264")

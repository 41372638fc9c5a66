import gzip
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from lmforge.data.prepare import DataConfig, iter_clean, prepare_data
from lmforge.data.shards import TokenData, tokenize_data
from lmforge.errors import LmforgeError

LOREM = ("The quick brown fox jumps over the lazy dog while the compiler checks every branch of the parser. "
         "Scaling laws predict the loss of large runs from small ones, given enough careful experiments. ")


def doc(i: int, n: int = 3) -> str:
    """A distinct document: unique words so no two are near-duplicates."""
    rng = np.random.default_rng(i)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, size=rng.integers(3, 9))) for _ in range(60 * n)]
    return f"document {i}: " + " ".join(words)


def cfg(**kw):
    return DataConfig(**{"min_chars": 20, "val_fraction": 0.2, **kw})


def test_directory_tree_drops_binary_and_invalid_utf8(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(6):
        (src / f"f{i}.py").write_text(doc(i))
    (src / "sub" / "notes.md").write_text(doc(99))
    (src / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "latin1.txt").write_bytes(("caf\xe9 " * 40).encode("latin-1"))
    man = prepare_data([str(src)], tmp_path / "out", cfg(), progress=False)
    m = man["metrics"]
    assert m["docs_kept"] == 7 and m["dropped"]["binary"] == 1 and m["dropped"]["invalid_utf8"] == 1
    assert m["docs_train"] + m["docs_val"] == 7
    kept = list(iter_clean(tmp_path / "out", "train")) + list(iter_clean(tmp_path / "out", "val"))
    assert sorted(kept) == sorted([doc(i) for i in range(6)] + [doc(99)])
    assert man["status"] == "complete" and str(src) in man["inputs"]


def test_nfc_length_filters_and_exact_dedup(tmp_path):
    src = tmp_path / "c.jsonl"
    decomposed = "Cafe\u0301 " + doc(1)
    lines = [{"text": decomposed}, {"text": doc(2)}, {"text": doc(2)}, {"text": "tiny"}, {"text": "x" * 5000}, {"text": "   "}]
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    man = prepare_data([str(src)], tmp_path / "out", cfg(max_chars=4000), progress=False)
    d = man["metrics"]["dropped"]
    assert (d["exact_dup"], d["too_short"], d["too_long"], d["empty"]) == (1, 1, 1, 1)
    texts = list(iter_clean(tmp_path / "out", "train")) + list(iter_clean(tmp_path / "out", "val"))
    assert unicodedata.normalize("NFC", decomposed) in texts and decomposed not in texts


def test_near_duplicates_removed_unless_disabled(tmp_path):
    base = doc(7, n=6)
    near = base.replace("document 7", "document seven", 1)  # one token differs in hundreds
    src = tmp_path / "c.jsonl.gz"
    with gzip.open(src, "wt") as f:
        for t in [base, near, doc(8)]:
            f.write(json.dumps({"body": t}) + "\n")
    on = prepare_data([str(src)], tmp_path / "on", cfg(text_field="body"), progress=False)
    off = prepare_data([str(src)], tmp_path / "off", cfg(text_field="body", dedup_near=False), progress=False)
    assert on["metrics"]["dropped"]["near_dup"] == 1 and on["metrics"]["docs_kept"] == 2
    assert off["metrics"]["dropped"]["near_dup"] == 0 and off["metrics"]["docs_kept"] == 3


def test_split_is_deterministic_by_content(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:02d}.txt").write_text(doc(i))
    a = prepare_data([str(src)], tmp_path / "a", cfg(), progress=False)
    # a different file order and an extra file must not move any document between splits
    (src / "zz_extra.txt").write_text(doc(1000))
    b = prepare_data([str(src)], tmp_path / "b", cfg(), progress=False)
    val_a, val_b = set(iter_clean(tmp_path / "a", "val")), set(iter_clean(tmp_path / "b", "val"))
    assert val_a and val_a == val_b - {doc(1000)}
    assert a["metrics"]["corpus_hash"] != b["metrics"]["corpus_hash"]


def test_parquet_and_save_to_disk_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [doc(i) for i in range(5)], "id": list(range(5))}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"content": [doc(i) for i in range(5, 9)]}).save_to_disk(str(tmp_path / "ds"))
    man = prepare_data([str(tmp_path / "d.parquet"), str(tmp_path / "ds")], tmp_path / "out", cfg(text_field="content"),
                       progress=False)
    assert man["metrics"]["docs_kept"] == 9


def test_tokenized_shards_decode_back_and_span_boundaries(tiny_data, tmp_path):
    from tokenizers import Tokenizer

    data_dir, tok_dir = tiny_data
    idx = json.loads((data_dir / "tokens" / "index.json").read_text())
    assert idx["dtype"] == "uint16" and idx["vocab_size"] == 512 and idx["eos_id"] == 1
    td = TokenData(data_dir)
    val = td.split("val")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = val.window(0, len(val))
    first_doc = ids[: int(np.argmax(ids == 1))]
    assert tok.decode(first_doc.tolist()) == next(iter_clean(data_dir, "val"))
    # re-tokenize with tiny shards: windows across boundaries equal the single-shard stream
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    tokenize_data(copy, tok_dir, progress=False, shard_tokens=1000)
    small = TokenData(copy).split("train")
    big = td.split("train")
    assert len(small.arrays) > 5 and len(small) == len(big)
    for off in (995, 1999, 5000):
        assert np.array_equal(small.window(off, 30), big.window(off, 30))


def test_truncated_shard_is_reported(tiny_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data[0], copy)
    shard = copy / "tokens" / "val-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(LmforgeError, match="truncated or corrupted"):
        TokenData(copy).split("val")


def test_tokenizer_loads_in_transformers(tiny_data):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok_dir = tiny_data[1]
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        t = cls.from_pretrained(str(tok_dir))
        assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (0, 1, 2)
        assert t.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]) == [4, 5]
        assert t.decode(t("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    man = json.loads((tok_dir / "manifest.json").read_text())
    assert man["metrics"]["val_bytes_per_token"] > 1.5


def test_default_corpus_is_the_stdlib():
    import sysconfig

    from lmforge.data.corpus import default_corpus_files

    files = default_corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500 and all(stdlib in f.parents for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert stdlib / "json" / "decoder.py" in files


# ---- bad input through the CLI: one line naming the file, exit 2 ----

def one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_missing_path(tmp_path):
    one_line_error(run_cli("data", tmp_path / "nope", "-o", tmp_path / "o", "-q"), str(tmp_path / "nope"), "no such file")


def test_cli_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("hi")
    one_line_error(run_cli("data", tmp_path / "empty", "-o", tmp_path / "o", "-q"), "empty corpus", "too_short 1")


def test_cli_jsonl_line_not_json(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": doc(1)}) + "\n{oops\n")
    one_line_error(run_cli("data", f, "-o", tmp_path / "o", "-q"), f"{f}:2", "not valid JSON")


def test_cli_jsonl_missing_field(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"body": doc(1)}) + "\n")
    one_line_error(run_cli("data", f, "-o", tmp_path / "o", "-q"), f"{f}:1", "no field 'text'", "--text-field")


def test_cli_vocab_too_small(tiny_data, tmp_path):
    one_line_error(run_cli("tokenizer", tiny_data[0], "-o", tmp_path / "t", "--vocab-size", "100", "-q"),
                   "--vocab-size 100 is too small", "at least 264")


# ---- memory stays flat as the corpus grows ----

RSS_SCRIPT = """
import resource, sys
from lmforge.data.prepare import DataConfig, prepare_data
prepare_data([sys.argv[1]], sys.argv[2], DataConfig(min_chars=20), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_big(root: Path, n_docs: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    vocab = np.array(["".join(chr(97 + c) for c in rng.integers(0, 26, size=6)) for _ in range(5000)])
    with open(root / "big.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(vocab[rng.integers(0, 5000, size=400)])}) + "\n")
    return root / "big.jsonl"


def peak_rss_kb(src: Path, out: Path) -> int:
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(out)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_corpus_size(tmp_path):
    small = make_big(tmp_path / "s", 2_000)   # ~5 MB
    large = make_big(tmp_path / "l", 8_000)   # ~20 MB, 4x the documents and bytes
    rss_small = peak_rss_kb(small, tmp_path / "os")
    rss_large = peak_rss_kb(large, tmp_path / "ol")
    assert large.stat().st_size > 3.5 * small.stat().st_size
    # 4x the corpus may not cost more than 15% more peak memory (the in-memory dedup sets it replaces would)
    assert rss_large < rss_small * 1.15, (rss_small, rss_large)

"""The data stage: every source type, cleaning, dedup, split, token shards, bad input, flat memory."""

import gzip
import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from lmforge.data.cleaned import iter_clean
from lmforge.data.prepare import DataConfig, prepare_data
from lmforge.data.quality import FilterConfig
from lmforge.data.shards import TokenData, dtype_for
from lmforge.tokenizer.encode import tokenize_data
from lmforge.errors import LmforgeError


def doc(i: int, n: int = 3) -> str:
    """A distinct document: random words, so no two are near-duplicates."""
    rng = np.random.default_rng(i)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, size=rng.integers(3, 9))) for _ in range(60 * n)]
    return f"document {i}: " + " ".join(words)


# Random-word documents are what the quality filters exist to remove; these tests are about the rest
# of the stage (tests/test_data_quality.py and test_data_pipeline.py cover the filters).
NO_FILTERS = FilterConfig(gopher=False, repetition=False, c4=False, code=False)


def cfg(**kw):
    return DataConfig(**{"min_chars": 20, "val_fraction": 0.2, "filters": NO_FILTERS, **kw})


def kept_texts(out) -> list[str]:
    return list(iter_clean(out, "train")) + list(iter_clean(out, "val"))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- sources and cleaning ----

def test_directory_tree_drops_binary_and_invalid_utf8(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(6):
        (src / f"f{i}.py").write_text(doc(i))
    (src / "sub" / "notes.md").write_text(doc(99))
    (src / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "latin1.txt").write_bytes(("caf\xe9 " * 40).encode("latin-1"))
    for hidden in (".git", "__pycache__"):  # never corpus material
        (src / hidden).mkdir()
        (src / hidden / "x.txt").write_text(doc(500))
    man = prepare_data([str(src)], tmp_path / "out", cfg(), progress=False)
    m = man["metrics"]
    assert m["docs_kept"] == 7 and m["dropped"]["binary"] == 1 and m["dropped"]["invalid_utf8"] == 1
    assert m["docs_seen"] == 9 and m["docs_train"] + m["docs_val"] == 7
    assert sorted(kept_texts(tmp_path / "out")) == sorted([doc(i) for i in range(6)] + [doc(99)])
    assert man["status"] == "complete" and man["stage"] == "data"
    assert man["inputs"][str(src)]["hash"].startswith("sha256:")
    files = sorted(p.name for p in (tmp_path / "out" / "clean").iterdir())
    assert files == ["train-00000.jsonl", "val-00000.jsonl"]  # no temp or dedup files left behind
    assert not list((tmp_path / "out").glob(".*"))


def test_nfc_length_filters_and_exact_dedup(tmp_path):
    decomposed = "Cafe\u0301 " + doc(1)
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": decomposed}, {"text": doc(2)}, {"text": doc(2)}, {"text": "tiny"},
                                             {"text": "x" * 5000}, {"text": "   "}, {"text": "bad \ud800 " + doc(3)}])
    man = prepare_data([str(src)], tmp_path / "out", cfg(max_chars=4000), progress=False)
    d = man["metrics"]["dropped"]
    assert (d["exact_dup"], d["too_short"], d["too_long"], d["empty"], d["invalid_utf8"]) == (1, 1, 1, 1, 1)
    texts = kept_texts(tmp_path / "out")
    assert unicodedata.normalize("NFC", decomposed) in texts and decomposed not in texts
    assert len(texts) == man["metrics"]["docs_kept"] == 2


def test_exact_dedup_after_normalisation(tmp_path):
    """Two spellings of the same text (composed and decomposed) are one document."""
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "Caf\u00e9 " + doc(1)}, {"text": "Cafe\u0301 " + doc(1)}])
    man = prepare_data([str(src)], tmp_path / "out", cfg(dedup_near=False), progress=False)
    assert man["metrics"]["dropped"]["exact_dup"] == 1 and man["metrics"]["docs_kept"] == 1


def test_near_duplicates_removed_unless_disabled(tmp_path):
    base = doc(7, n=6)
    near = base.replace("document 7", "document seven", 1)  # one word differs in hundreds
    src = tmp_path / "c.jsonl.gz"
    with gzip.open(src, "wt") as f:
        for t in [base, near, doc(8)]:
            f.write(json.dumps({"body": t}) + "\n")
    on = prepare_data([str(src)], tmp_path / "on", cfg(text_field="body"), progress=False)
    off = prepare_data([str(src)], tmp_path / "off", cfg(text_field="body", dedup_near=False), progress=False)
    assert on["metrics"]["dropped"]["near_dup"] == 1 and on["metrics"]["docs_kept"] == 2
    assert base in kept_texts(tmp_path / "on") and near not in kept_texts(tmp_path / "on")  # the first one wins
    assert off["metrics"]["dropped"]["near_dup"] == 0 and off["metrics"]["docs_kept"] == 3


def test_partial_overlap_is_not_a_near_duplicate(tmp_path):
    a = doc(1, n=6)
    words = a.split()
    half = " ".join(words[: len(words) // 2] + doc(2, n=3).split())  # shares about a third of its shingles
    changed = " ".join(words[:-1] + ["changed"])
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in (a, half, changed, "too few words, but long enough")])
    man = prepare_data([str(src)], tmp_path / "out", cfg(), progress=False)
    assert man["metrics"]["dropped"]["near_dup"] == 1 and man["metrics"]["docs_kept"] == 3
    assert sorted(kept_texts(tmp_path / "out")) == sorted([a, half, "too few words, but long enough"])
    assert not (tmp_path / "out" / "work").exists()


def test_split_is_deterministic_by_content(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:02d}.txt").write_text(doc(i))
    a = prepare_data([str(src)], tmp_path / "a", cfg(), progress=False)
    again = prepare_data([str(src)], tmp_path / "again", cfg(), progress=False)
    for split in ("train", "val"):  # the same input gives byte-identical output
        assert (tmp_path / "a" / "clean" / f"{split}-00000.jsonl").read_bytes() == \
               (tmp_path / "again" / "clean" / f"{split}-00000.jsonl").read_bytes()
    assert a["metrics"]["corpus_hash"] == again["metrics"]["corpus_hash"]
    # an extra file must not move any other document between splits
    (src / "00_extra.txt").write_text(doc(1000))
    b = prepare_data([str(src)], tmp_path / "b", cfg(), progress=False)
    val_a, val_b = set(iter_clean(tmp_path / "a", "val")), set(iter_clean(tmp_path / "b", "val"))
    assert val_a and val_a == val_b - {doc(1000)}
    assert a["metrics"]["corpus_hash"] != b["metrics"]["corpus_hash"]
    # and a document's split does not depend on which source it came from
    jl = write_jsonl(tmp_path / "c.jsonl", [{"text": doc(i)} for i in reversed(range(40))])
    prepare_data([str(jl)], tmp_path / "c", cfg(), progress=False)
    assert set(iter_clean(tmp_path / "c", "val")) == val_a


def test_parquet_and_save_to_disk_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [doc(i) for i in range(5)], "id": list(range(5))}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"content": [doc(i) for i in range(5, 9)]}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"content": [doc(20)]}),
                          "b": datasets.Dataset.from_dict({"content": [doc(21)]})}).save_to_disk(str(tmp_path / "dd"))
    sources = [str(tmp_path / "d.parquet"), str(tmp_path / "ds"), str(tmp_path / "dd")]
    man = prepare_data(sources, tmp_path / "out", cfg(text_field="content"), progress=False)
    assert man["metrics"]["docs_kept"] == 11
    assert sorted(kept_texts(tmp_path / "out")) == sorted([doc(i) for i in range(9)] + [doc(20), doc(21)])
    assert set(man["inputs"]) == set(sources)


def test_structured_sources_check_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": [doc(1)], "n": [3]}), tmp_path / "d.parquet")
    with pytest.raises(LmforgeError, match=r"d\.parquet: no column 'text'.*--text-field"):
        prepare_data([str(tmp_path / "d.parquet")], tmp_path / "o1", cfg(), progress=False)
    with pytest.raises(LmforgeError, match=r"column 'n' holds int64, not text"):
        prepare_data([str(tmp_path / "d.parquet")], tmp_path / "o2", cfg(text_field="n"), progress=False)


def test_default_corpus_is_the_stdlib():
    import sysconfig

    from lmforge.data.corpus import default_corpus_paths

    files = default_corpus_paths()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500 and all(stdlib in f.parents for f in files)
    assert not any("site-packages" in f.parts or "__pycache__" in f.parts for f in files)
    assert stdlib / "json" / "decoder.py" in files
    assert files == default_corpus_paths()  # a deterministic walk
    assert all(f.suffix in {".py", ".txt", ".rst", ".md", ".toml", ".cfg", ".ini", ".json", ".html", ".c", ".h",
                            ".sh", ".bat", ".ps1", ".xml", ".csv", ".yaml", ".yml", ".css", ".js", ".tcl", ".el",
                            ".pyi"} for f in files)
    with pytest.raises(LmforgeError, match="default:stdlib\\+site"):
        default_corpus_paths("everything")


def test_rerun_removes_stale_token_shards(tiny_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data[0], copy)
    assert (copy / "tokens" / "index.json").exists()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(doc(1))
    prepare_data([str(src)], copy, cfg(val_fraction=0.01), progress=False)
    assert not (copy / "tokens" / "index.json").exists() and not list((copy / "tokens").glob("*.bin"))
    with pytest.raises(LmforgeError, match="index.json: missing"):
        TokenData(copy)


def test_failed_run_leaves_no_complete_looking_output(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": doc(i)} for i in range(5)])
    with src.open("a") as f:
        f.write("{oops\n")
    with pytest.raises(LmforgeError):
        prepare_data([str(src)], tmp_path / "out", cfg(), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out" / "clean").glob("*.jsonl"))


# ---- token shards ----

def test_tokenized_shards_decode_back_and_span_boundaries(tiny_data, tmp_path):
    from tokenizers import Tokenizer

    data_dir, tok_dir = tiny_data
    idx = json.loads((data_dir / "tokens" / "index.json").read_text())
    assert idx["dtype"] == "uint16" and idx["vocab_size"] == 512 and (idx["bos_id"], idx["eos_id"]) == (0, 1)
    assert idx["tokenizer_hash"].startswith("sha256:") and set(idx["splits"]) == {"train", "val"}
    for split, entry in idx["splits"].items():
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"]) > 0
    td = TokenData(data_dir)
    assert (td.vocab_size, td.eos_id, td.dtype) == (512, 1, np.dtype("uint16"))
    val = td.split("val")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = val.window(0, len(val))
    assert ids.dtype == np.int64 and len(ids) == idx["splits"]["val"]["tokens"]
    docs = np.split(ids, np.flatnonzero(ids == 1) + 1)[:-1]  # every document ends with eos
    assert [tok.decode(d[:-1].tolist()) for d in docs] == list(iter_clean(data_dir, "val"))
    man = json.loads((data_dir / "manifest.json").read_text())
    assert man["metrics"]["tokens_val"] == len(val) and man["metrics"]["tokens_train"] == len(td.split("train"))
    assert man["inputs"]["tokenizer"]["hash"] == idx["tokenizer_hash"] and "token_index" in man["outputs"]
    # re-tokenize with tiny shards: windows across boundaries equal the single-shard stream
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    tokenize_data(copy, tok_dir, progress=False, shard_tokens=1000)
    small, big = TokenData(copy).split("train"), td.split("train")
    assert len(small.arrays) > 5 and len(small) == len(big)
    assert all(len(a) == 1000 for a in small.arrays[:-1])
    for off, n in ((995, 30), (1999, 2), (5000, 2500), (0, len(big))):
        assert np.array_equal(small.window(off, n), big.window(off, n))
    with pytest.raises(IndexError):
        small.window(len(small) - 5, 10)


def test_token_index_errors(tiny_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data[0], copy)
    shard = copy / "tokens" / "val-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(LmforgeError, match=r"val-00000\.bin: .*truncated or corrupted"):
        TokenData(copy)
    shard.unlink()
    with pytest.raises(LmforgeError, match=r"val-00000\.bin: token shard missing"):
        TokenData(copy / "tokens" / "index.json")
    with pytest.raises(LmforgeError, match=r"index\.json: missing; tokenize first"):
        TokenData(tmp_path)
    with pytest.raises(LmforgeError, match="no 'test' split"):
        TokenData(tiny_data[0]).split("test")


def big_vocab_tokenizer(path: Path, vocab_size: int = 70_000) -> Path:
    """A byte-level tokenizer whose byte tokens have ids above 65535, so uint16 would corrupt them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lmforge.tokenizer.io import SPECIAL_TOKENS

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), vocab_size - len(alphabet))})
    vocab.update({ch: vocab_size - len(alphabet) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_large_vocabulary_uses_uint32(tmp_path):
    assert dtype_for(65536) == np.dtype("uint16") and dtype_for(65537) == np.dtype("uint32")
    tok_dir = big_vocab_tokenizer(tmp_path / "tok")
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": doc(i)} for i in range(6)])
    prepare_data([str(src)], tmp_path / "data", cfg(val_fraction=0.3), progress=False)
    man = tokenize_data(tmp_path / "data", tok_dir, progress=False)
    td = TokenData(tmp_path / "data")
    assert td.dtype == np.dtype("uint32") and td.vocab_size == 70_000 and man["metrics"]["token_dtype"] == "uint32"
    ids = td.split("train").window(0, len(td.split("train")))
    assert ids.max() >= 65536
    first = ids[: int(np.argmax(ids == td.eos_id))]
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tok_dir / "tokenizer.json")).decode(first.tolist()) == next(
        iter_clean(tmp_path / "data", "train"))


# ---- bad input through the real CLI: one line naming the file, exit 2 ----

def one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_missing_path(tmp_path):
    one_line_error(run_cli("data", tmp_path / "nope", "-o", tmp_path / "o", "-q"), str(tmp_path / "nope"),
                   "no such file")


def test_cli_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("hi")
    (tmp_path / "empty" / "b.bin").write_bytes(b"\x00\x01\x02")
    one_line_error(run_cli("data", tmp_path / "empty", "-o", tmp_path / "o", "-q"), "empty corpus",
                   str(tmp_path / "empty"), "binary 1", "too_short 1", "--min-chars")


def test_cli_jsonl_line_not_json(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": doc(1)}])
    with f.open("a") as fh:
        fh.write("{oops\n")
    one_line_error(run_cli("data", f, "-o", tmp_path / "o", "-q"), f"{f}:2", "not valid JSON")


def test_cli_jsonl_missing_field(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"body": doc(1)}])
    one_line_error(run_cli("data", f, "-o", tmp_path / "o", "-q"), f"{f}:1", "no field 'text'", "body",
                   "--text-field")


def test_cli_unreachable_hub_dataset(tmp_path):
    res = run_cli("data", "hf:someone/no-such-dataset:train", "-o", tmp_path / "o", "-q",
                  env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    one_line_error(res, "hf:someone/no-such-dataset:train: cannot load the Hugging Face dataset")


def test_cli_config_file_flags_and_set(tmp_path):
    """Precedence: defaults < --config < --set < flags; near dups are kept with --no-near-dedup."""
    base = doc(7, n=6)
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": base}, {"text": base.replace("document 7", "doc seven")},
                                             {"text": doc(8)}, {"text": "short text, 27 characters."}])
    conf = tmp_path / "run.toml"
    conf.write_text(f'[data]\nsources = ["{src}"]\nmin_chars = 10\nval_fraction = 0.3\nnum_perm = 64\n'
                    '[train]\nlr = 1.0\n')
    res = run_cli("data", "-c", conf, "--no-filters", "--no-near-dedup", "--set", "data.min_chars=20", "--set", "data.num_perm=32",
                  "--min-chars", "30", "-o", tmp_path / "o", "-q")
    assert res.returncode == 0, res.stderr
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    c = man["config"]
    # min_chars: the flag beats --set; num_perm: --set beats the file; val_fraction: the file beats the default
    assert (c["min_chars"], c["val_fraction"], c["num_perm"], c["dedup_near"]) == (30, 0.3, 32, False)
    assert c["sources"] == [str(src)]
    assert man["metrics"]["docs_kept"] == 3 and man["metrics"]["dropped"]["too_short"] == 1
    conf.write_text("[data]\nbogus = 1\n")
    one_line_error(run_cli("data", "-c", conf, "-o", tmp_path / "o2", "-q"), str(conf), "unknown key 'data.bogus'")


def test_cli_tokenizer_then_tokenize(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": doc(i, n=20)} for i in range(12)])
    prepare_data([str(src)], tmp_path / "d", cfg(val_fraction=0.3), progress=False)
    res = run_cli("tokenizer", tmp_path / "d", "-o", tmp_path / "t", "--vocab-size", "300", "--tokenize")
    assert res.returncode == 0, res.stderr
    assert "bytes/token" in res.stdout and "train" in res.stdout
    td = TokenData(tmp_path / "d")
    assert td.vocab_size == 300 and len(td.split("train")) > 0
    res = run_cli("data", src, "--no-filters", "-o", tmp_path / "d2", "--val-fraction", "0.3", "--tokenizer", tmp_path / "t", "-q")
    assert res.returncode == 0, res.stderr
    assert np.array_equal(TokenData(tmp_path / "d2").split("val").window(0, 50), td.split("val").window(0, 50))
    one_line_error(run_cli("data", src, "-o", tmp_path / "d3", "--tokenizer", tmp_path / "nope", "-q"),
                   str(tmp_path / "nope" / "tokenizer.json"), "lmforge tokenizer")
    assert not (tmp_path / "d3" / "manifest.json").exists()


# ---- memory stays flat as the corpus grows ----

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent (here pytest, with torch
# loaded) into the exec'd child, which would hide the child's own peak.
RSS_SCRIPT = """
import resource, sys
from lmforge.data.prepare import DataConfig, prepare_data
from lmforge.data.quality import FilterConfig
from lmforge.tokenizer.encode import tokenize_data
mode, a, b = sys.argv[1:4]
if mode == "clean":
    prepare_data([a], b, DataConfig(min_chars=20, workers=1), progress=False)  # default filters and PII, in-process
else:
    tokenize_data(a, b, progress=False)
try:
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_big(root: Path, n_docs: int, words: int = 150) -> Path:
    """``n_docs`` distinct documents of ``words`` random words (~7 bytes each), as one JSONL file.

    Many short documents stress what grows per document (dedup keys, LSH buckets), and their
    total size what grows per byte (a buffered corpus)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    # A fifth of the words are common English ones, so the documents pass the default quality filters.
    common = ["the", "of", "and", "to", "in", "is", "that", "for", "with", "was"] * 125
    vocab = np.array(["".join(chr(97 + c) for c in rng.integers(0, 26, size=6)) for _ in range(5000)] + common)
    with open(root / "big.jsonl", "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(vocab[rng.integers(0, len(vocab), size=words)]) + "."}) + "\n")
    return root / "big.jsonl"


def peak_rss_mb(mode: str, a: Path, b: Path) -> float:
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, mode, str(a), str(b)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def check_flat_memory(tmp_path: Path, n_small: int, factor: int) -> None:
    from lmforge.tokenizer.train import train_tokenizer

    peaks = {}
    for name, n in (("small", n_small), ("large", n_small * factor)):
        src = make_big(tmp_path / name, n)
        data = tmp_path / f"data_{name}"
        peaks[name] = {"clean": peak_rss_mb("clean", src, data), "MB": src.stat().st_size / 1e6}
        m = json.loads((data / "manifest.json").read_text())["metrics"]
        assert m["docs_kept"] > 0.95 * n, m["dropped"]  # the filters ran on every document, and kept them
        if name == "small":
            train_tokenizer(data, tmp_path / "tok", vocab_size=1024, max_train_bytes=1_000_000, progress=False)
        peaks[name]["tokenize"] = peak_rss_mb("tokenize", data, tmp_path / "tok")
    print(f"peak RSS MB: {peaks}")
    assert peaks["large"]["MB"] > (factor - 0.5) * peaks["small"]["MB"]
    # In-memory dedup sets, an in-memory LSH index or a buffered corpus would all grow with the corpus;
    # 10,000 extra in-memory signatures alone would add ~20%.
    for phase in ("clean", "tokenize"):
        assert peaks["large"][phase] < peaks["small"][phase] * 1.12, (phase, peaks)


def test_peak_memory_does_not_grow_with_corpus_size(tmp_path):
    """5,000 vs 15,000 documents (~5 vs ~16 MB), cleaning and tokenizing."""
    check_flat_memory(tmp_path, 5_000, 3)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_corpus_size_large(tmp_path):
    """10,000 vs 100,000 documents (~11 vs ~106 MB)."""
    check_flat_memory(tmp_path, 10_000, 10)


def test_cli_set_keys_start_with_the_section(tmp_path):
    res = run_cli("data", "default", "--set", "min_chars=30", "-o", tmp_path / "o", "-q")
    one_line_error(res, "--set min_chars...: keys start with the section 'data', for example --set data.min_chars=...")

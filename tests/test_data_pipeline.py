"""The data stage as a whole: filters with their report and samples, PII, languages, HTML, weighted
mixing through to training, tasks on Ray matching the local run, resuming, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from lmforge.data.cleaned import iter_clean
from lmforge.data.mix import PERIOD, Mix, MixOrder, MixSource, load_mix
from lmforge.data.prepare import DataConfig, prepare_data
from lmforge.data.quality import FilterConfig
from lmforge.errors import LmforgeError

WORDS = ("the of and to in is that for it as with was on be by this are from at or an have which not but all were "
         "when there can more one their has been would will other into some time only these so may than its then "
         "river garden window people letter morning history summer market village question station").split()


def prose(i: int, n_words: int = 120) -> str:
    """A distinct English-looking paragraph that passes the default quality filters."""
    rng = np.random.default_rng(1000 + i)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=rng.integers(8, 16))]
        sentences.append(" ".join(words).capitalize() + ".")
    return f"Note {i}. " + " ".join(sentences)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"min_chars": 20, "val_fraction": 0.2, **kw})


def kept(out) -> list[str]:
    return list(iter_clean(out, "train")) + list(iter_clean(out, "val"))


def write_docs(folder: Path, docs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


# ---- filters: what they removed, and samples to inspect ----

JUNK = {
    "menu.txt": "\n".join(f"- item {i}" for i in range(80)),  # a bullet list, no prose
    "symbols.txt": " ".join(["# ## ### ... ..."] * 60) + " " + prose(900, 40),
    "spam.txt": "buy cheap watches now " * 60,
}


def test_filters_report_and_write_samples_of_what_they_removed(tmp_path):
    src = write_docs(tmp_path / "src", {**{f"p{i}.txt": prose(i) for i in range(8)}, **JUNK})
    man = prepare_data([str(src)], tmp_path / "out", cfg(), progress=False)
    m = man["metrics"]
    assert m["docs_kept"] == 8
    assert sorted(kept(tmp_path / "out")) == sorted(prose(i) for i in range(8))
    removed = {r: f for r, f in m["filters"].items() if r.split(".")[0] in ("gopher", "repetition")}
    assert sum(f["docs"] for f in removed.values()) == 3
    assert sum(f["bytes"] for f in removed.values()) == sum(len(t.encode()) for t in JUNK.values())
    for reason, f in removed.items():  # each reason's samples are the very documents it removed
        assert m["dropped"][reason] == f["docs"]
        rows = [json.loads(line) for line in (tmp_path / "out" / "removed" / f"{reason}.jsonl").open()]
        assert len(rows) == f["docs"]
        assert all(Path(r["id"]).name in JUNK and r["text"] == JUNK[Path(r["id"]).name] for r in rows)
    off = prepare_data([str(src)], tmp_path / "off", cfg(filters=FilterConfig(gopher=False, repetition=False)),
                       progress=False)
    assert off["metrics"]["docs_kept"] == 11


def test_filter_keys_are_checked_and_the_known_ones_listed(tmp_path):
    src = write_docs(tmp_path / "src", {"a.txt": prose(1)})
    res = run_cli("data", src, "-o", tmp_path / "out", "--set", "data.filters.min_wrods=3")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "data.filters.min_wrods" in res.stderr and "min_words" in res.stderr


def test_pii_is_scrubbed_and_counted(tmp_path):
    planted = prose(1) + " Write to jane.doe@example.org or call +1 (415) 555-0132. Key AKIAIOSFODNN7EXAMPLE."
    src = write_docs(tmp_path / "src", {"a.txt": planted, "b.txt": prose(2)})
    man = prepare_data([str(src)], tmp_path / "out", cfg(val_fraction=0.01), progress=False)
    text = next(t for t in kept(tmp_path / "out") if t.startswith("Note 1."))
    assert "jane.doe@example.org" not in text and "<EMAIL>" in text
    assert "AKIAIOSFODNN7EXAMPLE" not in text and "555-0132" not in text
    assert man["metrics"]["pii"]["email"] == 1 and man["metrics"]["pii"]["aws_key"] == 1
    plain = prepare_data([str(src)], tmp_path / "plain", cfg(val_fraction=0.01, pii=False), progress=False)
    assert planted in kept(tmp_path / "plain") and not plain["metrics"]["pii"]


GERMAN = ("Die Stadt liegt am Ufer des Flusses, und im Sommer kommen viele Menschen, um in den Gärten zu "
          "spazieren. Am Morgen öffnet der Markt, und die Händler verkaufen Brot, Käse und frisches Obst. ") * 4


def test_languages_keep_listed_prose_and_count_each(tmp_path):
    src = write_docs(tmp_path / "src", {"en.txt": prose(1), "de.txt": GERMAN, "code.py": "def f(x):\n    return x\n" * 5})
    man = prepare_data([str(src)], tmp_path / "out", cfg(val_fraction=0.01, languages="en"), progress=False)
    m = man["metrics"]
    assert m["dropped"]["language"] == 1 and m["docs_kept"] == 2
    assert m["languages"] == {"en": 1, "de": 1, "code": 1}
    assert not any("Fluss" in t for t in kept(tmp_path / "out"))


def test_html_pages_become_their_main_text(tmp_path):
    body = " ".join(f"<p>{prose(i, 60)}</p>" for i in range(3))
    page = (f"<html><head><style>p {{color: red}}</style><script>var tracking = 1;</script></head><body>"
            f"<nav><a href='/'>Home</a> | <a href='/about'>About us</a></nav><article>{body}</article>"
            "<footer>Copyright footer text</footer></body></html>")
    src = write_docs(tmp_path / "src", {"page.html": page})
    prepare_data([str(src)], tmp_path / "out", cfg(val_fraction=0.01), progress=False)
    [text] = kept(tmp_path / "out")
    assert prose(0, 60)[:200] in text and "tracking" not in text and "color: red" not in text and "<p>" not in text


def test_an_html_dump_too_big_to_parse_is_counted_not_parsed(tmp_path, monkeypatch):
    from lmforge.data import sources

    page = "<html><body>" + "".join(f"<p>{prose(i, 60)}</p>" for i in range(4)) + "</body></html>"
    src = write_docs(tmp_path / "src", {"page.html": page, "small.html": f"<html><body><p>{prose(9)}</p></body></html>"})
    monkeypatch.setattr(sources, "HTML_MAX_CHARS", len(page) - 1)
    man = prepare_data([str(src)], tmp_path / "out", cfg(val_fraction=0.01, workers=1), progress=False)
    assert man["metrics"]["dropped"]["too_long"] == 1 and man["metrics"]["docs_kept"] == 1
    assert man["metrics"]["dropped_paths"]["too_long"] == [str(src / "page.html")]


# ---- weighted mixing ----

def test_mix_order_keeps_the_shares_at_every_step():
    order = MixOrder(starts=[0, 10_000, 30_000], windows=[100, 50, 7], shares=[0.6, 0.3, 0.1], context=8, seed=3)
    for n in (1, 7, 64, 1000, PERIOD + 5, 3 * PERIOD):
        counts = order.samples_per_source(n)
        assert sum(counts) == n
        # within one window of the share at every step; the shares themselves are kept to 1/PERIOD
        exact = [k / PERIOD for k in order.per_round.tolist()]
        assert all(abs(c - n * p) < 1.01 for c, p in zip(counts, exact)), (n, counts)
        assert all(abs(p - q) < 1 / PERIOD for p, q in zip(exact, (0.6, 0.3, 0.1)))
    offsets = order.offsets(np.arange(2 * PERIOD))
    src = np.searchsorted([0, 10_000, 30_000], offsets, side="right") - 1
    assert np.bincount(src, minlength=3).tolist() == order.samples_per_source(2 * PERIOD)
    # every pass over a source visits each of its windows once; the smallest source (7 windows) is repeated
    third = np.sort(offsets[src == 2][:7])
    assert third.tolist() == [30_000 + 8 * w for w in range(7)]
    again = MixOrder(starts=[0, 10_000, 30_000], windows=[100, 50, 7], shares=[0.6, 0.3, 0.1], context=8, seed=3)
    assert np.array_equal(again.offsets(np.arange(500, 700)), offsets[500:700])  # a pure function of the sample id


def write_mix(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_mix_runs_through_tokens_and_training(tmp_path):
    from lmforge.data.shards import TokenData
    from lmforge.tokenizer.encode import tokenize_data
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.batches import BatchSource

    a = write_docs(tmp_path / "a", {f"a{i}.txt": prose(i) for i in range(30)})
    b = write_docs(tmp_path / "b", {f"b{i}.txt": prose(100 + i) for i in range(6)})
    mix = load_mix(write_mix(tmp_path / "mix.toml", f'[sources]\nbig = "{a}"\nsmall = "{b}"\n\n'
                                                     '[shares]\nbig = 1\nsmall = 1\n\n[epochs]\nsmall = 8\n'))
    data = tmp_path / "data"
    man = prepare_data([], data, cfg(val_fraction=0.05), progress=False, mix=mix)
    assert man["mix"]["sources"][1] == {"name": "small", "path": str(b), "share": 1, "tokens": None, "epochs": 8.0}
    assert set(man["inputs"]) == {"big", "small"}
    train_tokenizer(data, tmp_path / "tok", vocab_size=300, progress=False)
    tokenize_data(data, tmp_path / "tok", progress=False)
    td = TokenData(data)
    sources = td.index["splits"]["train"]["sources"]
    assert [s["name"] for s in sources] == ["big", "small"]
    assert sum(s["tokens"] for s in sources) == len(td.split("train"))
    src = BatchSource(td.split("train"), 16, seed=0, mix=td.index["mix"], sources=sources)
    per_step = [src.tokens_per_source(step + 1, 8) for step in range(20)]
    for step, seen in enumerate(per_step):  # half the windows from each source, at every step
        assert abs(seen["big"] - seen["small"]) <= 16, (step, seen)
    x, _ = src.micro_batch(3, 0, 0, batch_size=8, grad_accum=1, world=1)
    assert x.shape == (8, 16)

    out = tmp_path / "train"
    res = run_cli("train", "--data", data, "--out", out, "--set", "train.max_steps=3",
                  "--set", "train.batch_size=4", "--set", "train.model.context=16", "--set", "train.model.n_layer=1",
                  "--set", "train.model.d_model=32", "--set", "train.model.n_head=2", "--set", "train.eval_every=3",
                  "--set", "train.eval_batches=1", "--quiet")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["tokens_per_source"] == {"big": 6 * 16, "small": 6 * 16}


@pytest.mark.parametrize("body, needle", [
    ('[sources]\na = "x"\n[shares]\na = 1\nb = 2\n', "[shares] names 'b', which [sources] does not define"),
    ('[sources]\na = "x"\nb = "y"\n[shares]\na = -1\nb = 2\n', "cannot be negative"),
    ('[sources]\na = "x"\n[shares]\na = 0\n', "sum to zero"),
    ('[sources]\na = "x"\n[tokens]\na = 10\n[epochs]\nc = 2\n', "[epochs] names 'c'"),
    ('[sources]\na = "x"\n[weights]\na = 1\n', "unknown table [weights]"),
])
def test_bad_mix_files_get_one_line_and_exit_2(tmp_path, body, needle):
    mix = write_mix(tmp_path / "mix.toml", body)
    res = run_cli("data", "--mix", mix, "-o", tmp_path / "out")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert needle in res.stderr and str(mix) in res.stderr


def test_unknown_language_code_is_one_line_exit_2(tmp_path):
    src = write_docs(tmp_path / "src", {"a.txt": prose(1)})
    res = run_cli("data", src, "-o", tmp_path / "out", "--languages", "en,xx")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "'xx'" in res.stderr and "en" in res.stderr


# ---- tasks: resuming, and the same result on Ray ----

def corpus(root: Path) -> Path:
    """Enough files for several tasks, with exact and near duplicates that cross task boundaries."""
    docs = {f"d{i:02d}.txt": prose(i) for i in range(24)}
    docs["d30.txt"] = prose(3)  # an exact copy of a file in another task
    docs["d31.txt"] = prose(5).replace("Note 5.", "Note five.")  # a near copy
    return write_docs(root, docs)


def test_interrupted_run_resumes_without_redoing_finished_tasks(tmp_path):
    src = corpus(tmp_path / "src")
    small = cfg(task_bytes=2_000)
    ref = prepare_data([str(src)], tmp_path / "ref", small, progress=False)
    assert ref["metrics"]["tasks"] >= 4
    assert ref["metrics"]["dropped"]["exact_dup"] == 1 and ref["metrics"]["dropped"]["near_dup"] == 1
    out = tmp_path / "out"
    calls = []

    from lmforge.data import executor as ex_mod

    class Interrupting(ex_mod.LocalExecutor):
        def run(self, fn, tasks):
            for i, args in enumerate(tasks):
                if fn.__name__ == "clean_task" and i == 3:
                    raise KeyboardInterrupt
                calls.append((fn.__name__, i))
                yield i, fn(*args)

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the fourth task
        prepare_data([str(src)], out, small, progress=False, executor=Interrupting())
    assert calls == [("clean_task", i) for i in range(3)]
    assert not (out / "manifest.json").exists() and len(list((out / "work" / "clean").glob("*.json"))) == 3
    man = prepare_data([str(src)], out, small, progress=False)
    assert man["metrics"]["tasks_reused"]["clean"] == 3
    assert kept(out) == kept(tmp_path / "ref") and man["metrics"]["corpus_hash"] == ref["metrics"]["corpus_hash"]
    assert not (out / "work").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def test_ray_executor_gives_the_same_documents_and_token_shards(tmp_path, ray_cluster):
    from lmforge.data.executor import RayExecutor
    from lmforge.tokenizer.encode import tokenize_data
    from lmforge.tokenizer.train import train_tokenizer

    src = corpus(tmp_path / "src")
    small = cfg(task_bytes=2_000)
    local = prepare_data([str(src)], tmp_path / "local", small, progress=False)
    on_ray = prepare_data([str(src)], tmp_path / "ray", small, progress=False, executor=RayExecutor())
    assert on_ray["metrics"]["executor"] == "ray" and local["metrics"]["executor"] == "local"
    assert kept(tmp_path / "ray") == kept(tmp_path / "local")
    assert on_ray["metrics"]["dropped"] == local["metrics"]["dropped"]
    assert on_ray["metrics"]["corpus_hash"] == local["metrics"]["corpus_hash"]
    train_tokenizer(tmp_path / "local", tmp_path / "tok", vocab_size=300, progress=False)
    tokenize_data(tmp_path / "local", tmp_path / "tok", progress=False, shard_tokens=5_000)
    tokenize_data(tmp_path / "ray", tmp_path / "tok", progress=False, shard_tokens=5_000, executor=RayExecutor())
    shards = sorted((tmp_path / "local" / "tokens").glob("*.bin"))
    assert len(shards) > 2 and [f.name for f in shards] == sorted(f.name for f in (tmp_path / "ray" / "tokens").glob("*.bin"))
    assert not list((tmp_path / "ray" / "tokens").glob(".*"))  # no part files left behind
    for f in shards:  # one task per clean file on Ray, joined into the same shards as the in-process encoder
        assert f.read_bytes() == (tmp_path / "ray" / "tokens" / f.name).read_bytes()
    assert (tmp_path / "local" / "tokens" / "index.json").read_text() == (tmp_path / "ray" / "tokens" / "index.json").read_text()


def test_ray_run_that_fails_resumes_from_its_finished_tasks(tmp_path, ray_cluster):
    from lmforge.data.executor import RayExecutor

    src = write_docs(tmp_path / "src", {f"d{i:02d}.jsonl": json.dumps({"text": prose(i)}) + "\n" for i in range(8)})
    (src / "d05.jsonl").write_text("{not json\n")
    small = cfg(task_bytes=1)  # a task per file
    with pytest.raises(LmforgeError, match="d05.jsonl:1: not valid JSON"):
        prepare_data([str(src)], tmp_path / "out", small, progress=False, executor=RayExecutor())
    finished = sorted(p.name for p in (tmp_path / "out" / "work" / "clean").glob("*.json"))
    assert finished == [f"{i:05d}.json" for i in range(8) if i != 5]  # the running tasks saved their work
    (src / "d05.jsonl").write_text(json.dumps({"text": prose(5)}) + "\n")
    man = prepare_data([str(src)], tmp_path / "out", small, progress=False, executor=RayExecutor())
    assert man["metrics"]["tasks_reused"]["clean"] == 7 and man["metrics"]["docs_kept"] == 8


def test_mix_round_trips_through_the_manifest():
    m = Mix([MixSource("a", "x", share=0.5), MixSource("b", "y", share=0.5, epochs=2.0)], "f.toml")
    assert Mix.from_dict(m.to_dict()).to_dict() == m.to_dict()

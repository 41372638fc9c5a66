"""bench/retrieval_corpus.py, the training text of the retrieval model in docs/knowledge.md: each
document is a chunk of one file after the best-matching chunk of another, never of itself."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("retrieval_corpus",
                                              Path(__file__).parents[1] / "bench" / "retrieval_corpus.py")
retrieval_corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(retrieval_corpus)


def body(name: str, words: list[str], n: int = 40) -> str:
    return "".join(f"def {name}_{i}(x):\n    return {words[i % len(words)]}(x) + {i}\n\n" for i in range(n))


def test_neighbours_come_from_another_file_and_match(tmp_path):
    files = {
        "parse.py": body("parse", ["tokenize_header", "split_fields"]),
        "parse_util.py": body("util", ["tokenize_header", "split_fields"]),
        "draw.py": body("draw", ["render_sprite", "blit_surface"]),
        "draw_util.py": body("helper", ["render_sprite", "blit_surface"]),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    paths = sorted(tmp_path.glob("*.py"))
    docs = retrieval_corpus.documents(paths, chunk_chars=400, neighbour_chars=200, max_docs=30, seed=0)
    assert 0 < len(docs) <= 30
    for doc in docs:
        neighbour, sep, local = doc.partition(retrieval_corpus.SEP)
        assert sep and neighbour and local
        own = [n for n, t in files.items() if local in t]
        assert len(own) == 1, "the local part is a chunk of exactly one file"
        found = [n for n, t in files.items() if neighbour in t]
        assert found and own[0] not in found, "the neighbour is never the chunk's own file"
        # BM25 picks the file that shares the chunk's words: parse* with parse*, draw* with draw*.
        assert found[0][:4] == own[0][:4]


def two_files(tmp_path) -> list[Path]:
    for name, words in (("a.py", ["load", "save"]), ("b.py", ["load", "dump"])):
        (tmp_path / name).write_text(body(name[0], words))
    return sorted(tmp_path.glob("*.py"))


def test_copy_share_puts_a_span_of_the_chunk_before_it(tmp_path):
    paths = two_files(tmp_path)
    docs = retrieval_corpus.documents(paths, chunk_chars=400, neighbour_chars=150, max_docs=20, copy_share=1.0)
    assert docs
    for doc in docs:
        neighbour, _, local = doc.partition(retrieval_corpus.SEP)
        assert len(neighbour) == 150 and neighbour in local
    plain = retrieval_corpus.documents(paths, chunk_chars=400, neighbour_chars=150, max_docs=20)
    assert not any(d.partition(retrieval_corpus.SEP)[0] in d.partition(retrieval_corpus.SEP)[2] for d in plain)


def test_scrambled_share_repeats_shuffled_words_on_other_lines(tmp_path):
    paths = two_files(tmp_path)
    docs = retrieval_corpus.documents(paths, chunk_chars=400, neighbour_chars=150, max_docs=20, scrambled_share=1.0)
    assert docs
    originals = [" ".join(p.read_text().split()) for p in paths]
    for doc in docs:
        first, _, second = doc.partition(retrieval_corpus.SEP)
        assert first.split() == second.split()  # the same words in the same order: copyable
        assert not set(first.splitlines()) & set(second.splitlines())  # but no line repeats whole
        assert not any(" ".join(first.split()) in o for o in originals)  # shuffled: not the file's own order

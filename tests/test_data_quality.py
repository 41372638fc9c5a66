"""Document quality filters: every rule fires on a document built to trip it, and only then."""

import random
import string
from dataclasses import replace

import pytest

from lmforge.config import from_dict
from lmforge.data.quality import RULES, FilterConfig, aggressive, apply_filters, c4_lines, profile_of
from lmforge.errors import LmforgeError

STOP = ("the", "be", "to", "of", "and", "that", "have", "with")
PHRASE = ("quantum", "marmalade", "orbit", "lantern", "whisper", "granite", "velvet", "harbor", "saffron", "thunder")
NGRAM_KEYS = [f"max_top_{n}gram" for n in (2, 3, 4)] + [f"max_dup_{n}gram" for n in range(5, 11)]


# ---- synthetic documents ----

def words(n: int, seed: int, stop_every: int = 4) -> list[str]:
    """Random lower-case words, a stop word every ``stop_every`` words: English-like, never repeating."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if stop_every and i % stop_every == 0:
            out.append(rng.choice(STOP))
        else:
            out.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9))))
    return out


def sentences(n_words: int, seed: int, per_line: int = 12, stop_every: int = 4) -> list[str]:
    ws = words(n_words, seed, stop_every)
    return [" ".join(ws[i:i + per_line]).capitalize() + "." for i in range(0, len(ws), per_line)]


def prose(n_words: int = 300, seed: int = 0, per_para: int = 4, **kw) -> str:
    """Paragraphs of one-sentence lines: passes every prose rule, C4's included."""
    lines = sentences(n_words, seed, **kw)
    return "\n\n".join("\n".join(lines[i:i + per_para]) for i in range(0, len(lines), per_para)) + "\n"


def module(n_funcs: int = 30) -> str:
    """An ordinary Python module: short lines such as `return None` and `else:` repeat in every function."""
    parts = ['"""Small helpers."""', "", "import os", "", ""]
    for i in range(n_funcs):
        parts += [f"def helper_{i}(value_{i}, limit={i}):",
                  f'    """Scale value_{i} by {i} unless it is missing."""',
                  f"    if value_{i} is None:",
                  "        return None",
                  f"    total_{i} = value_{i} * {i} + limit",
                  f"    if total_{i} > limit:",
                  f"        return os.path.join(str(total_{i}), 'x{i}')",
                  "    else:",
                  "        return None",
                  "", ""]
    return "\n".join(parts)


def c_module(n_funcs: int = 20) -> str:
    """Ordinary C: closing braces, `break;` and `return 0;` repeat everywhere."""
    parts = ["#include <stdio.h>", ""]
    for i in range(n_funcs):
        parts += [f"int step_{i}(int value_{i}) {{",
                  f"    for (int k = 0; k < value_{i}; k++) {{",
                  f"        if (k == {i}) {{",
                  "            break;",
                  "        }",
                  "    }",
                  f"    printf(\"%d\\n\", value_{i} + {i});",
                  "    return 0;",
                  "}", ""]
    return "\n".join(parts)


def phrase_doc(n: int, lines: int = 25) -> str:
    """Unique lines, each holding the same n-word phrase: repeats as n-grams, never as lines."""
    out = []
    for i in range(lines):
        ws = words(6, seed=100 + i)
        out.append(" ".join(ws[:3] + list(PHRASE[:n]) + ws[3:]).capitalize() + ".")
    return "\n".join(out) + "\n"


def only(key: str) -> dict:
    """Settings that switch every n-gram rule off but ``key``, so one rule is tested at a time."""
    return {k: 1.0 for k in NGRAM_KEYS if k != key}


def reason(text: str, doc_id: str = "doc.txt", **kw) -> str | None:
    return apply_filters(text, doc_id, FilterConfig(**kw))[1]


# ---- documents built to trip one rule each ----

def _bulleted() -> str:
    return "\n".join("• " + s for s in sentences(300, 0)) + "\n"


def _ellipses() -> str:
    lines = sentences(300, 0)
    return "\n".join(s[:-1] + "..." if i % 2 else s for i, s in enumerate(lines)) + "\n"


def _numbers() -> str:
    return prose(300) + "\n".join(" ".join(f"{i}.{j * 7}" for j in range(10)) for i in range(15)) + "\n"


def _dup_paragraph_chars() -> str:
    long_para = "\n".join(sentences(120, 7))
    short = [s for s in sentences(144, 8)]
    return "\n\n".join(short[:6] + [long_para] + short[6:] + [long_para]) + "\n"


def _dup_lines() -> str:
    paras = []
    for i in range(8):
        a, b = sentences(24, 20 + i)
        paras.append("\n".join([a, "Subscribe to the newsletter for more of the same.", b,
                                "All rights reserved by the owners of this site."]))
    return "\n\n".join(paras) + "\n"


def _dup_line_chars() -> str:
    long_line = sentences(150, 9, per_line=150)[0]
    return "\n".join(sentences(240, 10)[:10] + [long_line] + sentences(240, 10)[10:] + [long_line]) + "\n"


def _symbols() -> str:
    return "\n".join("".join(random.Random(i).choices("=-+*|/\\<>~", k=60)) for i in range(40)) + "\n"


CASES = [
    # (case id, text, doc id, settings, expected reason, settings that let it through)
    ("word_count", prose(30), "a.txt", {}, "gopher.word_count", {"min_words": 10}),
    ("word_count_max", prose(300), "a.txt", {"max_words": 200}, "gopher.word_count", {"max_words": 400}),
    ("mean_word_length", "\n".join(" ".join(["to", "be", "of", "at", "an", "the"] * 4) + f" {i}." for i in range(5)),
     "a.txt", {"repetition": False}, "gopher.mean_word_length", {"min_mean_word_length": 1.0}),
    ("symbol_ratio", prose(300) + " ".join(f"#tag{i}" for i in range(40)) + "\n", "a.txt", {},
     "gopher.symbol_ratio", {"max_symbol_word_ratio": 0.2}),
    ("ellipsis_lines", _ellipses(), "a.txt", {}, "gopher.ellipsis_lines", {"max_ellipsis_lines": 0.6}),
    ("bullet_lines", _bulleted(), "a.txt", {}, "gopher.bullet_lines", {"max_bullet_lines": 1.0}),
    ("alpha_words", _numbers(), "a.txt", {}, "gopher.alpha_words", {"min_alpha_words": 0.5}),
    ("stop_words", prose(300, stop_every=0), "a.txt", {}, "gopher.stop_words", {"min_stop_words": 0}),
    ("dup_paragraphs", prose(200, 2) + "\n" + ("\n".join(sentences(36, 1)) + "\n\n") * 5, "a.txt", {},
     "repetition.dup_paragraphs", {"max_dup_paragraphs": 0.6, "max_dup_paragraph_chars": 0.6,
                                   "max_dup_lines": 0.6, "max_dup_line_chars": 0.6} | only("")),
    ("dup_paragraph_chars", _dup_paragraph_chars(), "a.txt", {}, "repetition.dup_paragraph_chars",
     {"max_dup_paragraph_chars": 0.5, "max_dup_lines": 0.5, "max_dup_line_chars": 0.5} | only("")),
    ("dup_lines", _dup_lines(), "a.txt", {}, "repetition.dup_lines",
     {"max_dup_lines": 0.5, "max_dup_line_chars": 0.5} | only("")),
    ("dup_line_chars", _dup_line_chars(), "a.txt", {}, "repetition.dup_line_chars",
     {"max_dup_line_chars": 0.5} | only("")),
    *[(key[4:], phrase_doc(int(key.split("_")[-1][:-4])), "a.txt", only(key),
       f"repetition.{key[4:]}", only(key) | {key: 1.0}) for key in NGRAM_KEYS],
    ("lorem_ipsum", prose(300) + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n", "a.txt", {"c4": True},
     "c4.lorem_ipsum", {"c4": False}),
    ("too_little_left", prose(300).replace(".", ""), "a.txt", {"c4": True}, "c4.too_little_left",
     {"c4_min_lines": 0, "c4_min_words": 0}),
    ("too_short", "import os\nprint(os.sep)\n", "tiny.py", {}, "code.too_short", {"code_min_lines": 2}),
    ("line_length", module() + f'BLOB = "{"x" * 1500}"\n', "blob.py", {}, "code.line_length",
     {"code_max_line_length": 2000}),
    ("mean_line_length", "\n".join(f"value_{i} = compute(" + ", ".join(f"arg_{i}_{j}" for j in range(16)) + ")"
                                   for i in range(20)) + "\n", "wide.py", {}, "code.mean_line_length",
     {"code_max_mean_line_length": 200.0}),
    ("alnum", _symbols(), "art.py", {}, "code.alnum", {"code_min_alnum": 0.0}),
    ("autogenerated", "# Auto-generated by tools/gen_tables.py. DO NOT EDIT.\n" + module(), "tables.py", {},
     "code.autogenerated", {"code_header_lines": 0}),
    ("code_dup_lines", module(10) + "\nself.update()" * 600 + "\n", "loop.py", {}, "repetition.dup_lines",
     {"code_max_dup_lines": 0.95}),
    ("code_dup_line_chars", module(30) + ("\n" + "call_with_many_arguments(" + ", ".join(f"a{j}" for j in range(30))
                                          + ")") * 250 + "\n", "calls.py", {}, "repetition.dup_line_chars",
     {"code_max_dup_line_chars": 0.95}),
]


@pytest.mark.parametrize("text,doc_id,settings,expected,relaxed", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_rule_fires_on_its_document_and_its_threshold_flips_it(text, doc_id, settings, expected, relaxed):
    kept, why = apply_filters(text, doc_id, FilterConfig(**settings))
    assert (kept, why) == (None, expected)
    kept, why = apply_filters(text, doc_id, FilterConfig(**{**settings, **relaxed}))
    assert why is None and kept is not None


def test_every_rule_has_a_document_that_trips_it():
    fired = {c[4] for c in CASES}
    assert fired == {f"{name}.{rule}" for name, rules in RULES.items() for rule in rules}


@pytest.mark.parametrize("doc_id,text", [("notes.txt", prose(600)), ("README", prose(400, seed=3)),
                                         ("mod.py", module()), ("lib.c", c_module()),
                                         ("data.jsonl:7", prose(200, seed=5))])
def test_good_documents_are_kept_unchanged(doc_id, text):
    assert apply_filters(text, doc_id, FilterConfig()) == (text, None)


def test_repeated_short_lines_of_ordinary_code_are_not_repetition():
    # return None / else: / } repeat in every function; they must not count as duplicated lines.
    strict = {"code_max_dup_lines": 0.2, "code_max_dup_line_chars": 0.2}
    assert reason(module(), "m.py", **strict) is None
    assert reason(c_module(), "m.c", **strict) is None
    assert reason(module(), "m.py", **strict, code_dup_min_line_chars=0) == "repetition.dup_lines"


def test_ngram_rules_read_only_the_configured_prefix():
    text = prose(400, seed=4) + phrase_doc(10, lines=40)
    assert reason(text, **only("max_dup_10gram")) == "repetition.dup_10gram"
    assert reason(text, **only("max_dup_10gram"), ngram_max_words=400) is None


def test_short_unique_text_is_not_repetition():
    # In a handful of words the single most frequent 2-gram covers much of the text, but it occurs once.
    assert reason("Seven unique words make this sentence.\n", gopher=False) is None
    assert reason("  \n", min_words=0) is None  # nothing to measure: no per-word rule applies


def test_markdown_headings_are_not_hashtags():
    lines = sentences(300, 0)
    text = "\n\n".join(f"###### Part {i}\n{s}" for i, s in enumerate(lines)) + "\n"
    assert text.count("#") / len(text.split()) > 0.2  # would trip the '#' ratio if headings counted
    assert reason(text) is None


def test_words_in_other_scripts_count_as_words_with_letters():
    rng = random.Random(0)
    cyrillic = "абвгдежзиклмнопрстуфхцчшщэюя"
    text = "\n".join(" ".join("".join(rng.choices(cyrillic, k=rng.randint(4, 8))) for _ in range(10)) + "."
                     for _ in range(20)) + "\n"
    assert reason(text, min_stop_words=0) is None
    dashes = text + "\n".join(" ".join(["—", "№", "42"] * 10) for _ in range(10)) + "\n"  # no letters
    assert reason(dashes, min_stop_words=0) == "gopher.alpha_words"


@pytest.mark.parametrize("header,generated", [
    ("# This file is generated by mkstringprep.py. DO NOT EDIT.", True),
    ('""" Character Mapping Codec cp1252 generated from \'CP1252.TXT\' with gencodec.py.', True),
    ("// Code generated by protoc-gen-go.", True),
    ("# auto generated by tools/make_width_tables.py", True),
    ('"""Abstract syntax trees.\n\nA tree can be generated by passing a flag to compile()."""', False),
    ('"""Parser engine for the grammar tables generated by pgen."""', False),
])
def test_autogenerated_markers(header, generated):
    text = header + "\n" + module()
    assert reason(text, "m.py") == ("code.autogenerated" if generated else None)
    assert reason("\n" * 10 + text, "m.py") is None  # below the first code_header_lines lines


# ---- switches ----

@pytest.mark.parametrize("switch,case", [("gopher", "word_count"), ("gopher", "stop_words"),
                                         ("repetition", "dup_lines"), ("repetition", "top_2gram"),
                                         ("repetition", "code_dup_lines"), ("c4", "lorem_ipsum"),
                                         ("code", "autogenerated"), ("code", "line_length")])
def test_a_filter_switched_off_stops_its_rules(switch, case):
    _, text, doc_id, settings, expected, _ = next(c for c in CASES if c[0] == case)
    assert reason(text, doc_id, **settings) == expected
    assert reason(text, doc_id, **{**settings, switch: False}) is None


def test_prose_rules_never_judge_code_and_code_rules_never_judge_prose():
    # The stop-word-free module would fail Gopher; the 150-char prose lines would fail the code mean.
    assert reason(module(), "m.py") is None
    wide = "\n".join(sentences(600, 1, per_line=25)) + "\n"
    assert reason(wide, "wide.md") is None
    assert reason(wide, "wide.md", profile="code") == "code.mean_line_length"
    assert reason(module(), "m.py", profile="prose") is not None


# ---- C4 ----

def test_c4_keeps_only_punctuated_lines_and_paragraph_breaks():
    text = "\n".join([
        "Welcome to the site of the very best things in the world.",
        "Home | About | Contact",
        "Please enable JavaScript to view the comments on this page.",
        "Too short.",
        "",
        "  This is another paragraph that has enough words in it!  ",
        "A heading without any terminal punctuation mark",
        'He said "this line ends with a closing quote mark."',
        "",
        "",
    ])
    cfg = FilterConfig(c4=True, c4_min_lines=0, c4_min_words=0)
    assert c4_lines(text, cfg) == ("\n".join([
        "Welcome to the site of the very best things in the world.",
        "",
        "This is another paragraph that has enough words in it!",
        'He said "this line ends with a closing quote mark."',
    ]), None)
    assert c4_lines(text, replace(cfg, c4_min_line_words=2))[0].count("\n") == 4  # "Too short." is back
    assert c4_lines(text, replace(cfg, c4_min_lines=4)) == (None, "c4.too_little_left")
    assert c4_lines(text, replace(cfg, c4_min_words=40)) == (None, "c4.too_little_left")


def test_c4_is_the_only_filter_that_edits():
    text = prose(300) + "Navigation menu item without punctuation\n"
    assert apply_filters(text, "a.txt", FilterConfig()) == (text, None)
    kept, why = apply_filters(text, "a.txt", FilterConfig(c4=True))
    assert why is None and kept == text.replace("\nNavigation menu item without punctuation\n", "")


# ---- profile ----

@pytest.mark.parametrize("doc_id", ["a/b/c.py", "C:\\src\\Main.JAVA", "src.tar.gz#pkg/lib.rs", "conf.yaml.zst",
                                    "data.json.gz", "app.py:12", "build/Makefile", "x.tar#CMakeLists.txt", "site.css.bz2"])
def test_code_extensions_mean_code_whatever_the_content(doc_id):
    assert profile_of(doc_id, prose(200)) == "code"


@pytest.mark.parametrize("doc_id", ["README.md", "notes.txt", "page.html", "guide.rst.xz", "corpus.jsonl:12",
                                    "rows.parquet#41", "hf:org/set:train#3", "arbitrary id", "x.tar#docs/guide.txt"])
def test_other_ids_are_decided_by_content(doc_id):
    assert profile_of(doc_id, prose(200)) == "prose"
    assert profile_of(doc_id, module()) == "code"
    assert profile_of(doc_id, c_module()) == "code"


def test_content_profile_threshold_and_forced_profiles():
    mixed = prose(120) + "\n".join(module(2).split("\n")[5:12]) + "\n"  # about a third code lines
    assert profile_of("a.md", mixed) == "prose"
    assert profile_of("a.md", mixed, code_lines=0.2) == "code"
    assert profile_of("a.py", prose(100), "prose") == "prose"
    assert profile_of("a.txt", prose(100), "code") == "code"
    assert apply_filters(prose(30), "a.txt", FilterConfig(profile="code"))[1] is None  # no Gopher for code
    with pytest.raises(LmforgeError, match="profile"):
        profile_of("a.txt", "x", "fast")


# ---- configuration ----

@pytest.mark.parametrize("key,value,says", [
    ("max_dup_lines", 1.5, r"\[0.0, 1.0\]"),
    ("code_min_alnum", -0.1, r"\[0.0, 1.0\]"),
    ("min_words", -1, ">= 0"),
    ("code_max_line_length", 0, ">= 1"),
    ("ngram_max_words", 5, ">= 10"),
    ("min_alpha_words", "high", "number"),
    ("min_stop_words", 2.5, "integer"),
    ("gopher", "yes", "true or false"),
    ("profile", "fast", "prose, code, auto"),
])
def test_bad_settings_name_the_key_and_the_allowed_values(key, value, says):
    with pytest.raises(LmforgeError, match=rf"data\.filters\.{key} = .*{says}"):
        FilterConfig(**{key: value})


def test_ordered_pairs_are_checked():
    with pytest.raises(LmforgeError, match=r"data\.filters\.min_words = 200, data\.filters\.max_words = 100"):
        FilterConfig(min_words=200, max_words=100)
    with pytest.raises(LmforgeError, match="min_mean_word_length"):
        FilterConfig(min_mean_word_length=5.0, max_mean_word_length=4.0)


def test_filters_table_loads_through_the_config_plumbing():
    cfg = from_dict(FilterConfig, {"c4": True, "max_dup_lines": 0.25, "min_words": 20.0}, prefix="data.filters.")
    assert (cfg.c4, cfg.max_dup_lines, cfg.min_words) == (True, 0.25, 20)
    with pytest.raises(LmforgeError, match=r"data\.filters\.max_dup_lines = 3"):
        from_dict(FilterConfig, {"max_dup_lines": 3}, prefix="data.filters.")
    with pytest.raises(LmforgeError, match=r"unknown key 'data\.filters\.min_word'.*min_words"):
        from_dict(FilterConfig, {"min_word": 3}, prefix="data.filters.")


def test_aggressive_removes_more_than_default():
    sample = [("short.txt", prose(80, seed=11)),             # under aggressive's 100 words
              ("tiny.py", "\n".join(f"X_{i} = {i}" for i in range(6)) + "\n"),  # under aggressive's 10 lines
              ("wide.py", "\n".join(f"value_{i} = f(" + ", ".join(f"a{j}" for j in range(12)) + ")"
                                    for i in range(30)) + "\n"),
              ("nav.txt", prose(300, seed=12) + "\n".join(f"Menu item {i}" for i in range(60)) + "\n"),
              ("good.txt", prose(400, seed=13)), ("good.py", module())]
    strict = aggressive()
    assert strict.c4 and strict.gopher and strict.repetition and strict.code
    default_out = {d for d, t in sample if apply_filters(t, d, FilterConfig())[1]}
    strict_out = {d for d, t in sample if apply_filters(t, d, strict)[1]}
    assert default_out < strict_out
    assert {"good.txt", "good.py"}.isdisjoint(strict_out)
    assert {"short.txt", "tiny.py", "wide.py", "nav.txt"} <= strict_out


def test_every_reason_is_filter_dot_rule():
    for _, text, doc_id, settings, _, _ in CASES:
        why = apply_filters(text, doc_id, replace(aggressive(), **settings))[1]
        if why is not None:
            name, rule = why.split(".")
            assert rule in RULES[name]

"""Language identification and HTML main-content extraction: the languages of real paragraphs,
'und' for text without language, --languages validation, boilerplate dropped from web pages, and
HTML names recognised under compression suffixes."""

import logging
import socket
import subprocess
import time

import pytest

from lmforge.data import langid
from lmforge.data.html import body_text, html_to_text, is_html
from lmforge.data.langid import detect, known_languages, parse_languages
from lmforge.errors import LmforgeError

PARAGRAPHS = {
    "en": "The committee met on Tuesday to discuss the new budget for the public library. Most members agreed "
          "that the reading rooms should stay open later in the evening, especially during the winter months "
          "when students need a quiet and warm place to work.",
    "de": "Der Ausschuss traf sich am Dienstag, um über den neuen Haushalt der Stadtbibliothek zu beraten. Die "
          "meisten Mitglieder waren sich einig, dass die Lesesäle abends länger geöffnet bleiben sollten, vor "
          "allem in den Wintermonaten, wenn Studenten einen ruhigen und warmen Ort zum Arbeiten brauchen.",
    "fr": "Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque municipale. La plupart "
          "des membres ont convenu que les salles de lecture devraient rester ouvertes plus tard le soir, "
          "surtout pendant les mois d'hiver, lorsque les étudiants ont besoin d'un endroit calme pour travailler.",
    "zh": "委员会于星期二开会，讨论公共图书馆的新预算。大多数成员同意，阅览室应该在晚上延长开放时间，"
          "特别是在冬季的几个月里，因为学生们需要一个安静而温暖的地方学习。图书馆馆长表示，她将在下个月提交一份详细的计划。",
    "ru": "Комитет собрался во вторник, чтобы обсудить новый бюджет городской библиотеки. Большинство членов "
          "согласились с тем, что читальные залы должны оставаться открытыми дольше по вечерам, особенно зимой, "
          "когда студентам нужно тихое и тёплое место для занятий.",
}


@pytest.mark.parametrize("code", sorted(PARAGRAPHS))
def test_detect_paragraph_languages(code):
    lang, confidence = detect(PARAGRAPHS[code])
    assert lang == code
    assert 0.9 <= confidence <= 1.0


@pytest.mark.parametrize("text", ["", "   \n\t", "ok", "Hello world", "12345 67890 3.14159 2.71828 1.41421 1.73205",
                                  "!!! ??? ... --- *** ### +++ === /// ||| <<< >>>", "x = 1; y = 2",
                                  "0x1f 0x2e 0x3d 0x4c 0x5b 0x6a 0x79 0x88 0x97 0xa6 0xb5 0xc4 0xd3 0xe2"])
def test_detect_without_language_is_undetermined(text):
    assert detect(text) == ("und", 0.0)


def test_detect_long_document_samples_the_whole_text_quickly():
    # an English licence header must not decide a German document, and a huge text costs a sample
    header = "Licensed under the Apache License, Version 2.0. You may not use this file except in compliance. " * 15
    long_german = header + (PARAGRAPHS["de"] + "\n") * 60_000
    assert len(long_german) > 15_000_000
    start = time.perf_counter()
    lang, confidence = detect(long_german)
    elapsed = time.perf_counter() - start
    assert (lang, confidence > 0.9) == ("de", True)
    assert elapsed < 1.0  # classifying all 15 MB takes several seconds


def test_model_loaded_once():
    for paragraph in PARAGRAPHS.values():
        detect(paragraph)
    assert langid._identifier() is langid._identifier()
    assert langid._identifier.cache_info().misses == 1


def test_known_languages():
    codes = known_languages()
    assert {"en", "de", "fr", "zh", "ru", "ja", "es"} <= set(codes)
    assert list(codes) == sorted(codes)
    assert all(c == c.strip().lower() and c.isalpha() for c in codes)
    assert "zxx" not in codes and "und" not in codes


def test_parse_languages():
    assert parse_languages("en,zh") == ("en", "zh")
    assert parse_languages(" EN , zh,en,, De ") == ("en", "zh", "de")
    assert parse_languages(["FR", "en,de", " fr "]) == ("fr", "en", "de")
    assert parse_languages(("ru",)) == ("ru",)
    for empty in (None, "", " , ", [], ()):
        assert parse_languages(empty) == ()


def test_parse_languages_unknown_code():
    with pytest.raises(LmforgeError) as err:
        parse_languages("en,XX,de")
    message = str(err.value)
    assert message.startswith("unknown language code 'xx' (--languages); known codes: ")
    assert "\n" not in message
    assert message.split("known codes: ")[1].split(", ") == list(known_languages())
    with pytest.raises(LmforgeError, match="'english'"):
        parse_languages(["english"])


ARTICLE = "Tide pools are rocky hollows on the shore that keep seawater when the tide goes out."
PAGE = f"""<!DOCTYPE html><html><head><title>Tide pools</title>
<style>body {{ font-family: serif }} .menu {{ color: hotpink }}</style>
<script>var trackingPixel = "analytics-id-123";</script></head>
<body>
<header><div class="logo">MegaSite</div>
<nav class="menu"><ul><li><a href="/">Home</a></li><li><a href="/shop">Shop our deals</a></li>
<li><a href="/about">About us</a></li><li><a href="/contact">Contact the team</a></li></ul></nav></header>
<main><article>
<h1>Life in the tide pools</h1>
<p>{ARTICLE} They hold a surprising variety of animals, from anemones to small fish that wait for the water.</p>
<h2>Who lives there</h2>
<p>Sea stars cling to the rocks with hundreds of tube feet, while hermit crabs move between borrowed shells
as they grow. Limpets graze on algae and return to the same spot on the rock every time.</p>
<ul><li>Anemones catch drifting plankton.</li><li>Sculpins hide in the weed.</li></ul>
<pre><code>def count(pool):
    return sum(1 for animal in pool if animal.alive)</code></pre>
<table><tr><th>Species</th><th>Zone</th></tr><tr><td>Mussel</td><td>middle</td></tr></table>
<p>Visitors should step only on bare rock and put back any stone they turn over, because the animals
underneath depend on the shade and moisture it gives them.</p>
</article></main>
<aside class="sidebar"><h3>Related</h3><ul><li><a href="/x">Ten best beaches you must visit</a></li></ul></aside>
<footer><p>Copyright 2024 MegaSite Inc. All rights reserved.</p><p><a href="/privacy">Privacy policy</a></p></footer>
<script>document.write("late-script-text")</script>
</body></html>"""
BOILERPLATE = ("MegaSite", "Shop our deals", "About us", "Contact the team", "Ten best beaches", "Copyright 2024",
               "Privacy policy", "trackingPixel", "analytics-id", "late-script-text", "font-family", "hotpink")


def test_html_to_text_keeps_article_drops_boilerplate():
    text = html_to_text(PAGE)
    lines = text.split("\n")
    assert ARTICLE in text
    assert "Life in the tide pools" in lines and "Who lives there" in lines
    assert "Limpets graze on algae" in text and "it gives them." in text
    assert any(line.endswith("Anemones catch drifting plankton.") for line in lines)
    assert "def count(pool):\n    return sum(1 for animal in pool if animal.alive)" in text
    assert "| Mussel | middle |" in lines
    leaked = [b for b in BOILERPLATE if b in text]
    assert leaked == []
    assert lines == [line.rstrip() for line in lines] and text == text.strip()


def test_html_to_text_uses_no_network_or_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("html_to_text tried the network or a subprocess")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    page = PAGE.replace("<head>", '<head><link rel="canonical" href="https://example.com/tide-pools">'
                                  '<meta property="og:url" content="https://example.com/tide-pools">')
    assert ARTICLE in html_to_text(page)


def test_html_to_text_small_and_odd_pages(caplog):
    caplog.set_level(logging.DEBUG)
    # fragments and a long leading comment: trafilatura alone rejects these as "not HTML", logging errors
    assert html_to_text("<p>Just a fragment of a page, with a sentence.</p>") == \
        "Just a fragment of a page, with a sentence."
    comment = "<!-- " + "generated by a site builder, version 1.2.3; " * 3 + "-->"
    assert html_to_text(comment + "<html><body><p>The only paragraph.</p></body></html>") == "The only paragraph."
    # nothing to read: empty, script-only app shells, a page that is only a footer
    assert html_to_text("") is None
    assert html_to_text("<html><head><title>App</title></head><body><div id='root'></div>"
                        "<script>render()</script></body></html>") is None
    assert html_to_text("<html><body><footer>Copyright 2024 Nobody</footer></body></html>") is None
    assert [r.getMessage() for r in caplog.records if r.name.startswith("trafilatura")] == []


def test_html_to_text_small_page_falls_back_to_body_text():
    # trafilatura drops a comments section (include_comments=False), leaving it nothing on this page
    page = ("<html><body><div class='comments'>"
            "<p>First reply: the recipe works with brown sugar too.</p><p>Second reply: bake it ten minutes "
            "longer.</p></div><footer>Footer text here</footer><script>track()</script></body></html>")
    assert html_to_text(page) == ("First reply: the recipe works with brown sugar too.\n"
                                  "Second reply: bake it ten minutes longer.")


def test_body_text_blocks_whitespace_and_pre():
    html = ("<html><head><style>p{}</style></head><body><h2>Notes</h2><p>one   two\n   three <b>bold</b> end</p>"
            "<pre>def f():\n    return 1</pre><ul><li>a</li><li>b</li></ul>loose text<br>after break"
            "<aside>side</aside><script>x()</script></body></html>")
    assert body_text(html) == "Notes\none two three bold end\ndef f():\n    return 1\na\nb\nloose text\nafter break"
    assert body_text("<html><body><script>x()</script></body></html>") is None


@pytest.mark.parametrize("name,expected", [
    ("page.html", True), ("PAGE.HTM", True), ("book.xhtml", True), ("a/b/index.html.gz", True),
    ("page.htm.bz2", True), ("page.html.xz", True), ("page.xhtml.zst", True), ("notes.txt", False),
    ("notes.txt.gz", False), ("site.html.tar.gz", False), ("html", False), ("page.html.zip", False),
    ("page.shtml.gz", False),
])
def test_is_html(name, expected):
    assert is_html(name) is expected

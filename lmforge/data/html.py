"""HTML documents reduced to the text a reader came for.

A web page is mostly not its article: menus, footers, cookie banners, related-link boxes,
scripts and styles. Training on those teaches a model boilerplate, so an HTML document is reduced
to its main content with trafilatura, as plain text: paragraphs, headings, list items (``- ``),
code blocks (indentation kept) and tables (``| a | b |`` rows) each on their own lines.

trafilatura runs with ``favor_recall``: on documentation pages the default and the precision
mode drop section headings and doc comments in code listings, and recall was also the faster
mode there, while nav menus and footers are still removed. Comments sections, images, links and
metadata are left out; with no URL and no metadata asked for, trafilatura only parses the string
it is given (no network, no date lookups, no subprocess). Its warnings, one per odd page, are
silenced below ERROR so that a run over a crawl does not drown its own output.

Two gaps of trafilatura are covered here. It rejects a document that does not mention ``html``
in its first 50 characters unless it parses into two or more top-level elements, which loses
fragments (``<p>...</p>``) and pages with a long leading comment; such input is given an
``<html>`` start tag first, which the parser merges with any later one. And when it still
extracts nothing from a page whose visible text is small (a short note, a page that is all
comment section) the page's ``<body>`` text is used, minus scripts, styles, menus, headers,
footers and sidebars: on a small page there is little boilerplate left to keep out, while the
page's text would otherwise be lost. On a larger page an empty result is trafilatura's judgement
that nothing in it is content, and it stands.
"""

from __future__ import annotations

import functools
import logging
import re

from lmforge.data.compressed import inner_name

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
# Visible text up to this size is kept by the body-text fallback (see the module docstring).
FALLBACK_MAX_CHARS = 4000
_QUIET_LOGGERS = ("trafilatura", "htmldate", "courlan", "justext")
_DROPPED_TAGS = ("script", "style", "noscript", "template", "title", "svg", "canvas", "iframe", "object",
                 "nav", "header", "footer", "aside", "form", "button", "select")
_BLOCK_TAGS = frozenset({"address", "article", "blockquote", "br", "dd", "details", "div", "dl", "dt", "figcaption",
                         "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "main", "ol", "p", "section",
                         "summary", "table", "td", "th", "tr", "ul"})
_SPACES = re.compile(r"\s+")


def is_html(name: str) -> bool:
    """``page.html``, ``page.htm.gz``, ``book.xhtml.zst``: an HTML document, compressed or not."""
    return inner_name(name).lower().endswith(HTML_SUFFIXES)


@functools.lru_cache(maxsize=1)
def _trafilatura():
    """The trafilatura module, imported on first use (it costs ~0.3 s) with its loggers quietened."""
    import trafilatura

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return trafilatura


def html_to_text(html: str) -> str | None:
    """The main content of an HTML page as plain text, or None when there is none."""
    if "html" not in html[:50].lower():  # trafilatura's own test for "is this HTML at all"
        html = "<html>" + html
    text = _trafilatura().extract(html, output_format="txt", favor_recall=True, include_comments=False,
                                  include_tables=True, include_images=False, include_links=False,
                                  with_metadata=False, deduplicate=False)
    if text and text.strip():
        # table rows come with a trailing space per cell; no line's trailing space is content
        return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    text = body_text(html)
    return text if text and len(text) <= FALLBACK_MAX_CHARS else None


def body_text(html: str) -> str | None:
    """The visible text of ``<body>``, one line per block, without scripts, styles, menus,
    headers, footers, sidebars and forms; None when nothing is left."""
    import lxml.etree
    import lxml.html

    try:
        # bytes, so that an XML declaration with an encoding or a stray control character parses
        parser = lxml.html.HTMLParser(encoding="utf-8", remove_comments=True, remove_pis=True)
        root = lxml.html.document_fromstring(html.encode("utf-8", errors="replace"), parser=parser)
    except (lxml.etree.ParserError, ValueError):
        return None
    body = root.find("body")
    if body is None:
        return None
    for element in list(body.iter(*_DROPPED_TAGS)):
        element.drop_tree()
    return "\n".join(_blocks(body)) or None


def _blocks(body) -> list[str]:
    """The text of ``body`` cut at block boundaries: whitespace inside a block collapsed as a
    browser shows it, ``<pre>`` kept verbatim (it is code, and indentation is meaning)."""
    blocks: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        text = _SPACES.sub(" ", "".join(pending)).strip()
        pending.clear()
        if text:
            blocks.append(text)

    def walk(element) -> None:
        for child in element:
            if child.tag == "pre":
                flush()
                code = "\n".join(line.rstrip() for line in child.text_content().split("\n")).strip("\n")
                if code.strip():
                    blocks.append(code)
            elif child.tag in _BLOCK_TAGS:
                flush()
                pending.append(child.text or "")
                walk(child)
                flush()
            elif isinstance(child.tag, str):
                pending.append(child.text or "")
                walk(child)
            pending.append(child.tail or "")

    pending.append(body.text or "")
    walk(body)
    flush()
    return blocks

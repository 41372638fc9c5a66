"""Language identification of documents, for keeping a corpus to the languages a model is meant for.

The classifier is py3langid's naive Bayes model over byte n-grams (it ships inside the wheel, so
this works offline). It is loaded once per process, on first use, because the load costs about a
second and most runs never ask for a language.

Two choices keep it fast and honest on a corpus of millions of documents:

- Only a bounded sample of a document is classified: the whole text up to ``SAMPLE_CHARS``
  characters, and for a longer one ``SLICES`` slices spread over it (start, middle, end), so a
  licence header or a quoted passage does not decide the language of the whole, and a 10 MB file
  costs the same as a 2 kB one.
- Text with too little language in it gets ``("und", 0.0)`` (undetermined) instead of the model's
  guess, which on such input is noise. The rule, applied to the sample: fewer than
  ``MIN_LETTERS`` letters (``str.isalpha``: any script, so CJK characters count), or letters
  making up less than ``MIN_LETTER_SHARE`` of the non-space characters (number tables, hex
  dumps, punctuation art). The model's own "no linguistic content" class (``zxx``) is reported
  as ``und`` too. ``und`` always comes with confidence 0.0.

Confidences are the model's normalised probabilities; a low one (say under 0.5) means the text
is short, mixed or unlike any training language, and is worth a threshold in a filter.
"""

from __future__ import annotations

import functools

from lmforge.errors import LmforgeError

UNDETERMINED = "und"
SAMPLE_CHARS = 2000
SLICES = 4
MIN_LETTERS = 20
MIN_LETTER_SHARE = 0.25
_NO_LANGUAGE = "zxx"  # the model's label for non-linguistic content


@functools.lru_cache(maxsize=1)
def _identifier():
    """The py3langid classifier with normalised probabilities, loaded on first use."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@functools.lru_cache(maxsize=1)
def known_languages() -> tuple[str, ...]:
    """The language codes the model can answer, sorted: ISO 639-1 where one exists (``en``,
    ``zh``), ISO 639-3 for the languages without (``yue``, ``arz``)."""
    return tuple(sorted(code for code in _identifier().labels if code != _NO_LANGUAGE))


def parse_languages(spec: str | list | tuple | None) -> tuple[str, ...]:
    """``"en,zh"`` or ``["en", "zh"]`` -> ``("en", "zh")``: lowercased, stripped, de-duplicated,
    in the given order. An empty spec is ``()``; an unknown code is an error naming it."""
    if not spec:
        return ()
    items = [spec] if isinstance(spec, str) else list(spec)
    codes = [part.strip().lower() for item in items for part in str(item).split(",")]
    codes = list(dict.fromkeys(code for code in codes if code))
    known = known_languages()
    for code in codes:
        if code not in known:
            raise LmforgeError(f"unknown language code '{code}' (--languages); known codes: {', '.join(known)}")
    return tuple(codes)


def sample(text: str) -> str:
    """What is classified: ``text`` itself when short, else ``SLICES`` slices spread over it."""
    if len(text) <= SAMPLE_CHARS:
        return text
    width = SAMPLE_CHARS // SLICES
    step = (len(text) - width) / (SLICES - 1)
    return "\n".join(_slice_at(text, int(i * step), width) for i in range(SLICES))


def _slice_at(text: str, start: int, width: int) -> str:
    """``width`` characters from ``start``, moved past a word cut in half when a space is near,
    so the sample does not begin with a word fragment."""
    piece = text[start:start + width]
    if start:
        cut = next((i for i, ch in enumerate(piece[:40]) if ch.isspace()), -1)
        piece = piece[cut + 1:]
    return piece


def has_language(sample_text: str) -> bool:
    """Enough letters, and a large enough share of them, to be worth classifying (see the module)."""
    letters = sum(ch.isalpha() for ch in sample_text)
    if letters < MIN_LETTERS:
        return False
    visible = sum(not ch.isspace() for ch in sample_text)
    return letters >= MIN_LETTER_SHARE * visible


def detect(text: str) -> tuple[str, float]:
    """``(code, confidence)`` for the language of ``text``; ``("und", 0.0)`` when it has too
    little language in it to tell."""
    part = sample(text)
    if not has_language(part):
        return UNDETERMINED, 0.0
    code, confidence = _identifier().classify(part)
    if code == _NO_LANGUAGE:
        return UNDETERMINED, 0.0
    return code, min(1.0, max(0.0, float(confidence)))

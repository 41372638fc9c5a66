"""PII scrubbing: replace emails, IP addresses, phone numbers and secrets with typed placeholders.

Pretraining text is full of values a model should never learn to reproduce: authors' emails in
file headers, keys pasted into code, phone numbers in scraped pages. ``scrub`` replaces each one
it finds with a placeholder naming its kind (``<EMAIL>``, ``<API_KEY>``, ...), so the sentence
around it stays learnable and the count per kind can be reported.

Kinds (``KINDS``):

- ``email``: local@domain.tld, where the TLD is a country code or a common generic one;
- ``ip_address``: IPv4 and IPv6 addresses that are globally routable (loopback, private,
  documentation and multicast ranges are not personal data and are common in code), and for
  IPv4 not read as a version, section or OID number by their context;
- ``phone``: "+" and a country code with or without separators, and North American numbers
  with separators: (555) 123-4567, 555-123-4567, 555.123.4567;
- ``private_key``: a whole PEM ``-----BEGIN ... PRIVATE KEY-----`` block, or one cut off;
- ``aws_key``: access key ids (AKIA/ASIA...) and the value assigned to an AWS secret key name;
- ``api_key``: well-known token shapes (GitHub, Slack, OpenAI, Stripe, Google, Hugging Face),
  and random-looking quoted values assigned to names like api_key, secret, token or password.
  Only the value is replaced; the name and quotes stay.

Two constraints shape the code:

- Speed. Scrubbing runs on every document, so it must cost a small fraction of a cleaning pass.
  Every pattern therefore starts with a literal character (``@``, ``.``, ``:``, ``+``, ``(``,
  ``-``, ``=``, ``_``) or is guarded by a substring test: Python's regex engine then skips ahead
  with a plain character search instead of attempting a match at every position, and most text
  is never looked at by anything slower. The few hits are verified in Python.
- Few false positives. Code is a large share of the corpus and full of dotted numbers, numeric
  literals and ``name = "value"`` lines, so each kind is checked against its context: IPv4
  addresses must not look like versions, and only public addresses count, as in datatrove;
  phone numbers need separators or a leading ``+``; a generic secret must be assigned to a
  secret-sounding name and look random.

Detectors run in a fixed priority order (a private key block before anything found inside it,
a known token shape before the generic assignment rule) and a later match that overlaps an
earlier one is dropped. Placeholders contain nothing any detector matches, so scrubbing is
idempotent.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable

from lmforge.errors import LmforgeError

KINDS = ("email", "ip_address", "phone", "private_key", "aws_key", "api_key")
PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "phone": "<PHONE>",
                "private_key": "<PRIVATE_KEY>", "aws_key": "<AWS_KEY>", "api_key": "<API_KEY>"}

Span = tuple[int, int, str]  # start, end, kind

_DIGITS = frozenset(string.digits)
_WORD = frozenset(string.ascii_letters + string.digits + "_")

# ---- private keys --------------------------------------------------------------------------

# The body may be the bare base64 lines (with Proc-Type/DEK-Info headers when encrypted) or the
# same lines split over string literals in source code, hence quotes, backslashes and ``+``.
_PEM_MARK = r"PRIVATE KEY(?: BLOCK)?-----"
_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]{0,40}" + _PEM_MARK
    + r"(?:[A-Za-z0-9+/=\s:,.\\\"'-]{0,65536}?-----END[A-Z0-9 ]{0,40}" + _PEM_MARK
    # A block cut off before its END line still leaks the key; a bare marker string in code
    # (no 40+ character base64 line after it) is not a key and is left alone.
    + r"|(?:\\n|\s|[\"'+])*(?:[A-Za-z0-9+/=]{40,}(?:\\n|\s|[\"'+])*)+)")


_BASE64_LINE = re.compile(r"[A-Za-z0-9+/=]{40,}")


def _private_keys(text: str) -> list[Span]:
    if "-----BEGIN" not in text:
        return []
    # A pair of marker strings in code (``BEGIN = "-----BEGIN..."``, ``END = ...``) matches the
    # block pattern too; only a block with key material in it counts.
    return [(m.start(), m.end(), "private_key") for m in _PRIVATE_KEY.finditer(text)
            if _BASE64_LINE.search(text, m.start() + 10, m.end())]


# ---- AWS access key ids and well-known token shapes ----------------------------------------

_AWS_KEY_ID = re.compile(r"IA(?<=A[KS]IA)[A-Z0-9]{16}")  # "IA" is a rarer literal to scan for than "A"


def _aws_key_ids(text: str) -> list[Span]:
    return [(m.start() - 2, m.end(), "aws_key") for m in _AWS_KEY_ID.finditer(text)
            if _isolated(text, m.start() - 2, m.end())]


def _has_digit_and_letter(value: str) -> bool:
    return any(c in _DIGITS for c in value) and any(c.isalpha() for c in value)


def _mixed_case(value: str) -> bool:
    return any(c.islower() for c in value) and any(c.isupper() for c in value)


# Well-known token shapes. Scanning for each prefix separately would cost one pass over the text
# per shape, so the shapes are grouped by the first literal character they contain ("_", "-")
# and the letters before it are checked with a lookbehind. Each group names the shape, whose
# entry gives the length of the prefix before that character and an optional extra check.
_TOKENS_UNDERSCORE = re.compile(
    r"_(?:(?<=gh[pousr]_)(?P<github>[A-Za-z0-9]{36,255})"
    r"|(?<=github_)(?P<github_pat>pat_[A-Za-z0-9_]{22,255})"
    r"|(?<=[sr]k_)(?P<stripe>live_[A-Za-z0-9]{16,255})"
    r"|(?<=hf_)(?P<huggingface>[A-Za-z]{34}))")
_TOKENS_DASH = re.compile(
    r"-(?:(?<=xox[baprs]-)(?P<slack>[A-Za-z0-9-]{10,255})"
    r"|(?<=sk-)(?P<openai>(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,255}))")
_TOKENS_GOOGLE = re.compile(r"AIza(?P<google>[0-9A-Za-z_-]{35})")
_TOKEN_PREFIX: dict[str, tuple[int, Callable[[str], bool] | None]] = {
    "github": (3, None), "github_pat": (6, None), "stripe": (2, None), "slack": (4, None),
    "huggingface": (2, _mixed_case),
    "openai": (2, _has_digit_and_letter),  # prose like "sk-learn-..." has no digits; keys do
    "google": (0, None),
}


def _token_shapes(text: str) -> list[Span]:
    spans = []
    for pattern in (_TOKENS_UNDERSCORE, _TOKENS_DASH, _TOKENS_GOOGLE):
        for m in pattern.finditer(text):
            shape = m.lastgroup
            offset, check = _TOKEN_PREFIX[shape]
            start, end = m.start() - offset, m.end()
            if (_isolated(text, start, end) and (start == 0 or text[start - 1] != "-")
                    and (check is None or check(m.group(shape)))):
                spans.append((start, end, "api_key"))
    return spans


def _isolated(text: str, start: int, end: int) -> bool:
    """The match is a whole token, not the middle of a longer identifier."""
    return (start == 0 or text[start - 1] not in _WORD) and (end == len(text) or text[end] not in _WORD)


# ---- secrets assigned to names: aws_secret_access_key = ..., api_key = "..." ---------------

# One pattern per operator so that each starts with a literal. The value is either quoted
# (any secret) or a bare 40-character base64 run (AWS credential files and YAML).
_VALUE = r"""(?:(['"])(?P<q>[A-Za-z0-9_\-+/=.~!@#$%^&*?]{16,256})\1|(?P<u>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=]))"""
_ASSIGNMENTS = (re.compile(r"=>?[ \t]*" + _VALUE), re.compile(r":=?[ \t]*" + _VALUE))
# The name an assignment gives its value: the identifier just before the operator, maybe quoted
# (JSON) or subscripted (os.environ["API_KEY"]). It is matched on the reversed text before the
# operator, which anchors the match where the name ends instead of trying every start.
_NAME_REVERSED = re.compile(r"""[ \t]*\]?['"]?([A-Za-z0-9_.-]{1,64})""")
_NAME_WINDOW = 72
_AWS_SECRET_NAME = re.compile(r"(?i:aws_?secret_?(?:access_?)?key|secret_?access_?key)\Z")
# The keyword may end the name or be followed by _suffix, -suffix, a plural s, a camelCase word
# or Id, but not run on into a longer word (``tokenizer``, ``passwordless``, ``TOKENIZER``).
_SECRET_NAME = re.compile(
    r"(?i:api[_-]?key|access[_-]?key|private[_-]?key|secret|token|passw(?:or)?d|pwd)"
    r"(?:[sS]|[_-][A-Za-z0-9_-]*|[A-Z][a-z0-9][A-Za-z0-9_]*|I[dD])?\Z")
_NAME_HINT = re.compile(r"key|secret|token|pass|pwd", re.IGNORECASE)
_HINT_WINDOW = 40
# Tokens that are random but not secret: pagination cursors and idempotency keys in API output.
_PUBLIC_TOKEN_NAME = re.compile(
    r"(?:next|page|lock|client|request|continuation|pagination|idempotency|purchase|sync)[_-]?tokens?\Z",
    re.IGNORECASE)
_PLACEHOLDER_WORDS = ("your", "xxxx", "example", "placeholder", "changeme", "change_me", "dummy", "redacted",
                      "insert", "here", "fake", "sample", "****", "....", "<", "${", "{{")
_HEX_VALUE = re.compile(r"[0-9a-f]+|[0-9A-F]+")
_SEGMENT = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")


def _looks_random(value: str) -> bool:
    """A generated secret rather than a word, identifier, path or placeholder.

    Words and identifiers are long runs of one character class (``password_reset_2024``,
    ``MyApplicationName``); random strings switch between lower case, upper case and digits
    every couple of characters. Random lower-case strings switch less often, but unlike words
    they have few vowels; hexadecimal strings are taken as random whatever their runs.
    """
    lowered = value.lower()
    if any(w in lowered for w in _PLACEHOLDER_WORDS) or not _has_digit_and_letter(value):
        return False
    segments = _SEGMENT.findall(value)  # not empty: there is a digit
    run = sum(map(len, segments)) / len(segments)
    if run > 3.0 and not _HEX_VALUE.fullmatch(value) and (run > 4.5 or _vowel_share(lowered) >= 0.3):
        return False  # hex digests and keys are never words, however their digits fall
    return _entropy(value) >= (3.0 if len(value) >= 24 else 2.75)


def _vowel_share(lowered: str) -> float:
    letters = [c for c in lowered if "a" <= c <= "z"]
    return sum(c in "aeiouy" for c in letters) / max(1, len(letters))


def _entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _assignments(text: str) -> list[Span]:
    spans = []
    for pattern in _ASSIGNMENTS:
        for m in pattern.finditer(text):
            if not _NAME_HINT.search(text, max(0, m.start() - _HINT_WINDOW), m.start()):
                continue  # most assignments; this cheap test spares them the name extraction
            quoted = m.group("q")
            group = "q" if quoted is not None else "u"
            value = m.group(group)
            kind = _secret_kind(_assigned_name(text, m.start()), value, quoted is not None)
            if kind is not None:
                spans.append((m.start(group), m.end(group), kind))
    return spans


def _assigned_name(text: str, operator: int) -> str:
    m = _NAME_REVERSED.match(text[max(0, operator - _NAME_WINDOW):operator][::-1])
    return m.group(1)[::-1] if m else ""


def _secret_kind(name: str, value: str, quoted: bool) -> str | None:
    if not name:
        return None
    if len(value) == 40 and _is_base64(value) and _AWS_SECRET_NAME.search(name):
        return "aws_key"
    if (quoted and _SECRET_NAME.search(name) and not _PUBLIC_TOKEN_NAME.search(name)
            and _looks_random(value)):
        return "api_key"
    return None


def _is_base64(value: str) -> bool:
    return all(c.isascii() and (c.isalnum() or c in "+/") for c in value)


# ---- emails --------------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL_DOMAIN = re.compile(r"@" + _LABEL + r"(?:\." + _LABEL + r")*\.([A-Za-z]{2,24})(?![A-Za-z0-9-])")
_LOCAL_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}\Z")
_LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-")
# Generic TLDs common in real addresses. Any two-letter TLD (the country codes) is accepted too.
# An allowlist rather than "any word" keeps ``x@self.weight`` (matrix product in Python) out.
_TLDS = frozenset((
    "com", "org", "net", "edu", "gov", "mil", "int", "info", "biz", "name", "pro", "io", "ai", "co", "me", "dev",
    "app", "xyz", "online", "site", "tech", "store", "cloud", "email", "mail", "museum", "aero", "coop", "jobs",
    "mobi", "travel", "asia", "cat", "tel", "arpa", "local", "localdomain", "example", "invalid", "test", "onion",
    "page", "blog", "news", "shop", "club", "life", "live", "world", "today", "space", "website", "digital",
    "network", "systems", "solutions", "software", "studio", "design", "agency", "company", "global", "group",
    "media", "link", "fun", "top", "work", "wiki", "one", "zone", "team", "center", "services", "support",
    "consulting", "academy", "institute", "foundation", "church", "social", "science", "health", "law", "legal",
    "bank", "finance", "capital",
))


def _emails(text: str) -> list[Span]:
    if "@" not in text:
        return []
    spans = []
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        if at == 0 or text[at - 1] not in _LOCAL_CHARS or not _known_tld(m.group(1)):
            continue  # a decorator, a bare @mention or a dotted attribute chain
        local = _LOCAL_PART.search(text, max(0, at - 64), at)
        if local is not None:
            spans.append((local.start(), m.end(), "email"))
    return spans


def _known_tld(tld: str) -> bool:
    if len(tld) == 2:
        return tld.islower() or tld.isupper()
    return tld.lower() in _TLDS


# ---- IP addresses --------------------------------------------------------------------------

_IPV4_TRIGGER = re.compile(r"\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_DOTTED_RUN = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_VERSION_OPERATORS = ("==", ">=", "<=", "~=", "!=", "^", "~", ">", "<")
_WORD_BEFORE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[\s\"'=:(\[,-]{0,8}\Z")
_NAME_PARTS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
# Words that, just before a dotted quad, say it is a version or a section/OID number.
_VERSION_WORDS = frozenset({"v", "ver", "vers", "version", "versions", "rev", "revision", "release", "build",
                            "python", "py", "tag", "requires", "require", "pip", "firmware", "kernel", "patch",
                            "oid", "section", "sections", "sec", "chapter", "clause", "appendix", "figure",
                            "fig", "table", "step", "rule", "paragraph"})
_DOTTED_TOKEN = re.compile(r"[0-9][0-9A-Za-z]*(?:\.[0-9A-Za-z]+)+")
_LEADING_TOKEN = re.compile(r"[0-9A-Za-z.]*")
_TRAILING_TOKEN = re.compile(r"[0-9A-Za-z.]*\Z")
_CONTEXT = 40  # characters looked at for a version word
_NEAR = 24  # characters looked at for a neighbouring version number


def _ipv4(text: str) -> list[Span]:
    spans, done = [], 0
    for m in _IPV4_TRIGGER.finditer(text):
        first = m.start()
        if first < done or first == 0 or text[first - 1] not in _DIGITS:
            continue
        lo = first
        while lo > 0 and (text[lo - 1] in _DIGITS or (text[lo - 1] == "." and lo > 1 and text[lo - 2] in _DIGITS)):
            lo -= 1  # back to the start of the whole dotted run
        hi = _DOTTED_RUN.match(text, lo).end()
        done = hi
        if text.count(".", lo, hi) == 3 and not _version_context(text, lo, hi) and _public(text[lo:hi]):
            spans.append((lo, hi, "ip_address"))
    return spans


def _version_context(text: str, lo: int, hi: int) -> bool:
    """Whether a dotted quad reads as a version, section or OID number rather than an address."""
    before = text[lo - 1] if lo else ""
    after = text[hi:hi + 2]
    if before in _WORD or before == ".":
        return True  # v1.2.3.4, x.1.2.3.4
    if after[:1] in _WORD or (after[:1] in (".", "-", "+") and after[1:2].isalpha()):
        return True  # 1.2.3.4a1, 1.2.3.4.tar.gz, 1.2.3.4-rc1
    if before == "-" and lo > 1 and text[lo - 2].isalpha():
        return True  # package-1.2.3.4
    head = text[max(0, lo - _CONTEXT):lo]
    if head.rstrip(" \t\"'(").endswith(_VERSION_OPERATORS):
        return True  # foo>=1.2.3.4
    word = _WORD_BEFORE.search(head)
    if word is not None and _names_version(word.group(1)):
        return True  # __version__ = "1.2.3.4", section 8.2.4.4, NAMESPACE_OID, '1.3.6.1'
    return _near_version(text, lo, hi)


def _names_version(name: str) -> bool:
    return "version" in name.lower() or any(p.lower() in _VERSION_WORDS for p in _NAME_PARTS.findall(name))


def _near_version(text: str, lo: int, hi: int) -> bool:
    """A three-part version (1.2.3, 3.2.pl0) right beside the quad: a list of versions, not addresses.

    A window cut from the middle of the text may start or end inside a longer dotted number,
    which would then look like three parts, so that partial token is dropped first.
    """
    head, tail = text[max(0, lo - _NEAR):lo], text[hi:hi + _NEAR]
    if lo > _NEAR:
        head = head[_LEADING_TOKEN.match(head).end():]
    if hi + _NEAR < len(text):
        tail = tail[:_TRAILING_TOKEN.search(tail).start()]
    return any(t.count(".") == 2 for t in _DOTTED_TOKEN.findall(head + " " + tail))


def _public(candidate: str) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return address.is_global and not address.is_multicast


# The first colon of a global unicast address (2000::/3) follows a four-digit group starting with
# 2 or 3; checking that with a lookbehind keeps the cheap scan for ":" and skips the many other
# double colons (reST literal blocks, C++ scopes, Python slices).
_IPV6_TRIGGER = re.compile(r":(?<=[23][0-9A-Fa-f]{3}:)[0-9A-Fa-f]{0,4}:")
_IPV6_RUN = re.compile(r"[0-9A-Fa-f:]+(?:\.[0-9]+){0,3}")


def _ipv6(text: str) -> list[Span]:
    spans, done = [], 0
    for m in _IPV6_TRIGGER.finditer(text):
        if m.start() < done:
            continue
        lo = m.start() - 4
        hi = _IPV6_RUN.match(text, lo).end()
        done = hi
        run = text[lo:hi].rstrip(".")
        if run.endswith(":") and not run.endswith("::"):
            run = run[:-1]  # "address 2001:...:1: next" - the colon is punctuation
        end = lo + len(run)
        if _isolated(text, lo, end) and _public(run):
            spans.append((lo, end, "ip_address"))
    return spans


# ---- phone numbers -------------------------------------------------------------------------

# International: "+" and a country code, then groups separated by space, dot or dash (one may
# be a parenthesised area code), or the whole number in one run after the "+".
_PHONE_INTL = re.compile(
    r"\+[1-9][0-9]{0,3}(?:[ .-]?\([0-9]{1,5}\)[ .-]?[0-9]{1,8}|[ .-][0-9]{1,8})(?:[ .-][0-9]{1,8}){0,5}"
    r"|\+[1-9][0-9]{7,14}")
_PHONE_PAREN = re.compile(r"\([2-9][0-9]{2}\)[ .-]?[0-9]{3}[ .-][0-9]{4}")  # (555) 123-4567
_PHONE_LINE = (re.compile(r"-[0-9]{4}"), re.compile(r"\.[0-9]{4}"))  # the -4567 / .4567 of 555-123-4567
_NANP_HEAD = re.compile(r"(?:1[ .-])?[2-9][0-9]{2}[ .-][0-9]{3}\Z")
_NOT_BEFORE_PHONE = _WORD | frozenset(")]}.+-*/^%")


def _phones(text: str) -> list[Span]:
    spans = [(m.start(), m.end(), "phone") for m in _PHONE_INTL.finditer(text)
             if _plausible_intl(text, m.start(), m.end()) and _phone_bounds(text, m.start(), m.end())]
    spans += [(m.start(), m.end(), "phone") for m in _PHONE_PAREN.finditer(text)
              if _phone_bounds(text, m.start(), m.end())]
    for pattern in _PHONE_LINE:
        for m in pattern.finditer(text):
            span = _nanp(text, m.start(), m.end())
            if span is not None:
                spans.append(span)
    return spans


def _plausible_intl(text: str, start: int, end: int) -> bool:
    number = text[start + 1:end]
    if not 8 <= _count_digits(number) <= 15:
        return False
    if not number.isdigit():
        return True
    # Without separators, "+4294967296" after "=" or "(" is a signed integer literal and
    # "+10011010010" a formatted binary number, not a phone number.
    binary = set(number) <= {"0", "1"}
    operand = text[max(0, start - 8):start].rstrip(" \t").endswith(("=", "(", "[", "{", ","))
    return not (binary or operand)


def _nanp(text: str, sep: int, end: int) -> Span | None:
    """555-123-4567, 555.123.4567 or 555 123-4567, given where its last separator is."""
    head = _NANP_HEAD.search(text, max(0, sep - 9), sep)
    if head is None:
        return None
    middle = text[sep - 4]
    if middle != text[sep] and not (middle == " " and text[sep] == "-"):
        return None  # mixed separators like 555.123-4567 are more often something else
    start = head.start()
    return (start, end, "phone") if _phone_bounds(text, start, end) else None


def _phone_bounds(text: str, start: int, end: int) -> bool:
    """Not part of a longer number, identifier or arithmetic expression."""
    if start > 0 and text[start - 1] in _NOT_BEFORE_PHONE:
        return False
    nxt = text[end:end + 2]
    return not (nxt[:1] in _WORD or (nxt[:1] in (".", "-") and nxt[1:2] in _DIGITS))


def _count_digits(value: str) -> int:
    return sum(c in _DIGITS for c in value)


# ---- the public API ------------------------------------------------------------------------

# In priority order: an earlier detector's match wins over a later one that overlaps it.
_DETECTORS: tuple[tuple[frozenset[str], Callable[[str], list[Span]]], ...] = (
    (frozenset({"private_key"}), _private_keys),
    (frozenset({"aws_key"}), _aws_key_ids),
    (frozenset({"api_key"}), _token_shapes),
    (frozenset({"aws_key", "api_key"}), _assignments),
    (frozenset({"email"}), _emails),
    (frozenset({"ip_address"}), _ipv4),
    (frozenset({"ip_address"}), _ipv6),
    (frozenset({"phone"}), _phones),
)


def check_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """The PII kinds named by a list or a comma-separated string, in order and without repeats.

    An empty string or list names no kinds (scrubbing then changes nothing).
    """
    names = [n.strip() for n in map(str, kinds.split(",") if isinstance(kinds, str) else kinds)]
    names = [n for n in names if n]
    for name in names:
        if name not in PLACEHOLDERS:
            raise LmforgeError(f"unknown PII kind {name!r}; known kinds: {', '.join(KINDS)}")
    return tuple(dict.fromkeys(names))


def scrub(text: str, kinds: tuple[str, ...] = KINDS) -> tuple[str, dict[str, int]]:
    """``text`` with each value found replaced by its kind's placeholder, and the count per kind.

    Only kinds found at least once appear in the counts.
    """
    wanted = KINDS if kinds is KINDS else check_kinds(kinds)
    spans: list[Span] = []
    for covers, detect in _DETECTORS:
        if not covers.isdisjoint(wanted):
            spans += [s for s in detect(text) if s[2] in wanted]
    if not spans:
        return text, {}
    kept = _without_overlaps(spans)
    return _replace(text, kept), dict(Counter(kind for _, _, kind in kept))


def _without_overlaps(spans: list[Span]) -> list[Span]:
    """The spans, in text order, each dropped if it overlaps one earlier in ``spans``."""
    kept: list[Span] = []
    starts: list[int] = []
    for span in spans:
        start, end, _ = span
        i = bisect.bisect_left(starts, start)
        if (i > 0 and kept[i - 1][1] > start) or (i < len(kept) and kept[i][0] < end):
            continue
        kept.insert(i, span)
        starts.insert(i, start)
    return kept


def _replace(text: str, spans: list[Span]) -> str:
    parts, pos = [], 0
    for start, end, kind in spans:
        parts += (text[pos:start], PLACEHOLDERS[kind])
        pos = end
    parts.append(text[pos:])
    return "".join(parts)

"""PII scrubbing: every kind is replaced by its placeholder and counted, nothing else changes, and
version numbers, numeric literals, dates and other look-alikes in code are left alone."""

import base64
import sysconfig
from pathlib import Path

import pytest

from lmforge.data.pii import KINDS, PLACEHOLDERS, check_kinds, scrub
from lmforge.errors import LmforgeError

_B64 = base64.b64encode(bytes(range(256)) * 3).decode()
KEY_BODY = "\n".join(_B64[i:i + 64] for i in range(0, 640, 64))


def pem(label: str, headers: str = "") -> str:
    return f"-----BEGIN {label}-----\n{headers}{KEY_BODY}\n-----END {label}-----"


# (kind, text, the part of text that must become the placeholder)
FOUND = [
    ("email", "mail john.doe+tag@example.com today", "john.doe+tag@example.com"),
    ("email", "# Author: Barry Warsaw <Barry.Warsaw@python.org>", "Barry.Warsaw@python.org"),
    ("email", "git clone git@github.com:org/repo.git", "git@github.com"),
    ("email", "reach us at info@mail.company.co.uk.", "info@mail.company.co.uk"),
    ("ip_address", "resolver 8.8.8.8 answered", "8.8.8.8"),
    ("ip_address", "Received: from host ([93.184.216.34])", "93.184.216.34"),
    ("ip_address", "connect('151.101.1.69', 443)", "151.101.1.69"),
    ("ip_address", "the server at 8.8.4.4.", "8.8.4.4"),
    ("ip_address", "AAAA record 2606:4700:4700::1111 cached", "2606:4700:4700::1111"),
    ("ip_address", "ping [2001:4860:4860::8888]:53", "2001:4860:4860::8888"),
    ("phone", "call +1 (555) 123-4567 now", "+1 (555) 123-4567"),
    ("phone", "call 555-123-4567 now", "555-123-4567"),
    ("phone", "call (555) 123 4567 now", "(555) 123 4567"),
    ("phone", "call 555.123.4567 now", "555.123.4567"),
    ("phone", "call 1-800-555-1234 now", "1-800-555-1234"),
    ("phone", "London +44 20 7946 0958.", "+44 20 7946 0958"),
    ("phone", "Berlin: +49 30 1234567", "+49 30 1234567"),
    ("phone", "Paris +33 1 23 45 67 89", "+33 1 23 45 67 89"),
    ("phone", "<a href='tel:+31641044153'>", "+31641044153"),
    ("private_key", f"key:\n{pem('RSA PRIVATE KEY')}\nend", pem("RSA PRIVATE KEY")),
    ("private_key", f"key:\n{pem('EC PRIVATE KEY')}\nend", pem("EC PRIVATE KEY")),
    ("private_key", f"key:\n{pem('OPENSSH PRIVATE KEY')}\nend", pem("OPENSSH PRIVATE KEY")),
    ("private_key", f"key:\n{pem('PRIVATE KEY')}\nend", pem("PRIVATE KEY")),
    ("private_key", f"key:\n{pem('ENCRYPTED PRIVATE KEY')}\nend", pem("ENCRYPTED PRIVATE KEY")),
    ("private_key", "k = " + pem("RSA PRIVATE KEY", "Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n"),
     pem("RSA PRIVATE KEY", "Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n")),
    ("private_key", "KEY = (\n    '-----BEGIN PRIVATE KEY-----\\n'\n"
     + "".join(f"    '{line}\\n'\n" for line in KEY_BODY.splitlines()) + "    '-----END PRIVATE KEY-----')\nx = 1",
     "-----BEGIN PRIVATE KEY-----\\n'\n" + "".join(f"    '{line}\\n'\n" for line in KEY_BODY.splitlines())
     + "    '-----END PRIVATE KEY-----"),
    ("private_key", f"pasted: -----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n(cut)",
     f"-----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n"),
    ("aws_key", "id=AKIA2E0A8F3B244C9986 ok", "AKIA2E0A8F3B244C9986"),
    ("aws_key", "session ASIAY34FZKBOKMUTVV7A.", "ASIAY34FZKBOKMUTVV7A"),
    ("aws_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Zr2LmX4\nregion = x",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Zr2LmX4"),
    ("aws_key", 'AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Zr2LmX4"',
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Zr2LmX4"),
    ("aws_key", '{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Zr2LmX4"}',
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Zr2LmX4"),
    ("api_key", "GITHUB_TOKEN=ghp_" + "a1B2c3D4e5" * 3 + "f6G7h8", "ghp_" + "a1B2c3D4e5" * 3 + "f6G7h8"),
    ("api_key", "use gho_" + "Z9y8X7w6V5" * 4 + " here", "gho_" + "Z9y8X7w6V5" * 4),
    ("api_key", "ghs_" + "k3J9m2N8p1" * 4, "ghs_" + "k3J9m2N8p1" * 4),
    ("api_key", "pat github_pat_11ABCDEFG0123456789_abcdefghijKLMNOP01234 end",
     "github_pat_11ABCDEFG0123456789_abcdefghijKLMNOP01234"),
    ("api_key", "SLACK xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp"),
    ("api_key", "openai.api_key = sk-" + "T3BlbkFJ8x" * 4, "sk-" + "T3BlbkFJ8x" * 4),
    ("api_key", "key sk-proj-Ab3De6Gh9Jk2Mn5Pq8St1Vw4Yz7Bc0Ef3Hi6 set", "sk-proj-Ab3De6Gh9Jk2Mn5Pq8St1Vw4Yz7Bc0Ef3Hi6"),
    ("api_key", "stripe.api_key = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("api_key", "restricted rk_live_51H8xYzAbCdEfGhIjKl", "rk_live_51H8xYzAbCdEfGhIjKl"),
    ("api_key", "maps?key=AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI&x=1", "AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI"),
    ("api_key", "HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh", "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"),
    ("api_key", 'api_key = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"', "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
    ("api_key", "secret = 'Xk9#mP2$vL7qR4nW'", "Xk9#mP2$vL7qR4nW"),
    ("api_key", 'token: "a7F3kQ9zL2mX8pR4vT6w"', "a7F3kQ9zL2mX8pR4vT6w"),
    ("api_key", "auth_token = 'qzptmk7vwnrb2hdsfj9kxc'", "qzptmk7vwnrb2hdsfj9kxc"),
    ("api_key", 'password = "Tr0ub4dor&3xK9mZ"', "Tr0ub4dor&3xK9mZ"),
    ("api_key", '{"client_secret": "q8Zr2LmX4vT9wKp1aB3d"}', "q8Zr2LmX4vT9wKp1aB3d"),
    ("api_key", 'os.environ["OPENAI_API_KEY"] = "q8Zr2LmX4vT9wKp1"', "q8Zr2LmX4vT9wKp1"),
    ("api_key", "DB_PASSWORD => 'Zx8#kL2!mQ9@vR4$'", "Zx8#kL2!mQ9@vR4$"),
]


@pytest.mark.parametrize("kind,text,value", FOUND, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(FOUND)])
def test_each_kind_is_replaced_by_its_placeholder(kind, text, value):
    assert text.count(value) == 1
    out, counts = scrub(text)
    assert out == text.replace(value, PLACEHOLDERS[kind])
    assert counts == {kind: 1}


UNCHANGED = [
    # dotted numbers that are versions, OIDs or parts of longer runs
    '__version__ = "1.2.3.4"',
    "Python version 2.7.18.1 was the last",
    "requires foo>=1.2.3.4 and bar==2.0.0.1, baz ~= 3.1.4.1",
    "release v1.2.3.4 is out",
    "OID 1.3.6.1.4.1.311 and oid=2.5.29.17",
    "NAMESPACE_OID = '1.3.6.1'",
    "1.2.3.4.5 and 8.8.8.8.8",
    "see section 8.2.4.44 of the spec",
    "pkg-1.2.3.4.tar.gz and 1.2.3.4-rc1 and 1.2.3.4a1",
    "versions = ['3.2.1', '3.1.1.6']",
    "libfoo.so.1.2.3.4, mypkg-1.2.3.4 and abc1.2.3.4",
    # addresses that are not personal data
    "bind 127.0.0.1, 10.0.0.1, 192.168.1.1, 172.16.0.5, 0.0.0.0 and 255.255.255.0",
    "docs use 192.0.2.1, 198.51.100.7, 203.0.113.9, ::1, fe80::1, 2001:db8::8a2e:370:7334 and 224.0.0.1",
    "ip = '256.1.1.1'; ip2 = '01.02.03.04'",
    # colons that are not IPv6
    "std::vector<int> v; a[::2]; t = '12:30:45'; mac = 00:1a:2b:3c:4d:5e",
    "Example::\n\n    code\n",
    "hash x2606:4700:4700::1111 is one token",
    # numbers in code and prose that are not phone numbers
    "n = 1234567890; m = 4294967296",
    "date 2024-01-15, time 12:30:45.1234, 01.15.2024",
    "x = 0xDEADBEEF; y = 1e+10; z = 2.5e-10",
    "for i in range(10, 100): total = 555 - 123 - 4567",
    "card 4111-1111-1111-1111, ISBN 978-3-16-148410-0",
    "a = +4294967296  # 1 << 32\nformat(1234, '+b') == '+10011010010'",
    "@@ -10,7 +10,8 @@ def f():",
    "semver 1.2.3, 10.20.30 and 2.0.0-rc.1",
    "f(555) 123 4567",
    "table: 255 128.5000 300",
    "serial 555-123-4567-89",
    "delta: +12 345",
    # @ that is not an email
    "@functools.wraps(func)\ndef g(): pass",
    "y = x@self.weight\nz = a @ b.T",
    "@dataclass\nclass A: ...",
    # secrets that are placeholders, words or not secret
    'api_key = "your-api-key-here"',
    'password = "password_reset_2024"',
    'token = "{{ secrets.GITHUB_TOKEN }}"',
    'secret = "correct horse battery staple"',
    'tokenizer_name = "bert-base-uncased-2024x"',
    'api_key = os.environ["API_KEY"]',
    'client_secret = "a7F3kQ9zL2mX8pR4EXAMPLE"',
    'token = "xxxx-a7F3-kQ9z-L2mX"',
    'password = "a1a1a1a1a1a1a1a1"',
    'SECRET_KEY = "<API_KEY>"',
    '{"NextToken": "eyJOZXh0VG9rZW4iOiBudWxsLCAiYm90b190cnVuY2F0ZV9hbW91bnQiOiAxfQ=="}',
    "pip install scikit-learn-intelex-and-more-stuff-for-testing",
    "see sk-learn-compatible-estimators-for-everyone",
    "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 = None",
    "AKIA2E0A8F3B244C99861 is 21 characters; xAKIA2E0A8F3B244C9986 is inside a word",
    # PEM text that is not a private key
    'BEGIN = "-----BEGIN PRIVATE KEY-----"\nEND = "-----END PRIVATE KEY-----"',
    pem("PUBLIC KEY"),
    pem("CERTIFICATE"),
]


@pytest.mark.parametrize("text", UNCHANGED)
def test_look_alikes_are_left_alone(text):
    assert scrub(text) == (text, {})


DOC = f"""Contact: Jane Roe <jane.roe@example.org>, +1 (555) 123-4567.
The build server is 93.184.216.34 (version 1.2.3.4 of the agent), backup at 10.0.0.2.
config = {{"api_key": "9f8e7d6c5b4a39281706f5e4d3c2b1a0", "retries": 3}}
aws_access_key_id = AKIA2E0A8F3B244C9986
{pem("RSA PRIVATE KEY")}
Questions: ops@example.org or 555.123.4567; token ghp_{"a1B2c3D4e5" * 4}
"""
EXPECTED = {
    "email": ["jane.roe@example.org", "ops@example.org"],
    "phone": ["+1 (555) 123-4567", "555.123.4567"],
    "ip_address": ["93.184.216.34"],
    "api_key": ["9f8e7d6c5b4a39281706f5e4d3c2b1a0", "ghp_" + "a1B2c3D4e5" * 4],
    "aws_key": ["AKIA2E0A8F3B244C9986"],
    "private_key": [pem("RSA PRIVATE KEY")],
}


def expected_for(kinds) -> str:
    out = DOC
    for kind in kinds:
        for value in EXPECTED[kind]:
            out = out.replace(value, PLACEHOLDERS[kind])
    return out


def test_document_with_every_kind_keeps_the_rest_of_its_text():
    out, counts = scrub(DOC)
    assert out == expected_for(KINDS)
    assert counts == {kind: len(values) for kind, values in EXPECTED.items()}
    assert "version 1.2.3.4 of the agent), backup at 10.0.0.2." in out
    assert '"retries": 3}' in out and "aws_access_key_id = <AWS_KEY>" in out


@pytest.mark.parametrize("kind", KINDS)
def test_scrubbing_one_kind_touches_only_that_kind(kind):
    out, counts = scrub(DOC, (kind,))
    assert out == expected_for([kind])
    assert counts == {kind: len(EXPECTED[kind])}


def test_scrubbing_a_subset_of_kinds():
    out, counts = scrub(DOC, ("email", "phone"))
    assert out == expected_for(["email", "phone"])
    assert counts == {"email": 2, "phone": 2}
    assert scrub(DOC, ()) == (DOC, {})
    assert scrub(DOC, "ip_address, aws_key") == (expected_for(["ip_address", "aws_key"]), {"ip_address": 1, "aws_key": 1})


def test_scrubbing_is_idempotent():
    for text in [DOC] + [t for _, t, _ in FOUND]:
        once, counts = scrub(text)
        assert counts
        assert scrub(once) == (once, {})


def test_repeated_values_are_each_counted():
    out, counts = scrub("a@x.com, b@y.org and a@x.com; 8.8.8.8 then 1.1.1.1")
    assert out == "<EMAIL>, <EMAIL> and <EMAIL>; <IP_ADDRESS> then <IP_ADDRESS>"
    assert counts == {"email": 3, "ip_address": 2}


def test_placeholders_cover_every_kind():
    assert set(PLACEHOLDERS) == set(KINDS)
    assert len(set(PLACEHOLDERS.values())) == len(KINDS)


def test_check_kinds_accepts_lists_and_comma_separated_strings():
    assert check_kinds(["email", "phone"]) == ("email", "phone")
    assert check_kinds(" email , api_key,email ") == ("email", "api_key")
    assert check_kinds(KINDS) == KINDS
    assert check_kinds("") == ()


@pytest.mark.parametrize("bad", ["emails", "email,ssn", ["phone", "IP"]])
def test_check_kinds_names_the_unknown_kind_and_the_known_ones(bad):
    with pytest.raises(LmforgeError) as err:
        check_kinds(bad)
    message = str(err.value)
    assert message.startswith("unknown PII kind '")
    assert "known kinds: email, ip_address, phone, private_key, aws_key, api_key" in message
    with pytest.raises(LmforgeError):
        scrub("text", bad)


STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE_MODULES = ["calendar.py", "colorsys.py", "fractions.py", "statistics.py", "textwrap.py", "string.py",
                "difflib.py", "ast.py", "functools.py", "dataclasses.py", "random.py", "locale.py", "tarfile.py"]


def test_real_code_has_no_secrets_addresses_or_phones():
    """Code full of numbers, decorators and assignments; authors' emails in it may be found."""
    texts = [(STDLIB / m).read_text(encoding="utf-8") for m in CODE_MODULES if (STDLIB / m).exists()]
    assert len(texts) >= 10
    not_email = tuple(k for k in KINDS if k != "email")
    for text in texts:
        assert scrub(text, not_email) == (text, {})

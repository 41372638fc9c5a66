"""Chat data: validation with file:line errors, and the loss mask checked token by token."""

import json

import jinja2
import pytest

from lmforge.errors import LmforgeError
from lmforge.post.chats import chat_token_ids, pack, read_chats, render
from lmforge.tokenizer.io import load_tokenizer

CONV = [{"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "Now subtract."},
        {"role": "assistant", "content": "def sub(a, b):\n    return a - b"}]


def test_render_matches_the_chat_template_and_masks_only_the_assistant(tiny_data):
    _, tok_dir = tiny_data
    tok = load_tokenizer(tok_dir)
    ids = chat_token_ids(tok)
    template = (tok_dir / "chat_template.jinja").read_text()  # what transformers' apply_chat_template reads
    text = jinja2.Template(template).render(messages=CONV, add_generation_prompt=False)
    tokens, mask = render(CONV, tok, ids)
    assert tokens == tok.encode(text, add_special_tokens=False).ids  # the same tokens as the template
    # token by token: trained exactly on each assistant reply and the <|end|> that closes it
    expected, role = [], None
    for t in tokens:
        if t in (ids["system"], ids["user"], ids["assistant"]):
            role = t
            expected.append(False)
        else:
            expected.append(role == ids["assistant"])
    assert mask == expected
    learned = tok.decode([t for t, m in zip(tokens, mask) if m], skip_special_tokens=False)
    assert learned == "def add(a, b):\n    return a + b<|end|>def sub(a, b):\n    return a - b<|end|>"
    prompt, pmask = render(CONV[:2], tok, ids, add_generation_prompt=True)
    assert prompt[-1] == ids["assistant"] and not any(pmask)


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not JSON"),
    ('{"text": "hi"}', "'messages' is missing"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role = 'bot'"),
    ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}', "content is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
])
def test_bad_lines_name_the_file_and_line_or_are_counted(tmp_path, line, needle):
    good = json.dumps({"messages": CONV})
    f = tmp_path / "chats.jsonl"
    f.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(LmforgeError, match=rf"chats.jsonl:2: .*{needle}.*--skip-bad"):
        read_chats(f)
    got = read_chats(f, skip_bad=True)
    assert len(got.conversations) == 2 and sum(got.skipped.values()) == 1


def test_a_tokenizer_without_chat_tokens_is_refused():
    from tokenizers import Tokenizer, models

    with pytest.raises(LmforgeError, match="lacks the chat tokens"):
        chat_token_ids(Tokenizer(models.BPE()))


def test_packing_keeps_conversations_whole_and_counts_what_it_drops():
    import random

    rng = random.Random(0)
    convs = []
    for i in range(40):
        n = rng.randint(3, 30)
        toks = [1000 + i] * n  # each conversation's tokens carry its index, to trace them
        convs.append((toks, [False] + [True] * (n - 1)))
    convs.append(([7] * 40, [True] * 40))  # longer than a row: dropped, not truncated
    convs.append(([8, 9], [True, False]))  # nothing to predict after the shift
    p = pack(convs, context=31, pad_id=0)
    assert p.dropped == {"too_long": 1, "no_target": 1}
    assert all(len(r) == 32 for rows in (p.tokens, p.mask, p.doc) for r in rows)
    seen = {}
    for toks, msk, doc in zip(p.tokens, p.mask, p.doc):
        for t, m, d in zip(toks, msk, doc):
            if d == 0:
                assert t == 0 and not m  # padding is never trained on
                continue
            seen.setdefault(t, set()).add(d)
        # a conversation sits in one row, as one contiguous segment with its own doc number
        ids = [d for d in doc if d]
        assert ids == sorted(ids)
    for i, (toks, msk) in enumerate(convs[:40]):
        rows = [r for r, row in enumerate(p.tokens) if 1000 + i in row]
        assert len(rows) == 1 and p.tokens[rows[0]].count(1000 + i) == len(toks)
        assert len(seen[1000 + i]) == 1
    assert sum(m for row in p.mask for m in row) == sum(sum(m) for _, m in convs[:40])

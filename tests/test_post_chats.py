"""Chat data: validation with file:line errors, and the loss mask checked token by token."""

import json

import jinja2
import pytest

from lmforge.errors import LmforgeError
from lmforge.post.chats import chat_token_ids, read_chats, render
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

"""Talking to a chat model: the prompt for a conversation so far, and a streamed reply.

``lmforge chat`` is a loop over :func:`reply`; a program can call the same functions.
A conversation longer than the model's context loses its oldest turns first (the system
message stays), so a long chat keeps going instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmforge.model.generate import SampleConfig, stream
from lmforge.model.io import load_model
from lmforge.post.base import resolve_base
from lmforge.post.chats import chat_token_ids, render


@dataclass
class Chat:
    """A loaded chat model and the conversation so far."""

    model: object
    tok: object
    ids: dict
    system: str = ""
    history: list = field(default_factory=list)  # user and assistant messages

    def messages(self, history: list | None = None) -> list[dict]:
        """The system message (if any) and ``history`` (default: the whole history)."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + \
            (self.history if history is None else history)

    def reset(self) -> None:
        self.history.clear()


def open_chat(model_dir, work_dir=None) -> Chat:
    """A :class:`Chat` over an lmforge model directory or an HF directory (imported into ``work_dir``)."""
    base = resolve_base(model_dir, Path(work_dir or Path(model_dir) / ".chat"), flag="MODEL")
    tok = base.tokenizer()
    return Chat(load_model(base.model_dir), tok, chat_token_ids(tok))


def prompt_ids(chat: Chat, max_new_tokens: int, augment=None) -> list[int]:
    """The rendered conversation plus ``<|assistant|>``, dropping the oldest turns until the prompt
    leaves ``max_new_tokens`` of the context for the reply. ``augment(messages) -> (messages, _)``
    may add to the conversation first (retrieved material, with ``lmforge chat --knowledge``)."""
    budget = max(1, chat.model.cfg.context - max_new_tokens)
    history = list(chat.history)
    while True:
        messages = chat.messages(history)
        if augment is not None:
            messages = augment(messages)[0]
        tokens, _ = render(messages, chat.tok, chat.ids, add_generation_prompt=True)
        if len(tokens) <= budget or len(history) <= 1:
            return tokens[-budget:]
        history = history[2:] if len(history) > 2 else history[1:]


def reply(chat: Chat, text: str, cfg: SampleConfig, augment=None) -> Iterator[str]:
    """Add the user's ``text``, stream the assistant's answer as text pieces, and keep it in the history."""
    chat.history.append({"role": "user", "content": text})
    prompt = prompt_ids(chat, cfg.max_new_tokens, augment)
    out: list[int] = []
    shown = ""
    for t in stream(chat.model, prompt, cfg, stop_ids=(chat.ids["end"], chat.ids["eos"])):
        out.append(t)
        # Decode the whole answer each time: a byte-level token can end in the middle of a character.
        text_now = chat.tok.decode(out)
        if not text_now.endswith("\ufffd"):
            yield text_now[len(shown):]
            shown = text_now
    answer = chat.tok.decode(out)
    if len(answer) > len(shown):
        yield answer[len(shown):]
    chat.history.append({"role": "assistant", "content": answer or " "})

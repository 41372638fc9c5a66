"""The model side of evaluation: log-likelihoods and generations, batched, for a local model or an endpoint.

Every task asks one of three questions, the same three lm-evaluation-harness asks:

- ``loglikelihood``: log p(continuation | context), and whether greedy decoding would have
  produced the continuation;
- ``rolling_nll``: the negative log-likelihood of a whole text, window by window (perplexity, bpb);
- ``generate``: text continued until a stop string, with the KV cache.

Tokenization follows lm-evaluation-harness so that its ``--model hf`` and ``lmforge eval``
score the same tokens: a context's trailing spaces move to the continuation, the pair is
encoded whole and the context's tokens split off, no bos is added, and an empty context (and
a rolling text's first token) is conditioned on the end-of-document token, which is what
separates documents in training.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.generate import SampleConfig, generate
from lmforge.model.io import load_model
from lmforge.post.base import resolve_base
from lmforge.post.chats import chat_token_ids, render
from lmforge.rundir import read_manifest
from lmforge.tokenizer.io import special_ids

CHAT_STAGES = {"sft", "dpo", "distill"}


@dataclass
class LocalLM:
    """An lmforge model and its tokenizer, with the three scoring calls."""

    model: torch.nn.Module
    tok: object
    source: str  # what the user named
    weights_hash: str
    chat: bool = False  # a post-trained model: generation prompts are rendered as a user turn
    batch_size: int = 16

    def __post_init__(self):
        ids = special_ids(self.tok)
        self.eos_id, self.pad_id = ids["eos"], ids["pad"] if ids["pad"] is not None else 0
        self.context = self.model.cfg.context
        self.model.eval()

    # -- tokens
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eos_id], self.encode(continuation)
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # -- scoring
    @torch.no_grad()
    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p over the continuation, greedy) per (context ids, continuation ids);
        sequences longer than the context keep their last tokens, as lm-evaluation-harness does."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise LmforgeError("an empty continuation has no likelihood; check the task's choices")
            seq = (ctx + cont)[-(self.context + 1):]
            rows.append((seq[:-1], len(cont)))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = len(rows[idx[0]][0])
            batch = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            for b, i in enumerate(idx):
                batch[b, :len(rows[i][0])] = torch.tensor(rows[i][0])
            hidden = self.model.hidden(batch)  # right padding: causal attention never reads it
            # Every continuation token of the batch through the head at once: one matmul, one softmax.
            sizes = [rows[i][1] for i in idx]
            b_idx = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor(sizes))
            pos = torch.cat([torch.arange(len(rows[i][0]) - rows[i][1], len(rows[i][0])) for i in idx])
            targets = torch.cat([torch.tensor(pairs[i][1][-rows[i][1]:]) for i in idx])
            logp = torch.log_softmax(self.model.lm_head(hidden[b_idx, pos]).float(), -1)
            token_lp = logp.gather(-1, targets[:, None])[:, 0]
            hit = logp.argmax(-1) == targets
            for i, lp, h in zip(idx, token_lp.split(sizes), hit.split(sizes)):
                out[i] = (float(lp.sum()), bool(h.all()))
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def rolling_nll(self, tokens: list[int]) -> float:
        """-log p(tokens | end-of-document) in nats, over disjoint windows of the model's context,
        each window conditioned on the tokens just before it."""
        seq = [self.eos_id] + tokens
        total, pos = 0.0, 1
        while pos < len(seq):
            end = min(len(seq), pos + self.context)
            start = max(0, end - self.context - 1)  # full context behind the window's first target
            inp = torch.tensor([seq[start:end - 1]])
            targets = torch.tensor(seq[pos:end])
            hidden = self.model.hidden(inp)[0, pos - 1 - start:]
            logp = torch.log_softmax(self.model.lm_head(hidden).float(), -1)
            total -= float(logp.gather(-1, targets[:, None]).sum())
            pos = end
        return total

    def prompt_ids(self, prompt: str) -> list[int]:
        """A generation prompt: the text itself, or, for a chat model, the text as a user turn."""
        if self.chat:
            ids = chat_token_ids(self.tok)
            return render([{"role": "user", "content": prompt}], self.tok, ids, add_generation_prompt=True)[0]
        return self.encode(prompt) or [self.eos_id]

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[list[str]], sample: SampleConfig) -> list[str]:
        """Continue each prompt, cut at the first of its stop strings; batched with the KV cache."""
        stop_ids = [self.eos_id]
        if self.chat:
            stop_ids.append(chat_token_ids(self.tok)["end"])
        texts: list[str] = []
        cfg = SampleConfig(**{**vars(sample), "max_new_tokens": max_new_tokens})
        for start in range(0, len(prompts), self.batch_size):
            chunk = [self.prompt_ids(p) for p in prompts[start:start + self.batch_size]]
            for j, new in enumerate(generate(self.model, chunk, cfg, eos_id=stop_ids, pad_id=self.pad_id)):
                texts.append(cut_at_stop(self.decode(new), stop[start + j]))
        return texts


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


@dataclass
class EndpointLM:
    """An OpenAI-compatible server (``/v1/completions``): generation tasks only."""

    url: str
    model_name: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    chat: bool = False

    @property
    def source(self) -> str:
        return self.url

    @property
    def weights_hash(self) -> str | None:
        return None

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[list[str]], sample: SampleConfig) -> list[str]:
        key = os.environ.get(self.api_key_env, "")
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        out = []
        for prompt, stops in zip(prompts, stop):
            body = {"model": self.model_name, "prompt": prompt, "max_tokens": max_new_tokens,
                    "temperature": sample.temperature, "top_p": sample.top_p, "seed": sample.seed,
                    "stop": [s for s in stops if s][:4]}  # the OpenAI API takes at most 4 stop strings
            req = urllib.request.Request(self.url.rstrip("/") + "/completions", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    text = json.loads(r.read().decode("utf-8"))["choices"][0]["text"]
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as e:
                raise LmforgeError(f"{self.url}: completion request failed ({type(e).__name__}: {str(e)[:160]})") from None
            out.append(cut_at_stop(text, stops))
        return out


def open_lm(model: str, work_dir, batch_size: int = 16, chat: bool | None = None, endpoint_model: str = "",
            api_key_env: str = "OPENAI_API_KEY"):
    """A :class:`LocalLM` for an lmforge model or HF directory, or an :class:`EndpointLM` for an http(s) URL.

    ``chat=None`` decides by the model's manifest: an SFT, DPO or distill run is a chat model."""
    if model.startswith(("http://", "https://")):
        if not endpoint_model:
            raise LmforgeError(f"MODEL {model} is a URL: name the model it serves with --endpoint-model")
        return EndpointLM(model, endpoint_model, api_key_env, chat=bool(chat))
    base = resolve_base(model, Path(work_dir), flag="MODEL")
    if chat is None:
        chat = stage_of(base.model_dir) in CHAT_STAGES
    return LocalLM(load_model(base.model_dir), base.tokenizer(), model, base.weights_hash, chat, batch_size)


def stage_of(model_dir: Path) -> str:
    try:
        return read_manifest(model_dir).get("stage", "")
    except LmforgeError:
        return ""

"""OpenAI's request and response shapes, checked by hand so every bad field gets a 400 that names it.

Pure functions over plain dicts: the HTTP layer (:mod:`lmforge.serve.app`) parses JSON, calls
:func:`parse_chat` / :func:`parse_completion`, and builds responses with the ``*_response`` and
``*_chunk`` helpers. Unknown fields are ignored, as OpenAI-compatible servers commonly do. Extensions: ``top_k``
and ``ignore_eos``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

ROLES = ("system", "developer", "user", "assistant")
MAX_N = 16
MAX_STOP = 4


class ApiError(Exception):
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Params:
    """A validated request: what to generate and how."""

    model: str
    prompts: list  # chat: [messages]; completions: [str, ...] (a list prompt gives one choice set each)
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the top k
    user: str | None = None
    echo: bool = False
    ignore_eos: bool = False  # extension (as in vLLM): generate max_tokens tokens, for benchmarks


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body, name, lo=None, hi=None, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer, not {type(v).__name__}", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"'{name}' is {v}; it must be {rng}", name)
    return v


def _num(body, name, lo, hi, default, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not _is_num(v):
        raise bad(f"'{name}' must be a number, not {type(v).__name__}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' is {v}; it must be {'above' if lo_open else 'at least'} {lo} and at most {hi}", name)
    return float(v)


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, not {type(v).__name__}", name, "invalid_type")
    return v


def _common(body: dict) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the name of a served model (GET /v1/models lists them)", "model",
                  "missing_required_parameter" if model is None else "invalid_type")
    max_tokens = _int(body, "max_completion_tokens", 1)
    max_tokens = _int(body, "max_tokens", 1, default=max_tokens)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' has {len(stop)} strings; at most {MAX_STOP} are allowed", "stop")
    if any(not s for s in stop):
        raise bad("'stop' strings must not be empty", "stop")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = _bool(opts, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("'user' must be a string", "user", "invalid_type")
    top_k = _int(body, "top_k", -1, default=0)
    return dict(model=model, max_tokens=max_tokens, temperature=_num(body, "temperature", 0.0, 2.0, 1.0),
                top_p=_num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True), top_k=max(top_k, 0), stop=stop,
                seed=_int(body, "seed"), n=_int(body, "n", 1, MAX_N, 1), stream=stream, include_usage=include_usage,
                user=user, ignore_eos=_bool(body, "ignore_eos"))


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: only text is understood by a text model
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": ...}}; "
                          "this model reads text only", f"messages[{i}].content", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content", "invalid_type")


def parse_chat(body: dict) -> Params:
    p = _common(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {role, content}", "messages",
                  "missing_required_parameter" if msgs is None else "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}", f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 20)
    if top is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return Params(prompts=[out], logprobs=(top or 0) if logprobs else None, **p)


def parse_completion(body: dict) -> Params:
    p = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        prompts = prompt
    else:
        raise bad("'prompt' must be a string or a non-empty list of strings", "prompt",
                  "missing_required_parameter" if prompt is None else "invalid_type")
    if len(prompts) * p["n"] > MAX_N * 4:
        raise bad(f"{len(prompts)} prompts x n={p['n']} is too many choices for one request", "prompt")
    return Params(prompts=prompts, logprobs=_int(body, "logprobs", 0, 5), echo=_bool(body, "echo"), **p)


# -- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(lps: list[dict] | None) -> dict | None:
    if lps is None:
        return None
    def one(tok, lp):
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
    return {"content": [{**one(x["token"], x["logprob"]), "top_logprobs": [one(t, lp) for t, _, lp in x["top"]]}
                        for x in lps]}


def completion_logprobs(lps: list[dict] | None, offset: int = 0) -> dict | None:
    if lps is None:
        return None
    offsets, at = [], offset
    for x in lps:
        offsets.append(at)
        at += len(x["token"])
    return {"tokens": [x["token"] for x in lps], "token_logprobs": [x["logprob"] for x in lps],
            "top_logprobs": [{t: lp for t, _, lp in x["top"]} for x in lps], "text_offset": offsets}


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": chat_logprobs(c.get("logprobs")), "finish_reason": c["finish_reason"]}
                        for c in choices],
            "usage": use}


def completion_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": completion_logprobs(c.get("logprobs")),
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, index: int | None, delta: dict | None = None,
               finish_reason: str | None = None, logprobs=None, use: dict | None = None, with_usage=False) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [] if index is None else [{"index": index, "delta": delta or {},
                                                   "logprobs": chat_logprobs(logprobs), "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = use
    return chunk


def completion_chunk(rid: str, model: str, created: int, index: int | None, text: str = "",
                     finish_reason: str | None = None, logprobs=None, use: dict | None = None, with_usage=False) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [] if index is None else [{"index": index, "text": text,
                                                   "logprobs": completion_logprobs(logprobs),
                                                   "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = use
    return chunk

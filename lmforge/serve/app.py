"""The HTTP server: OpenAI's endpoints over the engines, with keys, limits, metrics and a usage ledger.

``create_app(cfg)`` builds a FastAPI app (tests drive it in-process or over loopback);
``run_server(cfg)`` serves it with uvicorn and drains on SIGTERM: new requests get 503,
streams in flight finish (up to ``drain_timeout``), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.config import load_toml
from lmforge.errors import LmforgeError
from lmforge.post.chats import render
from lmforge.serve.api import (ApiError, Params, bad, chat_chunk, chat_response, completion_chunk,
                               completion_response, new_id, parse_chat, parse_completion, usage)
from lmforge.serve.engine import GenRequest, QueueFull
from lmforge.serve.models import ServedModel, calibrate, load_served
from lmforge.serve.usage import UsageLog
from lmforge.serve.worker import EngineDown

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    models: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    dir: Path = Path("runs/serve")
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> user; empty: no auth
    max_seqs: int = 16
    max_queue: int = 256
    max_body: int = 1 << 20
    drain_timeout: float = 30.0
    precision: str = "auto"
    hardware: str = "cpu"
    calibrate: bool = True
    banner: bool = False  # print the URL, models and prices once loaded
    threads: int = 0  # torch compute threads; 0 keeps torch's default
    engine: str = "process"  # each model's engine in a process of its own, or "thread": in this one
    compile: bool = False  # the decode step through torch.compile


class Metrics:
    """Prometheus collectors in the app's own registry (two apps in one process do not collide)."""

    def __init__(self, state: "State"):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "Requests by endpoint and status", ["model", "endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Generated tokens", ["model"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=buckets, registry=r)
        self.tpot = Histogram("lmforge_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=buckets, registry=r)
        self.e2e = Histogram("lmforge_request_seconds", "End-to-end request time", ["model"], buckets=buckets,
                             registry=r)
        self.queue = Gauge("lmforge_queue_depth", "Requests waiting for a slot", ["model"], registry=r)
        self.active = Gauge("lmforge_active_sequences", "Sequences being generated", ["model"], registry=r)
        self.state = state

    def watch(self, m: ServedModel) -> None:
        self.queue.labels(m.name).set_function(lambda: m.engine.queue_depth)
        self.active.labels(m.name).set_function(lambda: m.engine.n_active)


class State:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.status = "loading"  # loading | ready | draining | failed
        self.error = ""
        self.models: dict[str, ServedModel] = {}
        self.metrics = Metrics(self)
        self.usage = UsageLog(Path(cfg.dir))
        self.keys = dict(cfg.api_keys)
        self._dispatch: _Dispatch | None = None
        self.virtual: dict = {}  # name -> an object with async complete(kind, params, models) -> Answer
        self.knowledge = None  # an object with augment(messages) -> (messages, citations)
        self.on_ready: list = []  # callables(state) run once the models are loaded

    def load(self) -> None:
        try:
            for spec in self.cfg.models:
                m = load_served(spec, Path(self.cfg.dir), self.cfg.max_seqs, self.cfg.max_queue, self.cfg.precision,
                                engine=self.cfg.engine, threads=self.cfg.threads, compile=self.cfg.compile)
                if m.name in self.models:
                    raise LmforgeError(f"two models are named '{m.name}'; name them with NAME=PATH")
                if self.cfg.calibrate:
                    calibrate(m, self.cfg.hardware)
                m.engine.start()
                self.metrics.watch(m)
                self.models[m.name] = m
            for hook in self.on_ready:  # e.g. a router setting its threshold on the loaded tiers
                hook(self)
            self.status = "ready"
            if self.cfg.banner:
                print(banner(self), flush=True)
        except Exception as e:  # the server stays up and says why on /health and every request
            self.status, self.error = "failed", str(e)
            log.exception("loading the models failed")
            print(f"error: {e}", flush=True)

    def dispatch_for(self, loop) -> "_Dispatch":
        if self._dispatch is None or self._dispatch.loop is not loop:
            self._dispatch = _Dispatch(loop)
        return self._dispatch

    def stop(self) -> None:
        for m in self.models.values():
            m.engine.close()


class _Dispatch:
    """Hands engine events to the event loop in batches: one wake-up per engine step rather than one
    per token per sequence (each wake-up is a write to the loop's self-pipe)."""

    def __init__(self, loop):
        self.loop = loop
        self._items: list = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, q: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((q, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for q, item in items:
            q.put_nowait(item)


def banner(state: State) -> str:
    cfg = state.cfg
    lines = [f"lmforge serve: http://{cfg.host}:{cfg.port}  (web chat at /, API at /v1, metrics at /metrics)"]
    for m in state.models.values():
        price = (f"${m.usd_per_mtok_out:.4f} per 1M output tokens at {m.decode_tok_s:,.0f} tok/s "
                 f"(catalog [{cfg.hardware}], batch {cfg.max_seqs})" if m.decode_tok_s else "not calibrated")
        lines.append(f"  model {m.name}: {m.source}  {m.precision}  context {m.context}  "
                     f"{'chat' if m.chat_ids else 'completions only'}  {price}")
    for name, vm in state.virtual.items():
        lines.append(f"  model {name}: {vm.describe()}")
    if state.knowledge is not None:
        lines.append(f"  knowledge: {state.knowledge.describe()}")
    lines.append("  auth: " + (f"{len(set(state.keys.values()))} user(s) by API key" if state.keys else "none (--no-auth)"))
    return "\n".join(lines)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a body over ``limit`` bytes with 413, by its Content-Length or while it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            e = too_large(self.limit) if length.isdigit() else bad("Content-Length is not a number", None)
            return await error_response(e)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return msg

        await self.app(scope, limited, send)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {limit} bytes (--max-body)",
                    code="request_too_large")


def create_app(cfg: ServeConfig, state: State | None = None) -> FastAPI:
    state = state or State(cfg)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="lmforge-load", daemon=True).start()
        yield
        state.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    app.add_middleware(BodyLimit, limit=cfg.max_body)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e):
        return error_response(too_large(cfg.max_body))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(ApiError(e.status_code, msg, kind, None, None, dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        eid = uuid.uuid4().hex[:12]
        log.exception("internal error %s on %s %s", eid, request.method, request.url.path)
        return error_response(ApiError(500, f"internal error {eid}; the server log has the details", "server_error",
                                       code="internal_error"))

    def ready():
        if state.status != "ready":
            why = {"loading": "the server is loading its models", "draining": "the server is shutting down",
                   "failed": f"the models failed to load: {state.error}"}[state.status]
            raise ApiError(503, f"{why}; retry later", "service_unavailable", code=state.status,
                           headers={"Retry-After": "1" if state.status == "loading" else "5"})

    def user_of(request: Request) -> str:
        if not state.keys:
            return "anonymous"
        auth = request.headers.get("authorization", "")
        if not auth:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="missing_api_key")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        for k, user in state.keys.items():
            if hmac.compare_digest(k.encode(), key.encode()):
                return user
        raise ApiError(401, "invalid API key", code="invalid_api_key")

    def model_of(name: str) -> ServedModel:
        m = state.models.get(name)
        if m is None:
            raise ApiError(404, f"model '{name}' is not served here; served: {', '.join(state.models)}",
                           "not_found_error", "model", "model_not_found")
        return m

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the body is not valid JSON ({e})", None, "invalid_json") from None

    @app.get("/health")
    async def health():
        body = {"status": state.status, "models": list(state.models)}
        if state.error:
            body["error"] = state.error
        # A model whose engine process has died cannot answer again until the server restarts.
        down = {name: m.engine.down for name, m in state.models.items() if m.engine.down}
        if down and state.status == "ready":
            body.update(status="degraded", down=down)
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def web_chat():
        page = STATIC / "chat.html"
        if not page.exists():
            return PlainTextResponse("lmforge serve: the API is at /v1")
        return FileResponse(page, media_type="text/html")

    @app.get("/v1/models")
    async def models(request: Request):
        user_of(request)
        ready()
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "lmforge", "context_length": m.context,
             "chat": m.chat_ids is not None} for m in state.models.values()] +
            [{"id": name, "object": "model", "created": 0, "owned_by": "lmforge", "chat": True, "router": True}
             for name in state.virtual]}

    @app.get("/v1/usage")
    async def my_usage(request: Request):
        return state.usage.for_user(user_of(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        user = user_of(request)
        ready()
        p = parse_chat(await body_of(request))
        citations = None
        if state.knowledge is not None:
            p.prompts[0], citations = await asyncio.to_thread(state.knowledge.augment, p.prompts[0])
        if p.model in state.virtual:
            return await virtual(state.virtual[p.model], "chat", p, user, citations)
        m = model_of(p.model)
        if m.chat_ids is None:
            raise bad(f"model '{m.name}' is a base model without chat tokens; use /v1/completions", "model",
                      "model_not_chat")
        prompts, stop_ids = prompt_ids(m, "chat", p)
        return await generate(request, m, p, user, prompts, stop_ids, "chat", citations)

    @app.post("/v1/completions")
    async def completions(request: Request):
        user = user_of(request)
        ready()
        p = parse_completion(await body_of(request))
        if p.model in state.virtual:
            return await virtual(state.virtual[p.model], "completions", p, user, None)
        m = model_of(p.model)
        prompts, stop_ids = prompt_ids(m, "completions", p)
        return await generate(request, m, p, user, prompts, stop_ids, "completions")

    async def virtual(vm, kind: str, p: Params, user: str, citations):
        """A request for a model that is a policy over others (the router): answered whole, then sent
        as one response or as a short stream."""
        if p.n != 1 or (kind == "completions" and len(p.prompts) != 1):
            raise bad(f"model '{vm.name}' answers one choice per request (n = 1, one prompt)", "n")
        t0 = time.perf_counter()
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        try:
            a = await vm.complete(kind, p, state.models)
        except ApiError as e:
            state.metrics.requests.labels(vm.name, kind, str(e.status)).inc()
            raise
        state.metrics.requests.labels(vm.name, kind, "ok").inc()
        state.metrics.e2e.labels(vm.name).observe(time.perf_counter() - t0)
        use = {**usage(a.prompt_tokens, a.completion_tokens), **a.usage_extra}
        state.usage.record({"request_id": rid, "user": user, "end_user": p.user, "model": vm.name, "endpoint": kind,
                            "status": "ok", "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                            "usd": a.usd, **{k: v for k, v in a.usage_extra.items() if k in ROUTE_FIELDS}})
        choice = {"index": 0, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
        if not p.stream:
            body = (chat_response if kind == "chat" else completion_response)(rid, vm.name, [choice], use)
            if citations is not None:
                body["citations"] = citations
            return JSONResponse(body, headers=a.headers)

        async def one_shot():
            created, wu = int(time.time()), p.include_usage
            chunk = chat_chunk if kind == "chat" else completion_chunk
            if kind == "chat":
                first = chat_chunk(rid, vm.name, created, 0, {"role": "assistant", "content": ""}, with_usage=wu)
                if citations is not None:
                    first["citations"] = citations
                yield sse(first)
            yield sse(chunk(rid, vm.name, created, 0, {"content": a.text} if kind == "chat" else a.text,
                            with_usage=wu))
            yield sse(chunk(rid, vm.name, created, 0, {} if kind == "chat" else "", a.finish_reason, with_usage=wu))
            if wu:
                yield sse(chunk(rid, vm.name, created, None, use=use, with_usage=True))
            yield "data: [DONE]\n\n"

        return StreamingResponse(one_shot(), media_type="text/event-stream", headers=a.headers)

    async def generate(request, m: ServedModel, p: Params, user: str, prompts: list[list[int]], stop_ids, kind,
                       citations=None):
        t0 = time.perf_counter()
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        reqs = build_requests(m, kind, p, prompts, stop_ids)
        dispatch = state.dispatch_for(asyncio.get_running_loop())
        q: asyncio.Queue = asyncio.Queue()

        track = _Tracker(state, m, kind, user, rid, p, len(reqs), t0)

        def sink(i):
            def put(ev):
                # Accounting happens here, on the engine's thread, so a request is billed for what was
                # generated even when its client is gone before the last event. If it fails (say the
                # ledger's disk is full), the client still gets its event.
                try:
                    track.event(ev)
                finally:
                    dispatch.post(q, (i, ev))
            return put

        handles = []
        try:
            for i, r in enumerate(reqs):
                handles.append(m.engine.submit(r, sink(i)))
        except (QueueFull, EngineDown) as e:
            track.rejected = True
            for h in handles:
                h.cancel()
            err = (ApiError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
                   if isinstance(e, QueueFull) else
                   ApiError(503, f"model '{m.name}': {e}", "server_error", code="engine_down"))
            state.metrics.requests.labels(m.name, kind, str(err.status)).inc()
            raise err from None
        if p.stream:
            return StreamingResponse(stream(m, p, kind, rid, q, handles, track, citations), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = [{"index": i, "text": "", "logprobs": [] if p.logprobs is not None else None, "finish_reason": None}
                   for i in range(len(reqs))]
        left = len(handles)
        try:
            while left:
                try:
                    i, ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                left -= ev.finish_reason is not None
                choices[i]["text"] += ev.text
                if ev.logprobs:
                    choices[i]["logprobs"].extend(ev.logprobs)
                if ev.finish_reason:
                    choices[i]["finish_reason"] = ev.finish_reason
            if any(c["finish_reason"] == "error" for c in choices):
                raise RuntimeError("the engine failed while generating")
            if p.echo:
                for c in choices:
                    c["text"] = p.prompts[c["index"] // p.n] + c["text"]
            use = usage(track.prompt_tokens, track.completion_tokens)
            body = (chat_response if kind == "chat" else completion_response)(rid, m.name, choices, use)
            if citations is not None:
                body["citations"] = citations
            return JSONResponse(body)
        finally:
            for h in handles:
                h.cancel()

    async def stream(m, p, kind, rid, q, handles, track, citations=None):
        created = int(time.time())
        chunk = chat_chunk if kind == "chat" else completion_chunk
        wu = p.include_usage
        try:
            if kind == "chat":
                for i in range(len(handles)):
                    first = chat_chunk(rid, m.name, created, i, {"role": "assistant", "content": ""}, with_usage=wu)
                    if citations is not None and i == 0:
                        first["citations"] = citations
                    yield sse(first)
            if p.echo:
                for i in range(len(handles)):
                    yield sse(chunk(rid, m.name, created, i, p.prompts[i // p.n], with_usage=wu))
            left = len(handles)
            while left:
                # Everything that arrived since the last write goes out in one write (several SSE events):
                # under load the event loop falls behind the engine, and one send per token would add up.
                batch = [await q.get()]
                while not q.empty():
                    batch.append(q.get_nowait())
                out = []
                for i, ev in batch:
                    left -= ev.finish_reason is not None
                    if ev.finish_reason == "error":
                        out.append(sse(ApiError(500, "the engine failed while generating", "server_error").body()))
                        continue
                    if ev.text or ev.logprobs:
                        body = {"content": ev.text} if kind == "chat" else ev.text
                        out.append(sse(chunk(rid, m.name, created, i, body, None, ev.logprobs, with_usage=wu)))
                    if ev.finish_reason:
                        out.append(sse(chunk(rid, m.name, created, i, {} if kind == "chat" else "", ev.finish_reason,
                                             with_usage=wu)))
                if out:
                    yield "".join(out)
            if wu:
                yield sse(chunk(rid, m.name, created, None, use=usage(track.prompt_tokens, track.completion_tokens),
                                with_usage=True))
            yield "data: [DONE]\n\n"
        finally:
            # A client that went away mid-stream lands here: its sequences leave at the next step.
            for h in handles:
                h.cancel()

    return app


ROUTE_FIELDS = ("tier", "escalated", "fallback")


@dataclass
class Answer:
    """A whole answer from a virtual model (the router), with the headers and usage fields it adds."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    headers: dict
    usage_extra: dict
    usd: float


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def prompt_ids(m: ServedModel, kind: str, p: Params) -> tuple[list[list[int]], tuple[int, ...]]:
    """Token ids of each prompt and the tokens that end an answer: a chat is rendered with the
    model's template and ends at ``<|end|>``; a completion prompt starts after the end-of-document
    token, which precedes every training document."""
    if kind == "chat":
        ids, _ = render(p.prompts[0], m.tok, m.chat_ids, add_generation_prompt=True)
        stop = (m.chat_ids["end"], m.eos)
        prompts = [ids]
    else:
        prompts, stop = [[m.eos] + m.encode(text) for text in p.prompts], (m.eos,)
    return prompts, (() if p.ignore_eos else stop)


def prompt_text(kind: str, p: Params) -> str:
    """The prompt as plain text (what a routing classifier reads)."""
    if kind == "chat":
        return "\n".join(m["content"] for m in p.prompts[0])
    return p.prompts[0]


def build_requests(m: ServedModel, kind: str, p: Params, prompts: list[list[int]], stop_ids,
                   logprobs: int | None = None) -> list[GenRequest]:
    reqs = []
    for ids in prompts:
        room = m.context - len(ids)
        max_tokens = p.max_tokens if p.max_tokens is not None else max(1, room if kind == "chat" else min(16, room))
        for _ in range(p.n):
            r = GenRequest(ids, max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                           stop=p.stop, stop_ids=stop_ids, seed=None if p.seed is None else p.seed + len(reqs),
                           logprobs=p.logprobs if logprobs is None else logprobs)
            try:
                m.engine.check(r)
            except LmforgeError as e:
                raise ApiError(400, str(e), param="messages" if kind == "chat" else "prompt",
                               code="context_length_exceeded") from None
            reqs.append(r)
    return reqs


async def generate_once(m: ServedModel, kind: str, p: Params, logprobs: bool = False):
    """One answer from a served model, whole (with its token logprobs when asked): a router's tier call."""
    if kind == "chat" and m.chat_ids is None:
        raise bad(f"model '{m.name}' is a base model without chat tokens", "model", "model_not_chat")
    prompts, stop = prompt_ids(m, kind, p)
    req = build_requests(m, kind, p, prompts[:1], stop, logprobs=0 if logprobs else None)[0]
    return (await asyncio.to_thread(m.engine.generate, [req]))[0]


class _Tracker:
    """Per-request accounting, fed from the engine's thread: TTFT and TPOT as tokens arrive, and once
    every sequence of the request has ended, the request and token counters and the usage ledger line."""

    def __init__(self, state: State, m: ServedModel, kind: str, user: str, rid: str, p: Params, n: int, t0: float):
        self.state, self.m, self.kind, self.user, self.rid, self.p = state, m, kind, user, rid, p
        self.t0, self.first, self.left = t0, None, n
        self.prompt_tokens = self.completion_tokens = 0
        self.reasons: list[str] = []
        self.rejected = False  # refused with 429: counted there, not billed
        self._lock = threading.Lock()

    def event(self, ev) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.first is None and (ev.text or ev.finish_reason):
                self.first = now
                self.state.metrics.ttft.labels(self.m.name).observe(now - self.t0)
            if not ev.finish_reason:
                return
            self.left -= 1
            self.reasons.append(ev.finish_reason)
            self.prompt_tokens += ev.prompt_tokens
            self.completion_tokens += ev.completion_tokens
            if ev.completion_tokens > 1:
                self.state.metrics.tpot.labels(self.m.name).observe((now - self.first) / (ev.completion_tokens - 1))
            if self.left == 0 and not self.rejected:
                self.close()

    def close(self) -> None:
        status = "error" if "error" in self.reasons else "cancelled" if "cancelled" in self.reasons else "ok"
        mt = self.state.metrics
        mt.requests.labels(self.m.name, self.kind, status).inc()
        mt.prompt_tokens.labels(self.m.name).inc(self.prompt_tokens)
        mt.generation_tokens.labels(self.m.name).inc(self.completion_tokens)
        mt.e2e.labels(self.m.name).observe(time.perf_counter() - self.t0)
        usd = (self.prompt_tokens * self.m.usd_per_mtok_in + self.completion_tokens * self.m.usd_per_mtok_out) / 1e6
        self.state.usage.record({"request_id": self.rid, "user": self.user, "end_user": self.p.user,
                                 "model": self.m.name, "endpoint": self.kind, "status": status,
                                 "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                                 "usd": usd})


def read_keys(api_key: str | None, keys_file: Path | None, no_auth: bool, serve_dir: Path) -> dict[str, str]:
    """key -> user. ``--api-key`` is user ``default``; a keys file is JSON or TOML ``{user = "key"}``;
    with neither (and no ``--no-auth``) a key is made, printed once and saved to ``DIR/api_key`` (mode 600)."""
    keys: dict[str, str] = {}
    if api_key:
        keys[api_key] = "default"
    if keys_file:
        if not keys_file.exists():
            raise LmforgeError(f"--api-keys {keys_file}: file not found")
        if keys_file.suffix == ".json":
            try:
                raw = json.loads(keys_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise LmforgeError(f"--api-keys {keys_file}: not valid JSON ({e}); write {{\"alice\": \"KEY\"}}") from None
        else:
            raw = load_toml(keys_file)
        if not isinstance(raw, dict):
            raise LmforgeError(f"--api-keys {keys_file}: expected user = key pairs")
        for user, key in raw.items():
            if not isinstance(key, str) or len(key) < 8:
                raise LmforgeError(f"--api-keys {keys_file}: the key of '{user}' must be a string of 8+ characters")
            if key in keys:
                raise LmforgeError(f"--api-keys {keys_file}: '{user}' shares a key with '{keys[key]}'")
            keys[key] = user
    if no_auth:
        if keys:
            raise LmforgeError("--no-auth contradicts --api-key/--api-keys; drop one")
        return {}
    if not keys:
        serve_dir.mkdir(parents=True, exist_ok=True)
        path = serve_dir / "api_key"
        key = path.read_text().strip() if path.exists() else secrets.token_urlsafe(24)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(key + "\n")
            tmp.chmod(0o600)
            tmp.replace(path)
        print(f"API key (user 'default'): {key}   (saved in {path}; pass --api-key to choose one)", flush=True)
        keys[key] = "default"
    return keys


def run_server(cfg: ServeConfig, state: State | None = None) -> int:
    """Serve until SIGTERM/SIGINT, drain, exit 0. ``state`` carries plug-ins (a router, a knowledge index)."""
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # A thread engine (and a process engine's reader) needs the GIL between steps; by default a busy
    # event loop keeps it for up to 5 ms before handing it over.
    sys.setswitchinterval(0.0005)
    state = state or State(cfg)
    app = create_app(cfg, state)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.status != "failed":
                state.status = "draining"
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal once it has shut down, which would end the process
            # by SIGTERM; a drained server exits 0 instead.
            getattr(self, "_captured_signals", []).clear()

    server = DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=int(cfg.drain_timeout), access_log=False))
    server.run()
    return 0

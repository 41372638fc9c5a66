"""Serving: the continuous-batching engine, the OpenAI-compatible API (through the official
``openai`` client), errors in OpenAI's shape, keys and usage, disconnects, load and drain."""

import asyncio
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import CHAT_CTX, run_cli
from serving import free_port, serving, wait_until

from lmforge.model.generate import SampleConfig, generate
from lmforge.model.io import load_model
from lmforge.serve.app import ServeConfig, State, create_app, read_keys
from lmforge.serve.engine import Engine, GenRequest, QueueFull
from lmforge.serve.models import build_engine
from lmforge.serve.worker import EngineDown, EngineProcess
from lmforge.tokenizer.io import load_tokenizer, tokenizer_dir_for

ALICE, BOB = "key-alice-0001", "key-bob-0002"


@pytest.fixture(scope="module")
def lm(chat_base):
    torch.manual_seed(0)
    model = load_model(chat_base)
    tok = load_tokenizer(tokenizer_dir_for(chat_base))
    return model, tok, tok.token_to_id("<|eos|>")


def prompts_of(tok, eos, texts):
    return [[eos] + tok.encode(t).ids for t in texts]


TEXTS = ["def f(", "import os\n", "class A:\n    def", "# sum a list\n", "x = [", "for i in range(", "return self.",
         "if __name__"]


# -- engine, without HTTP
def test_engine_greedy_equals_static_generate_with_slots_reused(lm):
    """Eight prompts of different lengths and budgets through three slots: sequences finish at
    different steps, new ones take freed slots (the cache compacts), and each row's tokens still
    equal generating it alone."""
    model, tok, eos = lm
    prompts = prompts_of(tok, eos, TEXTS)
    budgets = [5, 17, 3, 30, 9, 22, 12, 40]
    ref = [generate(model, [p], SampleConfig(max_new_tokens=b, temperature=0))[0] for p, b in zip(prompts, budgets)]
    engine = Engine(model, tok.decode, max_seqs=3)
    outs = engine.generate([GenRequest(p, max_tokens=b, temperature=0) for p, b in zip(prompts, budgets)])
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" and o.completion_tokens == b for o, b in zip(outs, budgets))
    assert [o.text for o in outs] == [tok.decode(r) for r in ref]
    assert engine.n_active == 0 and engine.queue_depth == 0


def test_engine_sampling_is_per_sequence(lm):
    """A seeded request samples the same tokens whatever it is batched with; top_k=1 is greedy;
    stop tokens and stop strings end only their own sequence."""
    model, tok, eos = lm
    p = prompts_of(tok, eos, TEXTS[:3])
    engine = Engine(model, tok.decode, max_seqs=4)
    alone = engine.generate([GenRequest(p[0], max_tokens=20, temperature=0.9, top_p=0.9, seed=7)])[0]
    mixed = engine.generate([GenRequest(p[1], max_tokens=20, temperature=1.2, seed=1),
                             GenRequest(p[0], max_tokens=20, temperature=0.9, top_p=0.9, seed=7),
                             GenRequest(p[2], max_tokens=20, temperature=0)])
    assert mixed[1].token_ids == alone.token_ids
    greedy = engine.generate([GenRequest(p[2], max_tokens=20, temperature=0)])[0]
    topk1 = engine.generate([GenRequest(p[2], max_tokens=20, temperature=1.0, top_k=1, seed=3)])[0]
    assert topk1.token_ids == greedy.token_ids == mixed[2].token_ids
    # A stop token: the first greedy token that is not the first one ends the sequence before it.
    stop_tok = greedy.token_ids[3]
    cut = engine.generate([GenRequest(p[2], max_tokens=20, temperature=0, stop_ids=(stop_tok,)),
                           GenRequest(p[0], max_tokens=20, temperature=0)])
    first = greedy.token_ids.index(stop_tok)
    assert cut[0].token_ids == greedy.token_ids[:first] and cut[0].finish_reason == "stop"
    assert cut[1].completion_tokens == 20
    # A stop string: the text ends just before it, and it is never part of the text.
    s = greedy.text[5:8]
    cut = engine.generate([GenRequest(p[2], max_tokens=20, temperature=0, stop=[s])])[0]
    assert cut.finish_reason == "stop" and cut.text == greedy.text[: greedy.text.index(s)]


def test_engine_cancel_frees_the_slot_and_queue_is_bounded(lm):
    model, tok, eos = lm
    p = prompts_of(tok, eos, TEXTS[:1])[0]
    engine = Engine(model, tok.decode, max_seqs=1, max_queue=1)
    running = engine.submit(GenRequest(p, max_tokens=60, temperature=0))
    engine.step()  # admitted: the slot is taken
    waiting = engine.submit(GenRequest(p, max_tokens=5, temperature=0))
    with pytest.raises(QueueFull):
        engine.submit(GenRequest(p, max_tokens=5, temperature=0))
    running.cancel()
    engine.step()  # the cancelled one leaves, the waiting one takes its slot
    assert running.done.is_set() and running.completion.finish_reason == "cancelled"
    assert engine.n_active == 1 and engine.queue_depth == 0
    while not waiting.done.is_set():
        engine.step()
    assert waiting.completion.completion_tokens == 5 and engine.n_active == 0


def test_engine_refuses_prompts_over_the_context(lm):
    model, tok, eos = lm
    engine = Engine(model, tok.decode)
    ctx = model.cfg.context
    with pytest.raises(Exception, match=f"exceeds the model's context of {ctx} tokens by 5"):
        engine.submit(GenRequest([eos] * (ctx - 5), max_tokens=10))


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decode_equals_eager(lm):
    """torch.compile'd decode steps (batches of one and of several, slots reused) give the same greedy
    tokens as the eager model: the keys a compiled step writes reach the engine's cache, since every
    later step reads them."""
    model, tok, eos = lm
    prompts = prompts_of(tok, eos, TEXTS[:5])
    budgets = [5, 17, 3, 30, 9]
    ref = [generate(model, [p], SampleConfig(max_new_tokens=b, temperature=0))[0] for p, b in zip(prompts, budgets)]
    engine = Engine(model, tok.decode, max_seqs=3, compile=True)
    engine.warm_up()
    outs = engine.generate([GenRequest(p, max_tokens=b, temperature=0) for p, b in zip(prompts, budgets)])
    assert [o.token_ids for o in outs] == ref


def _engine_process(chat_base, max_seqs: int, max_queue: int) -> EngineProcess:
    build = functools.partial(build_engine, str(chat_base), str(tokenizer_dir_for(chat_base)), "float32", "cpu",
                              max_seqs, 1 << 30)
    return EngineProcess(build, CHAT_CTX, max_seqs=max_seqs, max_queue=max_queue, threads=1)


def test_engine_process_matches_the_thread_engine_and_fails_cleanly_when_killed(lm, chat_base):
    """The engine in its own process: the same completions as in this one, the queue bounded by
    what the parent has sent, cancel and pause across the pipe, and a killed child ends what is in
    flight with "error" and refuses new requests instead of hanging them."""
    model, tok, eos = lm
    prompts = prompts_of(tok, eos, TEXTS)
    reqs = [GenRequest(p, max_tokens=b, temperature=0) for p, b in zip(prompts, [5, 17, 3, 30, 9, 22, 12, 40])]
    here = Engine(model, tok.decode, max_seqs=3).generate(reqs)
    ep = _engine_process(chat_base, max_seqs=3, max_queue=2)
    try:
        there = ep.generate(reqs)
        assert [(o.token_ids, o.text, o.finish_reason) for o in there] == \
            [(o.token_ids, o.text, o.finish_reason) for o in here]
        assert ep.tokens_out == sum(o.completion_tokens for o in here)
        assert wait_until(lambda: ep.n_active == 0 and ep.queue_depth == 0, timeout=10)

        ep.stop()  # paused: what is sent stays queued
        a = ep.submit(GenRequest(prompts[0], max_tokens=5, temperature=0))
        b = ep.submit(GenRequest(prompts[1], max_tokens=5, temperature=0))
        assert ep.queue_depth == 2
        with pytest.raises(QueueFull):
            ep.submit(GenRequest(prompts[2], max_tokens=5, temperature=0))
        # The child has both and, paused, admits neither.
        assert wait_until(lambda: ep._stats[0] == 2, timeout=10) and ep.n_active == 0
        time.sleep(0.2)
        assert ep.n_active == 0 and not b.done.is_set()
        a.cancel()
        ep.start()
        assert b.done.wait(30) and a.done.wait(30)
        assert a.completion.finish_reason == "cancelled" and b.completion.token_ids == here[1].token_ids[:5]

        # A request whose event handler raises still completes, and the engine keeps serving.
        def broken(ev):
            raise RuntimeError("a handler bug")
        c = ep.submit(GenRequest(prompts[2], max_tokens=3, temperature=0), broken)
        assert c.done.wait(30) and c.completion.token_ids == here[2].token_ids
        assert ep.generate(reqs[:1])[0].token_ids == here[0].token_ids and ep.down == ""

        long = ep.submit(GenRequest(prompts[3], max_tokens=CHAT_CTX - len(prompts[3]), temperature=0))
        assert wait_until(lambda: ep.n_active == 1, timeout=10)
        os.kill(ep._proc.pid, signal.SIGKILL)
        assert long.done.wait(10) and long.completion.finish_reason == "error"
        with pytest.raises(EngineDown, match="has stopped"):
            ep.submit(GenRequest(prompts[0], max_tokens=5))
    finally:
        ep.close()


# -- the HTTP API
@pytest.fixture(scope="module")
def server(chat_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    cfg = ServeConfig(models=[f"chat={chat_base}"], dir=d, api_keys={ALICE: "alice", BOB: "bob"}, max_seqs=8,
                      max_queue=64, max_body=20_000)
    state = State(cfg)
    with serving(create_app(cfg, state)) as url:
        yield url, state, d


def client(url, key=ALICE):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_chat_completions_and_streaming(server):
    url, state, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["chat"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write heappush."}]
    r = c.chat.completions.create(model="chat", messages=msgs, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == "chat" and r.id.startswith("chatcmpl-")
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 24 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Streamed, greedy: the deltas add up to the same answer, then one chunk with the usage.
    chunks = list(c.chat.completions.create(model="chat", messages=msgs, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
    assert text == ch.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason] == [ch.finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert sum(1 for x in chunks if x.choices and x.choices[0].delta.content) > 1  # it really streamed
    # n, seed and logprobs
    r2 = c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, temperature=1.0, n=3, seed=5,
                                   logprobs=True, top_logprobs=2)
    assert [x.index for x in r2.choices] == [0, 1, 2]
    lp = r2.choices[0].logprobs.content
    assert 1 <= len(lp) <= 8
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    again = c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, temperature=1.0, n=3, seed=5)
    assert [x.message.content for x in again.choices] == [x.message.content for x in r2.choices]


def test_openai_client_completions(server):
    url, _, _ = server
    c = client(url)
    r = c.completions.create(model="chat", prompt=["def f(", "import "], max_tokens=6, temperature=0, logprobs=1,
                             stop=["\n\n"], extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 2
    for ch in r.choices:
        assert ch.finish_reason in ("stop", "length") and "\n\n" not in ch.text
        assert len(ch.logprobs.tokens) == len(ch.logprobs.token_logprobs) <= 6
    streamed = "".join(x.choices[0].text for x in c.completions.create(
        model="chat", prompt="def f(", max_tokens=6, temperature=0, stop=["\n\n"], stream=True, extra_body={"ignore_eos": True}))
    assert streamed == r.choices[0].text


def malformed_requests(url):
    """(description, method, path, kwargs, expected status, expected param) for every kind of bad request."""
    ok = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    chat, comp = "/v1/chat/completions", "/v1/completions"
    H = {"Authorization": f"Bearer {ALICE}"}
    J = {"headers": H}
    cases = [
        ("invalid json", "POST", chat, {"content": b"{not json", **J}, 400, None),
        ("body is a list", "POST", chat, {"json": [1, 2], **J}, 400, None),
        ("no model", "POST", chat, {"json": {"messages": ok["messages"]}, **J}, 400, "model"),
        ("model not a string", "POST", chat, {"json": {**ok, "model": 3}, **J}, 400, "model"),
        ("unknown model", "POST", chat, {"json": {**ok, "model": "gpt-9"}, **J}, 404, "model"),
        ("no messages", "POST", chat, {"json": {"model": "chat"}, **J}, 400, "messages"),
        ("empty messages", "POST", chat, {"json": {**ok, "messages": []}, **J}, 400, "messages"),
        ("bad role", "POST", chat, {"json": {**ok, "messages": [{"role": "bot", "content": "x"}]}, **J}, 400,
         "messages[0].role"),
        ("content not text", "POST", chat, {"json": {**ok, "messages": [{"role": "user", "content": 5}]}, **J}, 400,
         "messages[0].content"),
        ("max_tokens 0", "POST", chat, {"json": {**ok, "max_tokens": 0}, **J}, 400, "max_tokens"),
        ("max_tokens string", "POST", chat, {"json": {**ok, "max_tokens": "10"}, **J}, 400, "max_tokens"),
        ("max_completion_tokens -1", "POST", chat, {"json": {**ok, "max_completion_tokens": -1}, **J}, 400,
         "max_completion_tokens"),
        ("temperature < 0", "POST", chat, {"json": {**ok, "temperature": -0.5}, **J}, 400, "temperature"),
        ("temperature > 2", "POST", chat, {"json": {**ok, "temperature": 2.5}, **J}, 400, "temperature"),
        ("temperature string", "POST", chat, {"json": {**ok, "temperature": "hot"}, **J}, 400, "temperature"),
        ("top_p 0", "POST", chat, {"json": {**ok, "top_p": 0}, **J}, 400, "top_p"),
        ("top_p > 1", "POST", chat, {"json": {**ok, "top_p": 1.5}, **J}, 400, "top_p"),
        ("top_k float", "POST", chat, {"json": {**ok, "top_k": 2.5}, **J}, 400, "top_k"),
        ("n 0", "POST", chat, {"json": {**ok, "n": 0}, **J}, 400, "n"),
        ("n 1000", "POST", chat, {"json": {**ok, "n": 1000}, **J}, 400, "n"),
        ("stop int", "POST", chat, {"json": {**ok, "stop": 7}, **J}, 400, "stop"),
        ("five stops", "POST", chat, {"json": {**ok, "stop": list("abcde")}, **J}, 400, "stop"),
        ("stream not bool", "POST", chat, {"json": {**ok, "stream": "yes"}, **J}, 400, "stream"),
        ("stream_options without stream", "POST", chat, {"json": {**ok, "stream_options": {"include_usage": True}},
                                                         **J}, 400, "stream_options"),
        ("top_logprobs without logprobs", "POST", chat, {"json": {**ok, "top_logprobs": 2}, **J}, 400, "top_logprobs"),
        ("seed string", "POST", chat, {"json": {**ok, "seed": "x"}, **J}, 400, "seed"),
        ("user not string", "POST", chat, {"json": {**ok, "user": 5}, **J}, 400, "user"),
        ("prompt too long", "POST", chat, {"json": {**ok, "messages": [{"role": "user", "content": "x " * 400}]}, **J},
         400, "messages"),
        ("max_tokens past the context", "POST", chat, {"json": {**ok, "max_tokens": 100_000}, **J}, 400, "messages"),
        ("no prompt", "POST", comp, {"json": {"model": "chat"}, **J}, 400, "prompt"),
        ("prompt int", "POST", comp, {"json": {"model": "chat", "prompt": 3}, **J}, 400, "prompt"),
        ("logprobs 10", "POST", comp, {"json": {"model": "chat", "prompt": "x", "logprobs": 10}, **J}, 400, "logprobs"),
        ("no key", "POST", chat, {"json": ok}, 401, None),
        ("wrong key", "POST", chat, {"json": ok, "headers": {"Authorization": "Bearer nope-nope"}}, 401, None),
        ("not bearer", "GET", "/v1/models", {"headers": {"Authorization": ALICE}}, 401, None),
        ("oversized body", "POST", chat, {"json": {**ok, "user": "x" * 30_000}, **J}, 413, None),
        ("unknown route", "GET", "/v1/nothing", J, 404, None),
        ("wrong method", "GET", chat, J, 405, None),
    ]
    return cases


def test_malformed_requests_get_the_right_4xx_in_openai_shape(server):
    url, state, _ = server
    cases = malformed_requests(url)
    sent = 0
    with httpx.Client(base_url=url, timeout=30) as h:
        while sent < 60:
            for what, method, path, kw, status, param in cases:
                r = h.request(method, path, **kw)
                assert r.status_code == status, (what, r.status_code, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], what
                if param is not None:
                    assert err["param"] == param, (what, err)
                assert h.get("/health").status_code == 200
                sent += 1
    with httpx.Client(base_url=url, timeout=30) as h:
        r = h.post("/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"},
                   json={"model": "chat", "messages": [{"role": "user", "content": "x " * 400}]})
        assert "by" in r.json()["error"]["message"] and "tokens" in r.json()["error"]["message"]


def test_keys_see_only_their_own_usage_and_cost_sums_the_ledger(server):
    url, state, d = server
    a, b = client(url, ALICE), client(url, BOB)
    for _ in range(2):
        a.chat.completions.create(model="chat", messages=[{"role": "user", "content": "a"}], max_tokens=4,
                                  user="alice-end-user")
    b.completions.create(model="chat", prompt="b", max_tokens=3, extra_body={"ignore_eos": True})
    with httpx.Client(base_url=url, timeout=30) as h:
        ua = h.get("/v1/usage", headers={"Authorization": f"Bearer {ALICE}"}).json()
        ub = h.get("/v1/usage", headers={"Authorization": f"Bearer {BOB}"}).json()
    assert ua["user"] == "alice" and ub["user"] == "bob"
    assert {r["user"] for r in ua["recent"]} == {"alice"} and {r["user"] for r in ub["recent"]} == {"bob"}
    assert not {r["request_id"] for r in ua["recent"]} & {r["request_id"] for r in ub["recent"]}
    assert ub["completion_tokens"] == 3 and ub["requests"] == 1
    rows = [json.loads(x) for x in (d / "usage.jsonl").read_text().splitlines()]
    assert {r["user"] for r in rows} <= {"alice", "bob"} and all(r["usd"] > 0 for r in rows if r["completion_tokens"])
    out = run_cli("cost", "--serve", d, "--json")
    assert out.returncode == 0, out.stderr
    summed = json.loads(out.stdout)
    assert summed["users"]["bob"]["completion_tokens"] == sum(r["completion_tokens"] for r in rows if r["user"] == "bob")
    assert summed["total"]["requests"] == len(rows)


def test_metrics_expose_requests_tokens_queue_and_latency(server):
    url, _, _ = server
    client(url).completions.create(model="chat", prompt="x", max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(f"{url}/metrics").text
    for name in ("lmforge_requests_total", "lmforge_generation_tokens_total", "lmforge_queue_depth",
                 "lmforge_active_sequences", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_time_per_output_token_seconds_bucket"):
        assert name in text, name
    assert 'lmforge_requests_total{endpoint="completions",model="chat",status="ok"}' in text


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    url, state, _ = server
    engine = state.models["chat"].engine
    with httpx.Client(base_url=url, timeout=30) as h:
        with h.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                      json={"model": "chat", "prompt": "def", "max_tokens": 100, "stream": True,
                            "ignore_eos": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(x.startswith("data: {") for x in got)
            assert engine.n_active == 1
    assert wait_until(lambda: engine.n_active == 0, timeout=10)


async def _one(h: httpx.AsyncClient, i: int, rng) -> int:
    """One request of the load test: streamed or not, and one in ten clients hangs up mid-stream."""
    body = {"model": "chat", "messages": [{"role": "user", "content": f"question {i}"}],
            "max_tokens": rng.randint(4, 24), "temperature": 0.7, "seed": i}
    hdr = {"Authorization": f"Bearer {ALICE}"}
    if i % 2:
        r = await h.post("/v1/chat/completions", json=body, headers=hdr)
        return r.status_code
    body.update(stream=True, max_tokens=40, ignore_eos=True)
    async with h.stream("POST", "/v1/chat/completions", json=body, headers=hdr) as r:
        n = 0
        async for line in r.aiter_lines():
            n += line.startswith("data:")
            if i % 10 == 0 and n == 3:
                return r.status_code  # leaving the block closes the connection mid-stream
        assert line == "data: [DONE]" or n > 0
        return r.status_code


def _rss_mb(pids=("self",)) -> float:
    """Resident memory of the server: this process (the HTTP side runs in it) and its engine processes."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))
    return total / 1024


def server_pids(state) -> tuple:
    return ("self", *(m.engine._proc.pid for m in state.models.values() if getattr(m.engine, "_proc", None)))


def run_load(url, n_requests: int, concurrency: int, waves: int = 3, pids=("self",)) -> tuple[list[int], list[float]]:
    import random

    async def wave(seed):
        rng = random.Random(seed)
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=concurrency)) as h:
            async def guarded(i):
                async with sem:
                    return await _one(h, i, rng)
            return await asyncio.gather(*(guarded(i) for i in range(n_requests)))

    statuses, rss = [], []
    for w in range(waves):
        statuses += asyncio.run(wave(w))
        rss.append(_rss_mb(pids))
    return statuses, rss


def test_load_with_disconnects_leaves_no_5xx_and_no_leaked_slots(server):
    url, state, _ = server
    engine = state.models["chat"].engine
    pids = server_pids(state)
    assert len(pids) == 2  # the engine runs in a process of its own, and its memory is counted too
    statuses, rss = run_load(url, n_requests=40, concurrency=12, pids=pids)
    assert len(statuses) == 120 and all(s == 200 for s in statuses), sorted(set(statuses))
    assert wait_until(lambda: engine.n_active == 0 and engine.queue_depth == 0, timeout=15)
    # The first wave warms allocators and caches; later waves must not keep growing.
    assert rss[2] - rss[0] < 40, rss
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.slow
def test_load_full_size(server):
    url, state, _ = server
    statuses, rss = run_load(url, n_requests=500, concurrency=32, pids=server_pids(state))
    assert all(s == 200 for s in statuses) and rss[2] - rss[0] < 40, (sorted(set(statuses)), rss)
    assert wait_until(lambda: state.models["chat"].engine.n_active == 0, timeout=30)


def test_an_unknown_engine_is_a_one_line_error(chat_base):
    r = run_cli("serve", chat_base, "--engine", "fork", "--no-auth")
    assert r.returncode == 2 and r.stderr.strip() == "error: --engine 'fork': use process or thread", r.stderr


def test_a_process_that_never_closes_its_engine_still_exits(chat_base):
    """The engine process ignores SIGTERM (the server ends it after draining), so multiprocessing's
    own exit hook could not end it: the engine closes it at interpreter exit."""
    code = (f"import functools\n"
            f"from lmforge.serve.models import build_engine\n"
            f"from lmforge.serve.worker import EngineProcess\n"
            f"b = functools.partial(build_engine, {str(chat_base)!r}, {str(tokenizer_dir_for(chat_base))!r}, "
            f"'float32', 'cpu', 2, 8)\n"
            f"e = EngineProcess(b, {CHAT_CTX}, 2, 8, threads=1).start()\n"
            f"print(len(e.generate([])))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr[-2000:]


def test_a_dead_engine_process_is_503_not_a_hang(chat_base, tmp_path):
    cfg = ServeConfig(models=[f"chat={chat_base}"], dir=tmp_path, max_seqs=2, calibrate=False, threads=1)
    state = State(cfg)
    with serving(create_app(cfg, state)) as url:
        body = {"model": "chat", "prompt": "def", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        engine = state.models["chat"].engine
        os.kill(engine._proc.pid, signal.SIGKILL)
        assert wait_until(lambda: bool(engine.down), timeout=10)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down", r.text
        assert "has stopped" in r.json()["error"]["message"]
        h = httpx.get(f"{url}/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "degraded" and "chat" in h.json()["down"]


def test_queue_full_is_429_with_retry_after(chat_base, tmp_path):
    cfg = ServeConfig(models=[f"chat={chat_base}"], dir=tmp_path, max_seqs=1, max_queue=1, calibrate=False)
    state = State(cfg)
    with serving(create_app(cfg, state)) as url:
        engine = state.models["chat"].engine
        engine.stop()  # paused: what is submitted stays queued, so the test does not race the model
        body = {"model": "chat", "prompt": "def", "max_tokens": 20, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as h:
            with h.stream("POST", "/v1/completions", json=body) as first:
                assert engine.queue_depth == 1
                r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
                engine.start()
                lines = [x for x in first.iter_lines() if x]
                assert first.status_code == 200 and lines[-1] == "data: [DONE]"
        assert wait_until(lambda: engine.n_active == 0 and engine.queue_depth == 0, timeout=10)


def test_503_while_loading(chat_base, tmp_path):
    from fastapi.testclient import TestClient

    cfg = ServeConfig(models=[str(chat_base)], dir=tmp_path, calibrate=False)
    app = create_app(cfg)  # without the lifespan the models never load: the server stays "loading"
    c = TestClient(app)
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = c.post("/v1/completions", json={"model": "x", "prompt": "y"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "loading"


def test_read_keys(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text('alice = "alice-key-1"\nbob = "bob-key-22"\n')
    assert read_keys(None, f, False, tmp_path) == {"alice-key-1": "alice", "bob-key-22": "bob"}
    f.write_text('alice = "same-key-1"\nbob = "same-key-1"\n')
    with pytest.raises(Exception, match="shares a key"):
        read_keys(None, f, False, tmp_path)
    made = read_keys(None, None, False, tmp_path / "d")  # no key given: one is made and kept
    key = (tmp_path / "d" / "api_key").read_text().strip()
    assert made == {key: "default"} and (tmp_path / "d" / "api_key").stat().st_mode & 0o777 == 0o600
    assert read_keys(None, None, False, tmp_path / "d") == made
    assert read_keys(None, None, True, tmp_path) == {}


def test_sigterm_drains_streams_and_exits_zero(chat_base, tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", f"chat={chat_base}", "--port", str(port),
                          "--no-auth", "--dir", str(tmp_path), "--no-calibrate", "--drain-timeout", "20"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        assert wait_until(up, timeout=60), p.stdout.read() if p.poll() is not None else "not ready"

        async def streams():
            started = []
            async with httpx.AsyncClient(base_url=url, timeout=60) as h:
                async def one(i):
                    body = {"model": "chat", "prompt": f"x{i}", "max_tokens": 100, "ignore_eos": True, "stream": True}
                    lines = []
                    async with h.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line:
                                lines.append(line)
                            if len(lines) == 2:
                                started.append(i)
                                if len(started) == 4:  # every stream is in flight: now stop the server,
                                    # the whole process group, as a service manager (or Ctrl-C) does:
                                    # the engine process must not die before the streams it serves.
                                    os.killpg(p.pid, signal.SIGTERM)
                    return lines
                return await asyncio.gather(*(one(i) for i in range(4)))

        results = asyncio.run(streams())
        for lines in results:
            assert lines[-1] == "data: [DONE]"
            finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
            assert finals[-1] == "length"
        assert p.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if p.poll() is None:
            p.kill()

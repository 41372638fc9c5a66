"""Continuous batching: many sequences share one forward pass per decode step.

A request waits in a bounded queue until a slot is free. Between decode steps the engine
admits waiting requests, prefills their prompts together in one batch, and then every
active sequence advances one token in one batched forward pass. A finished or cancelled
sequence frees its slot at the next step, and a new request can take it.

Each slot owns a preallocated region of one key/value cache (``slots x context`` per layer),
so no memory is allocated per request. Active sequences are kept in slots ``0..B-1``: when one
leaves, the last one's cache moves into its slot (one copy of one sequence), so a decode step
reads a contiguous slice of the cache instead of gathering rows. Paged blocks would save
memory when contexts are long and sequences short, and pay when memory rather than compute
limits the batch. At this project's sizes it is compute: 64 slots of a depth-6 model at
context 512 take 604 MB in fp32, allocated once.

Sampling parameters, stop tokens, stop strings and the token budget are per sequence.
The engine is plain Python: ``Engine(model, tok).generate([GenRequest(...)])`` needs no
server; :meth:`Engine.start` runs the same loop on a thread for a server to feed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model.generate import filter_logits

log = logging.getLogger("lmforge.serve")


class QueueFull(LmforgeError):
    """The engine's queue holds ``max_queue`` requests already."""


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the text
    stop_ids: tuple[int, ...] = ()  # stop tokens (eos, end of turn), excluded too
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k


@dataclass
class Event:
    """What one step produced for one sequence: new text (possibly empty) and, at the end, why."""

    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top": [(token, logprob)]}
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None


class _Seq:
    __slots__ = ("req", "on_event", "id", "out", "pos", "next_token", "gen", "text", "sent", "prefix_at", "read_at",
                 "pending_lp", "cancelled", "finish")

    def __init__(self, req: GenRequest, on_event, sid: int):
        self.req, self.on_event, self.id = req, on_event, sid
        self.out: list[int] = []  # generated tokens (stop token excluded)
        self.pos = 0  # tokens in this sequence's cache
        self.next_token: int | None = None  # sampled, not yet in the cache
        self.gen = torch.Generator().manual_seed(req.seed if req.seed is not None else torch.seed() % 2**63)
        self.text = ""  # decoded so far
        self.sent = 0  # characters of ``text`` already emitted
        self.prefix_at = self.read_at = 0  # incremental decoding: context start, end of decoded tokens
        self.pending_lp: list[dict] = []
        self.cancelled = False
        self.finish: str | None = None


class Handle:
    """A submitted request: cancel it, or wait for its completion (without a callback)."""

    def __init__(self, seq: _Seq):
        self._seq = seq
        self.done = threading.Event()
        self.completion: Completion | None = None

    def cancel(self) -> None:
        self._seq.cancelled = True


class SlotCache:
    """Per-layer K/V buffers of shape (slots, n_kv_head, context, head_dim), read and written
    through the same ``layer(i).update`` / ``advance`` interface as :class:`lmforge.model.model.KVCache`."""

    def __init__(self, cfg, slots: int, device, dtype):
        shape = (slots, cfg.n_kv_head, cfg.context, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.rows = slice(0, 0)
        self.write_pos: torch.Tensor | None = None  # decode: one position per row; prefill: None
        self.read_len = 0
        self.length = 0  # unused: callers always pass positions

    def prefill(self, first: int, n: int, length: int) -> None:
        self.rows, self.write_pos, self.read_len = slice(first, first + n), None, length

    def decode(self, n: int, pos: torch.Tensor) -> None:
        self.rows, self.write_pos, self.read_len = slice(0, n), pos, int(pos.max()) + 1

    def move(self, src: int, dst: int, length: int) -> None:
        for buf in (*self.k, *self.v):
            buf[dst, :, :length] = buf[src, :, :length]

    def layer(self, i: int) -> "_SlotLayer":
        return _SlotLayer(self, i)

    def advance(self, n: int) -> None:
        pass


class _SlotLayer:
    def __init__(self, cache: SlotCache, i: int):
        self.c, self.i = cache, i

    def update(self, k, v):
        c = self.c
        Kall, Vall = c.k[self.i], c.v[self.i]
        if c.write_pos is None:
            K, V = Kall[c.rows], Vall[c.rows]
            K[:, :, : k.shape[2]] = k
            V[:, :, : v.shape[2]] = v
            return K[:, :, : c.read_len], V[:, :, : c.read_len]
        # Decode rows are slots 0..n-1: written in the whole buffer, in place (a compiled step then
        # mutates the cache rather than copying it).
        rows = torch.arange(k.shape[0], device=k.device)
        Kall[rows, :, c.write_pos] = k[:, :, 0]
        Vall[rows, :, c.write_pos] = v[:, :, 0]
        n = k.shape[0]
        return Kall[:n, :, : c.read_len], Vall[:n, :, : c.read_len]


class Engine:
    """Continuous batching over one model. ``max_seqs`` sequences decode together; up to
    ``max_queue`` more wait. ``decode(ids) -> str`` turns tokens into text (a tokenizer's decode)."""

    down = ""  # why the engine can serve no more ("" here: a failing step fails its requests, not the engine)

    def __init__(self, model, decode: Callable[[list[int]], str], max_seqs: int = 16, max_queue: int = 256,
                 prefill_tokens: int = 4096, token_text: Callable[[int], str] | None = None, compile: bool = False):
        check_limits(max_seqs, max_queue)
        self.model = model.eval()
        self.cfg = model.cfg
        self.decode_ids = decode
        self.token_text = token_text or (lambda t: decode([t]))
        self.max_seqs, self.max_queue, self.prefill_tokens = max_seqs, max_queue, prefill_tokens
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = SlotCache(self.cfg, max_seqs, self.device, self.dtype)
        self.waiting: deque[_Seq] = deque()
        self.active: list[_Seq] = []  # active[i] lives in cache slot i
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.tokens_in = self.tokens_out = self.steps = 0
        # Compiling fuses the decode step's many small ops (norms, RoPE, residuals): a step of a small
        # model is mostly per-op overhead. Prefill stays eager: its shapes vary more, and it is rarer.
        self._forward = torch.compile(model, dynamic=True) if compile else model

    # -- submission (any thread)
    def submit(self, req: GenRequest, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue ``req``. ``on_event`` is called from the engine's thread for every step that
        produced text and once more at the end (``finish_reason`` set). Raises :class:`QueueFull`."""
        self.check(req)
        seq = _Seq(req, None, next(self._ids))
        handle = Handle(seq)
        seq.on_event = completing(handle, on_event, req.logprobs is not None)
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            self.waiting.append(seq)
        self._wake.set()
        return handle

    def check(self, req: GenRequest) -> None:
        check_request(req, self.cfg.context)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def n_active(self) -> int:
        return len(self.active)

    # -- the loop
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()

    def reset_counters(self) -> None:
        self.tokens_in = self.tokens_out = self.steps = 0

    def warm_up(self) -> None:
        """Decode a batch of one and of two: a compiled step compiles once for each (a batch of one is
        specialised), and what is measured or served afterwards does not wait for it."""
        req = GenRequest([0] * 4, max_tokens=3, temperature=0)
        self.generate([req])
        if self.max_seqs > 1:
            self.generate([req, req])
        self.reset_counters()

    def _loop(self) -> None:
        while not self._stop:
            if not self.guarded_step():
                self._wake.wait(0.05)
                self._wake.clear()

    def guarded_step(self) -> bool:
        """:meth:`step`, except that a failing step fails what is in flight instead of raising: a bug
        must not leave clients waiting forever."""
        try:
            return self.step()
        except Exception:
            log.exception("engine step failed; failing %d active and %d waiting requests",
                          len(self.active), len(self.waiting))
            self._fail_all()
            return False

    def _fail_all(self) -> None:
        with self._lock:
            seqs, self.active = self.active + list(self.waiting), []
            self.waiting.clear()
        for s in seqs:
            s.on_event(Event("", list(s.out), None, "error", len(s.req.prompt), len(s.out)))

    def generate(self, requests: list[GenRequest]) -> list[Completion]:
        """Run ``requests`` to completion (on the calling thread unless :meth:`start` was called)."""
        handles = submit_all(self, requests, self.step if self._thread is None else lambda: time.sleep(0.01))
        if self._thread is not None:
            for h in handles:
                h.done.wait()
        while not all(h.done.is_set() for h in handles):
            self.step()
        return [h.completion for h in handles]

    @torch.no_grad()
    def step(self) -> bool:
        """Drop cancelled sequences, admit and prefill waiting ones, decode one token for all."""
        self._retire(lambda s: s.cancelled, "cancelled")
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
            self._retire(lambda s: s.finish is not None)
        if not self.active:
            return bool(admitted)
        self._decode()
        self._retire(lambda s: s.finish is not None)
        self.steps += 1
        return True

    def _admit(self) -> list[_Seq]:
        out, budget = [], self.prefill_tokens
        with self._lock:
            while self.waiting and len(self.active) + len(out) < self.max_seqs:
                seq = self.waiting[0]
                if seq.cancelled:
                    self.waiting.popleft()
                    seq.finish = "cancelled"
                    seq.on_event(Event("", [], finish_reason="cancelled"))  # never prefilled: nothing to bill
                    continue
                if out and len(seq.req.prompt) > budget:
                    break
                budget -= len(seq.req.prompt)
                out.append(self.waiting.popleft())
        return out

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Prefill in groups of similar length: one padded batch of a 10- and a 120-token prompt would
        compute 240 tokens for 130, so a group grows only while padding stays under a quarter."""
        seqs = sorted(seqs, key=lambda s: len(s.req.prompt))
        group: list[_Seq] = []
        real = 0
        for s in seqs:
            n = len(s.req.prompt)
            if group and n * (len(group) + 1) > 1.25 * (real + n):
                self._prefill_group(group)
                group, real = [], 0
            group.append(s)
            real += n
        self._prefill_group(group)

    def _prefill_group(self, seqs: list[_Seq]) -> None:
        first, n = len(self.active), len(seqs)
        self.active.extend(seqs)
        lens = torch.tensor([len(s.req.prompt) for s in seqs], device=self.device)
        P = int(lens.max())
        idx = torch.zeros((n, P), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            idx[i, : len(s.req.prompt)] = torch.tensor(s.req.prompt, device=self.device)
        ar = torch.arange(P, device=self.device)
        # Right-padded rows: a pad query still sees key 0, so no row of the mask is empty.
        mask = (ar[None, :] <= ar[:, None])[None, None] & (ar[None, None, None, :] < lens[:, None, None, None])
        self.cache.prefill(first, n, P)
        h = self.model.hidden(idx, cache=self.cache, positions=ar.expand(n, P), attn_mask=mask)
        logits = self.model.lm_head(h[torch.arange(n), lens - 1]).float()
        for s in seqs:
            s.pos = len(s.req.prompt)
        self.tokens_in += int(lens.sum())
        self._sample(seqs, logits)

    def _decode(self) -> None:
        seqs = self.active
        n = len(seqs)
        pos = torch.tensor([s.pos for s in seqs], device=self.device)
        idx = torch.tensor([[s.next_token] for s in seqs], device=self.device)
        self.cache.decode(n, pos)
        keys = torch.arange(self.cache.read_len, device=self.device)
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]
        logits = self._forward(idx, cache=self.cache, positions=pos[:, None], attn_mask=mask)[:, -1].float()
        for s in seqs:
            s.pos += 1
        self._sample(seqs, logits)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        want_lp = [s.req.logprobs is not None for s in seqs]
        logp = F.log_softmax(logits, -1) if any(want_lp) else None
        greedy = logits.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            r = s.req
            if r.temperature <= 0:
                t = greedy[i]
            else:
                row = filter_logits(logits[i : i + 1] / r.temperature, r.top_k, r.top_p)
                t = int(torch.multinomial(row.softmax(-1), 1, generator=s.gen))
            if t in r.stop_ids:
                self._finish(s, "stop")
                continue
            s.out.append(t)
            s.next_token = t
            self.tokens_out += 1
            if want_lp[i]:
                top = torch.topk(logp[i], r.logprobs).indices.tolist() if r.logprobs else []
                s.pending_lp.append({"token": self.token_text(t), "id": t, "logprob": float(logp[i, t]),
                                     "top": [(self.token_text(j), j, float(logp[i, j])) for j in top]})
            self._advance_text(s)

    def _advance_text(self, s: _Seq) -> None:
        r = s.req
        # Decode only the newest tokens (after a few of context): decoding the whole answer at every
        # step would cost O(n^2). A token that ends mid-character waits for the next one.
        head = self.decode_ids(s.out[s.prefix_at : s.read_at])
        both = self.decode_ids(s.out[s.prefix_at :])
        if len(both) > len(head) and not both.endswith("\ufffd"):
            s.text += both[len(head) :]
            s.prefix_at, s.read_at = s.read_at, len(s.out)
        for stop in r.stop:
            at = s.text.find(stop, max(0, s.sent - len(stop)))
            if at >= 0:
                s.text = s.text[:at]
                s.finish = "stop"
                return
        if len(s.out) >= r.max_tokens or s.pos >= self.cfg.context:
            self._finish(s, "length")
            return
        # Hold back anything that could be the start of a stop string.
        safe = len(s.text) - (max((len(x) for x in r.stop), default=1) - 1)
        if safe > s.sent:
            s.on_event(Event(s.text[s.sent : safe], [], s.pending_lp or None))
            s.sent, s.pending_lp = safe, []

    def _finish(self, s: _Seq, reason: str) -> None:
        """End ``s`` at a stop token or its budget: its text is the whole decoded answer (bytes held
        back for an unfinished character included). A stop string sets ``finish`` itself instead."""
        if s.finish is None:
            s.finish = reason
            s.text = self.decode_ids(s.out)

    def _retire(self, done: Callable[[_Seq], bool], reason: str | None = None) -> None:
        i = 0
        while i < len(self.active):
            s = self.active[i]
            if not done(s):
                i += 1
                continue
            s.finish = s.finish or reason
            last = self.active.pop()
            if last is not s:
                self.cache.move(len(self.active), i, last.pos)
                self.active[i] = last
            rest = s.text[s.sent :] if s.finish != "cancelled" else ""
            s.sent = len(s.text)
            s.on_event(Event(rest, list(s.out), s.pending_lp or None, s.finish, len(s.req.prompt), len(s.out)))


def submit_all(engine, requests: list[GenRequest], while_full: Callable[[], object]) -> list:
    """Submit every request to ``engine``, calling ``while_full`` (step, or wait) while its queue is full."""
    handles = []
    for r in requests:
        while True:
            try:
                handles.append(engine.submit(r))
                break
            except QueueFull:
                while_full()
    return handles


def check_limits(max_seqs: int, max_queue: int) -> None:
    if max_seqs < 1 or max_queue < 0:
        raise LmforgeError("max_seqs must be >= 1 and max_queue >= 0")


def check_request(req: GenRequest, context: int) -> None:
    if not req.prompt:
        raise LmforgeError("the prompt has no tokens")
    if req.max_tokens < 1:
        raise LmforgeError("max_tokens must be at least 1")
    over = len(req.prompt) + req.max_tokens - context
    if over > 0:
        raise LmforgeError(f"the prompt ({len(req.prompt)} tokens) plus max_tokens ({req.max_tokens}) exceeds the "
                           f"model's context of {context} tokens by {over}")


def completing(handle, on_event, want_logprobs: bool):
    """Wrap ``on_event`` so ``handle`` (anything with ``done`` and ``completion``) collects the whole
    completion and is marked done at the end."""
    parts: list[str] = []
    lps: list[dict] = []

    def cb(ev: Event) -> None:
        parts.append(ev.text)
        if ev.logprobs:
            lps.extend(ev.logprobs)
        try:
            if on_event is not None:
                on_event(ev)
        finally:  # a failing handler must not leave a waiter on the handle for ever
            if ev.finish_reason is not None:
                handle.completion = Completion("".join(parts), ev.token_ids, ev.finish_reason, ev.prompt_tokens,
                                               ev.completion_tokens, lps if want_logprobs else None)
                handle.done.set()

    return cb

"""The models a server holds: each one loaded once, in the chosen precision, behind its own engine.

An engine runs on a thread of the server's process (``engine="thread"``) or in a process of its own
(``engine="process"``, the server's default: there the decode never waits for the HTTP side's GIL).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.cost.hw import bf16_supported_on_cpu
from lmforge.cost.ledger import inference_cost
from lmforge.errors import LmforgeError
from lmforge.model.io import load_config, load_model
from lmforge.post.base import resolve_base
from lmforge.post.chats import chat_token_ids
from lmforge.serve.engine import Engine, GenRequest
from lmforge.serve.worker import EngineProcess
from lmforge.tokenizer.io import load_tokenizer, special_ids

GENERIC_NAMES = {"train", "model", "final", "base", "hf"}


@dataclass
class ServedModel:
    name: str
    source: str  # what the user named
    weights_hash: str
    engine: Engine | EngineProcess
    tok: object
    eos: int
    chat_ids: dict | None  # None: a base model without the chat tokens; /v1/chat/completions refuses it
    precision: str
    context: int
    usd_per_mtok_out: float = 0.0
    usd_per_mtok_in: float = 0.0
    decode_tok_s: float = 0.0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


def model_name(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH``; a path's name is its last part, or the last two when the last is generic
    (``runs/default/train`` is served as ``default-train``)."""
    name, eq, path = spec.partition("=")
    if eq and name and "/" not in name:
        return name, path
    p = Path(spec)
    parts = [x for x in p.parts if x not in ("/", ".", "..")]
    if not parts:
        raise LmforgeError(f"MODEL {spec!r}: name a model directory")
    return ("-".join(parts[-2:]) if parts[-1] in GENERIC_NAMES and len(parts) > 1 else parts[-1]), spec


def pick_dtype(precision: str) -> torch.dtype:
    if precision not in ("auto", "bf16", "fp32"):
        raise LmforgeError(f"--precision {precision!r}: use auto, bf16 or fp32")
    if precision == "auto":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported() or bf16_supported_on_cpu()
        return torch.bfloat16 if ok else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


ENGINES = ("process", "thread")


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise LmforgeError(f"--engine {engine!r}: use process or thread")


def load_served(spec: str, work_dir: Path, max_seqs: int, max_queue: int, precision: str = "auto",
                device: str = "cpu", engine: str = "thread", threads: int = 0, compile: bool = False) -> ServedModel:
    """``engine``: "thread" loads the model here; "process" leaves it to the engine's own process,
    which loads it on ``start()``. ``compile``: the decode step through ``torch.compile``."""
    check_engine(engine)
    name, path = model_name(spec)
    base = resolve_base(path, work_dir / "models" / name, flag="MODEL")
    tok = base.tokenizer()
    dtype = pick_dtype(precision)
    try:
        chat_ids = chat_token_ids(tok)
    except LmforgeError:
        chat_ids = None
    eos = special_ids(tok)["eos"]
    args = (str(base.model_dir), str(base.tok_dir), str(dtype).removeprefix("torch."), device, max_seqs)
    if engine == "process":
        context = load_config(base.model_dir).context
        # The child enforces no queue limit of its own: the parent counts what it has sent.
        eng = EngineProcess(functools.partial(build_engine, *args, 1 << 30, compile), context, max_seqs, max_queue,
                            threads)
    else:
        eng = build_engine(*args, max_queue, compile)
        context = eng.cfg.context
    return ServedModel(name, str(path), base.weights_hash, eng, tok, eos, chat_ids,
                       "bf16" if dtype == torch.bfloat16 else "fp32", context)


def build_engine(model_dir: str, tok_dir: str, dtype: str, device: str, max_seqs: int, max_queue: int,
                 compile: bool = False) -> Engine:
    """Load a model and its tokenizer behind a new engine (module-level, so a child process can run it).
    A compiled engine is warmed up here, so no request waits for the compiler."""
    tok = load_tokenizer(tok_dir)
    model = load_model(model_dir, device=device).to(getattr(torch, dtype))
    engine = Engine(model, lambda ids: tok.decode(ids, skip_special_tokens=False), max_seqs=max_seqs,
                    max_queue=max_queue, token_text=lambda t: tok.decode([t], skip_special_tokens=False),
                    compile=compile)
    if compile:
        try:
            engine.warm_up()
        except Exception as e:  # inductor needs a working C++ compiler (or Triton on a GPU)
            raise LmforgeError(f"--compile: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); serve "
                               "without --compile, or install a C++ compiler (g++)") from e
    return engine


def calibrate(m: ServedModel, hardware: str = "cpu", steps: int = 8) -> None:
    """Measure decode and prefill throughput at a full batch (about a second) and price both per
    million tokens from the hardware catalog, for the startup line and the usage ledger."""
    e = m.engine
    prompt_len = min(32, m.context // 4)
    steps = max(2, min(steps, m.context - prompt_len))
    reqs = [GenRequest([m.eos] * prompt_len, max_tokens=steps, temperature=0, seed=0) for _ in range(e.max_seqs)]
    e.generate(reqs[:1])  # warm-up
    t0 = time.perf_counter()
    e.generate([GenRequest([m.eos] * prompt_len, max_tokens=1, temperature=0) for _ in range(e.max_seqs)])
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    e.generate(reqs)
    t_all = time.perf_counter() - t0
    m.decode_tok_s = e.max_seqs * (steps - 1) / max(1e-6, t_all - t_prefill)
    prefill_tok_s = e.max_seqs * prompt_len / max(1e-6, t_prefill)
    m.usd_per_mtok_out = inference_cost(m.decode_tok_s, hardware)["usd_per_million_tokens"]
    m.usd_per_mtok_in = inference_cost(prefill_tok_s, hardware)["usd_per_million_tokens"]
    e.reset_counters()

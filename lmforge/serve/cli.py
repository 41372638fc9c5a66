"""``lmforge serve``: a thin wrapper over :func:`lmforge.serve.app.run_server`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

import asyncio

from lmforge.errors import LmforgeError
from lmforge.knowledge.augment import open_knowledge
from lmforge.knowledge.index import open_index
from lmforge.route.config import load_router
from lmforge.route.evaluate import calibration_prompts
from lmforge.route.router import Router
from lmforge.serve.app import ServeConfig, State, read_keys, run_server
from lmforge.serve.models import check_engine


def serve_cmd(
    models: Optional[List[str]] = typer.Argument(None, help="Models to serve: an lmforge run or model directory, an HF export "
                                       "or an import-hf directory; NAME=PATH chooses the name clients use."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; the default is reachable from this "
                             "machine only. 0.0.0.0 serves the network (keep an API key on)."),
    port: int = typer.Option(8000, "--port", "-p"),
    dir: Path = typer.Option(Path("runs/serve"), "--dir", help="Where the usage ledger (usage.jsonl) and a "
                             "generated API key are kept."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMFORGE_API_KEY",
                                          help="The key clients send as 'Authorization: Bearer KEY' (user 'default')."),
    api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="A TOML or JSON file of user = key pairs: "
                                            "several users, each with their own usage."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Accept requests without a key."),
    max_seqs: int = typer.Option(16, "--max-seqs", help="Sequences decoded together (continuous batching)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests that may wait for a slot; more get 429."),
    max_body: int = typer.Option(1 << 20, "--max-body", help="Largest request body in bytes; more gets 413."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="On SIGTERM, seconds to let streams finish."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where the CPU/GPU has it), bf16 or fp32."),
    threads: int = typer.Option(0, "--threads", help="Torch compute threads (0: torch's default). On a small "
                                "machine one fewer than the cores leaves one for the HTTP side."),
    engine: str = typer.Option("process", "--engine", help="process: each model's engine runs in a process of its "
                               "own, so decoding never waits on the HTTP side (Python's GIL); thread: in the "
                               "server's process (one process, less memory, slower under load)."),
    compile: bool = typer.Option(False, "--compile", help="Run the decode step through torch.compile: fused "
                                 "small ops, faster steps for small models (measured in docs/serving.md), at the "
                                 "cost of tens of seconds of compiling at startup. Needs a C++ compiler on CPU."),
    hardware: str = typer.Option("cpu", "--hardware", help="Hardware catalog entry that prices tokens."),
    router: Optional[Path] = typer.Option(None, "--router", help="A router file (TOML): one model name in front "
                                          "of a small and a large tier; see `lmforge router --help`."),
    knowledge: Optional[Path] = typer.Option(None, "--knowledge", help="An index from `lmforge index`: each chat "
                                             "turn gets the top chunks in its prompt and the answer cites them."),
    knowledge_k: int = typer.Option(4, "--knowledge-k", help="Chunks retrieved per user turn."),
    knowledge_tokens: Optional[int] = typer.Option(None, "--knowledge-tokens", help="Token budget for the quoted "
                                                   "chunks (default: a third of the smallest served context)."),
    no_calibrate: bool = typer.Option(False, "--no-calibrate", help="Skip the one-second throughput measurement "
                                      "that prices tokens (the ledger then records $0)."),
):
    """Serve models over an OpenAI-compatible API, with a web chat at / and Prometheus metrics.

    Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/usage
    (the caller's own usage), GET /health, GET /metrics. Requests from many clients are batched
    together as they arrive (continuous batching); SIGTERM drains and exits 0.

    Examples:
      lmforge serve runs/sft-d3 --api-key secret123
      lmforge serve small=runs/default/train big=runs/sft-d3 --port 8080 --api-keys keys.toml
      curl -H 'Authorization: Bearer secret123' localhost:8000/v1/models
    """
    check_engine(engine)
    if max_seqs < 1 or max_queue < 0 or max_body < 1 or threads < 0:
        raise LmforgeError("--max-seqs and --max-body must be at least 1, --max-queue and --threads at least 0")
    specs = list(models or [])
    routed = None
    if router is not None:
        routed = Router(load_router(router))
        routed.check()
        specs += [f"{name}={path}" for name, path in routed.local_models().items()]
    if not specs:
        raise LmforgeError("name at least one MODEL to serve, or a --router whose tiers are local models")
    keys = read_keys(api_key, api_keys, no_auth, dir)
    if host not in ("127.0.0.1", "localhost", "::1") and not keys:
        print(f"warning: serving on {host} without an API key: anyone who can reach it can use it", flush=True)
    cfg = ServeConfig(models=specs, host=host, port=port, dir=dir, api_keys=keys, max_seqs=max_seqs,
                      max_queue=max_queue, max_body=max_body, drain_timeout=drain_timeout, precision=precision,
                      hardware=hardware, calibrate=not no_calibrate, banner=True, threads=threads,
                      engine=engine, compile=compile)
    state = State(cfg)
    if knowledge is not None:
        open_index(knowledge).close()  # a bad path fails now, not at the first request
        state.on_ready.append(lambda st: attach_knowledge(st, knowledge, knowledge_k, knowledge_tokens))
    if routed is not None:
        state.virtual[routed.name] = routed
        if routed.threshold is None:
            state.on_ready.append(lambda st: calibrate_router(routed, st))
    raise typer.Exit(run_server(cfg, state))


def calibrate_router(router: Router, state: State) -> None:
    prompts = calibration_prompts(router.cfg.calibration)
    t = asyncio.run(router.calibrate(state.models, prompts))
    print(f"router {router.name}: threshold {t:.4f} escalates {router.cfg.target_escalation:.0%} of "
          f"{len(prompts)} calibration prompts", flush=True)


def attach_knowledge(state: State, path: Path, k: int, budget: Optional[int]) -> None:
    """Retrieval for every chat request, counted in the tokens of the served model with the smallest context."""
    m = min(state.models.values(), key=lambda x: x.context)
    state.knowledge = open_knowledge(path, lambda text: len(m.encode(text)), m.context, k, budget)

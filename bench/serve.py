"""Serving throughput and latency: ``lmforge serve`` under load against static-batch generation, side by side.

    python bench/serve.py                                  # d3 and d6 random-init models, concurrency 1,4,16,64
    python bench/serve.py --quick                          # smoke test: d3 only, concurrency 1,4, short requests
    python bench/serve.py --model runs/default/train --concurrency 1,16 --json serve.json --llama-cpp

A load generator in the style of ``vllm bench serve``, over HTTP on loopback. For each model,
``lmforge serve`` runs as a subprocess (--no-calibrate, --max-seqs = the largest concurrency,
--engine process and --compile unless --engine thread / --no-compile say otherwise);
for each concurrency C, C client threads send a fixed, seeded list of requests (max(8, 4*C)
by default; each client sends its next request when its last one finished) to
/v1/completions with ``stream: true``, ``ignore_eos: true`` and temperature 0. Prompts are
8..128 tokens of standard-library source, outputs uniform in 16..256 tokens. Per request:
TTFT (first chunk with text), TPOT ((e2e - TTFT) / (tokens - 1)) and end-to-end latency.

Then the server is stopped and, in this process, on the same model, precision, threads and
requests, cut into static batches of C in order:

  hf generate       transformers AutoModelForCausalLM.generate on the lmforge export (left padding)
  lmforge generate  lmforge.model.generate.generate (no eos, so every row runs to the batch's longest)
  llama.cpp         (--llama-cpp) llama-cpp-python on the GGUF export, one request at a time

A static batch runs until its longest request is done, so only each request's own max_tokens
count as output: the padding it decodes past a shorter request's end is paid for, not counted.
The default models have random weights (throughput does not depend on them): lmforge run's shape
(runs/default/train/model_config.json, else depth 3) and depth 6, both at context 512, with
runs/default's tokenizer (else one trained on stdlib source). Every way uses the same torch
threads, by default one fewer than torch's default: the client threads and the server's HTTP loop
share the machine. As a check, the server's greedy text is compared with lmforge generate's.
The issue's targets, per model: at C=16 the server's output tok/s >= 2x HF generate's, and its
TTFT p50 <= 3x that at C=1.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.cost.hw import bf16_supported_on_cpu, cpu_name  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.model.generate import SampleConfig, generate  # noqa: E402
from lmforge.model.io import CONFIG, load_config, load_model, save_model  # noqa: E402
from lmforge.model.model import ModelConfig, build_model, param_counts  # noqa: E402
from lmforge.rundir import Manifest  # noqa: E402
from lmforge.serve.models import model_name, pick_dtype  # noqa: E402
from lmforge.tokenizer.io import load_tokenizer, special_ids, tokenizer_dir_for  # noqa: E402

CONTEXT = 512  # prompts of up to 128 tokens plus outputs of up to 256 fit
DEFAULT_RUN = ROOT / "runs" / "default" / "train"
FALLBACK_SHAPE = {"depth": 3, "d_model": 192, "n_head": 3, "d_ff": 512, "vocab_size": 8192}
SHAPE_KEYS = ("depth", "aspect", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "tie_embeddings",
              "rope_theta", "norm_eps")
API_KEY = "bench-serve-key"


@dataclass
class Req:
    text: str
    ids: list[int]  # what the server prefills: eos, then the encoded text
    max_tokens: int


# ----------------------------------------------------------------------------- models and requests


def tokenizer_for_bench(work: Path) -> Path:
    """The tokenizer of ``lmforge run`` when there is one, else a small one trained on stdlib source."""
    try:
        tok_dir = tokenizer_dir_for(DEFAULT_RUN)
        if (tok_dir / "tokenizer.json").exists():
            return tok_dir
    except LmforgeError:
        pass
    from lmforge.data.corpus import write_stdlib_sample
    from lmforge.data.prepare import prepare_data
    from lmforge.tokenizer.train import train_tokenizer

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        corpus = write_stdlib_sample(work / "corpus", 1_000_000)
        prepare_data([str(corpus)], work / "data", progress=False)
        train_tokenizer(work / "data", tok_dir, vocab_size=2048, progress=False)
    return tok_dir


def default_configs() -> list[ModelConfig]:
    """``lmforge run``'s shape and depth 6 at the same aspect, both at context CONTEXT."""
    if (DEFAULT_RUN / CONFIG).exists():
        c = load_config(DEFAULT_RUN)
        shape = {k: getattr(c, k) for k in SHAPE_KEYS}
    else:
        shape = dict(FALLBACK_SHAPE)
    small = ModelConfig(**{**shape, "context": CONTEXT})
    big = ModelConfig(depth=6, aspect=small.aspect, vocab_size=small.vocab_size, context=CONTEXT,
                      tie_embeddings=small.tie_embeddings)
    return [small, big]


def write_model(cfg: ModelConfig, out: Path, tok_dir: Path) -> Path:
    """A random-initialised model directory whose manifest names its tokenizer, as a train run's does."""
    torch.manual_seed(0)
    save_model(build_model(cfg), out)
    man = Manifest(out, "bench", {"model": asdict(cfg), "weights": "random init"})
    man.add_input("tokenizer", tok_dir)
    man.finish()
    return out


def source_ids(tok) -> list[int]:
    """Token ids of ~200 KB of standard-library source: prompt text that tokenizes like real text."""
    parts, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
        if total > 200_000:
            break
    return tok.encode("\n".join(parts), add_special_tokens=False).ids


def make_requests(tok, n: int, prompt_range, out_range, seed: int = 0) -> list[Req]:
    rng = random.Random(seed)
    ids, eos = source_ids(tok), special_ids(tok)["eos"]
    reqs = []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        at = rng.randrange(len(ids) - length)
        text = tok.decode(ids[at:at + length])
        # Encoded again as the server does it, so every way prefills exactly the same tokens.
        reqs.append(Req(text, [eos] + tok.encode(text, add_special_tokens=False).ids, rng.randint(*out_range)))
    return reqs


def fit_context(reqs: list[Req], context: int) -> list[Req]:
    """Shorten outputs that would not fit a model of a smaller context (a --model run)."""
    return [Req(r.text, r.ids, min(r.max_tokens, context - len(r.ids))) for r in reqs]


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, model_dir: Path, work: Path, port: int, max_seqs: int, precision: str,
                 threads: int, compile: bool = True, engine: str = "process") -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = work / f"serve-{name}.log"
    cmd = [sys.executable, "-m", "lmforge", "serve", f"{name}={model_dir}", "--port", str(port),
           "--api-key", API_KEY, "--dir", str(work / "serve"), "--max-seqs", str(max_seqs),
           "--precision", precision, "--no-calibrate", "--engine", engine] + (["--compile"] if compile else [])
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    return proc, log


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmforge serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            body = json.loads(resp.read() or b"{}")
            conn.close()
            if resp.status == 200:
                return
            if body.get("status") == "failed":
                raise RuntimeError(f"lmforge serve failed to load: {body.get('error')}")
        except (OSError, http.client.HTTPException, json.JSONDecodeError):
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"lmforge serve not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stream_one(port: int, model: str, req: Req) -> dict:
    """One streamed completion; times measured from just before the request is sent."""
    body = json.dumps({"model": model, "prompt": req.text, "max_tokens": req.max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    ttft, tokens, error, text = None, 0, None, []
    try:
        conn.request("POST", "/v1/completions", body, headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"}
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"].get("message")
            parts = [c["text"] for c in chunk.get("choices", []) if c.get("text")]
            if parts and ttft is None:
                ttft = time.perf_counter() - t0
            text += parts
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        e2e = time.perf_counter() - t0
    except (OSError, http.client.HTTPException) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()
    if error or ttft is None:
        return {"error": error or "no text streamed"}
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "wanted": req.max_tokens, "text": "".join(text),
            "tpot": (e2e - ttft) / (tokens - 1) if tokens > 1 else None}


def run_load(port: int, model: str, reqs: list[Req], concurrency: int) -> tuple[list[dict], float]:
    """Closed loop: ``concurrency`` clients, each sending its next request when its last one ends."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        t0 = time.perf_counter()
        out = list(pool.map(lambda r: stream_one(port, model, r), reqs))
        wall = time.perf_counter() - t0
    return out, wall


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summarize_load(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    tpots = [r["tpot"] for r in ok if r["tpot"] is not None]
    s = {"requests": len(records), "failed": len(records) - len(ok),
         "short": sum(r["tokens"] != r["wanted"] for r in ok),  # ignore_eos should make this 0
         "output_tokens": tokens, "seconds": wall, "output_tok_s": tokens / wall, "req_s": len(ok) / wall}
    for key in ("ttft", "tpot", "e2e"):
        xs = tpots if key == "tpot" else [r[key] for r in ok]
        s[f"{key}_p50"], s[f"{key}_p99"] = pct(xs, 50), pct(xs, 99)
    errors = sorted({r["error"] for r in records if "error" in r})
    if errors:
        s["errors"] = errors[:5]
    return s


def bench_server(name: str, model_dir: Path, work: Path, args, sets: dict[int, list[Req]]) -> tuple[dict, dict]:
    """Per concurrency: the load summary, and each request's text (None where it failed)."""
    port = free_port()
    proc, log = start_server(name, model_dir, work, port, max(sets), args.precision, args.threads, args.compile,
                             args.engine)
    try:
        t0 = time.perf_counter()
        wait_ready(proc, port, log)
        print(f"  serve      up in {time.perf_counter() - t0:.1f} s", flush=True)
        # Warm-up: the first forward passes of each shape are slow and would land in C=1's TTFT.
        warm = [Req(r.text, r.ids, 4) for r in sets[min(sets)][:4]]
        run_load(port, name, warm, len(warm))
        out, texts = {}, {}
        for c, reqs in sets.items():
            records, wall = run_load(port, name, reqs, c)
            out[c], texts[c] = summarize_load(records, wall), [r.get("text") for r in records]
            s = out[c]
            print(f"  serve      C={c:<3} {s['output_tok_s']:9,.0f} tok/s  {s['req_s']:6.2f} req/s  "
                  f"TTFT p50 {ms(s['ttft_p50'])}  TPOT p50 {ms(s['tpot_p50'])}"
                  + (f"  FAILED {s['failed']}: {s['errors'][0]}" if s["failed"] else ""), flush=True)
        return out, texts
    finally:
        stop_server(proc)


# ----------------------------------------------------------------------------- static-batch baselines


def batches(reqs: list[Req], size: int) -> list[list[Req]]:
    return [reqs[i:i + size] for i in range(0, len(reqs), size)]


def static_summary(useful: int, computed: int, seconds: float, n: int) -> dict:
    return {"requests": n, "output_tokens": useful, "decoded_tokens": computed, "seconds": seconds,
            "output_tok_s": useful / seconds, "req_s": n / seconds, "useful_fraction": useful / computed}


def load_hf(hf_dir: Path, dtype: torch.dtype, pad: int):
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    # No eos at all (not only ignored): every row runs to max_new_tokens, as ignore_eos does in the server.
    model.generation_config = GenerationConfig(do_sample=False, pad_token_id=pad, eos_token_id=None,
                                               bos_token_id=None)
    return model


@torch.no_grad()
def hf_static(model, reqs: list[Req], size: int, pad: int) -> dict:
    useful = computed = 0
    t0 = time.perf_counter()
    for b in batches(reqs, size):
        P, M = max(len(r.ids) for r in b), max(r.max_tokens for r in b)
        ids = torch.full((len(b), P), pad, dtype=torch.long)
        mask = torch.zeros((len(b), P), dtype=torch.long)
        for i, r in enumerate(b):  # left padding: every row's next token lands in the last column
            ids[i, P - len(r.ids):] = torch.tensor(r.ids)
            mask[i, P - len(r.ids):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=M, min_new_tokens=M)
        assert out.shape[1] == P + M, f"HF generate stopped early: {out.shape[1] - P} of {M} tokens"
        useful += sum(r.max_tokens for r in b)
        computed += len(b) * M
    return static_summary(useful, computed, time.perf_counter() - t0, len(reqs))


def lmforge_static(model, reqs: list[Req], size: int, pad: int) -> tuple[dict, list[list[int]]]:
    """The summary, and each request's own tokens (for checking the server's greedy text against)."""
    useful = computed = 0
    tokens = []
    t0 = time.perf_counter()
    for b in batches(reqs, size):
        M = max(r.max_tokens for r in b)
        out = generate(model, [r.ids for r in b], SampleConfig(max_new_tokens=M, temperature=0.0), eos_id=None,
                       pad_id=pad)
        assert all(len(o) == M for o in out), "lmforge generate stopped early"
        tokens += [o[:r.max_tokens] for o, r in zip(out, b)]
        useful += sum(r.max_tokens for r in b)
        computed += len(b) * M
    return static_summary(useful, computed, time.perf_counter() - t0, len(reqs)), tokens


def llama_cpp_one_by_one(llm, reqs: list[Req]) -> dict:
    """llama-cpp-python's Llama decodes one sequence at a time, so requests run back to back."""
    ttfts, useful = [], 0
    t0 = time.perf_counter()
    for r in reqs:
        llm.reset()
        t1 = time.perf_counter()
        n = 0
        for _ in llm.generate(r.ids, temp=0.0, top_k=1, reset=True):  # never stops by itself: count to max_tokens
            n += 1
            if n == 1:
                ttfts.append(time.perf_counter() - t1)
            if n == r.max_tokens:
                break
        useful += n
    s = static_summary(useful, useful, time.perf_counter() - t0, len(reqs))
    s["ttft_p50"] = pct(ttfts, 50)
    return s


def bench_static(name: str, model_dir: Path, work: Path, args, sets: dict[int, list[Req]],
                 pad: int) -> tuple[dict, dict]:
    """Per concurrency: each way's summary, and lmforge generate's tokens per request."""
    dtype = pick_dtype(args.precision)
    from lmforge.export.hf import export_hf

    hf = load_hf(export_hf(model_dir, work / "hf" / name), dtype, pad)
    ours = load_model(model_dir).to(dtype).eval()
    warm = [Req(r.text, r.ids, 4) for r in sets[min(sets)][:2]]
    hf_static(hf, warm, 2, pad)
    lmforge_static(ours, warm, 2, pad)
    llm = None
    if args.llama_cpp:
        llm = load_llama_cpp(model_dir, work / "gguf" / name, dtype, args.threads)
        llama_cpp_one_by_one(llm, warm[:1])
    out, tokens = {}, {}
    for c, reqs in sets.items():
        ours_c, tokens[c] = lmforge_static(ours, reqs, c, pad)
        out[c] = {"hf_generate": hf_static(hf, reqs, c, pad), "lmforge_generate": ours_c}
        if llm is not None:
            out[c]["llama_cpp"] = llama_cpp_one_by_one(llm, reqs)
        print(f"  static     C={c:<3} " + "  ".join(f"{k} {v['output_tok_s']:,.0f} tok/s" for k, v in out[c].items()),
              flush=True)
    del hf, ours, llm
    gc.collect()
    return out, tokens


def load_llama_cpp(model_dir: Path, out: Path, dtype: torch.dtype, threads: int):
    import llama_cpp

    from lmforge.export.gguf import export_gguf

    path = export_gguf(model_dir, out, dtype="bf16" if dtype == torch.bfloat16 else "f32")
    return llama_cpp.Llama(model_path=str(path), n_ctx=load_config(model_dir).context, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


# ----------------------------------------------------------------------------- report


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:,.0f} ms"


def with_ratios(serve: dict[int, dict], static: dict[int, dict], agree: dict[int, int]) -> list[dict]:
    rows = []
    for c, sv in serve.items():
        hf = static[c]["hf_generate"]["output_tok_s"]
        rows.append({"concurrency": c, "serve": sv, **static[c], "greedy_agree": agree[c],
                     "serve_over_hf": sv["output_tok_s"] / hf if hf else None})
    return rows


def agreement(texts: dict[int, list], tokens: dict[int, list], tok) -> dict[int, int]:
    """Requests whose streamed text equals lmforge generate's greedy output: continuous batching
    should compute what a static batch does (equal in fp32; bf16 rounding may flip near-ties)."""
    return {c: sum(t == tok.decode(ids, skip_special_tokens=False) for t, ids in zip(texts[c], tokens[c]))
            for c in texts}


def targets(rows: list[dict]) -> dict:
    """The issue's bars: at C=16, >= 2x HF generate's throughput and TTFT p50 <= 3x that at C=1."""
    by = {r["concurrency"]: r for r in rows}
    out = {}
    if 16 in by:
        ratio = by[16]["serve_over_hf"]
        out["throughput_2x_hf_at_16"] = {"value": ratio, "bar": 2.0, "pass": ratio is not None and ratio >= 2.0}
    if 16 in by and 1 in by:
        a, b = by[16]["serve"]["ttft_p50"], by[1]["serve"]["ttft_p50"]
        ratio = a / b if a is not None and b else None  # None: every request failed
        out["ttft_p50_16_vs_1"] = {"value": ratio, "bar": 3.0, "pass": ratio is not None and ratio <= 3.0}
    return out


def fold(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(models: list[dict], llama: bool) -> str:
    head = ["model", "C", "requests", "serve tok/s", "req/s", "TTFT p50 / p99", "TPOT p50 / p99", "e2e p50 / p99",
            "HF generate tok/s", "lmforge generate tok/s", "serve / HF"]
    if llama:
        head.insert(-1, "llama.cpp tok/s (1 at a time)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
    for m in models:
        for r in m["rows"]:
            s = r["serve"]
            cells = [m["name"], str(r["concurrency"]), str(s["requests"]), f"{s['output_tok_s']:,.0f}",
                     f"{s['req_s']:.2f}", f"{ms(s['ttft_p50'])} / {ms(s['ttft_p99'])}",
                     f"{ms(s['tpot_p50'])} / {ms(s['tpot_p99'])}",
                     f"{s['e2e_p50']:.2f} s / {s['e2e_p99']:.2f} s" if s["e2e_p50"] is not None else "-",
                     f"{r['hf_generate']['output_tok_s']:,.0f} ({r['hf_generate']['useful_fraction']:.0%} useful)",
                     f"{r['lmforge_generate']['output_tok_s']:,.0f}",
                     fold(r["serve_over_hf"])]
            if llama:
                cells.insert(-1, f"{r['llama_cpp']['output_tok_s']:,.0f}" if "llama_cpp" in r else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_targets(models: list[dict]) -> None:
    for m in models:
        t = m["targets"]
        if "throughput_2x_hf_at_16" in t:
            x = t["throughput_2x_hf_at_16"]
            print(f"{'PASS' if x['pass'] else 'FAIL'} {m['name']}: serve at C=16 is {fold(x['value'])} HF generate "
                  "at batch 16 (bar: >= 2x)")
        else:
            print(f"SKIP {m['name']}: concurrency 16 not run, no throughput target")
        if "ttft_p50_16_vs_1" in t:
            x = t["ttft_p50_16_vs_1"]
            print(f"{'PASS' if x['pass'] else 'FAIL'} {m['name']}: TTFT p50 at C=16 is {fold(x['value'])} that at "
                  "C=1 (bar: <= 3x)")
        else:
            print(f"SKIP {m['name']}: concurrency 1 and 16 not both run, no TTFT target")


# ----------------------------------------------------------------------------- main


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="DIR",
                    help="an lmforge model directory (repeatable); default: two random-init models, d3 and d6")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    ap.add_argument("--num-prompts", type=int, default=0, help="requests per concurrency (default max(8, 4*C))")
    ap.add_argument("--prompt-len", default="8,128", help="prompt tokens, uniform in LO,HI")
    ap.add_argument("--output-len", default="16,256", help="max_tokens, uniform in LO,HI")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for every way, server included (default: torch's default less one; "
                         "--quick: 1)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="serve without --compile (the decode step eager)")
    ap.add_argument("--engine", default="process", choices=("process", "thread"), help="lmforge serve --engine")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp (llama-cpp-python) on the GGUF export")
    ap.add_argument("--work", default="", help="keep models and exports here (default: a temp dir, removed)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: the small model, concurrency 1,4, 8 short requests each")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.prompt_len, args.output_len = "1,4", "8,32", "8,24"
        args.num_prompts = args.num_prompts or 8
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    args.prompt_len = tuple(int(x) for x in args.prompt_len.split(","))
    args.output_len = tuple(int(x) for x in args.output_len.split(","))
    # One core is left to the client threads and the server's HTTP loop: an OpenMP pool that spans every core
    # stalls whenever one of its workers is descheduled, and decode then slows several-fold.
    args.threads = args.threads or (1 if args.quick else max(1, torch.get_num_threads() - 1))
    return args


def prepare_models(args, work: Path, tok_dir: Path) -> list[tuple[str, Path]]:
    if args.model:
        return [(name, Path(path)) for name, path in map(model_name, args.model)]
    out = []
    # --quick smoke-tests the code paths, which the small model exercises as well as the large one.
    for cfg in default_configs()[: 1 if args.quick else None]:
        name = f"d{cfg.depth}"
        out.append((name, write_model(cfg, work / "models" / name, tok_dir)))
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lmforge-servebench-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/serve.py " + shlex.join(sys.argv[1:])
    bf16 = bf16_supported_on_cpu()
    dtype = pick_dtype(args.precision)
    print(f"cpu: {cpu_name()}  bf16 {'yes' if bf16 else 'no'}  threads {args.threads}  "
          f"precision {'bf16' if dtype == torch.bfloat16 else 'fp32'}  load average {os.getloadavg()[0]:.2f}",
          flush=True)
    try:
        tok_dir = tokenizer_for_bench(work) if not args.model else None
        models = prepare_models(args, work, tok_dir)
        results = []
        for name, model_dir in models:
            results.append(bench_model(name, Path(model_dir), work, args))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report(results, args, command, bf16, dtype)


def bench_model(name: str, model_dir: Path, work: Path, args) -> dict:
    cfg = load_config(model_dir)
    tok = load_tokenizer(tokenizer_dir_for(model_dir))
    pad = special_ids(tok)["pad"] or 0
    n_max = max(args.num_prompts or max(8, 4 * c) for c in args.concurrency)
    pool = fit_context(make_requests(tok, n_max, args.prompt_len, args.output_len, args.seed), cfg.context)
    # The first N of one seeded list: every way sees the same requests at a given concurrency.
    sets = {c: pool[:args.num_prompts or max(8, 4 * c)] for c in args.concurrency}
    random_init = (model_dir / "manifest.json").exists() and \
        json.loads((model_dir / "manifest.json").read_text()).get("stage") == "bench"
    print(f"model {name}: {model_dir}  depth {cfg.n_layer}  d_model {cfg.d_model}  heads {cfg.n_head}  "
          f"d_ff {cfg.d_ff}  vocab {cfg.vocab_size}  context {cfg.context}  "
          f"{param_counts(cfg)['total'] / 1e6:.1f}M params  {'random weights' if random_init else 'trained weights'}",
          flush=True)
    serve, texts = bench_server(name, model_dir, work, args, sets)
    static, tokens = bench_static(name, model_dir, work, args, sets, pad)
    rows = with_ratios(serve, static, agreement(texts, tokens, tok))
    return {"name": name, "path": str(model_dir), "config": asdict(cfg), "random_weights": random_init,
            "rows": rows, "targets": targets(rows)}


def report(results: list[dict], args, command: str, bf16: bool, dtype: torch.dtype) -> None:
    print()
    print(f"Output tokens/s counts only each request's own max_tokens. HF and lmforge generate run static batches of "
          f"C (in request order) to the batch's longest output, so the padding they decode is paid, not counted"
          f"{'; llama.cpp runs one request at a time' if args.llama_cpp else ''}. Prompts {args.prompt_len[0]}.."
          f"{args.prompt_len[1]} tokens, outputs {args.output_len[0]}..{args.output_len[1]}, ignore_eos, "
          f"temperature 0; {'random-init' if all(m['random_weights'] for m in results) else 'given'} weights; "
          f"same model, precision and torch threads ({args.threads}) for every way; the serve clients share the CPU. "
          f"Server: --engine {args.engine}{' --compile' if args.compile else ''}.")
    print()
    print(markdown(results, args.llama_cpp))
    print()
    for m in results:
        agree = sum(r["greedy_agree"] for r in m["rows"])
        total = sum(r["serve"]["requests"] for r in m["rows"])
        print(f"check {m['name']}: the server's greedy text equals lmforge generate's for {agree} of {total} requests")
    print_targets(results)
    print(f"\ncommand: {command}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cpu_name(), "bf16_supported": bf16, "threads": args.threads, "engine": args.engine,
            "compile": args.compile,
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "command": command,
            "concurrency": args.concurrency, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "seed": args.seed, "models": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

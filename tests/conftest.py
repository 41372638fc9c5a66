"""Shared fixtures: a tiny real corpus run through the real data and tokenizer stages."""

import os
import sys
import sysconfig
from pathlib import Path

import pytest

# Keep test processes from oversubscribing the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "glob.py", "shlex.py", "string.py",
           "colorsys.py", "calendar.py", "queue.py", "sched.py", "difflib.py", "json/encoder.py", "json/decoder.py",
           "ast.py", "dataclasses.py", "enum.py", "functools.py"]


def make_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in MODULES:
        src = STDLIB / name
        (root / name.replace("/", "_")).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data_dir, tokenizer_dir) for ~0.5 MB of stdlib code, vocab 512."""
    from lmforge.data.prepare import DataConfig, prepare_data
    from lmforge.tokenizer.encode import tokenize_data
    from lmforge.tokenizer.train import train_tokenizer

    base = tmp_path_factory.mktemp("tiny")
    corpus = make_corpus(base / "corpus")
    data_dir, tok_dir = base / "data", base / "tok"
    prepare_data([str(corpus)], data_dir, DataConfig(val_fraction=0.15, min_chars=16), progress=False)
    train_tokenizer(data_dir, tok_dir, vocab_size=512, progress=False)
    tokenize_data(data_dir, tok_dir, progress=False)
    return data_dir, tok_dir


@pytest.fixture(scope="session")
def medium_data(tmp_path_factory):
    """(data_dir, tokenizer_dir) for ~3.5 MB of stdlib modules, vocab 512: about a million train tokens.

    For tests that must train past the chaotic early phase without repeating data, so that
    a batch's tokens appear at exactly one step."""
    from lmforge.data.prepare import DataConfig, prepare_data
    from lmforge.tokenizer.encode import tokenize_data
    from lmforge.tokenizer.train import train_tokenizer

    from lmforge.data.corpus import write_stdlib_sample

    base = tmp_path_factory.mktemp("medium")
    corpus = write_stdlib_sample(base / "corpus", 3_500_000)
    data_dir, tok_dir = base / "data", base / "tok"
    prepare_data([str(corpus)], data_dir, DataConfig(val_fraction=0.05, min_chars=16), progress=False)
    train_tokenizer(data_dir, tok_dir, vocab_size=512, progress=False)
    tokenize_data(data_dir, tok_dir, progress=False)
    return data_dir, tok_dir


CHAT_CTX = 128


def function_chats(limit=120):
    """Conversations from stdlib functions with docstrings: ask for the function, answer with its source."""
    import ast

    out = []
    for name in ("textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "shlex.py", "colorsys.py", "glob.py", "string.py"):
        src = (STDLIB / name).read_text()
        for node in ast.walk(ast.parse(src)):
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc:
                body = ast.get_source_segment(src, node)
                out.append({"messages": [{"role": "user", "content": f"Write {node.name}: {doc.splitlines()[0][:50]}"},
                                         {"role": "assistant", "content": body[:150]}]})
    return out[:limit]


@pytest.fixture(scope="session")
def chat_base(tiny_data, tmp_path_factory):
    """A small base model (context CHAT_CTX) whose tokenizer has the chat tokens, for post-training tests."""
    from lmforge.model.model import ModelConfig
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import train

    data_dir, _ = tiny_data
    out = tmp_path_factory.mktemp("base") / "run"
    train(TrainConfig(data=str(data_dir), out=str(out), model=ModelConfig(depth=2, vocab_size=0, context=CHAT_CTX),
                      max_steps=40, batch_size=8, eval_every=0, ckpt_every=0, precision="fp32", warmup_steps=5),
          progress=False)
    return out


RANDOM_CHAT_CTX = 4096


@pytest.fixture(scope="session")
def random_chat_model(tiny_data, tmp_path_factory):
    """An untrained model with a real lmforge tokenizer (chat tokens included) that never ends a turn itself."""
    import torch

    from lmforge.model.io import save_model
    from lmforge.model.model import ModelConfig, build_model
    from lmforge.rundir import Manifest
    from lmforge.tokenizer.io import load_tokenizer, special_ids

    _, tok_dir = tiny_data
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=1, aspect=64, vocab_size=tok.get_vocab_size(), context=RANDOM_CHAT_CTX,
                                    tie_embeddings=False))
    with torch.no_grad():
        # A residual dimension held large for every token acts as a bias on the logits: a strongly
        # negative one for the stop tokens makes every answer run to max_tokens or to Stop.
        model.tok_emb.weight[:, 0] = 10.0
        model.lm_head.weight[[ids["eos"], ids["end"]], 0] = -10.0
    out = tmp_path_factory.mktemp("webchat") / "model"
    save_model(model, out)
    man = Manifest(out, "train", {"note": "random init, for serving tests"})
    man.add_input("tokenizer", tok_dir)
    man.finish()
    return out


def run_cli(*args, env=None, timeout=300):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def signal_when(args, path, sig, delay, env=None, timeout=120, contains=None):
    """Start ``python -m lmforge ARGS``, wait until ``path`` exists (and holds the text ``contains``,
    when given), wait ``delay`` s, send ``sig``; return (returncode, stderr)."""
    import subprocess
    import time

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.Popen([sys.executable, "-m", "lmforge", *map(str, args)], env=full_env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t_end = time.time() + timeout
    def ready():
        f = Path(path)
        return f.exists() and (contains is None or contains in f.read_text(errors="replace"))

    while time.time() < t_end and p.poll() is None and not ready():
        time.sleep(0.02)
    time.sleep(delay)
    if p.poll() is None:
        p.send_signal(sig)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err

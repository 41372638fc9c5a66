from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lmforge.model.generate import SampleConfig
from lmforge.model.sampling import sample_texts


def sample_cmd(
    run: Path = typer.Argument(..., help="A train run directory or any lmforge model directory."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt text; repeat for a batch."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 for greedy."),
    top_k: int = typer.Option(50, "--top-k", help="0 disables."),
    top_p: float = typer.Option(0.95, "--top-p", help="1.0 disables."),
    seed: int = typer.Option(0, "--seed"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer dir (default: from the run manifest)."),
):
    """Generate text from a trained model, with a KV cache.

    Example: lmforge sample runs/train -p "def fibonacci(n):" -p "import os" -n 64
    """
    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    texts = sample_texts(run, prompt or [""], cfg, tokenizer_dir=tokenizer)
    for p, t in zip(prompt or [""], texts):
        print("=" * 60)
        print(p + t)

"""Does post-training do anything? Held-out stop rate, syntax-valid rate and reference loss, per model.

    python bench/post_quality.py runs/scaling3/target1-d3 runs/sft-demo runs/dpo-onpolicy
    python bench/post_quality.py --data runs/chats/val_chats.jsonl --max-new-tokens 128 RUN...

For every "Write a function ..." request in --data (held out by source file), each model answers
greedily with at most --max-new-tokens tokens:

  stop rate      the answer ends its turn (<|end|> or <|eos|>) within the budget
  syntax-valid   ast.parse accepts the answer
  loss           mean loss on every held-out conversation's assistant tokens (all of --data)

docs/posttraining.md records the results and the commands that trained the models.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.model.generate import SampleConfig, generate  # noqa: E402
from lmforge.model.io import load_model  # noqa: E402
from lmforge.post.chats import chat_token_ids, pack, read_chats, render  # noqa: E402
from lmforge.post.sft import Rows, packed_loss  # noqa: E402
from lmforge.tokenizer.io import load_tokenizer, tokenizer_dir_for  # noqa: E402


def parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="model directories to compare")
    ap.add_argument("--data", default="runs/chats/val_chats.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    val = read_chats(args.data).conversations
    asks = [c for c in val if c[0]["content"].startswith("Write a function")]
    print(f"{len(asks)} requests, {len(val)} conversations from {args.data}; greedy, {args.max_new_tokens} new tokens")
    print(f"{'model':<44} {'loss':>7} {'stop':>11} {'syntax':>11}")
    for run in args.runs:
        tok = load_tokenizer(tokenizer_dir_for(run))
        ids = chat_token_ids(tok)
        model = load_model(run)
        rows = Rows.of(pack([render(c, tok, ids) for c in val], model.cfg.context, ids["pad"]))
        with torch.no_grad():
            loss = packed_loss(model, rows.batch(torch.arange(len(rows)))).item()
        prompts = [render(c[:1], tok, ids, add_generation_prompt=True)[0] for c in asks]
        outs = generate(model, prompts, SampleConfig(max_new_tokens=args.max_new_tokens, temperature=0),
                        eos_id=[ids["end"], ids["eos"]], pad_id=ids["pad"])
        # generate() cuts at the stop token, so an answer shorter than its budget stopped. The budget
        # is the same for every row of a batch: at most what the context leaves after the longest prompt.
        budget = min(args.max_new_tokens, model.cfg.context - max(len(p) for p in prompts))
        stopped = sum(len(o) < budget for o in outs)
        valid = sum(parses(tok.decode(o)) for o in outs)
        n = len(asks)
        print(f"{run:<44} {loss:7.4f} {stopped:>3}/{n} {stopped / n:5.1%} {valid:>3}/{n} {valid / n:5.1%}")


if __name__ == "__main__":
    main()

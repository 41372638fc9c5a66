"""Sampling with a KV cache: temperature, top-k, top-p, stop at eos, batched prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.model.model import GPT, KVCache


@dataclass
class SampleConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    seed: int = 0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the top token always survives.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def pick(logits: torch.Tensor, cfg: SampleConfig, gen: torch.Generator) -> torch.Tensor:
    """The next token per row: greedy at temperature 0, else sampled after top-k / top-p."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    cfg: SampleConfig,
    eos_id: int | list[int] | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt; return only the new tokens, cut at (and excluding) eos (or any of
    several stop ids: a chat model stops at ``<|end|>`` as well).

    Prompts of different lengths are left-padded into one batch; per-row positions and a
    padding-aware causal mask keep every row's result equal to generating it alone.
    """
    model.eval()
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    device = next(model.parameters()).device
    B = len(prompts)
    if B == 0:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (use the bos token for an empty prompt)")
    ctx = model.cfg.context
    prompts = [p[-ctx:] for p in prompts]
    P = max(len(p) for p in prompts)
    max_new = max(0, min(cfg.max_new_tokens, ctx - P))
    total = P + max_new
    idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((B, total), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        idx[b, P - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        valid[b, P - len(p) :] = True
    positions_all = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, total, device, dtype)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cur, t0 = idx, 0
    for _ in range(max_new):
        t1 = t0 + cur.shape[1]
        mask = causal[t0:t1, :t1][None, None] & valid[:, None, None, :t1]
        logits = model(cur, cache=cache, positions=positions_all[:, t0:t1], attn_mask=mask)[:, -1].float()
        nxt = pick(logits, cfg, gen)
        for b in range(B):
            if not done[b]:
                if nxt[b].item() in stop:
                    done[b] = True
                else:
                    out[b].append(int(nxt[b]))
        if bool(done.all()):
            break
        cur, t0 = nxt[:, None], t1
    return out


@torch.no_grad()
def stream(model: GPT, prompt: list[int], cfg: SampleConfig, stop_ids: list[int] = ()):
    """Yield one prompt's new tokens as they are sampled (excluding the stop token), for a
    terminal that prints them as they come. The same sampling as :func:`generate`."""
    model.eval()
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    device = next(model.parameters()).device
    prompt = prompt[-model.cfg.context:]
    max_new = max(0, min(cfg.max_new_tokens, model.cfg.context - len(prompt)))
    cache = KVCache(model.cfg, 1, len(prompt) + max_new, device, next(model.parameters()).dtype)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    cur = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(max_new):
        logits = model(cur, cache=cache)[:, -1].float()
        nxt = pick(logits, cfg, gen)
        t = int(nxt)
        if t in stop_ids:
            return
        yield t
        cur = nxt[:, None]

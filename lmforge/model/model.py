"""A Llama-architecture decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases.

One ``depth`` dial sizes the model (width = ``aspect`` * depth, 64 by default; heads of ~64 dims); every derived
size can be overridden explicitly. The module reads top to bottom: config, blocks,
model, then the small helpers that report parameters and FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model.fused import linear_cross_entropy


@dataclass
class ModelConfig:
    depth: int = 6
    aspect: int = 64  # width per layer: d_model = aspect * depth
    vocab_size: int = 8192  # 0: take it from the tokenizer
    context: int = 256
    # Derived from depth when left at 0.
    n_layer: int = 0
    d_model: int = 0
    n_head: int = 0
    n_kv_head: int = 0
    d_ff: int = 0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise LmforgeError(f"model.depth = {self.depth}: must be at least 1")
        if self.aspect < 2 or self.aspect % 2:
            raise LmforgeError(f"model.aspect = {self.aspect}: must be an even number of at least 2 (width per layer)")
        self.n_layer = self.n_layer or self.depth
        self.d_model = self.d_model or self.aspect * self.depth
        # Heads of about 64 dims; at widths that 64 does not divide, the most heads that do.
        self.n_head = self.n_head or next(h for h in range(max(1, self.d_model // 64), 0, -1)
                                          if self.d_model % h == 0 and (self.d_model // h) % 2 == 0)
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.d_model % self.n_head:
            raise LmforgeError(
                f"model.n_head = {self.n_head} does not divide model.d_model = {self.d_model}; "
                f"pick n_head from the divisors of {self.d_model}"
            )
        if (self.d_model // self.n_head) % 2:
            raise LmforgeError(f"model: head size d_model/n_head = {self.d_model // self.n_head} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise LmforgeError(
                f"model.n_kv_head = {self.n_kv_head} does not divide model.n_head = {self.n_head} (grouped-query attention needs it)"
            )
        if not self.d_ff:
            # SwiGLU at 8/3 width keeps the MLP's parameters equal to a 4x GELU MLP.
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.vocab_size < 0 or self.context < 1:
            raise LmforgeError("model.vocab_size must be >= 0 (0: take it from the tokenizer) and model.context positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out, not F.rms_norm: on CPU that is unfused too, and vector_norm reads x in one pass.
        rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + self.eps)
        return x * rstd * self.weight


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    # Half-split layout (rotate_half), the convention Hugging Face Llama uses, so exports need no permutation.
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., D) by the angles whose cos/sin broadcast to it, in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over (B, H, T, D) tensors: causal, or, with ``mask``, where the
    boolean (B, 1, T, T) ``mask`` allows (packed documents: causal and within one document).

    SDPA's fused kernel wins on GPUs and at long context, but on a CPU in bf16 at short
    context its backward is slow: plain batched matmuls with the mask folded into one
    baddbmm are about twice as fast there (the T x T scores are small at T <= 512).
    """
    B, H, T, D = q.shape
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or T > 512:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if mask is None:
        bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    else:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        bias = bias.expand(B, H, T, T).reshape(B * H, T, T)
    scores = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D**-0.5)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * H, T, D)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k and v share one matmul: fewer, larger GEMMs run closer to peak on small models.
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        B, T, _ = x.shape
        H, K = self.n_head, self.n_kv_head
        qk, v = self.wqkv(x).view(B, T, H + 2 * K, self.head_dim).split([H + K, K], dim=2)
        # RoPE rotates q and k together, in the activations' dtype (bf16 under autocast).
        q, k = apply_rope(qk, cos.to(qk.dtype), sin.to(qk.dtype)).split([H, K], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if cache is None:
            y = causal_attention(q, k, v, attn_mask)
        elif attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_ff = cfg.d_ff
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # gate and up in one GEMM
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.d_ff, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.context, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual output projections are scaled down with depth (GPT-2) so the residual stream stays O(1).
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets=None, cache=None, positions=None, attn_mask=None):
        """Return logits, or the mean cross-entropy when ``targets`` is given.

        ``positions`` (B, T) and a boolean ``attn_mask`` (B, 1, T, T) serve generation with
        left-padded batches and training on packed documents (positions restart at each one,
        attention stays inside it); pretraining uses neither and takes the causal path.
        """
        x = self.hidden(idx, cache, positions, attn_mask)
        if targets is None:
            return self.lm_head(x)
        return linear_cross_entropy(x, self.lm_head.weight, targets)

    def hidden(self, idx, cache=None, positions=None, attn_mask=None):
        """The final normed hidden states (B, T, d_model): scoring needs the head only where it reads."""
        T = idx.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.cfg.context:
                raise LmforgeError(f"sequence of {start + T} tokens exceeds model.context = {self.cfg.context}")
            cos = self.rope_cos[start : start + T][None, :, None]  # (1, T, 1, D), broadcast over batch and heads
            sin = self.rope_sin[start : start + T][None, :, None]
        else:
            cos = self.rope_cos[positions][:, :, None]  # (B, T, 1, D)
            sin = self.rope_sin[positions][:, :, None]
        x = self.tok_emb(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache.layer(i) if cache is not None else None, attn_mask)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0

    def layer(self, i: int) -> "_LayerView":
        return _LayerView(self, i)

    def advance(self, n: int) -> None:
        self.length += n


class _LayerView:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k, v):
        c, t0 = self.cache, self.cache.length
        t1 = t0 + k.shape[2]
        c.k[self.i][:, :, t0:t1] = k
        c.v[self.i][:, :, t0:t1] = v
        return c.k[self.i][:, :, :t1], c.v[self.i][:, :, :t1]


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> GPT:
    if cfg.vocab_size < 1:
        raise LmforgeError("model.vocab_size is 0; set it or let `lmforge train` take it from the tokenizer")
    with torch.device(device):
        return GPT(cfg)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and non-embedding parameter counts, computed from the config alone."""
    d, L = cfg.d_model, cfg.n_layer
    attn = d * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + cfg.n_head * cfg.head_dim * d
    mlp = 3 * d * cfg.d_ff
    per_layer = attn + mlp + 2 * d
    non_embedding = L * per_layer + d
    emb = cfg.vocab_size * d
    total = non_embedding + emb + (0 if cfg.tie_embeddings else emb)
    return {"total": total, "non_embedding": non_embedding, "embedding": emb}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6N plus the attention term 12 * n_layer * seq_len * d_attn.

    N counts every weight that takes part in a matmul: the non-embedding weights and the
    output projection, but not the input embedding lookup. The attention term counts the
    score and value matmuls over the full sequence, forward and backward, as PaLM's MFU
    accounting does (no discount for the causal mask)."""
    T = seq_len or cfg.context
    n = param_counts(cfg)["non_embedding"] + cfg.vocab_size * cfg.d_model  # lm_head matmul
    return 6 * n + 12 * cfg.n_layer * T * cfg.n_head * cfg.head_dim

"""The output layer and loss as one autograd function, for speed on CPUs at large vocab.

Autograd's ``F.cross_entropy(F.linear(x, w).float(), y)`` makes several full passes over
the N x V logits in fp32 (upcast, log-softmax, its saved output, a zero-filled gradient,
the log-softmax backward, the downcast). Here the logits stay in the compute dtype and
are read three times: a fp32 log-sum-exp over row chunks small enough to stay in cache,
a softmax in the backward, and the two gradient matmuls. Masking (-1 targets) and the
1/n scale act on the (N, d) side of the matmuls, never on the logits.
"""

from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = x @ weight.t()  # (N, V) in the compute dtype
        # Row chunks of about 2 MB of fp32 keep the upcast in cache; a compiler fuses it anyway.
        rows = logits.shape[0] if torch.compiler.is_compiling() else max(1, (1 << 19) // logits.shape[1])
        lse = torch.cat([torch.logsumexp(c.float(), dim=-1) for c in logits.split(rows)])
        valid = targets != -1
        safe = targets.clamp(min=0)
        target_logit = logits.gather(1, safe[:, None]).squeeze(1).float()
        n_valid = valid.sum().clamp(min=1)
        ctx.save_for_backward(x, weight, logits, safe, valid, n_valid, target_logit - lse)
        return torch.where(valid, lse - target_logit, 0.0).sum() / n_valid

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, logits, safe, valid, n_valid, target_logprob = ctx.saved_tensors
        # d loss / d logits = (softmax - one_hot(target)) * valid / n_valid
        probs = torch.softmax(logits, dim=-1)  # compute dtype, fp32 arithmetic inside
        # p - 1 at the target in fp32 before rounding: a confident p = 0.999 would lose it in bf16.
        rows = torch.arange(len(safe), device=safe.device)
        probs[rows, safe] = torch.expm1(target_logprob).to(probs.dtype)
        row_scale = (valid * (grad / n_valid))[:, None]  # fp32, applied on the (N, d) side
        grad_x = (probs @ weight) * row_scale
        grad_w = probs.t() @ (x * row_scale).to(x.dtype)
        return grad_x, grad_w, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` (x: (..., d), weight: (V, d)) against ``targets``; -1 is ignored.

    Under autocast the matmuls run in the autocast dtype and the log-sum-exp in fp32,
    as autocast would run ``F.linear`` followed by ``F.cross_entropy``."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        return LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype), targets.reshape(-1))

"""Plain-autograd references that the fused fast paths are tested against."""

import torch
import torch.nn.functional as F


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` in plain autograd ops, a row chunk at a time; -1 is ignored.

    The reference that ``linear_cross_entropy`` (what ``GPT.forward`` uses) is tested against.
    """
    x = x.reshape(-1, x.shape[-1])
    targets = targets.reshape(-1)
    n_valid = (targets != -1).sum().clamp(min=1)
    total = x.new_zeros((), dtype=torch.float32)
    for s in range(0, x.shape[0], chunk):
        logits = F.linear(x[s : s + chunk], weight)
        total = total + F.cross_entropy(logits.float(), targets[s : s + chunk], ignore_index=-1, reduction="sum")
    return total / n_valid

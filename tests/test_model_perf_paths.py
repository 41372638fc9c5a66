"""The CPU fast paths in the model agree with the plain PyTorch formulations they replace.

- causal_attention: batched matmuls + softmax on CPU in bf16 at short context, SDPA otherwise
- linear_cross_entropy: output layer + loss with a hand-written backward
- RMSNorm and RoPE written out, in the activations' dtype
"""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, build_model
from lmforge.model.fused import linear_cross_entropy
from lmforge.model.model import RMSNorm, apply_rope, causal_attention, rope_tables
from reference_ops import chunked_cross_entropy

bf16_cpu = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 support"
)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qkv(B=2, H=3, T=64, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(3)]


def attention_and_grads(fn, tensors, dtype):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    return [out] + [t.grad for t in leaves]


@bf16_cpu
def test_causal_attention_bf16_matches_sdpa():
    tensors = qkv()
    truth = attention_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                tensors, torch.float32)
    sdpa = attention_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               tensors, torch.bfloat16)
    ours = attention_and_grads(causal_attention, tensors, torch.bfloat16)
    for o, s, t in zip(ours, sdpa, truth):
        # As close to the fp32 result as SDPA's own bf16 kernel is, within bf16 rounding.
        assert rel_err(o, t) < max(2 * rel_err(s, t), 1e-2)


def test_causal_attention_uses_sdpa_outside_the_fast_path():
    q, k, v = qkv()
    assert torch.equal(causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, k, v = (t.bfloat16() for t in qkv(B=1, H=1, T=520, D=8))
    assert torch.equal(causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_causal_attention_is_causal():
    q, k, v = (t.bfloat16() for t in qkv(T=16))
    v2 = v.clone()
    v2[:, :, 10:] += 1
    assert torch.equal(causal_attention(q, k, v)[:, :, :10], causal_attention(q, k, v2)[:, :, :10])


def loss_and_grads(fn, x, w, y, autocast):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x, w, y)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def reference_ce(x, w, y):
    return F.cross_entropy(F.linear(x, w).float(), y, ignore_index=-1)


def ce_case(N=300, d=48, V=700, seed=0, confident=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -1
    if confident:  # most rows put p ~ 0.99+ on their target, where p - 1 must not drown in rounding
        w[:N] = x[:N] * 0.5
        y = torch.where(y == -1, -1, torch.arange(N) % V)
    return x, w, y


def test_linear_cross_entropy_matches_autograd_fp32():
    x, w, y = ce_case()
    ours = loss_and_grads(linear_cross_entropy, x, w, y, autocast=False)
    ref = loss_and_grads(reference_ce, x, w, y, autocast=False)
    assert torch.allclose(ours[0], ref[0], atol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    chunked = loss_and_grads(lambda x, w, y: chunked_cross_entropy(x, w, y, chunk=64), x, w, y, autocast=False)
    assert torch.allclose(ours[0], chunked[0], atol=1e-5)


@bf16_cpu
@pytest.mark.parametrize("confident", [False, True])
def test_linear_cross_entropy_bf16_as_accurate_as_autocast(confident):
    x, w, y = ce_case(confident=confident)
    truth = loss_and_grads(reference_ce, x.double(), w.double(), y, autocast=False)
    ours = loss_and_grads(linear_cross_entropy, x, w, y, autocast=True)
    ref = loss_and_grads(reference_ce, x, w, y, autocast=True)  # what autograd under autocast gives
    assert ours[0].dtype == torch.float32 and ours[1].dtype == x.dtype and ours[2].dtype == w.dtype
    assert abs(ours[0] - ref[0]) < 1e-4  # same bf16 logits, same fp32 log-sum-exp
    for a, r, t in zip(ours[1:], ref[1:], truth[1:]):
        assert rel_err(a, t) < 1.5 * rel_err(r, t) + 1e-3


def test_linear_cross_entropy_all_targets_ignored_is_zero():
    x, w, y = ce_case(N=8)
    loss, gx, gw = loss_and_grads(linear_cross_entropy, x, w, torch.full_like(y, -1), autocast=False)
    assert loss.item() == 0 and gx.abs().sum() == 0 and gw.abs().sum() == 0


def test_rmsnorm_matches_functional():
    torch.manual_seed(0)
    norm = RMSNorm(32, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(4, 7, 32) * 3).requires_grad_()
    ours = norm(x)
    ref = F.rms_norm(x, (32,), norm.weight, 1e-5)
    assert torch.allclose(ours, ref, atol=1e-6)
    g = torch.randn_like(ours)
    assert torch.allclose(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-5)


def test_rope_is_a_rotation_of_each_half_split_pair():
    D, T = 16, 10
    cos, sin = rope_tables(D, T, 10000.0)
    x = torch.randn(2, T, 3, D)  # (B, T, H, D), the layout the model rotates in
    out = apply_rope(x, cos[:, None], sin[:, None])
    half = D // 2
    angle = torch.outer(torch.arange(T, dtype=torch.float32), 1.0 / 10000.0 ** (torch.arange(0, D, 2) / D))
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    assert torch.allclose(out, torch.cat([z.real, z.imag], dim=-1), atol=1e-5)


@bf16_cpu
def test_model_under_autocast_takes_the_fast_paths_and_tracks_fp32(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, vocab_size=97, context=32, n_head=2, n_kv_head=1)
    model = build_model(cfg)
    x = torch.randint(0, 97, (2, 32))
    y = torch.randint(0, 97, (2, 32))
    fp32 = model(x, y)

    def no_sdpa(*a, **k):
        raise AssertionError("training at short context in bf16 on CPU should not call SDPA")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x, y)
    bf16.backward()
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

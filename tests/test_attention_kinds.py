"""Local and full attention against the dense reference; axial embeddings."""

import math

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.attention import full_attention, local_attention
from reformer.attention.reference import dense_attention_reference
from reformer.embeddings import AxialPositionalEmbedding

F64 = torch.float64


def _qkv(B=2, H=2, L=27, D=5, padded=True):
    q, k, v = (torch.randn(B, H, L, D, dtype=F64, requires_grad=True) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, -5:] = False
        mask[1, :2] = False
    return q, k, v, mask


def _check(out, ref, inputs, mask):
    real = torch.ones(out.shape[0], out.shape[2], dtype=torch.bool) if mask is None else mask
    real = real[:, None, :, None].to(F64)
    assert (out - ref).mul(real).abs().max() < 1e-10
    up = torch.randn_like(out) * real
    for a, b in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs, up)):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("length", [27, 8])
def test_local_matches_reference(causal, shared, padded, length):
    q, k, v, mask = _qkv(L=length, padded=padded)
    kk = None if shared else k
    out = local_attention(q, kk, v, chunk_len=4, causal=causal, attention_mask=mask)
    ref = dense_attention_reference(q, kk, v, causal=causal, attention_mask=mask, chunk_len=4)
    _check(out, ref, (q, k, v) if not shared else (q, v), mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_full_matches_reference(causal, shared, padded):
    q, k, v, mask = _qkv(padded=padded)
    kk = None if shared else k
    out = full_attention(q, kk, v, causal=causal, attention_mask=mask)
    ref = dense_attention_reference(q, kk, v, causal=causal, attention_mask=mask)
    _check(out, ref, (q, k, v) if not shared else (q, v), mask)


def test_axial_embedding_shapes_and_parameter_count():
    emb = AxialPositionalEmbedding((16, 8), (12, 20))
    assert sum(p.numel() for p in emb.parameters()) == 16 * 12 + 8 * 20
    out = emb(100)
    assert out.shape == (100, 32)
    # position p = 8 * i + j: its first 12 dims are row i of axis 0, the rest row j of axis 1
    for p in (0, 7, 8, 99):
        assert torch.equal(out[p, :12], emb.weights[0][p // 8])
        assert torch.equal(out[p, 12:], emb.weights[1][p % 8])
    assert torch.equal(emb(5, offset=40), out[40:45])


def test_model_axial_default_parameter_count():
    cfg = ReformerConfig(d_model=256, max_seq_len=65536, n_layers=1)
    model = ReformerLM(cfg)
    assert cfg.resolved_axial_shape == (256, 256)
    assert sum(p.numel() for p in model.pos_emb.parameters()) == 256 * 128 + 256 * 128
    cfg = ReformerConfig(d_model=64, max_seq_len=1000, n_layers=1, axial_shape=(10, 100))
    assert math.prod(cfg.resolved_axial_shape) == 1000
    assert ReformerLM(cfg).pos_emb(1000).shape == (1000, 64)


@pytest.mark.parametrize("around", [(1, 1), (2, 1), (0, 2), (0, 0)])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("length", [27, 8])
def test_encoder_local_matches_reference(around, shared, length):
    """Non-causal local attention over `before` chunks before and `after` after its own."""
    q, k, v, mask = _qkv(L=length, padded=True)
    kk = None if shared else k
    before, after = around
    kw = dict(causal=False, attention_mask=mask, chunk_len=4)
    kw |= dict(chunks_before=before, chunks_after=after)
    out = local_attention(q, kk, v, **kw)
    ref = dense_attention_reference(q, kk, v, **kw)
    _check(out, ref, (q, k, v) if not shared else (q, v), mask)


@pytest.mark.parametrize("around", [(1, 0), (1, 1), (2, 1)])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("length", [27, 21])  # 7 and 6 chunks: more than the window
def test_wrapped_local_matches_reference(around, shared, length):
    """local_wrap (transformers' encoders): neighbours counted around the sequence's ends."""
    q, k, v, mask = _qkv(L=length, padded=True)
    kk = None if shared else k
    before, after = around
    kw = dict(causal=False, attention_mask=mask, chunk_len=4, wrap=True)
    kw |= dict(chunks_before=before, chunks_after=after)
    out = local_attention(q, kk, v, **kw)
    ref = dense_attention_reference(q, kk, v, **kw)
    _check(out, ref, (q, k, v) if not shared else (q, v), mask)

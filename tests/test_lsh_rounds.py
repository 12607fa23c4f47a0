"""LSH without duplicate correction, with and without the look-back wrap (the semantics of
transformers' and trax's Reformer), against the round-by-round reference; float64."""

import pytest
import torch

from reformer.attention.lsh import draw_rotations, hash_vectors, lsh_attention
from reformer.attention.reference import hash_reference, lsh_rounds_reference
from test_lsh import _inputs

F64 = torch.float64


def _compare(qk, v, mask, rotations, *, wrap, causal, key_norm="l2", chunk_len=4, **kw):
    out = lsh_attention(
        qk, v, rotations, attention_mask=mask, chunk_len=chunk_len, causal=causal,
        mode="chunk", wrap=wrap, dedup=False, key_norm=key_norm, **kw,
    )  # fmt: skip
    ref = lsh_rounds_reference(
        qk, v, rotations, attention_mask=mask, chunk_len=chunk_len, causal=causal, wrap=wrap,
        key_norm=key_norm,
    )  # fmt: skip
    real = torch.ones(qk.shape[0], qk.shape[2], dtype=torch.bool) if mask is None else mask
    real = real[:, None, :, None].to(F64)
    assert (out - ref).mul(real).abs().max() < 1e-10
    upstream = torch.randn_like(out) * real
    g_out = torch.autograd.grad(out, (qk, v), upstream)
    g_ref = torch.autograd.grad(ref, (qk, v), upstream)
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() < 1e-10
    return out


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("length,padded", [(29, True), (32, False)])
def test_rounds_equal_reference(wrap, causal, n_hashes, length, padded):
    qk, v, mask = _inputs(2, 2, length, 5, padded)
    rot = draw_rotations(2, 5, n_hashes, 4, dtype=F64)
    _compare(qk, v, mask, rot, wrap=wrap, causal=causal)


def test_wrap_changes_the_output():
    """The wrap is not a no-op: some first-chunk queries see the previous round's keys."""
    qk, v, _ = _inputs(1, 2, 32, 5, False)
    rot = draw_rotations(2, 5, 2, 4, dtype=F64)
    kw = dict(chunk_len=4, causal=False, mode="chunk", dedup=False)
    a = lsh_attention(qk, v, rot, wrap=True, **kw)
    b = lsh_attention(qk, v, rot, wrap=False, **kw)
    assert (a - b).abs().max() > 1e-3


def test_rounds_with_rms_keys_and_many_slices(monkeypatch):
    """Slices cut within heads (the wrap keeps each head's first row with its own look-back);
    transformers' key normalisation."""
    import reformer.attention.lsh as lsh

    monkeypatch.setattr(lsh, "GROUP_ENTRIES", 3 * 2 * 40 * 5)  # a few heads per group
    qk, v, mask = _inputs(2, 3, 37, 5, True)
    rot = draw_rotations(3, 5, 2, 6, dtype=F64)
    import reformer.attention.chunked as chunked

    monkeypatch.setattr(chunked, "SLICE_ENTRIES", 4 * 8 * 3)  # three rows per slice
    _compare(qk, v, mask, rot, wrap=True, causal=True, key_norm="rms")


def test_transformers_factor_order():
    """Explicit factors: one rotation tensor sliced per factor, the first factor least
    significant in the bucket id (transformers' rule)."""
    g = torch.Generator().manual_seed(3)
    rot = draw_rotations(2, 6, 2, 0, generator=g, dtype=F64, factors=(4, 6))
    g = torch.Generator().manual_seed(3)
    whole = torch.randn(2, 6, 2, 5, generator=g, dtype=F64)
    x = torch.randn(1, 2, 11, 6, dtype=F64)
    p0, p1 = x @ whole[0, :, 0, :2], x @ whole[0, :, 0, 2:]  # head 0, round 0
    h0 = torch.cat([p0, -p0], -1).argmax(-1)
    h1 = torch.cat([p1, -p1], -1).argmax(-1)
    expect = h0 + 4 * h1
    assert torch.equal(hash_vectors(x, rot)[0, 0, 0], expect[0, 0])
    assert torch.equal(hash_vectors(x, rot), hash_reference(x, rot))

"""LSH attention against the naive reference built from the union of candidate sets."""

import pytest
import torch

from reformer.attention import full_attention
from reformer.attention.lsh import (
    FACTORISE_ABOVE,
    auto_n_buckets,
    bucket_factors,
    draw_rotations,
    hash_vectors,
    lsh_attention,
)
from reformer.attention.reference import hash_reference, lsh_attention_reference

F64 = torch.float64


def _inputs(B, H, L, D, padded):
    qk = torch.randn(B, H, L, D, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, L, D, dtype=F64, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, :3] = False  # left padding in one row
        mask[0, -4:] = False  # right padding in the other
        mask[1, L // 2] = False  # and a hole
    return qk, v, mask


def _compare(qk, v, mask, rotations, **kw):
    out = lsh_attention(qk, v, rotations, attention_mask=mask, **kw)
    ref = lsh_attention_reference(qk, v, rotations, attention_mask=mask, **kw)
    real = torch.ones(qk.shape[0], qk.shape[2], dtype=torch.bool) if mask is None else mask
    real = real[:, None, :, None].to(F64)
    assert (out - ref).mul(real).abs().max() < 1e-10
    upstream = torch.randn_like(out) * real  # padded rows carry no gradient
    g_out = torch.autograd.grad(out, (qk, v), upstream)
    g_ref = torch.autograd.grad(ref, (qk, v), upstream)
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() < 1e-10


MODES = [("chunk", False), ("chunk", True), ("window", True)]


@pytest.mark.parametrize("mode,causal", MODES)
@pytest.mark.parametrize("n_hashes", [1, 2, 4])
@pytest.mark.parametrize("length", [29, 37])  # not multiples of the chunk
@pytest.mark.parametrize("padded", [False, True])
def test_lsh_equals_union_reference(mode, causal, n_hashes, length, padded):
    qk, v, mask = _inputs(2, 2, length, 7, padded)
    rot = draw_rotations(2, 7, n_hashes, 8, dtype=F64)
    _compare(qk, v, mask, rot, chunk_len=4, causal=causal, mode=mode)


@pytest.mark.parametrize("mode,causal", MODES)
def test_factorised_buckets_match_reference(mode, causal):
    n_buckets = 2 * FACTORISE_ABOVE
    assert len(bucket_factors(n_buckets)) == 2
    qk, v, mask = _inputs(2, 2, 45, 6, padded=True)
    rot = draw_rotations(2, 6, 2, n_buckets, dtype=F64)
    assert torch.equal(hash_vectors(qk, rot), hash_reference(qk, rot))
    _compare(qk, v, mask, rot, chunk_len=4, causal=causal, mode=mode)


@pytest.mark.parametrize("entries", [1, 50, 1 << 22])  # one position, ragged slices, whole
def test_hashing_in_slices_changes_no_bucket(monkeypatch, entries):
    """Hashing a slice of positions at a time (its memory is O(L sqrt L) at once otherwise)
    gives the reference's buckets, factorised or not, odd lengths."""
    from reformer.attention import hashing

    monkeypatch.setattr(hashing, "HASH_ENTRIES", entries)
    qk, _, _ = _inputs(2, 2, 45, 6, padded=False)
    for n_buckets in (8, 2 * FACTORISE_ABOVE):
        rot = draw_rotations(2, 6, 3, n_buckets, dtype=F64)
        assert torch.equal(hash_vectors(qk, rot), hash_reference(qk, rot))


def test_bucket_rules():
    assert auto_n_buckets(1024, 64) == 32  # 16 chunks -> 2 * 16: half a chunk per bucket
    assert auto_n_buckets(1000, 64) == 32
    assert auto_n_buckets(10, 64) == 2
    assert auto_n_buckets(65536, 64) == 2048
    assert bucket_factors(2048) == (64, 32)
    assert bucket_factors(FACTORISE_ABOVE) == (FACTORISE_ABOVE,)
    assert bucket_factors(2 * 131) == (2 * 131,)  # no even factorisation: kept whole
    for k in (256, 2048, 4096):
        k1, k2 = bucket_factors(k)
        assert k1 * k2 == k and k1 % 2 == 0 and k2 % 2 == 0


def test_buckets_cover_range_and_are_balanced():
    qk = torch.randn(1, 1, 4096, 16)
    rot = draw_rotations(1, 16, 1, 256)
    b = hash_vectors(qk, rot)
    assert b.min() >= 0 and b.max() < 256
    assert b.unique().numel() > 200  # random rotations of random vectors use most buckets


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_chunk_equals_full_shared_qk(causal, n_hashes):
    """With one chunk spanning the sequence every pair is a candidate in every round."""
    qk, v, mask = _inputs(2, 3, 23, 8, padded=True)
    rot = draw_rotations(3, 8, n_hashes, 4, dtype=F64)
    out = lsh_attention(qk, v, rot, chunk_len=32, causal=causal, mode="chunk", attention_mask=mask)
    full = full_attention(qk, None, v, causal=causal, attention_mask=mask)
    real = mask[:, None, :, None]
    assert (out - full).masked_fill(~real, 0).abs().max() < 1e-10


def test_window_mode_candidates_are_same_bucket_and_earlier():
    """Window mode never looks past C earlier bucket-mates: with C = 1 and one round each
    token sees only itself and its previous bucket-mate (checked against the reference's
    explicit sets)."""
    from reformer.attention.reference import lsh_candidate_sets

    qk = torch.randn(1, 1, 32, 4, dtype=F64)
    rot = draw_rotations(1, 4, 1, 4, dtype=F64)
    b = hash_reference(qk, rot)
    sets = lsh_candidate_sets(
        b, torch.ones(1, 32, dtype=torch.bool), chunk_len=1, causal=True, mode="window"
    )[0, 0, 0]
    for i in range(32):
        mates = [j for j in range(i) if b[0, 0, 0, j] == b[0, 0, 0, i]]
        expected = {i, *mates[-1:]}
        assert set(torch.nonzero(sets[i]).flatten().tolist()) == expected


def test_rotations_reproducible_under_manual_seed():
    torch.manual_seed(3)
    a = draw_rotations(2, 4, 2, 8)
    torch.manual_seed(3)
    b = draw_rotations(2, 4, 2, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("rows", [1, 3, 700])  # 700 rows spans several slices
def test_chunk_attention_core_matches_plain_autograd(rows, monkeypatch):
    """The custom-backward core (recomputes probabilities, slices rows) against autograd."""
    from reformer.attention import chunked

    monkeypatch.setattr(chunked, "SLICE_ENTRIES", 4096)
    C, W, D = 5, 10, 7
    q, k, v = (torch.randn(rows, n, D, dtype=F64, requires_grad=True) for n in (C, W, W))
    code = torch.randint(0, 4, (rows, C, W), dtype=torch.int8)
    code[..., 0] = 1  # every query has a candidate
    lut = torch.tensor([-1e9, 0.0, -0.7, -1e5], dtype=F64)
    out, lse = chunked.chunk_attention(q, k, v, code, lut)
    ref_out, ref_lse = chunked.chunk_attention_reference(q, k, v, code, lut)
    assert (out - ref_out).abs().max() < 1e-12 and (lse - ref_lse).abs().max() < 1e-10
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    ours = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * g_out).sum() + (ref_lse * g_lse).sum(), (q, k, v))
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("mode,causal", MODES)
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_lsh_core_head_groups_and_row_slices(mode, causal, n_hashes, monkeypatch):
    """Tiny group and slice sizes: heads split across groups and rows across slices (a
    slice boundary inside a round, and windows that look back across heads) change
    nothing."""
    from reformer.attention import chunked, lsh

    monkeypatch.setattr(lsh, "GROUP_ENTRIES", 1)  # one head per group
    monkeypatch.setattr(chunked, "SLICE_ENTRIES", 3 * 4 * 8)  # 3 rows of (C=4, 2C=8)
    qk, v, mask = _inputs(2, 3, 41, 5, padded=True)
    rot = draw_rotations(3, 5, n_hashes, 8, dtype=F64)
    _compare(qk, v, mask, rot, chunk_len=4, causal=causal, mode=mode)
    monkeypatch.setattr(lsh, "GROUP_ENTRIES", 2 * n_hashes * 44 * 5)  # two heads per group
    _compare(qk, v, mask, rot, chunk_len=4, causal=causal, mode=mode)


@pytest.mark.parametrize("mode,causal", MODES)
def test_lsh_float32_against_float64_reference(mode, causal):
    """float32 keeps float32 accuracy, also for tokens whose only candidate is themselves
    (the self score is -1e5: no normaliser of that size may enter a subtraction)."""
    torch.manual_seed(0)
    qk64, v64, mask = _inputs(2, 2, 45, 12, padded=True)
    rot = draw_rotations(2, 12, 3, 8)
    kw = dict(chunk_len=4, causal=causal, mode=mode, attention_mask=mask)
    qk32, v32 = (x.detach().float().requires_grad_() for x in (qk64, v64))
    out = lsh_attention(qk32, v32, rot, **kw)
    ref = lsh_attention_reference(qk64, v64, tuple(r.double() for r in rot), **kw)
    real = mask[:, None, :, None]
    assert (out.double() - ref).masked_fill(~real, 0).abs().max() < 1e-5
    up = torch.randn_like(ref) * real
    g32 = torch.autograd.grad(out, (qk32, v32), up.float())
    g64 = torch.autograd.grad(ref, (qk64, v64), up)
    for a, b in zip(g32, g64):
        assert (a.double() - b).abs().max() < 1e-4


@pytest.mark.parametrize("mode,causal", MODES)
def test_lsh_int64_pair_keys(mode, causal, monkeypatch):
    """Keys too large for int32 (many heads per group, many buckets) take the int64 path."""
    from reformer.attention import lsh_layout

    monkeypatch.setattr(lsh_layout, "INT32_KEYS_BELOW", 0)
    qk, v, mask = _inputs(2, 2, 29, 5, padded=True)
    rot = draw_rotations(2, 5, 2, 8, dtype=F64)
    _compare(qk, v, mask, rot, chunk_len=4, causal=causal, mode=mode)


# Encoder layouts: chunks before and after the own one (non-causal chunk mode).
AROUND = [(1, 1), (2, 1), (0, 2), (0, 0), (3, 2)]


@pytest.mark.parametrize("around", AROUND)
@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("length", [29, 41])  # not multiples of the chunk
def test_encoder_lsh_equals_union_reference(around, n_hashes, length):
    """Non-causal LSH with `before` chunks before and `after` after each sorted chunk is
    softmax over the union of those candidate sets: outputs and gradients, float64,
    padding (left, right, a hole), odd lengths."""
    qk, v, mask = _inputs(2, 2, length, 7, padded=True)
    rot = draw_rotations(2, 7, n_hashes, 8, dtype=F64)
    before, after = around
    _compare(
        qk, v, mask, rot, chunk_len=4, causal=False, mode="chunk",
        chunks_before=before, chunks_after=after,
    )  # fmt: skip


@pytest.mark.parametrize("around", [(1, 1), (2, 3)])
def test_encoder_lsh_slices_and_groups(around, monkeypatch):
    """Slices of 2 rows (a window then reaches past its slice on both sides, across rounds
    and heads) and one head per group change nothing."""
    from reformer.attention import chunked, lsh

    before, after = around
    W = (before + 1 + after) * 4
    monkeypatch.setattr(lsh, "GROUP_ENTRIES", 1)
    monkeypatch.setattr(chunked, "SLICE_ENTRIES", 2 * 4 * W)
    qk, v, mask = _inputs(2, 3, 43, 5, padded=True)
    rot = draw_rotations(3, 5, 2, 8, dtype=F64)
    kw = dict(chunk_len=4, causal=False, mode="chunk", chunks_before=before, chunks_after=after)
    _compare(qk, v, mask, rot, **kw)
    monkeypatch.setattr(lsh, "GROUP_ENTRIES", 2 * 2 * 44 * 5)  # two heads per group
    _compare(qk, v, mask, rot, **kw)


def test_encoder_lsh_without_dedup_matches_round_reference():
    """lsh_dedup=False with a wide window: each round a softmax over its own window,
    combined by log-sum-exps (the round-by-round reference)."""
    from reformer.attention.reference import lsh_rounds_reference

    qk, v, mask = _inputs(2, 2, 37, 6, padded=True)
    rot = draw_rotations(2, 6, 3, 8, dtype=F64)
    kw = dict(chunk_len=4, causal=False, attention_mask=mask, chunks_before=2, chunks_after=1)
    out = lsh_attention(qk, v, rot, mode="chunk", dedup=False, **kw)
    ref = lsh_rounds_reference(qk, v, rot, wrap=False, **kw)
    real = mask[:, None, :, None].to(F64)
    assert (out - ref).mul(real).abs().max() < 1e-10
    up = torch.randn_like(out) * real
    for a, b in zip(torch.autograd.grad(out, (qk, v), up), torch.autograd.grad(ref, (qk, v), up)):
        assert (a - b).abs().max() < 1e-10


def test_encoder_lsh_sees_later_tokens():
    """The layout is not causal: changing only the last token's value changes the outputs
    of earlier tokens (two chunks, each seeing the other)."""
    qk = torch.randn(1, 1, 16, 4, dtype=F64)
    v = torch.randn(1, 1, 16, 4, dtype=F64)
    rot = draw_rotations(1, 4, 1, 2, dtype=F64)  # 2 buckets: large shared chunks
    kw = dict(chunk_len=8, causal=False, mode="chunk", chunks_before=1, chunks_after=1)
    base = lsh_attention(qk, v, rot, **kw)
    v2 = v.clone()
    v2[0, 0, -1] += 1.0
    assert (lsh_attention(qk, v2, rot, **kw) - base)[0, 0, :-1].abs().max() > 1e-6

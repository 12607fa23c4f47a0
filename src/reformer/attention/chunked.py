"""The attention core of the chunked kinds: softmax within (query chunk, key window) pairs.

Legend: M rows (independent query chunks, e.g. B * H * R * N), C queries per row, W keys per
row (2C: the chunk and the one before it), D head dim.

Scores are q . k + lut[code]: an int8 code per (query, key) names the additive term (masked,
a duplicate-count correction, the self score), so the (M, C, W) float bias never exists and
the backward pass needs to keep only the int8 codes. The custom autograd function works on
slices of rows (bounded working set, better cache use) and recomputes scores and
probabilities in the backward pass instead of storing them (as flash attention does).
`reference.py` and the tests compare it against plain autograd.

Why local attention has this core and not LSH's (`lsh._LSHCore`): both are "softmax within
(chunk, chunk + previous) windows with int8 pair codes", but LSH's core is built around
what local attention does not have: a sorted layout gathered per slice through index lists
(R rounds x heads), look-back windows as strided views of the gathered buffer, codes that
count rounds, a log-sum-exp combination of rounds and gradients scattered back with
index_add_. Local attention's windows are fixed positions, so its rows are plain views of
the projections (no gather, no scatter), with separate queries and keys scaled by
1/sqrt(D). Run through the LSH core, local attention would pay an identity "sort", R = 1
gathers and scatters of every q, k, v row (extra memory passes the size of its inputs), and
the round combination, for nothing. The two share the slicing (`row_slices`), the score
constants and the code scheme instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import upcast

# Rows per slice: about 2^21 score entries at a time (8 MiB in fp32).
SLICE_ENTRIES = 1 << 21


def slice_rows(per_row: int, entries: int | None = None) -> int:
    """Rows per slice: about `entries` (default SLICE_ENTRIES) entries, at least one row."""
    return max(1, (SLICE_ENTRIES if entries is None else entries) // max(1, per_row))


def chunk_slices(length: int, chunk_len: int | None) -> list[slice]:
    """Consecutive slices covering range(length), each at most chunk_len long (one slice
    when chunk_len is None); the one chunking helper of the package."""
    step = length if chunk_len is None else chunk_len
    return [slice(a, min(a + step, length)) for a in range(0, length, max(1, step))]


def row_slices(rows: int, per_row: int, entries: int | None = None) -> list[slice]:
    """Consecutive slices of `rows`, each holding about `entries` (default SLICE_ENTRIES)
    = rows x per_row."""
    return chunk_slices(rows, slice_rows(per_row, entries))


def _probs(q: Tensor, k: Tensor, code: Tensor, lut: Tensor, lse: Tensor | None):
    """Scores -> (probabilities, lse) for one slice. q (m, C, D), k (m, W, D), code (m, C, W)."""
    scores = upcast(torch.bmm(q, k.transpose(1, 2)))
    scores += lut[code.long()]
    if lse is None:
        # One exp pass: softmax is a fused kernel, and its largest probability is
        # exp(max - max) / sum = 1 / sum, so lse = max + log(sum) = max - log(p_max).
        top = scores.amax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return probs, top - probs.amax(dim=-1).log()
    scores -= lse[..., None]
    return scores.exp_(), lse


class _ChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, code, lut):
        M, C, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(M, C, dtype=lut.dtype, device=q.device)
        for sl in row_slices(M, C * k.shape[1]):
            p, lse[sl] = _probs(q[sl], k[sl], code[sl], lut, None)
            out[sl] = torch.bmm(p.to(v.dtype), v[sl])
        ctx.save_for_backward(q, k, v, code, lut, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, code, lut, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if d_out is None:
            d_out = torch.zeros_like(out)
        if d_lse is None:
            d_lse = torch.zeros_like(lse)
        # dS = P * (dO V^T - rowsum(dO * O) + dlse): softmax and log-sum-exp backward
        delta = (upcast(d_out) * upcast(out)).sum(-1) - d_lse  # (M, C)
        for sl in row_slices(q.shape[0], q.shape[1] * k.shape[1]):
            p, _ = _probs(q[sl], k[sl], code[sl], lut, lse[sl])
            dp = upcast(torch.bmm(d_out[sl], v[sl].transpose(1, 2)))
            ds = (dp.sub_(delta[sl][..., None])).mul_(p).to(q.dtype)
            dv[sl] = torch.bmm(p.to(v.dtype).transpose(1, 2), d_out[sl])
            dq[sl] = torch.bmm(ds, k[sl])
            dk[sl] = torch.bmm(ds.transpose(1, 2), q[sl])
        return dq, dk, dv, None, None


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, code: Tensor, lut: Tensor):
    """Softmax attention within rows. q (M, C, D), k and v (M, W, D), code (M, C, W) int8,
    lut (n_codes,) float: score_ij = q_i . k_j + lut[code_ij]. Returns out (M, C, D) and the
    log-sum-exp of each query's scores (M, C)."""
    return _ChunkAttention.apply(q, k, v, code, lut)


def chunk_attention_reference(q: Tensor, k: Tensor, v: Tensor, code: Tensor, lut: Tensor):
    """Plain-autograd version of `chunk_attention` (the tests' reference)."""
    scores = upcast(q @ k.transpose(-1, -2)) + lut[code.long()]
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]).to(v.dtype) @ v, lse

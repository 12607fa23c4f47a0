"""Local attention over a sequence split across ranks: each rank borrows the halo of
positions its chunks' neighbourhoods reach on other ranks, then runs `local_attention`.

Legend: B batch, H heads, l this rank's positions [P0, P1), D head dim, C chunk length.

Local chunks are fixed by position (chunk c holds positions [c C, (c + 1) C)), so the
queries of [P0, P1) need keys from the `before` chunks before P0's chunk to the `after`
chunks after the chunk of P1 - 1. Every rank knows every rank's window, so one all-to-all
moves exactly the halo rows (query-keys or keys, values and the padding mask) and nothing
else; the window starts on a chunk boundary, so `local_attention` over it chunks it as one
process chunks the whole sequence, and this rank keeps the outputs of its own positions.
Autograd returns the halo's gradients to their ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sequence.shard import SequenceShard
from .local import local_attention


def window(shard: SequenceShard, rank: int, chunk_len: int, before: int, after: int):
    """[lo, hi): the positions whose keys rank `rank`'s queries can reach."""
    P0, P1, C = shard.bounds[rank], shard.bounds[rank + 1], chunk_len
    return max(0, (P0 // C - before) * C), min(shard.length, ((P1 - 1) // C + 1 + after) * C)


def halo_local_attention(
    q: Tensor,
    k: Tensor | None,
    v: Tensor,
    valid: Tensor,
    shard: SequenceShard,
    *,
    chunk_len: int,
    causal: bool,
    key_norm: str = "l2",
    chunks_before: int = 1,
    chunks_after: int = 0,
) -> Tensor:
    """`local_attention` of this rank's queries (B, H, l, D) over the whole sequence (k None:
    shared QK; valid (B, l) True at real tokens). Returns (B, H, l, D)."""
    B, H, l, D = q.shape
    me, P0, P1 = shard.rank, shard.start, shard.stop
    heads = [t for t in (q, k, v) if t is not None]
    # position-major rows: every head's q (k) v, then the mask, one row per position
    rows = [t.permute(2, 0, 1, 3).reshape(l, -1) for t in heads]
    rows = torch.cat([*rows, valid.t().to(q.dtype)], dim=1)
    spans = [window(shard, r, chunk_len, chunks_before, chunks_after) for r in range(shard.size)]
    lo, hi = spans[me]
    send, recv, pieces = [], [], []
    for r, (r_lo, r_hi) in enumerate(spans):
        a, b = max(r_lo, P0), min(r_hi, P1)  # my positions rank r needs
        n = max(0, b - a) if r != me else 0
        send.append(n)
        pieces.append(rows[a - P0 : a - P0 + n])
        s0, s1 = shard.bounds[r], shard.bounds[r + 1]  # rank r's positions I need
        recv.append(max(0, min(hi, s1) - max(lo, s0)) if r != me else 0)
    got = shard.exchange(torch.cat(pieces), send, recv)
    before_me = sum(recv[:me])
    full = torch.cat([got[:before_me], rows, got[before_me:]])  # positions lo .. hi
    n = full.shape[0]
    width = [t.shape[1] * t.shape[3] * B for t in heads]
    parts = full.split([*width, B], dim=1)
    as_heads = [p.reshape(n, B, H, D).permute(1, 2, 0, 3) for p in parts[:-1]]
    mask = parts[-1].t() > 0.5
    qw, vw = as_heads[0], as_heads[-1]
    kw = as_heads[1] if k is not None else None
    out = local_attention(qw, kw, vw, chunk_len=chunk_len, causal=causal, attention_mask=mask,
                          key_norm=key_norm, chunks_before=chunks_before,
                          chunks_after=chunks_after)  # fmt: skip
    return out[:, :, P0 - lo : P1 - lo]

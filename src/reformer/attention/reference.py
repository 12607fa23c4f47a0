"""Naive O(L^2) attention, written to be obviously right: the tests' ground truth.

Each function builds the dense (L x L) set of allowed pairs straight from the definitions
(Kitaev et al. 2020, sec. 2: buckets by random rotations, chunks of the bucket-sorted sequence,
and each hash round's candidate set S_r(i), the paper's P_i^(r)) and takes a plain softmax over
it. Nothing here is fast; nothing here shares code with the optimised kinds beyond the two
score constants.

Legend: B batch, H heads, L length, D head dim, R hash rounds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import SELF_SCORE


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _valid(attention_mask: Tensor | None, B: int, L: int, device: torch.device) -> Tensor:
    if attention_mask is None:
        return torch.ones(B, L, dtype=torch.bool, device=device)
    return attention_mask.to(device=device, dtype=torch.bool)


def _softmax_over(scores: Tensor, allowed: Tensor, v: Tensor) -> Tensor:
    """softmax over the allowed entries of each row; rows with none give 0."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def hash_reference(qk: Tensor, rotations: tuple[Tensor, ...]) -> Tensor:
    """Buckets (B, H, R, L), head by head and round by round: for factors K_1..K_F,
    bucket = sum_f h_f * prod_{g > f} K_g with h_f = argmax([x A ; -x A])."""
    B, H, L, _ = qk.shape
    R = rotations[0].shape[2]
    out = torch.zeros(B, H, R, L, dtype=torch.long, device=qk.device)
    x = qk.detach().to(rotations[0].dtype)
    for h in range(H):
        for r in range(R):
            for rot in rotations:
                proj = x[:, h] @ rot[h, :, r, :]  # (B, L, K_f / 2)
                h_f = torch.cat([proj, -proj], dim=-1).argmax(dim=-1)
                out[:, h, r] = out[:, h, r] * (2 * rot.shape[-1]) + h_f
    return out


def lsh_candidate_sets(
    buckets: Tensor,
    valid: Tensor,
    *,
    chunk_len: int,
    causal: bool,
    mode: str,
    chunks_before: int = 1,
    chunks_after: int = 0,
) -> Tensor:
    """S_r(i) as a dense bool (B, H, R, L, L) [.., i, j] from the buckets (B, H, R, L).

    chunk:  sort by (bucket, position) with padded positions in a bucket after all others,
            cut into chunks of chunk_len; j is a candidate of i when j's chunk is i's, one
            of the chunks_before before it or one of the chunks_after after it.
    window: j shares i's bucket and is i or one of i's chunk_len nearest earlier
            bucket-mates.
    Then: j must be a real token, and j <= i when causal.
    """
    B, H, R, L = buckets.shape
    K = int(buckets.max()) + 1
    pos = torch.arange(L, device=buckets.device)
    sets = torch.zeros(B, H, R, L, L, dtype=torch.bool, device=buckets.device)
    for b in range(B):
        for h in range(H):
            for r in range(R):
                bk = torch.where(valid[b], buckets[b, h, r], K)  # padding: a bucket of its own
                if mode == "chunk":
                    order = torch.argsort(bk * L + pos)
                    rank = torch.empty_like(order)
                    rank[order] = pos
                    chunk = rank // chunk_len
                    d = chunk[None, :] - chunk[:, None]  # [i, j]: j's chunk minus i's
                    s = (d >= -chunks_before) & (d <= chunks_after)
                else:
                    same = bk[:, None] == bk[None, :]
                    # nth: how many earlier positions share my bucket (my rank in the bucket)
                    nth = torch.tril(same.long(), -1).sum(dim=1)
                    back = nth[:, None] - nth[None, :]
                    s = same & (pos[None, :] <= pos[:, None]) & (back <= chunk_len)
                s = s & valid[b][None, :]
                if causal:
                    s = s & (pos[None, :] <= pos[:, None])
                sets[b, h, r] = s
    return sets


def lsh_attention_reference(
    qk: Tensor,
    v: Tensor,
    rotations: tuple[Tensor, ...],
    *,
    chunk_len: int,
    causal: bool,
    mode: str,
    attention_mask: Tensor | None = None,
    chunks_before: int = 1,
    chunks_after: int = 0,
) -> Tensor:
    """Softmax over the union of the rounds' candidate sets, each pair counted once.

    (B, H, L, D) x2 -> (B, H, L, D). Rows of padded queries are 0.
    """
    B, _H, L, _ = qk.shape
    valid = _valid(attention_mask, B, L, qk.device)
    sets = lsh_candidate_sets(
        hash_reference(qk, rotations),
        valid,
        chunk_len=chunk_len,
        causal=causal,
        mode=mode,
        chunks_before=chunks_before,
        chunks_after=chunks_after,
    )
    union = sets.any(dim=2)  # (B, H, L, L)
    scores = qk @ _unit(qk).transpose(-1, -2)
    eye = torch.eye(L, dtype=torch.bool, device=qk.device)
    scores = scores.masked_fill(eye, SELF_SCORE)
    return _softmax_over(scores, union, v)


def dense_attention_reference(
    q: Tensor,
    k: Tensor | None,
    v: Tensor,
    *,
    causal: bool,
    attention_mask: Tensor | None = None,
    chunk_len: int | None = None,
    chunks_before: int = 1,
    chunks_after: int = 0,
    wrap: bool = False,
) -> Tensor:
    """Full attention, or local attention when `chunk_len` is given (j's chunk is i's, one
    of the chunks_before before it or one of the chunks_after after it; with `wrap`,
    counted around the ends of the chunked sequence padded to a multiple of chunk_len).
    `k=None` means shared QK: unit keys, no 1/sqrt(D), self score SELF_SCORE.
    (B, H, L, D) -> (B, H, L, D); rows of padded queries are 0."""
    B, H, L, D = q.shape
    pos = torch.arange(L, device=q.device)
    allowed = _valid(attention_mask, B, L, q.device)[:, None, None, :].expand(B, H, L, L)
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    if chunk_len is not None:
        ci, cj = pos[:, None] // chunk_len, pos[None, :] // chunk_len
        d = cj - ci
        if wrap:
            n = -(-L // chunk_len)
            d = (d + chunks_before) % n - chunks_before  # the offset around the ring
        allowed = allowed & (d >= -chunks_before) & (d <= chunks_after)
    if k is None:
        scores = q @ _unit(q).transpose(-1, -2)
        scores = scores.masked_fill(torch.eye(L, dtype=torch.bool, device=q.device), SELF_SCORE)
    else:
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    return _softmax_over(scores, allowed, v)


def _keys_reference(qk: Tensor, key_norm: str) -> Tensor:
    if key_norm == "rms":  # transformers: x / sqrt(mean(x^2) + 1e-6) / sqrt(D)
        D = qk.shape[-1]
        return qk / torch.sqrt((qk * qk).sum(-1, keepdim=True) / D + 1e-6) / math.sqrt(D)
    return _unit(qk)


def lsh_rounds_reference(
    qk: Tensor,
    v: Tensor,
    rotations: tuple[Tensor, ...],
    *,
    chunk_len: int,
    causal: bool,
    wrap: bool,
    attention_mask: Tensor | None = None,
    key_norm: str = "l2",
    chunks_before: int = 1,
    chunks_after: int = 0,
) -> Tensor:
    """The chunk layout without duplicate correction, round by round: transformers' and
    trax's semantics (lsh_dedup=False), with or without their look-back wrap.

    Each round is sorted by (bucket, position), padding (to a multiple of chunk_len, and the
    user's) in a bucket after all others, and cut into chunks; the rounds are laid end to
    end. A query attends to its chunk and the chunk before it in that concatenation: with
    `wrap` cyclically (a round's first chunk sees the previous round's last, round 0's the
    last round's), without it not across a round's start. Without `wrap`, chunks_before and
    chunks_after widen the window to that many chunks on each side, within the round. A
    sequence of one chunk has no look-back. Per query and round: softmax over its window, a
    key there twice counted twice, j == i scored SELF_SCORE; then the rounds weighted by
    their log-sum-exps. (B, H, L, D) x2 -> (B, H, L, D); rows of padded queries are
    meaningless.
    """
    B, H, L, _ = qk.shape
    C = chunk_len
    Lp = -(-L // C) * C
    valid = torch.zeros(B, Lp, dtype=torch.bool, device=qk.device)
    valid[:, :L] = _valid(attention_mask, B, L, qk.device)
    qk_p = torch.cat([qk, qk.new_zeros(B, H, Lp - L, qk.shape[-1])], dim=2)
    v_p = torch.cat([v, v.new_zeros(B, H, Lp - L, v.shape[-1])], dim=2)
    buckets = hash_reference(qk_p, rotations)  # (B, H, R, Lp)
    R = buckets.shape[2]
    K = int(buckets.max()) + 1
    scores = qk_p @ _keys_reference(qk_p, key_norm).transpose(-1, -2)  # (B, H, Lp, Lp)
    scores = scores.masked_fill(torch.eye(Lp, dtype=torch.bool, device=qk.device), SELF_SCORE)
    out = torch.zeros_like(v_p)
    for b in range(B):
        for h in range(H):
            chunks = _sorted_chunks(buckets[b, h], valid[b], K, C)  # (R * N, C)
            lse, outs = [], []
            for r in range(R):
                count = _round_pair_counts(
                    chunks, r, R, valid[b], causal, wrap, chunks_before, chunks_after, qk.dtype
                )
                s = scores[b, h].masked_fill(count == 0, float("-inf")) + count.clamp(min=1).log()
                s = s.masked_fill(~valid[b][:, None], 0.0)  # padded queries: anything finite
                lse.append(torch.logsumexp(s, dim=-1))
                outs.append(torch.softmax(s, dim=-1) @ v_p[b, h])
            w = torch.softmax(torch.stack(lse), dim=0)  # (R, Lp)
            out[b, h] = (w[..., None] * torch.stack(outs)).sum(0)
    return out[:, :, :L]


def _sorted_chunks(buckets: Tensor, valid: Tensor, K: int, C: int) -> Tensor:
    """(R * N, C): the positions of each round sorted by (bucket, position), padding in
    bucket K after all others, the rounds laid end to end and cut into chunks of C.
    buckets: (R, Lp) of one head; valid: (Lp,) real tokens."""
    R, Lp = buckets.shape
    pos = torch.arange(Lp, device=buckets.device)
    seq = torch.cat(
        [torch.argsort(torch.where(valid, buckets[r], K) * Lp + pos) for r in range(R)]
    )  # (R * Lp,)
    return seq.view(R * (Lp // C), C)


def _round_pair_counts(
    chunks: Tensor,
    r: int,
    R: int,
    valid: Tensor,
    causal: bool,
    wrap: bool,
    chunks_before: int,
    chunks_after: int,
    dtype: torch.dtype,
) -> Tensor:
    """(Lp, Lp) [i, j]: how many times key j sits in query i's window in round r (a key
    there twice, through the wrap, counts twice). chunks: (R * N, C) positions of the
    rounds' sorted chunks laid end to end; valid: (Lp,) real tokens."""
    N, Lp = chunks.shape[0] // R, valid.shape[0]
    count = torch.zeros(Lp, Lp, dtype=dtype, device=chunks.device)  # [i, j]
    for c in range(r * N, (r + 1) * N):
        window = [chunks[c]]
        if wrap:
            if N > 1:
                window.insert(0, chunks[(c - 1) % (R * N)])
        else:
            first, n = r * N, c % N
            for o in (*range(-chunks_before, 0), *range(1, chunks_after + 1)):
                if 0 <= n + o < N:
                    window.append(chunks[first + n + o])
        keys = torch.cat(window)
        for i in chunks[c].tolist():
            for j in keys.tolist():
                if valid[j] and (not causal or j <= i):
                    count[i, j] += 1
    return count

"""LSH attention (DESIGN.md section 2): hash, sort, attend within chunks, unsort, combine.

Legend: B batch, H heads, L length, Lp padded length (multiple of C), D head dim,
R hash rounds, K buckets, C chunk length, N = Lp / C chunks per round, S = R * Lp.

The candidate set S_r(i) of query i in round r:
  - mode "chunk" (the paper's): every j in i's sorted chunk or the previous chunk *of the
    same round*;
  - mode "window" (strictly causal): j in i's bucket among its C nearest earlier
    bucket-mates. The sorted chunk + one-back layout always covers it, and it depends on
    positions <= i only, so no future token can move it.
Both keep j <= i when causal, drop padded keys, and give j == i the score SELF_SCORE.
Scores are s_ij = qk_i . qk_j / |qk_j| - log N_ij, with N_ij the number of rounds whose
candidate set holds j; combining rounds by their log-sum-exps is then exactly softmax over
the union of the candidate sets (`reference.lsh_attention_reference` builds that union).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .chunked import chunk_attention, row_slices
from .common import (
    MASK_SCORE,
    SELF_SCORE,
    look_one_back,
    pad_to,
    padded_length,
    unit_keys,
    upcast,
    valid_positions,
)

# Bucket counts above this are factorised as K1 * K2 with K1 ~ K2 ~ sqrt(K): hashing costs
# O(L * (K1 + K2)) instead of O(L * K), which matters because K grows with L.
FACTORISE_ABOVE = 128


def auto_n_buckets(length: int, chunk_len: int) -> int:
    """The automatic bucket count for a (padded) length: 2 * next_pow2(ceil(L / chunk_len)).

    With K ~ 2 L / C the average bucket holds about half a chunk (the paper's ratio), so a
    bucket rarely spills over the chunk + previous-chunk window.
    """
    n_chunks = max(1, -(-length // chunk_len))
    return 2 * 2 ** math.ceil(math.log2(n_chunks))


def bucket_factors(n_buckets: int) -> tuple[int, ...]:
    """Split K into even factors hashed by separate rotations: (K,) or (K1, K2), K1 >= K2."""
    if n_buckets <= FACTORISE_ABOVE:
        return (n_buckets,)
    best = None
    for k2 in range(2, math.isqrt(n_buckets) + 1, 2):
        if n_buckets % k2 == 0 and (n_buckets // k2) % 2 == 0:
            best = (n_buckets // k2, k2)
    return best if best is not None else (n_buckets,)


def draw_rotations(
    n_heads: int,
    head_dim: int,
    n_hashes: int,
    n_buckets: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, ...]:
    """Random rotations, one (H, D, R, K_f / 2) tensor per bucket factor K_f."""
    return tuple(
        torch.randn(
            n_heads, head_dim, n_hashes, k // 2, generator=generator, device=device, dtype=dtype
        )
        for k in bucket_factors(n_buckets)
    )


def hash_vectors(qk: Tensor, rotations: tuple[Tensor, ...]) -> Tensor:
    """Angular LSH: (B, H, L, D) -> buckets (B, H, R, L) in [0, K), K = prod of factors.

    Each factor f: h_f = argmax([x A_f ; -x A_f]); the bucket is the mixed-radix number of the
    factor hashes. The vectors are detached: bucket choice carries no gradient.
    """
    x = qk.detach().to(rotations[0].dtype)
    buckets = None
    for rot in rotations:
        proj = torch.einsum("bhld,hdrk->bhrlk", x, rot)  # (B, H, R, L, K_f / 2)
        h = torch.cat([proj, -proj], dim=-1).argmax(dim=-1)  # (B, H, R, L)
        buckets = h if buckets is None else buckets * (2 * rot.shape[-1]) + h
    assert buckets is not None
    return buckets


def lsh_attention(
    qk: Tensor,
    v: Tensor,
    rotations: tuple[Tensor, ...],
    *,
    chunk_len: int,
    causal: bool,
    mode: str,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Shared-QK LSH attention.

    Args:
        qk: (B, H, L, D) shared query-key vectors.
        v: (B, H, L, D) values.
        rotations: from `draw_rotations`, one (H, D, R, K_f / 2) tensor per bucket factor.
        chunk_len: C; any L works (padded internally to a multiple of C).
        causal: keep only j <= i.
        mode: "window" (strictly causal; needs causal) or "chunk".
        attention_mask: optional (B, L) bool/int, True/1 at real tokens, False/0 at padding.
    Returns:
        (B, H, L, D). Outputs at padded positions are finite but meaningless.
    """
    assert mode in ("window", "chunk"), mode
    B, H, L, D = qk.shape
    C = chunk_len
    R = rotations[0].shape[2]
    K = math.prod(2 * r.shape[-1] for r in rotations)
    Lp = padded_length(L, C)
    N = Lp // C
    S = R * Lp
    device = qk.device

    qk = pad_to(qk, Lp, dim=2)  # (B, H, Lp, D)
    v = pad_to(v, Lp, dim=2)
    valid = valid_positions(B, L, Lp, attention_mask, device)  # (B, Lp)

    # 1. Hash; padded positions get bucket K of their own, so they sort after every real
    #    token and never change the chunks real tokens fall in.
    buckets = hash_vectors(qk, rotations)  # (B, H, R, Lp)
    buckets = buckets.masked_fill(~valid[:, None, None, :], K)
    # Round-qualified bucket id: equal ids mean same round *and* same bucket.
    rb = buckets + torch.arange(R, device=device)[:, None] * (K + 1)  # (B, H, R, Lp)

    # 2. Sort by (round, bucket, position). sticker: sorted slot -> r * Lp + position.
    pos = torch.arange(Lp, device=device)
    sort_key = (rb * Lp + pos).flatten(2)  # (B, H, S)
    sorted_key, sticker = sort_key.sort(dim=-1)
    undo = torch.empty_like(sticker)  # (r * Lp + position) -> sorted slot
    undo.scatter_(-1, sticker, torch.arange(S, device=device).expand_as(sticker))
    pos_s = sticker % Lp  # (B, H, S) position of each sorted slot
    rb_s = sorted_key // Lp  # (B, H, S) round-qualified bucket of each slot

    def gather_rows(x: Tensor) -> Tensor:  # (B, H, Lp, D) -> (B, H, R * N, C, D)
        return x.gather(2, pos_s[..., None].expand(-1, -1, -1, x.shape[-1])).view(
            B, H, R * N, C, x.shape[-1]
        )

    M = B * H * R * N  # rows: independent (query chunk, key window) pairs
    q_c = gather_rows(qk).view(M, C, D)
    k_c = look_one_back(gather_rows(unit_keys(qk)), dim=-2).view(M, 2 * C, D)
    v_c = look_one_back(gather_rows(v), dim=-2).view(M, 2 * C, D)

    # 3-4. Each (query, key) pair of the layout gets an int8 code: 0 if j is not in S_r(i),
    #      else N_ij (the number of rounds whose candidate set holds j), or R + 1 for j == i.
    code = _pair_codes(pos_s, rb_s, undo, buckets, R=R, N=N, C=C, K=K, mode=mode, causal=causal)

    # 5. Scores q.k + lut[code]: masked, - log N_ij (exact duplicate correction), and the
    #    self score (added to q.k_i: exp(SELF_SCORE) underflows exactly as an override would).
    dtype = upcast(qk[:1, :1, :1, :1]).dtype
    counts = torch.arange(1, R + 1, device=device, dtype=dtype)
    lut = torch.cat(
        [
            torch.tensor([MASK_SCORE], device=device, dtype=dtype),
            -torch.log(counts),
            torch.tensor([SELF_SCORE], device=device, dtype=dtype) - math.log(R),
        ]
    )
    out_c, lse = chunk_attention(q_c, k_c, v_c, code, lut)  # (M, C, D), (M, C)

    # 6. Unsort and combine the rounds by their log-sum-exps.
    out = out_c.reshape(B, H, S, D).gather(2, undo[..., None].expand(-1, -1, -1, D))
    out = out.view(B, H, R, Lp, D)
    lse = lse.reshape(B, H, S).gather(2, undo).view(B, H, R, Lp)
    weights = torch.softmax(lse, dim=2).to(out.dtype)  # (B, H, R, Lp)
    out = (out * weights[..., None]).sum(dim=2)  # (B, H, Lp, D)
    return out[:, :, :L]


@torch.no_grad()
def _pair_codes(
    pos_s: Tensor,
    rb_s: Tensor,
    undo: Tensor,
    buckets: Tensor,
    *,
    R: int,
    N: int,
    C: int,
    K: int,
    mode: str,
    causal: bool,
) -> Tensor:
    """int8 codes (B * H * R * N, C, 2C) of the chunk + one-back layout, slice by slice.

    pos_s, rb_s: (B, H, S) position and round-qualified bucket of each sorted slot;
    undo: (B, H, S) sorted slot of (r * Lp + position); buckets: (B, H, R, Lp).

    N_ij uses a per-round int32 key e_r(x) such that j is in S_r(i) exactly when
    0 <= e_r(i) - e_r(j) <= T:
      chunk:  e = chunk index of x in round r's sorted order, T = 1;
      window: e = bucket * (Lp + C + 1) + sorted slot, T = C (slots of one bucket are
              consecutive, and the spacing keeps different buckets more than C apart).
    """
    B, H, S = pos_s.shape
    Lp = S // R
    M = B * H * R * N
    device = pos_s.device

    def rows(x: Tensor) -> tuple[Tensor, Tensor]:  # (..., S) -> (rows, C), (rows, 2C)
        x = x.reshape(-1, R * N, C)
        return x.reshape(-1, C), look_one_back(x, dim=-1).reshape(-1, 2 * C)

    q_pos, k_pos = rows(pos_s)
    q_rb, k_rb = rows(rb_s)
    first = (torch.arange(M, device=device) % N) == 0  # each round's first chunk
    back_half = torch.arange(2 * C, device=device) < C
    # sorted-slot distance from the query back to the key: C + c - w, whatever the row
    back = C + torch.arange(C, device=device)[:, None] - torch.arange(2 * C, device=device)
    band = (back >= 0) & (back <= C)  # (C, 2C) window: the C nearest earlier slots

    slots = undo.view(B, H, R, Lp) - (torch.arange(R, device=device) * Lp)[:, None]
    if mode == "chunk":
        keys, T = slots.div(C, rounding_mode="floor"), 1
    else:
        keys, T = buckets * (Lp + C + 1) + slots, C
    keys = keys.to(torch.int32)  # (B, H, R, Lp)
    q_idx = pos_s.view(B, H, S)
    e_q = torch.stack([keys[:, :, r].gather(2, q_idx) for r in range(R)])  # (R, B, H, S)
    e_q, e_k = rows(e_q.view(R * B, H, S))  # (R*M, C), (R*M, 2C): round-major
    e_q, e_k = e_q.view(R, M, C), e_k.view(R, M, 2 * C)

    code = torch.empty(M, C, 2 * C, dtype=torch.int8, device=device)
    # Rows come in blocks of N chunks of one (batch, head, round); slices stay inside a block,
    # so a slice's own round r is known: an allowed pair is in S_r(i) by construction, and
    # only the other R - 1 rounds need counting.
    for block in range(M // N):
        r_own = block % R
        for part in row_slices(N, C * 2 * C):
            sl = slice(block * N + part.start, block * N + part.stop)
            qp, kp = q_pos[sl, :, None], k_pos[sl, None, :]
            kr = k_rb[sl, None, :]
            ok = (kr % (K + 1)) != K  # padded keys sit in bucket K
            ok = ok & ~(first[sl, None, None] & back_half)  # no wrap into another round
            if mode == "window":
                ok = ok & (q_rb[sl, :, None] == kr) & band
            if causal:
                ok = ok & (kp <= qp)
            ok = ok.expand(qp.shape[0], C, 2 * C)
            count = ok.to(torch.int8)  # (m, C, 2C): round r_own itself
            for r in range(R):
                if r != r_own:
                    d = e_q[r, sl, :, None] - e_k[r, sl, None, :]
                    count += (d >= 0) & (d <= T)
            count.masked_fill_(~ok, 0)
            count.masked_fill_(ok & (qp == kp), R + 1)
            code[sl] = count
    return code

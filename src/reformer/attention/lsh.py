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

from .common import (
    MASK_SCORE,
    SELF_SCORE,
    look_one_back,
    lookback_ok,
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

    q_c = gather_rows(qk)  # (B, H, RN, C, D)
    k_c = look_one_back(gather_rows(unit_keys(qk)), dim=-2)  # (B, H, RN, 2C, D)
    v_c = look_one_back(gather_rows(v), dim=-2)  # (B, H, RN, 2C, D)

    # 3. Candidate sets in round r, as a mask over the chunk + one-back layout.
    q_pos = pos_s.view(B, H, R * N, C)[..., :, None]  # (B, H, RN, C, 1)
    k_pos = look_one_back(pos_s.view(B, H, R * N, C), dim=-1)[..., None, :]  # (.., 1, 2C)
    q_rb = rb_s.view(B, H, R * N, C)[..., :, None]
    k_rb = look_one_back(rb_s.view(B, H, R * N, C), dim=-1)[..., None, :]
    k_valid = (k_rb % (K + 1)) != K  # padded keys sit in bucket K
    allowed = lookback_ok(R, N, C, device) & k_valid  # (B, H, RN, C, 2C); "chunk" mode
    if mode == "window":
        slot = torch.arange(S, device=device).view(R * N, C)
        back = slot[:, :, None] - look_one_back(slot, dim=-1)[:, None, :]  # (RN, C, 2C)
        allowed = allowed & (q_rb == k_rb) & (back >= 0) & (back <= C)
    if causal:
        allowed = allowed & (k_pos <= q_pos)

    # 4. N_ij: in how many rounds' candidate sets is j? (>= 1 wherever allowed.)
    n_rounds = _rounds_containing(undo, buckets, q_pos, k_pos, R=R, Lp=Lp, C=C, mode=mode)

    # 5. Scores, self rule, duplicate correction; softmax within the round.
    dots = upcast(torch.matmul(q_c, k_c.transpose(-1, -2)))  # (B, H, RN, C, 2C)
    dots = dots.masked_fill(q_pos == k_pos, SELF_SCORE)
    dots = dots - torch.log(n_rounds.clamp_min(1).to(dots.dtype))
    dots = dots.masked_fill(~allowed, MASK_SCORE)
    lse = torch.logsumexp(dots, dim=-1)  # (B, H, RN, C)
    probs = torch.exp(dots - lse[..., None]).to(v_c.dtype)
    out_c = torch.matmul(probs, v_c)  # (B, H, RN, C, D)

    # 6. Unsort and combine the rounds by their log-sum-exps.
    out = out_c.view(B, H, S, D).gather(2, undo[..., None].expand(-1, -1, -1, D))
    out = out.view(B, H, R, Lp, D)
    lse = lse.view(B, H, S).gather(2, undo).view(B, H, R, Lp)
    weights = torch.softmax(lse, dim=2).to(out.dtype)  # (B, H, R, Lp)
    out = (out * weights[..., None]).sum(dim=2)  # (B, H, Lp, D)
    return out[:, :, :L]


def _rounds_containing(
    undo: Tensor,
    buckets: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    R: int,
    Lp: int,
    C: int,
    mode: str,
) -> Tensor:
    """Count, for each (query, key) pair of the layout, the rounds whose candidate set holds
    the key (before the round-independent causal and padding rules).

    undo: (B, H, S) sorted slot of (r * Lp + position); buckets: (B, H, R, Lp);
    q_pos: (B, H, RN, C, 1), k_pos: (B, H, RN, 1, 2C). Returns int (B, H, RN, C, 2C).

    Per round r each position x gets an int32 key e_r(x) such that j is in S_r(i) exactly
    when 0 <= e_r(i) - e_r(j) <= T:
      chunk:  e = chunk index of x in round r's sorted order, T = 1;
      window: e = bucket * (Lp + C + 1) + sorted slot, T = C (slots of one bucket are
              consecutive, and the spacing keeps different buckets more than C apart).
    """
    B, H = undo.shape[:2]
    RN, Cq = q_pos.shape[2], q_pos.shape[3]
    q_idx = q_pos.reshape(B, H, RN * Cq)
    k_idx = k_pos.reshape(B, H, RN * 2 * Cq)
    slots = undo.view(B, H, R, Lp) - (torch.arange(R, device=undo.device) * Lp)[:, None]
    if mode == "chunk":
        keys, T = slots.div(C, rounding_mode="floor"), 1
    else:
        keys, T = buckets * (Lp + C + 1) + slots, C
    keys = keys.to(torch.int32)  # (B, H, R, Lp)
    count = torch.zeros(B, H, RN, Cq, 2 * Cq, dtype=torch.int32, device=undo.device)
    for r in range(R):
        e_q = keys[:, :, r].gather(2, q_idx).view(B, H, RN, Cq, 1)
        e_k = keys[:, :, r].gather(2, k_idx).view(B, H, RN, 1, 2 * Cq)
        diff = e_q - e_k  # (B, H, RN, C, 2C)
        count += (diff >= 0) & (diff <= T)
    return count

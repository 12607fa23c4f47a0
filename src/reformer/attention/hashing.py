"""LSH hashing (Kitaev et al. 2020, sec. 2): bucket counts, random rotations, angular hashes.

Legend: B batch, H heads, L length, D head dim, R hash rounds, K buckets (K_f per factor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
    factors: tuple[int, ...] | None = None,
) -> tuple[Tensor, ...]:
    """Random rotations, one (H, D, R, K_f / 2) tensor per bucket factor K_f, most
    significant factor first (the order `hash_vectors` takes).

    factors: explicit factors in transformers' order (first least significant): one
    (H, D, R, sum K_f / 2) tensor is drawn and sliced per factor, exactly as transformers
    draws it, so the same seed gives the same buckets. None: `bucket_factors(n_buckets)`,
    each factor drawn on its own.
    """
    if factors is not None:
        width = sum(factors) // 2
        rot = torch.randn(
            n_heads, head_dim, n_hashes, width, generator=generator, device=device, dtype=dtype
        )
        starts = [sum(factors[:i]) // 2 for i in range(len(factors))]
        parts = [rot[..., a : a + k // 2] for a, k in zip(starts, factors)]
        return tuple(reversed(parts))
    return tuple(
        torch.randn(
            n_heads, head_dim, n_hashes, k // 2, generator=generator, device=device, dtype=dtype
        )
        for k in bucket_factors(n_buckets)
    )


# Positions hashed at a time: the projections of a slice, (B, H, R, l, K_f / 2), hold at most
# this many entries. K grows with L (K ~ 2 L / C, factorised: K_f ~ sqrt(K)), so hashing the
# whole sequence at once would need O(L^1.5) memory: 8 GiB at 2^20 tokens, 4 heads, 4 rounds.
HASH_ENTRIES = 1 << 22


def hash_vectors(qk: Tensor, rotations: tuple[Tensor, ...]) -> Tensor:
    """Angular LSH: (B, H, L, D) -> buckets (B, H, R, L) in [0, K), K = prod of factors.

    Each factor f: h_f = argmax([x A_f ; -x A_f]); the bucket is the mixed-radix number of the
    factor hashes. The vectors are detached: bucket choice carries no gradient. Positions
    are hashed a slice at a time (HASH_ENTRIES), which changes no bucket.
    """
    x = qk.detach().to(rotations[0].dtype)
    B, H, L, _ = x.shape
    R = rotations[0].shape[2]
    widest = max(rot.shape[-1] for rot in rotations)
    step = max(1, HASH_ENTRIES // max(1, B * H * R * widest))
    buckets = torch.empty(B, H, R, L, dtype=torch.long, device=x.device)
    for start in range(0, L, step):
        xs = x[:, :, start : start + step]
        out = None
        for rot in rotations:
            proj = torch.einsum("bhld,hdrk->bhrlk", xs, rot)  # (B, H, R, l, K_f / 2)
            # argmax of [proj, -proj] (first index on ties) without building it
            top, arg_top = proj.max(dim=-1)
            low, arg_low = proj.min(dim=-1)
            del proj
            h = torch.where(top >= -low, arg_top, arg_low + rot.shape[-1])  # (B, H, R, l)
            out = h if out is None else out * (2 * rot.shape[-1]) + h
        assert out is not None
        buckets[:, :, :, start : start + step] = out
    return buckets

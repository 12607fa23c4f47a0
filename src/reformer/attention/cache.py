"""Per-layer decode cache: the keys and values of the positions so far and, for LSH, each
bucket's most recent members; and attention for one new token through it.

Legend: B batch, H heads, D head dim, R hash rounds, K buckets, C chunk length.

Strictly causal attention makes cached decoding exact: in `window` mode the candidates of
token t are t itself and its C most recent earlier bucket-mates in each round, which depend
on tokens <= t only. With the duplicate correction, the full forward's combination of rounds
equals one softmax over the union of the rounds' candidate sets; `attend_one` computes that
softmax directly. Per token, LSH and local attention touch at most R * C + 1 and 2C keys
(the cost stays flat as the prefix grows); full attention touches all earlier keys.

`Attention.forward` fills the cache when it runs the prompt (position 0) and calls
`attend_one` for each later token: one forward, with or without a cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .common import SELF_SCORE
from .hashing import hash_vectors


@dataclass
class LayerCache:
    """One layer's decode state for sequences of `total_len` tokens (hashed as the full
    forward of that length hashes). Empty until the prompt has run through the layer."""

    total_len: int
    keys: Tensor | None = None  # (B, H, total_len, D): unit keys (shared QK) or keys
    values: Tensor | None = None  # (B, H, total_len, D)
    rotations: tuple[Tensor, ...] | None = None  # LSH only: the prompt's, reused
    mates: Tensor | None = None  # (B, H, R, K, C) positions of each bucket's last C, -1 empty

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search: each new beam's parent)."""
        for name in ("keys", "values", "mates"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))


def fill(lc: LayerCache, kind: str, q: Tensor, k: Tensor, v: Tensor, rotations, n_buckets: int,
         chunk_len: int) -> None:  # fmt: skip
    """Store the prompt's keys and values (B, H, P, D) and, for LSH, its buckets' members."""
    B, H, P, D = v.shape
    lc.keys = v.new_zeros(B, H, lc.total_len, D)
    lc.values = v.new_zeros(B, H, lc.total_len, D)
    lc.keys[:, :, :P], lc.values[:, :, :P] = k, v
    if kind == "lsh":
        lc.rotations = rotations
        R = rotations[0].shape[2]
        lc.mates = torch.full((B, H, R, n_buckets, chunk_len), -1, dtype=torch.long,
                              device=v.device)  # fmt: skip
        _fill_mates(lc.mates, hash_vectors(q, rotations))


def _fill_mates(mates: Tensor, buckets: Tensor) -> None:
    """Prefill: each bucket's last C positions among buckets (B, H, R, P), oldest first."""
    B, H, R, P = buckets.shape
    K, C = mates.shape[3], mates.shape[4]
    pos = torch.arange(P, device=buckets.device)
    sorted_key, order = (buckets * P + pos).sort(dim=-1)  # by (bucket, position)
    sorted_b = sorted_key // P
    last = torch.searchsorted(sorted_b.contiguous(), sorted_b.contiguous(), right=True) - 1
    back = last - torch.arange(P, device=buckets.device)  # 0 for a bucket's newest member
    keep = back < C
    slot = torch.where(keep, sorted_b * C + (C - 1 - back), K * C)  # K * C: a discard slot
    flat = torch.full((B, H, R, K * C + 1), -1, dtype=torch.long, device=buckets.device)
    flat.scatter_(-1, slot, order)
    mates.copy_(flat[..., : K * C].view(B, H, R, K, C))


def _insert_mates(mates: Tensor, buckets: Tensor, pos: int) -> None:
    """Append position `pos` to its bucket's row in each round. buckets: (B, H, R)."""
    C = mates.shape[-1]
    idx = buckets[..., None, None].expand(*buckets.shape, 1, C)  # (B, H, R, 1, C)
    row = mates.gather(3, idx)
    row = torch.cat([row[..., 1:], torch.full_like(row[..., :1], pos)], dim=-1)
    mates.scatter_(3, idx, row)


def attend_one(
    lc: LayerCache, kind: str, shared_qk: bool, chunk_len: int, q: Tensor, k: Tensor,
    v: Tensor, t: int,
) -> Tensor:  # fmt: skip
    """Attention of the token at position t through the cache: q, k (stored form), v
    (B, H, 1, D) -> (B, H, D); its key and value are appended."""
    B, H, _, D = q.shape
    assert lc.keys is not None and lc.values is not None, "the prompt must run first"
    lc.keys[:, :, t] = k[:, :, 0]
    lc.values[:, :, t] = v[:, :, 0]
    q = q[:, :, 0]  # (B, H, D)
    scale = 1.0 if shared_qk else 1.0 / math.sqrt(D)
    if kind == "lsh":
        assert lc.rotations is not None and lc.mates is not None
        buckets = hash_vectors(q[:, :, None], lc.rotations)[..., 0]  # (B, H, R)
        C = chunk_len
        idx = buckets[..., None, None].expand(*buckets.shape, 1, C)
        cand = lc.mates.gather(3, idx).flatten(2)  # (B, H, R * C) earlier bucket-mates
        cand, _ = cand.sort(dim=-1)
        dup = torch.zeros_like(cand, dtype=torch.bool)
        dup[..., 1:] = cand[..., 1:] == cand[..., :-1]  # union: each position once
        valid = (cand >= 0) & ~dup
        cand = cand.clamp_min(0)
        _insert_mates(lc.mates, buckets, t)
    else:
        start = max(0, (t // chunk_len - 1) * chunk_len) if kind == "local" else 0
        cand = torch.arange(start, t, device=q.device).expand(B, H, -1)
        valid = torch.ones_like(cand, dtype=torch.bool)
    keys = lc.keys.gather(2, cand[..., None].expand(-1, -1, -1, D))  # (B, H, n, D)
    vals = lc.values.gather(2, cand[..., None].expand(-1, -1, -1, D))
    scores = (keys @ q[..., None])[..., 0] * scale  # (B, H, n)
    scores = scores.masked_fill(~valid, float("-inf"))
    if shared_qk:
        self_score = torch.full_like(scores[..., :1], SELF_SCORE)
    else:
        self_score = (k[:, :, 0] * q).sum(-1, keepdim=True) * scale
    scores = torch.cat([scores, self_score], dim=-1)
    vals = torch.cat([vals, v], dim=2)  # (B, H, n + 1, D)
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return (probs.to(vals.dtype)[..., None, :] @ vals)[..., 0, :]  # (B, H, D)

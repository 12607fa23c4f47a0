"""Pieces shared by the chunked attention kinds (LSH and local) and their references.

Legend: B batch, H heads, L length, Lp length padded to a multiple of C, D head dim,
C chunk length, N chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# A masked-out score. Finite, so a row with no candidate (a padded query) gives a finite
# garbage output instead of NaN, which would leak through 0 * NaN into real rows later;
# exp(MASK - lse) underflows to exactly 0 for every real row, whose lse >= SELF_SCORE.
MASK_SCORE = -1e9
# The score of a token with itself under shared-QK attention (the paper's rule: a token
# attends to itself only when it has no other candidate). Large negative rather than -inf
# so that such a token still gets a well-defined output; exp(SELF_SCORE) == 0 in fp32/64.
SELF_SCORE = -1e5


def padded_length(length: int, chunk_len: int) -> int:
    """Smallest multiple of `chunk_len` >= `length`."""
    return -(-length // chunk_len) * chunk_len


def pad_to(x: Tensor, length: int, dim: int) -> Tensor:
    """Zero-pad `x` along `dim` to `length`."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, extra]
    return F.pad(x, pad)


def valid_positions(
    batch: int, length: int, padded: int, attention_mask: Tensor | None, device: torch.device
) -> Tensor:
    """(B, Lp) bool: True at real tokens, False at user padding and internal padding."""
    valid = torch.zeros(batch, padded, dtype=torch.bool, device=device)
    if attention_mask is None:
        valid[:, :length] = True
    else:
        valid[:, :length] = attention_mask.to(device=device, dtype=torch.bool)
    return valid


def look_around(x: Tensor, before: int = 1, after: int = 0, dim: int = -2) -> Tensor:
    """(..., N, C, ...) -> (..., N, (before + 1 + after) C, ...): each chunk preceded by the
    `before` chunks before it and followed by the `after` chunks after it, in position order.

    `dim` is the chunk-length dim; the chunk-index dim is the one before it. Chunks past
    either end wrap around (chunk -1 is the last one), which callers must mask
    (`around_ok`).
    """
    dim = dim % x.dim()
    parts = [x.roll(k, dims=dim - 1) for k in range(before, -after - 1, -1)]
    return torch.cat(parts, dim=dim)


def around_ok(
    rounds: int,
    n_chunks: int,
    chunk_len: int,
    device: torch.device,
    before: int = 1,
    after: int = 0,
) -> Tensor:
    """(R * N, 1, W C) bool layout mask for `look_around` (W = before + 1 + after): False
    on the key blocks of chunks outside the round (a wrap-around would reach into another
    round, or, with few chunks, duplicate the chunk's own keys)."""
    chunk = torch.arange(n_chunks, device=device)[:, None]  # (N, 1)
    offset = torch.arange(-before, after + 1, device=device)  # (W,)
    inside = ((chunk + offset) >= 0) & ((chunk + offset) < n_chunks)  # (N, W)
    ok = inside.repeat_interleave(chunk_len, dim=1)[:, None, :]  # (N, 1, W C)
    return ok.repeat(rounds, 1, 1)


def unit_keys(qk: Tensor, norm: str = "l2") -> Tensor:
    """Shared-QK keys: queries scaled to unit length (no further 1/sqrt(d) temperature).

    norm "l2": qk / max(|qk|, 1e-6); "rms": transformers' qk * rsqrt(mean(qk^2) + 1e-6) /
    sqrt(D), the same direction and a length 1 / sqrt(1 + 1e-6 D / |qk|^2) (imported
    checkpoints use it so that their scores match to the last digit).
    """
    if norm == "rms":
        scale = torch.rsqrt(qk.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return qk * scale / math.sqrt(qk.shape[-1])
    assert norm == "l2", norm
    return F.normalize(qk, p=2.0, dim=-1, eps=1e-6)


def upcast(scores: Tensor) -> Tensor:
    """Scores in at least float32: softmax statistics in half precision lose too much."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        return scores.float()
    return scores

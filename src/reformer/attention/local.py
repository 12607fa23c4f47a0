"""Local attention: each chunk of C positions attends to itself, the `before` chunks
before it and the `after` chunks after it (1 and 0 for causal models: the previous chunk).

Legend: B batch, H heads, L length, Lp padded length, D head dim, C chunk length,
N = Lp / C chunks, W = (before + 1 + after) C keys per chunk. The authors' enwik8 model
interleaves it with LSH layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .chunked import chunk_attention
from .common import (
    MASK_SCORE,
    SELF_SCORE,
    around_ok,
    look_around,
    pad_to,
    padded_length,
    unit_keys,
    upcast,
    valid_positions,
)


def local_attention(
    q: Tensor,
    k: Tensor | None,
    v: Tensor,
    *,
    chunk_len: int,
    causal: bool,
    attention_mask: Tensor | None = None,
    key_norm: str = "l2",
    chunks_before: int = 1,
    chunks_after: int = 0,
    wrap: bool = False,
) -> Tensor:
    """Chunked local attention over the own chunk and its neighbours.

    Args:
        q: (B, H, L, D) queries (the shared query-keys when `k` is None).
        k: (B, H, L, D) keys, or None for shared-QK attention (unit keys, no 1/sqrt(D),
            a token sees itself only when it has nothing else; as in LSH attention).
        v: (B, H, L, D) values.
        chunk_len: C; any L works.
        causal: keep only j <= i.
        attention_mask: optional (B, L), True/1 at real tokens.
        key_norm: shared-QK keys' normalisation, "l2" or "rms" (`common.unit_keys`).
        chunks_before, chunks_after: how many neighbouring chunks on each side a chunk
            attends to (chunks past the sequence's ends are masked unless `wrap`).
        wrap: (not causal) the neighbours wrap around the ends, as transformers' encoders
            do: chunk 0's look-back is the last chunk (a sequence of one chunk attends to
            itself once).
    Returns:
        (B, H, L, D).
    """
    B, H, L, D = q.shape
    C = chunk_len
    Lp = padded_length(L, C)
    N = Lp // C
    shared = k is None
    keys = unit_keys(q, key_norm) if shared else k * (1.0 / math.sqrt(D))
    nb, na = chunks_before, chunks_after
    W = (nb + 1 + na) * C
    q_c = pad_to(q, Lp, 2).view(B, H, N, C, D)
    k_c = look_around(pad_to(keys, Lp, 2).view(B, H, N, C, D), nb, na, dim=-2)  # (B, H, N, W, D)
    v_c = look_around(pad_to(v, Lp, 2).view(B, H, N, C, D), nb, na, dim=-2)

    code = _pair_codes(B, H, L, C, nb, na, causal, wrap, shared, attention_mask, q.device)
    dtype = upcast(q[:1, :1, :1, :1]).dtype
    lut = torch.tensor([MASK_SCORE, 0.0, SELF_SCORE], dtype=dtype, device=q.device)
    M = B * H * N
    out, _ = chunk_attention(
        q_c.reshape(M, C, D), k_c.reshape(M, W, D), v_c.reshape(M, W, D),
        code.reshape(M, C, W), lut,
    )  # fmt: skip
    return out.view(B, H, Lp, D)[:, :, :L]


def _pair_codes(
    B: int,
    H: int,
    L: int,
    C: int,
    nb: int,
    na: int,
    causal: bool,
    wrap: bool,
    shared: bool,
    attention_mask: Tensor | None,
    device: torch.device,
) -> Tensor:
    """(B, H, N, C, W) int8 codes for the shared core: 0 masked, 1 candidate, 2 the token
    itself (shared QK). A key is a candidate when it lies in the chunk's window (past the
    ends only with `wrap`), is a real token and, if causal, is not after the query."""
    Lp = padded_length(L, C)
    N, W = Lp // C, (nb + 1 + na) * C
    pos = torch.arange(Lp, device=device).view(N, C)
    q_pos = pos[:, :, None]  # (N, C, 1)
    k_pos = look_around(pos, nb, na, dim=-1)[:, None, :]  # (N, 1, W); ends wrap around
    assert not (wrap and causal), "a causal model masks the wrapped chunks anyway"
    if wrap and N > 1:
        allowed = torch.ones(N, 1, W, dtype=torch.bool, device=device)
    else:
        allowed = around_ok(1, N, C, device, nb, na)  # (N, 1, W): the wraps masked
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    valid = valid_positions(B, L, Lp, attention_mask, device).view(B, N, C)
    k_valid = look_around(valid, nb, na, dim=-1)[:, None, :, None, :]  # (B, 1, N, 1, W)
    allowed = allowed & k_valid  # (B, 1, N, C, W)
    code = allowed.expand(B, H, N, C, W).to(torch.int8)
    if shared:
        code = code + (allowed & (q_pos == k_pos)).to(torch.int8)
    return code

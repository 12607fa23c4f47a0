"""Dense attention: the shared-QK variant the paper ablates, and the ordinary baseline.

Legend: B batch, H heads, L length, D head dim.
Memory is O(L^2) (the L x L bias alone); use it for short sequences and as a baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import MASK_SCORE, SELF_SCORE, unit_keys


def full_attention(
    q: Tensor,
    k: Tensor | None,
    v: Tensor,
    *,
    causal: bool,
    attention_mask: Tensor | None = None,
    key_norm: str = "l2",
) -> Tensor:
    """Dense softmax attention through `scaled_dot_product_attention`.

    Args:
        q: (B, H, L, D) queries (the shared query-keys when `k` is None).
        k: (B, H, L, D) keys, or None for shared-QK attention: keys are the unit-length
            queries, scores are not scaled by 1/sqrt(D), and a token attends to itself only
            when it has no other candidate (as in LSH attention).
        v: (B, H, L, D) values.
        causal: keep only j <= i.
        attention_mask: optional (B, L), True/1 at real tokens.
        key_norm: shared-QK keys' normalisation, "l2" or "rms" (`common.unit_keys`).
    Returns:
        (B, H, L, D).
    """
    B, _H, L, _D = q.shape
    if k is not None and attention_mask is None:
        # The ordinary Transformer: let SDPA pick its fused (flash) kernel.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    # An additive bias: MASK_SCORE on masked pairs. For shared QK the self score must be
    # SELF_SCORE itself (not added to q.k), so the diagonal is biased by SELF_SCORE - q.k_hat.
    device = q.device
    dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    allowed = torch.ones(L, L, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    else:
        allowed = allowed.expand(B, 1, L, L)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, MASK_SCORE
    )  # (B, 1, L, L)
    if k is None:
        k = unit_keys(q, key_norm)
        self_dot = (q * k).sum(-1)  # (B, H, L)
        bias = bias + torch.diag_embed(SELF_SCORE - self_dot.to(dtype))  # (B, H, L, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

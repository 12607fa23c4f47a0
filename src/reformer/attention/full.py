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
    L = q.shape[2]
    if k is not None and attention_mask is None:
        # The ordinary Transformer: let SDPA pick its fused (flash) kernel.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if k is None and causal and attention_mask is None and L > 1:
        # Shared QK, causal, unpadded: query i's candidates are j < i, and position 0's only
        # candidate is itself (output v_0, no gradient to its score). Queries 1.. against keys
        # ..L-2 under the flash kernel's causal mask are exactly the j < i rows, with no L x L
        # bias in memory.
        keys = unit_keys(q, key_norm)
        rest = F.scaled_dot_product_attention(
            q[:, :, 1:], keys[:, :, :-1], v[:, :, :-1], is_causal=True, scale=1.0
        )
        return torch.cat([v[:, :, :1].to(rest.dtype), rest], dim=2)

    # An additive bias (1 or B, 1, L, L) in the scores' dtype: MASK_SCORE on masked pairs and,
    # for shared QK, SELF_SCORE on the diagonal. q.k_hat is added to it there, but |q.k_hat|
    # <= |q| is negligible beside 1e5: exp() of the self score is 0 whenever a row has another
    # candidate, and a row with none gives weight 1 to itself whatever its score.
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(
        ~allowed, MASK_SCORE
    )
    if k is None:
        bias.diagonal(dim1=-2, dim2=-1).add_(SELF_SCORE)
        return F.scaled_dot_product_attention(
            q, unit_keys(q, key_norm), v, attn_mask=bias, scale=1.0
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

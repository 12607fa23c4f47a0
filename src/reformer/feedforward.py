"""Position-wise pieces computed a chunk of positions at a time (the paper's section 4).

The feed-forward layer's (B, L, d_ff) intermediate and the (B, L, vocab) logits are never
held whole: each chunk is computed, used and freed; under autograd each chunk is
checkpointed, so the backward pass recomputes one chunk at a time as well. The result and
gradients are those of the unchunked computation
(tests/test_model.py::test_chunked_ff_and_loss_equal_unchunked).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention.chunked import chunk_slices
from .attention.common import upcast


def apply_chunked(
    fn: Callable[..., Tensor], *xs: Tensor | None, chunk_len: int | None, dim: int = 1
) -> Tensor:
    """cat([fn(*chunks) for each chunk of positions along `dim`]) == fn(*xs), in less memory.

    Position-wise `fn` only. Under autograd each chunk is checkpointed (only its inputs are
    kept), so the backward pass never holds more than one chunk's intermediates either.
    `xs` may hold None (passed through unsliced).
    """
    ref = next(x for x in xs if x is not None)
    slices = chunk_slices(ref.shape[dim], chunk_len)
    if len(slices) == 1:
        return fn(*xs)
    grad = torch.is_grad_enabled()
    outs = []
    for sl in slices:
        index = (slice(None),) * dim + (sl,)
        parts = [None if x is None else x[index] for x in xs]
        outs.append(checkpoint(fn, *parts, use_reentrant=False) if grad else fn(*parts))
    return torch.cat(outs, dim=dim)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu}


class FeedForward(nn.Module):
    """d_model -> d_ff -> activation (GELU, or ReLU as the released checkpoints) -> d_model."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu") -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, d_ff)
        self.w_out = nn.Linear(d_ff, d_model)
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    def extra_repr(self) -> str:
        return f"activation={self.activation}"

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(self._act(self.w_in(x)))


def chunked_cross_entropy(
    hidden: Tensor,
    targets: Tensor,
    head: Callable[[Tensor], Tensor],
    *,
    chunk_len: int | None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Sum of token cross-entropies and the count of scored tokens, a chunk at a time.

    hidden: (B, L, W); targets: (B, L) with `ignore_index` where unscored; head maps
    (B, l, W) -> (B, l, V) logits. Never holds (B, L, V) at once. Returns (sum, count).
    """

    def chunk_loss(h: Tensor, t: Tensor) -> Tensor:
        logits = upcast(head(h))  # (B, l, V), at least float32
        return F.cross_entropy(
            logits.flatten(0, 1), t.flatten(), ignore_index=ignore_index, reduction="sum"
        )

    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    grad = torch.is_grad_enabled()
    for sl in chunk_slices(hidden.shape[1], chunk_len):
        h, t = hidden[:, sl], targets[:, sl]
        if not (t != ignore_index).any():
            continue
        total = total + (
            checkpoint(chunk_loss, h, t, use_reentrant=False) if grad else chunk_loss(h, t)
        )
    count = (targets != ignore_index).sum()
    return total, count

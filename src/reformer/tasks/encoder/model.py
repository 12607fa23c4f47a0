"""Encoder heads on the Reformer stack: sequence classification (and the masked LM, which is
`ReformerLM` itself with causal=False: its loss scores the masked positions only).

Legend: B batch, L length, W width of the final hidden state (2 d_model when reversible),
K classes.

`ReformerClassifier` is a `ReformerLM` whose output layer (`head`) maps a pooled state to
class logits: every other parameter has the masked LM's name and shape, so an `mlm` run's
weights load into it with only the head left fresh (`load_checkpoint(..., fresh=("head",
"out_bias"))`, the second a tied masked LM's output bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ReformerConfig
from ...model import ReformerLM

POOLINGS = ("mean", "first")


def pool(hidden: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """(B, L, W) -> (B, W): the mean over the real positions, or the state at position 0
    (a CLS token the data puts there; with bidirectional attention it sees the whole
    sequence). Padded positions never enter the mean."""
    if pooling == "first":
        return hidden[:, 0]
    assert pooling == "mean", pooling
    if attention_mask is None:
        return hidden.mean(dim=1)
    w = attention_mask.to(hidden.dtype)[..., None]  # (B, L, 1)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class ReformerClassifier(ReformerLM):
    """Sequence classification: encoder -> norm -> pool over real positions -> Linear(W, K).

    The final LayerNorm is applied per position before pooling (as the masked LM applies
    it before its output layer), so a fine-tuned model starts from the states the masked
    LM was trained to produce. `model(input_ids, attention_mask) -> (B, K)` logits.
    """

    def __init__(self, config: ReformerConfig, n_classes: int, pooling: str = "mean") -> None:
        if config.causal:
            raise ValueError(
                "ReformerClassifier needs an encoder: set model.causal=False (a causal "
                "model's first positions would never see the rest of the sequence)"
            )
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2; got {n_classes!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        super().__init__(config)
        width = 2 * config.d_model if config.reversible else config.d_model
        self.head = nn.Linear(width, n_classes)
        if config.tie_embeddings:
            del self.out_bias  # the masked LM's tied output bias has no use here
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.n_classes, self.pooling = n_classes, pooling

    def logits_from_hidden(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L, W) -> (B, K). Under `shard_sequence`: this rank's (B, l, W) slice, pooled
        over the whole sequence through the group (every rank gets the same logits)."""
        if self.shard is None:
            return self.head(pool(self.norm(hidden), attention_mask, self.pooling))
        states = self.norm(hidden)
        if self.pooling == "first":  # position 0 is rank 0's
            return self.head(self.shard.sum(states[:, 0] * (self.shard.rank == 0)))
        w = torch.ones_like(states[..., :1]) if attention_mask is None else (
            attention_mask.to(states.dtype)[..., None])  # fmt: skip
        count = self.shard.total(w.sum(dim=1)).clamp(min=1.0)
        return self.head(self.shard.sum((states * w).sum(dim=1)) / count)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, K) class logits."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.logits_from_hidden(hidden, attention_mask)

    def loss(  # type: ignore[override]
        self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Mean cross-entropy (nats) of the class logits against labels (B,). Under
        `shard_sequence`: whole sequences on every rank of the group, and each rank's share
        of the loss (the shares sum to it)."""
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point:
            raise TypeError("labels must be an integer tensor of class ids")
        if labels.shape != input_ids.shape[:1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must be (batch,) = ({input_ids.shape[0]},)"
            )
        if int(labels.min()) < 0 or int(labels.max()) >= self.n_classes:
            raise ValueError(f"labels must lie in [0, n_classes={self.n_classes})")
        share = 1.0
        if self.shard is not None:  # whole sequences in, this rank's share of the loss out
            self.fit_shard(input_ids.shape[1])
            input_ids = self.shard.local(input_ids)
            attention_mask = None if attention_mask is None else self.shard.local(attention_mask)
            share = 1.0 / self.shard.size
        logits = self(input_ids, attention_mask)
        logits = logits.float() if logits.dtype != torch.float64 else logits
        return F.cross_entropy(logits, labels) * share

    def decode(self, *args, **kwargs):  # type: ignore[override]
        raise ValueError("a classifier has no incremental decoding (it is not a causal LM)")

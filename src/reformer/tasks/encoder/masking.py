"""BERT's masking rule for masked-LM training (Devlin et al. 2019, section 3.1).

Each real position is chosen with probability `rate` (0.15); a chosen position's input
becomes the mask token with probability `mask` (0.8), a uniformly random ordinary token with
probability `random` (0.1), and stays itself otherwise (0.1). The targets are the original
ids at the chosen positions and IGNORE_INDEX elsewhere, so the loss scores only them.

Randomness comes from the generator passed in (the data's per-step generator), never from
torch's global RNG, so a batch is a pure function of (seed, step) and resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...data._common import IGNORE_INDEX


@dataclass(frozen=True)
class MaskingRule:
    """rate: share of real positions chosen; mask / random: shares of the chosen ones whose
    input becomes the mask token / a random token from [0, n_ordinary) (the rest keep
    theirs)."""

    mask_id: int
    n_ordinary: int
    rate: float = 0.15
    mask: float = 0.8
    random: float = 0.1

    def __post_init__(self) -> None:
        for name in ("rate", "mask", "random"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"masking {name} must be in [0, 1]; got {value}")
        if self.rate == 0.0:
            raise ValueError("masking rate must be > 0: with no chosen position nothing is scored")
        if self.mask + self.random > 1.0:
            raise ValueError(
                f"masking shares mask={self.mask} + random={self.random} exceed 1; the rest "
                "of the chosen positions keep their token, so the two must sum to at most 1"
            )

    def apply(
        self,
        ids: Tensor,
        generator: torch.Generator,
        valid: Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[Tensor, Tensor]:
        """ids (B, L) -> (inputs, targets), both (B, L). valid: (B, L) bool, True at real
        tokens (padding is never chosen). The draws are made for the global batch of
        B * world_size rows and this rank keeps rows rank::world_size, so N processes mask
        exactly as one process with the whole batch. At least one position per row is
        chosen (a row with none would add nothing to the loss)."""
        B, L = ids.shape
        rows = slice(rank, None, world_size)
        u = torch.rand(B * world_size, L, generator=generator)[rows]
        kind = torch.rand(B * world_size, L, generator=generator)[rows]
        random_ids = torch.randint(0, self.n_ordinary, (B * world_size, L), generator=generator)
        random_ids = random_ids[rows]
        chosen = u < self.rate
        if valid is not None:
            valid = valid.cpu().bool()
            chosen &= valid
            u = u.masked_fill(~valid, 2.0)
        # Rows without a chosen position get their lowest-u real position.
        empty = ~chosen.any(dim=1)
        if bool(empty.any()):
            first = u.argmin(dim=1)
            chosen[empty, first[empty]] = True
        ids_cpu = ids.cpu()
        inputs = torch.where(chosen & (kind < self.mask), self.mask_id, ids_cpu)
        replace = chosen & (kind >= self.mask) & (kind < self.mask + self.random)
        inputs = torch.where(replace, random_ids, inputs)
        targets = torch.where(chosen, ids_cpu, IGNORE_INDEX)
        return inputs.to(ids.device), targets.to(ids.device)

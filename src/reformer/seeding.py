"""Explicit randomness: generators seeded from ints, and replayable dropout masks.

Everything random in a forward pass (hash rotations, dropout) is drawn from a generator
seeded with a per-call seed, never from re-seeding the global RNG, so a reversible backward
pass (or a decoder) can replay it exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh torch.Generator on `device` seeded with `seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def dropout_mask(
    shape: torch.Size, p: float, generator: torch.Generator, device: torch.device, dtype
) -> Tensor:
    """Inverted-dropout multiplier drawn from an explicit generator (replayable)."""
    keep = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=generator)
    return keep / (1.0 - p)


def rank_generator(gen: torch.Generator, rank: int, device: torch.device) -> torch.Generator:
    """A generator of its own for one rank of a sequence group: seeded from one draw of `gen`
    (the same draw on every rank, so every rank's `gen` stays in step) and the rank, so that
    the ranks' slices get different dropout masks, the same on every replay."""
    base = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    return seeded_generator(base + rank, device)

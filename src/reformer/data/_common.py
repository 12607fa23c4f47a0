"""Shared helpers for the data package: stateless seeding, argument checks, errors.

Every random batch is a pure function of ``(seed, stream, step)``: a fresh ``torch.Generator``
is seeded from a hash of those values, the *global* batch (``batch_size * world_size`` rows) is
drawn from it, and rank ``r`` keeps rows ``r::world_size``. Resuming at any step, or changing
the number of ranks while keeping the global batch size, therefore reproduces the same rows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..seeding import seeded_generator

IGNORE_INDEX = -100
"""Target value for positions that carry no loss (the default ``ignore_index`` of
``torch.nn.functional.cross_entropy``)."""

SPLITS = ("train", "val", "test")


class DataFileNotFoundError(FileNotFoundError, ValueError):
    """A data file is missing. Both a ``FileNotFoundError`` and a ``ValueError``."""


def derive_seed(seed: int, stream: str, step: int) -> int:
    """Map ``(seed, stream, step)`` to a 63-bit generator seed (stable across runs and hosts)."""
    key = f"reformer.data|{int(seed)}|{stream}|{int(step)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(seed: int, stream: str, step: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return seeded_generator(derive_seed(seed, stream, step))


def check_positive(name: str, value: int) -> int:
    """Return ``value`` as int, or raise ``ValueError`` if it is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_step_and_shard(step: int, batch_size: int, rank: int, world_size: int) -> None:
    """Validate the arguments shared by every ``batch``/``train_batch`` method."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    check_positive("batch_size", batch_size)
    check_positive("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be an integer in [0, world_size) = [0, {world_size}), got {rank!r}"
        )


def check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> str:
    """Return ``split`` if it is one of ``allowed``, else raise a ``ValueError`` listing them."""
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")
    return split


def check_file(path: str | os.PathLike[str], expected: str) -> Path:
    """Return ``path`` as a ``Path`` if it is an existing regular file.

    Raises:
        DataFileNotFoundError: if nothing exists at ``path`` (message says what was expected).
        ValueError: if ``path`` exists but is not a regular file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFileNotFoundError(f"no such file: {str(p)!r}; expected {expected}")
    if not p.is_file():
        raise ValueError(f"{str(p)!r} is not a regular file; expected {expected}")
    return p


def shift_targets(tokens: torch.Tensor) -> torch.Tensor:
    """Next-token targets for ``tokens`` (B, T): ``out[:, t] = tokens[:, t + 1]``, last = -100."""
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:, :-1] = tokens[:, 1:]
    return targets

"""--parallel sequence in the trainer: the 2-D layout of the ranks (data x sequence), the
model split over its sequence group, and the gradient sum the split needs.

Ranks [g S, (g + 1) S) form sequence group g (S = --sequence-ranks, all ranks by default):
they hold the same rows of the batch (the group's data rank is g of world / S) and each
takes its slice of their positions. A rank's loss is its slice's share of its group's mean
(`ReformerLM.loss`), so a parameter's gradient is the sum over the group's ranks; over the
groups, the mean, as DDP takes it. One all-reduce over all ranks does both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..sequence import SequenceShard


@dataclass(frozen=True)
class SequenceLayout:
    """This rank's place: sequence group `data_rank` of `data_world`, rank `rank` of
    `size` in it (`group` the process group of its ranks)."""

    rank: int
    size: int
    data_rank: int
    data_world: int
    group: object

    def shard(self, length: int) -> SequenceShard:
        return SequenceShard(length, self.rank, self.size, self.group)


def sequence_layout(sequence_ranks: int | None, rank: int, world_size: int) -> SequenceLayout:
    """The groups of a launched run (every rank creates every group, in the same order)."""
    size = sequence_ranks or world_size
    if world_size % size:
        raise ValueError(
            f"--sequence-ranks {size} does not divide the {world_size} processes; choose a "
            "divisor of --nproc-per-node x nodes"
        )
    groups = [
        dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world_size // size)
    ]
    return SequenceLayout(rank % size, size, rank // size, world_size // size, groups[rank // size])


def sum_gradients(model: nn.Module, data_world: int) -> None:
    """Every gradient summed over all ranks and divided by the number of sequence groups:
    the sum over a group's slices, the mean over groups (one flat all-reduce; a parameter
    without a gradient on this rank takes part with zeros)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a slice that scores nothing leaves the output layer without gradients
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if data_world > 1:
        flat /= data_world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """The model on whole sequences for a while (rank 0's evaluation), then split again."""
    shard = getattr(model, "shard", None)
    if shard is None:
        yield
        return
    model.shard_sequence(None)
    try:
        yield
    finally:
        model.shard_sequence(shard)

"""One sequence across the ranks of a group: which positions a rank holds, and the two
collectives the routed attention needs (an all-to-all that autograd reverses, and an
all-gather of small count tensors).

A group of `size` ranks splits every sequence of the batch into contiguous slices of
positions, [bounds[r], bounds[r + 1]) on rank r, as even as the length allows (the last
ranks hold one more position when it does not divide). Every position-wise part of the model
(embeddings at global positions, norms, feed-forward, head, loss) runs on the slice alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def split_bounds(length: int, parts: int) -> list[int]:
    """Slice boundaries (parts + 1 of them) of `length` positions over `parts` ranks."""
    return [length * i // parts for i in range(parts + 1)]


@dataclass(frozen=True)
class SequenceShard:
    """This rank's slice of each sequence: positions [start, stop) of `length`.

    group: the process group of the ranks that share the sequences (None: the default
    group); rank and size: this rank's index in it and its size."""

    length: int
    rank: int
    size: int
    group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"sequence rank {self.rank} is outside [0, {self.size})")
        if self.length < self.size:
            raise ValueError(
                f"a sequence of {self.length} positions cannot be split over {self.size} "
                "ranks: use fewer --sequence-ranks or a longer --seq-len"
            )

    @property
    def bounds(self) -> list[int]:
        return split_bounds(self.length, self.size)

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    def local(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's slice of a whole-sequence tensor along `dim`."""
        return x.narrow(dim, self.start, self.stop - self.start)

    def total(self, x: Tensor) -> Tensor:
        """The sum of `x` over the group's ranks (no gradient)."""
        x = x.detach().clone()
        dist.all_reduce(x, group=self.group)
        return x

    def sum(self, x: Tensor) -> Tensor:
        """The sum of `x` over the group's ranks, differentiable: every rank's gradient is the
        sum of the ranks' gradients (each rank's loss being its share of the group's)."""
        return _GroupSum.apply(x, self.group)

    def gather_counts(self, counts: Tensor) -> Tensor:
        """(size, *counts.shape): every rank's `counts`, in rank order (no gradient)."""
        parts = [torch.empty_like(counts) for _ in range(self.size)]
        dist.all_gather(parts, counts.contiguous(), group=self.group)
        return torch.stack(parts)

    def exchange_counts(self, send: Tensor) -> Tensor:
        """send[r] rows go to rank r; returns how many rows arrive from each rank."""
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        return recv

    def exchange(self, x: Tensor, send: list[int], recv: list[int]) -> Tensor:
        """Rows of x, send[r] of them to rank r in order; returns the rows that arrive, from
        rank 0 first. Differentiable: the backward pass sends the gradients back."""
        if x.requires_grad:
            return _Exchange.apply(x, send, recv, self.group)
        return _all_to_all(x, send, recv, self.group)


def _all_to_all(x: Tensor, send: list[int], recv: list[int], group: Any) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class _Exchange(torch.autograd.Function):
    """all_to_all_single whose backward pass is the reverse all_to_all."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group: Any) -> Tensor:  # type: ignore[override]
        ctx.plan = (send, recv, group)
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        send, recv, group = ctx.plan
        return _all_to_all(grad, recv, send, group), None, None, None


class _GroupSum(torch.autograd.Function):
    """all_reduce(sum) whose backward pass is the all_reduce(sum) of the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None

"""One sequence across many processes (`--parallel sequence`): `SequenceShard` says which
positions a rank holds; `attention/routed.py` attends across the ranks. docs/distributed.md
has the design."""

from .shard import SequenceShard, split_bounds

__all__ = ["SequenceShard", "split_bounds"]

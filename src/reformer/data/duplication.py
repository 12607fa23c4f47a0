"""The synthetic duplication task of the Reformer paper (Kitaev et al. 2020, section 5).

Each sequence is ``0 w 0 w``: a separator ``0``, a word ``w`` of ``seq_len / 2 - 1`` symbols
drawn uniformly from ``1 .. vocab_size - 1``, then the separator and the same word again. The
first copy is unpredictable; a model that attends to it can predict the second copy exactly,
so loss and accuracy are measured on the second copy only.
"""

from __future__ import annotations

import torch

from reformer.data._common import (
    IGNORE_INDEX,
    check_positive,
    check_split,
    check_step_and_shard,
    make_generator,
)

__all__ = ["DuplicationTask"]


class DuplicationTask:
    """Deterministic, stateless generator of duplication-task batches.

    Args:
        seq_len: total sequence length ``L``; even and >= 4 (the word has ``L / 2 - 1``
            symbols).
        vocab_size: number of token ids; symbol 0 is the separator, words use
            ``1 .. vocab_size - 1``, so it must be >= 3.
    """

    def __init__(self, seq_len: int, vocab_size: int = 128) -> None:
        check_positive("seq_len", seq_len)
        if seq_len < 4 or seq_len % 2:
            raise ValueError(
                f"seq_len must be even and >= 4 (sequence is '0 w 0 w'), got {seq_len}; "
                f"try {max(4, seq_len + seq_len % 2)}"
            )
        check_positive("vocab_size", vocab_size)
        if vocab_size < 3:
            raise ValueError(
                f"vocab_size must be >= 3 (0 is the separator, words need at least two "
                f"symbols to be random), got {vocab_size}"
            )
        self.seq_len = seq_len
        self.vocab_size = vocab_size

    @property
    def word_len(self) -> int:
        """Length of ``w``: ``seq_len / 2 - 1``."""
        return self.seq_len // 2 - 1

    @property
    def num_targets(self) -> int:
        """Number of scored positions per sequence (``t = L/2 .. L-2``): ``word_len``."""
        return self.word_len

    def __repr__(self) -> str:
        return f"DuplicationTask(seq_len={self.seq_len}, vocab_size={self.vocab_size})"

    def batch(
        self,
        step: int,
        batch_size: int,
        seed: int,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of global batch ``(seed, split, step)`` that belong to ``rank``.

        The global batch has ``batch_size * world_size`` rows drawn from a generator seeded by
        ``(seed, split, step)``; rank ``r`` gets rows ``r::world_size``. Two ranks together
        therefore see exactly the rows one rank sees with twice the batch size.

        Args:
            step: training step (or eval batch index), >= 0.
            batch_size: rows per rank ``B``.
            seed: run seed.
            split: ``"train"``, ``"val"`` or ``"test"``; each is an independent stream.
            rank: this process's rank in ``[0, world_size)``.
            world_size: number of ranks sharing the global batch.

        Returns:
            ``(input_ids, targets)``, both int64 of shape ``(B, L)``. ``targets[:, t] =
            input_ids[:, t + 1]`` for ``t`` in ``L/2 .. L-2`` (the positions that predict the
            second copy of ``w``) and ``-100`` everywhere else.
        """
        check_split(split)
        check_step_and_shard(step, batch_size, rank, world_size)
        L, half = self.seq_len, self.seq_len // 2
        gen = make_generator(seed, f"duplication/{split}", step)
        words = torch.randint(
            1,
            self.vocab_size,
            (batch_size * world_size, self.word_len),
            generator=gen,
            dtype=torch.long,
        )
        words = words[rank::world_size]
        inputs = torch.zeros(batch_size, L, dtype=torch.long)
        inputs[:, 1:half] = words
        inputs[:, half + 1 :] = words
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, half : L - 1] = inputs[:, half + 1 :]
        return inputs, targets

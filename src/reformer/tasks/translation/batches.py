"""Translation batches: sentence pairs in a padded teacher-forcing layout, cut under a
padded-token budget, as a pure function of (seed, step).

Shapes: B sentence pairs in a batch, S padded source length, T padded target length
(longest target + 1, room for the BOS / EOS shift).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from reformer.data._common import IGNORE_INDEX, check_positive, make_generator

if TYPE_CHECKING:
    from ...data.subword import Tokenizer

# ---------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class Batch:
    """Padded sentence pairs, teacher-forcing layout.

    For target ids ``y1..yn``: ``tgt_in`` is ``[bos, y1..yn]`` and ``tgt_out`` is
    ``[y1..yn, eos]``, so position t of the decoder predicts ``tgt_out[:, t]``.
    """

    src: torch.Tensor  # (B, S) long, source ids right-padded with pad_id
    tgt_in: torch.Tensor  # (B, T) long, [bos] + target ids, right-padded with pad_id
    tgt_out: torch.Tensor  # (B, T) long, target ids + [eos], right-padded with IGNORE_INDEX
    index: torch.Tensor  # (B,) long, position of each pair in ParallelData.pairs
    pad_id: int = 0

    @property
    def src_mask(self) -> torch.Tensor:
        """(B, S) bool, True at real source tokens."""
        return self.src != self.pad_id

    @property
    def tgt_mask(self) -> torch.Tensor:
        """(B, T) bool, True at real target positions (of both tgt_in and tgt_out)."""
        return self.tgt_out != IGNORE_INDEX

    def __len__(self) -> int:
        return self.src.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            src=self.src.to(device, non_blocking=non_blocking),
            tgt_in=self.tgt_in.to(device, non_blocking=non_blocking),
            tgt_out=self.tgt_out.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
        )


class ParallelData:
    """Token-id sentence pairs and the batches made from them.

    With ``max_len``, a pair is *long* if its source has more than ``max_len`` ids or its
    target more than ``max_len - 1`` (decoder rows are target + 1). Training skips long pairs
    (``drop_long=True``, counted in ``dropped``) or truncates them (``drop_long=False``).
    Training also skips pairs with an empty source: an all-padding source row leaves the
    encoder and cross-attention nothing to attend to. :meth:`eval_batches` keeps every pair,
    truncated to ``max_len``, so an empty source there gives a row whose ``src_mask`` is all
    False (S is at least 1).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        max_len: int | None = None,
        drop_long: bool = True,
    ) -> None:
        if len({pad_id, bos_id, eos_id}) != 3:
            raise ValueError(f"pad/bos/eos ids must differ, got {pad_id}, {bos_id}, {eos_id}")
        if max_len is not None and (
            isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2
        ):
            raise ValueError(f"max_len must be None or an integer >= 2, got {max_len!r}")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.max_len = max_len
        self.drop_long = drop_long
        self.pairs: list[tuple[list[int], list[int]]] = []
        for i, (src, tgt) in enumerate(pairs):
            src, tgt = [int(x) for x in src], [int(x) for x in tgt]
            for side, ids in (("source", src), ("target", tgt)):
                if ids and (min(ids) < 0 or pad_id in ids):
                    raise ValueError(
                        f"pair {i}: {side} ids must be >= 0 and never pad_id={pad_id} (which "
                        f"marks padding), got {ids[:20]}"
                    )
            self.pairs.append((src, tgt))

        src_len = torch.tensor([len(s) for s, _ in self.pairs], dtype=torch.long)
        tgt_len = torch.tensor([len(t) + 1 for _, t in self.pairs], dtype=torch.long)
        keep = src_len > 0
        if max_len is not None:
            if drop_long:
                keep &= (src_len <= max_len) & (tgt_len <= max_len)
            src_len, tgt_len = src_len.clamp(max=max_len), tgt_len.clamp(max=max_len)
        self._src_len, self._tgt_len = src_len, tgt_len  # (N,) lengths after truncation
        self.train_indices = torch.nonzero(keep).flatten()  # (N_train,) pairs used in training
        self.dropped = len(self.pairs) - len(self.train_indices)
        self._bounds: tuple[int, list[tuple[int, int]]] | None = None  # (max_tokens, cuts)
        self._plan: tuple[tuple[int, int, int], list[torch.Tensor]] | None = None

    @classmethod
    def from_text(
        cls,
        pairs: Sequence[tuple[str, str]],
        tokenizer: Tokenizer,
        max_len: int | None = None,
        *,
        drop_long: bool = True,
    ) -> ParallelData:
        """Encode ``(source, target)`` sentences with ``tokenizer`` (its special ids are used)."""
        src = tokenizer.encode_batch([s for s, _ in pairs])
        tgt = tokenizer.encode_batch([t for _, t in pairs])
        return cls(
            list(zip(src, tgt)),
            pad_id=tokenizer.pad_id,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            max_len=max_len,
            drop_long=drop_long,
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def batches_per_epoch(self, max_tokens: int) -> int:
        """Training batches in one epoch under ``max_tokens`` (the same for every epoch)."""
        return len(self._train_bounds(max_tokens))

    def batch_at(self, step: int, max_tokens: int, seed: int) -> Batch:
        """The training batch of global step ``step``; a pure function of its arguments.

        Each epoch sorts the training pairs by (source, target) length, ties broken by a
        permutation seeded with ``(seed, epoch)``, cuts that order into batches whose padded
        size ``B * max(S, T)`` is at most ``max_tokens``, and shuffles the batch order with the
        same generator. Ties only swap pairs of equal lengths, so the cuts, and the number of
        batches per epoch, are the same in every epoch: ``epoch, i = divmod(step, n_batches)``.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        bounds = self._train_bounds(max_tokens)
        epoch, i = divmod(step, len(bounds))
        key = (epoch, max_tokens, int(seed))
        if self._plan is None or self._plan[0] != key:
            gen = make_generator(seed, "translation.train", epoch)
            idx = self.train_indices[torch.randperm(len(self.train_indices), generator=gen)]
            # A stable sort keeps the random order among pairs of equal lengths.
            idx = idx[torch.sort(self._length_key(idx), stable=True).indices]
            order = torch.randperm(len(bounds), generator=gen).tolist()
            self._plan = (key, [idx[bounds[j][0] : bounds[j][1]] for j in order])
        return self._collate(self._plan[1][i])

    def eval_batches(self, max_tokens: int) -> Iterator[Batch]:
        """Every pair once, in the original order, consecutive pairs grouped under max_tokens.

        ``Batch.index`` says which pair each row is, to put translations back in order.
        Raises ValueError at the call (not at the first batch) if a pair cannot fit.
        """
        bounds = self._cut(torch.arange(len(self.pairs)), max_tokens)
        return (self._collate(torch.arange(a, b)) for a, b in bounds)

    # -- internals ------------------------------------------------------------------------------

    def _train_bounds(self, max_tokens: int) -> list[tuple[int, int]]:
        """Batch cuts ``[(start, end)]`` of the length-sorted training order (cached)."""
        if self._bounds is None or self._bounds[0] != max_tokens:
            if len(self.train_indices) == 0:
                raise ValueError(
                    f"no training pairs: {len(self.pairs)} pairs, {self.dropped} dropped as empty "
                    f"or longer than max_len={self.max_len}; raise max_len or check the data"
                )
            idx = self.train_indices
            self._bounds = (max_tokens, self._cut(idx[self._length_key(idx).argsort()], max_tokens))
        return self._bounds[1]

    def _length_key(self, idx: torch.Tensor) -> torch.Tensor:
        """(N,) sort key of pairs ``idx`` (N,): by source length, then target length."""
        return self._src_len[idx] * (int(self._tgt_len.max()) + 1) + self._tgt_len[idx]

    def _cut(self, idx: torch.Tensor, max_tokens: int) -> list[tuple[int, int]]:
        """Greedy cuts of ``idx`` (N,) into runs with ``len * max(S, T) <= max_tokens``."""
        check_positive("max_tokens", max_tokens)
        # S and T of a batch are maxima over its rows, so B * max(S, T) = B * max_i max(s_i, t_i).
        cost = torch.maximum(self._src_len[idx], self._tgt_len[idx]).tolist()
        bounds, start, widest = [], 0, 0
        for j, c in enumerate(cost):
            if c > max_tokens:
                raise ValueError(
                    f"pair {int(idx[j])} needs {c} padded tokens, more than max_tokens="
                    f"{max_tokens}; raise max_tokens or set max_len <= max_tokens"
                )
            if (j - start + 1) * max(widest, c) > max_tokens:
                bounds.append((start, j))
                start, widest = j, 0
            widest = max(widest, c)
        if start < len(cost):
            bounds.append((start, len(cost)))
        return bounds

    def _collate(self, idx: torch.Tensor) -> Batch:
        """Pad the pairs ``idx`` (B,) into a :class:`Batch`, truncating to max_len if set."""
        s_max, t_max = (None, None) if self.max_len is None else (self.max_len, self.max_len - 1)
        rows = [(self.pairs[i][0][:s_max], self.pairs[i][1][:t_max]) for i in idx.tolist()]
        S = max(1, *(len(s) for s, _ in rows))
        T = 1 + max(len(t) for _, t in rows)
        pad, ign = self.pad_id, IGNORE_INDEX
        src = [s + [pad] * (S - len(s)) for s, _ in rows]
        tgt_in = [[self.bos_id, *t] + [pad] * (T - 1 - len(t)) for _, t in rows]
        tgt_out = [[*t, self.eos_id] + [ign] * (T - 1 - len(t)) for _, t in rows]
        return Batch(
            src=torch.tensor(src, dtype=torch.long),  # (B, S)
            tgt_in=torch.tensor(tgt_in, dtype=torch.long),  # (B, T)
            tgt_out=torch.tensor(tgt_out, dtype=torch.long),  # (B, T)
            index=idx.to(torch.long).clone(),  # (B,)
            pad_id=pad,
        )

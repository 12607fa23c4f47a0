"""Byte-level corpora: enwik8 and any local text file.

A :class:`ByteCorpus` holds one uint8 array split into train / val / test. enwik8 (the Hutter
Prize file, exactly 10^8 bytes) is split 90,000,000 / 5,000,000 / 5,000,000 as is standard;
any other length is split in the same proportions: ``val = test = n // 20`` bytes at the end,
the first ``n - 2 * (n // 20)`` bytes for training. The vocabulary is the 256 byte values.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from reformer.data._common import (
    check_file,
    check_positive,
    check_split,
    check_step_and_shard,
    make_generator,
)

__all__ = ["ENWIK8_SIZE", "ByteCorpus", "load_enwik8", "load_text", "split_sizes"]

ENWIK8_SIZE = 100_000_000
"""Size in bytes of the full enwik8 file."""

_ENWIK8_EXPECTED = (
    "the enwik8 file (raw bytes, 10^8 bytes for the full corpus) or a .zip archive containing it"
)


def split_sizes(n: int) -> tuple[int, int, int]:
    """``(train, val, test)`` sizes for ``n`` bytes: 90% / 5% / 5%.

    ``val = test = n // 20`` and ``train = n - 2 * (n // 20)``; for ``n = 10^8`` this is the
    standard enwik8 split 90,000,000 / 5,000,000 / 5,000,000.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    held_out = n // 20
    return n - 2 * held_out, held_out, held_out


class ByteCorpus:
    """A byte sequence split 90/5/5 into train, val and test, served as int64 token batches.

    Args:
        data: 1-D uint8 array (a read-only ``np.memmap`` is fine and is not copied).
        name: a label used in ``repr`` and error messages.

    Attributes:
        vocab_size: 256.
        train, val, test: 1-D uint8 views of the three splits.
    """

    vocab_size: int = 256

    def __init__(self, data: np.ndarray, name: str = "bytes", vocab_size: int = 256) -> None:
        if (
            not isinstance(data, np.ndarray)
            or data.ndim != 1
            or data.dtype not in (np.uint8, np.int32)
        ):
            raise ValueError(
                "ByteCorpus expects a 1-D uint8 numpy array (int32 for a subword corpus), got "
                f"{type(data).__name__} with shape {getattr(data, 'shape', None)} and dtype "
                f"{getattr(data, 'dtype', None)}"
            )
        if data.size == 0:
            raise ValueError(f"{name} is empty (0 bytes); give a non-empty file")
        self.name = name
        self.vocab_size = vocab_size
        n_train, n_val, _ = split_sizes(int(data.size))
        self.train = data[:n_train]
        self.val = data[n_train : n_train + n_val]
        self.test = data[n_train + n_val :]

    def __len__(self) -> int:
        return int(self.train.size + self.val.size + self.test.size)

    def __repr__(self) -> str:
        return (
            f"ByteCorpus({self.name!r}, train={self.train.size:,}, val={self.val.size:,}, "
            f"test={self.test.size:,})"
        )

    def split(self, split: str) -> np.ndarray:
        """The 1-D uint8 array of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        check_split(split)
        return {"train": self.train, "val": self.val, "test": self.test}[split]

    def _check_length(self, split: str, seq_len: int) -> np.ndarray:
        check_positive("seq_len", seq_len)
        arr = self.split(split)
        if arr.size < seq_len + 1:
            longest = arr.size - 1
            hint = f"use seq_len <= {longest}" if longest >= 1 else "this split cannot be used"
            raise ValueError(
                f"the {split} split of {self.name} has {arr.size:,} bytes but seq_len="
                f"{seq_len:,} needs at least seq_len + 1 = {seq_len + 1:,}; {hint} "
                "or give a larger file"
            )
        return arr

    def train_batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crops of the train split for ``rank`` at ``step``.

        The global batch of ``batch_size * world_size`` crop offsets is drawn uniformly from
        a generator seeded by ``(seed, step)``; rank ``r`` gets rows ``r::world_size``.

        Args:
            step: training step, >= 0.
            batch_size: rows per rank ``B``.
            seq_len: tokens per row ``L``; each row is a crop of ``L + 1`` consecutive bytes.
            seed: run seed.
            rank: this process's rank in ``[0, world_size)``.
            world_size: number of ranks sharing the global batch.

        Returns:
            ``(input_ids, targets)``, both int64 of shape ``(B, L)``, with
            ``targets[:, t] = crop[t + 1]`` and ``input_ids[:, t] = crop[t]``.
        """
        check_step_and_shard(step, batch_size, rank, world_size)
        arr = self._check_length("train", seq_len)
        gen = make_generator(seed, "bytes/train", step)
        num_starts = arr.size - seq_len  # valid offsets: 0 .. size - seq_len - 1
        starts = torch.randint(0, num_starts, (batch_size * world_size,), generator=gen)
        starts = starts[rank::world_size].numpy()
        return _gather(arr, starts, seq_len)

    def num_eval_windows(self, split: str, seq_len: int) -> int:
        """Number of full windows :meth:`eval_batches` yields for ``split`` and ``seq_len``."""
        arr = self._check_length(split, seq_len)
        return (arr.size - 1) // seq_len

    def eval_batches(
        self,
        split: str,
        seq_len: int,
        batch_size: int,
        max_batches: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive, non-overlapping windows over ``split``, in order.

        Window ``i`` has inputs ``data[i*L : (i+1)*L]`` and targets ``data[i*L+1 : (i+1)*L+1]``,
        so every byte from position 1 up to ``1 + num_eval_windows * L`` is predicted exactly
        once; the trailing ``(size - 1) % L`` bytes that do not fill a window are skipped.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            seq_len: window length ``L``.
            batch_size: windows per batch; the last batch may have fewer rows.
            max_batches: stop after this many batches (``None``: the whole split).

        Yields:
            ``(input_ids, targets)``, both int64 of shape ``(b, L)`` with ``b <= batch_size``.
        """
        check_positive("batch_size", batch_size)
        if max_batches is not None:
            check_positive("max_batches", max_batches)
        arr = self._check_length(split, seq_len)
        n_windows = (arr.size - 1) // seq_len
        n_batches = -(-n_windows // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            first = b * batch_size
            last = min(first + batch_size, n_windows)
            starts = np.arange(first, last, dtype=np.int64) * seq_len
            yield _gather(arr, starts, seq_len)


def _gather(arr: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops ``arr[s : s + seq_len + 1]`` for each start -> (inputs, targets) (B, seq_len)."""
    idx = starts.astype(np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    crops = torch.from_numpy(np.asarray(arr[idx], dtype=np.int64))
    return crops[:, :-1].contiguous(), crops[:, 1:].contiguous()


def _memmap_bytes(path: Path, expected: str) -> np.ndarray:
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{str(path)!r} is empty (0 bytes); expected {expected}")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))


def load_enwik8(path: str | os.PathLike[str]) -> ByteCorpus:
    """Load enwik8 from the raw Hutter Prize file or a ``.zip`` containing it.

    A raw file is memory-mapped read-only; a zip member is read into memory. In a zip the
    member named ``enwik8`` is used, or the only file if there is exactly one. A file of
    exactly 10^8 bytes gets the standard 90M / 5M / 5M split; other lengths (e.g. a prefix)
    are split 90/5/5 proportionally (see :func:`split_sizes`).

    Raises:
        DataFileNotFoundError: (a ``ValueError``) if ``path`` does not exist.
        ValueError: if the file is empty, or the zip holds no recognisable member.
    """
    p = check_file(path, _ENWIK8_EXPECTED)
    if not zipfile.is_zipfile(p):
        return ByteCorpus(_memmap_bytes(p, _ENWIK8_EXPECTED), name=p.name)
    with zipfile.ZipFile(p) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        named = [m for m in members if Path(m.filename).name == "enwik8"]
        if len(named) == 1:
            member = named[0]
        elif len(members) == 1:
            member = members[0]
        else:
            listing = ", ".join(m.filename for m in members[:10]) or "nothing"
            raise ValueError(
                f"zip archive {str(p)!r} holds {listing}; expected a single member or one "
                "named 'enwik8' (the raw Hutter Prize file)"
            )
        raw = zf.read(member)
    if not raw:
        raise ValueError(f"member {member.filename!r} of {str(p)!r} is empty (0 bytes)")
    return ByteCorpus(np.frombuffer(raw, dtype=np.uint8), name=f"{p.name}:{member.filename}")


def load_text(path: str | os.PathLike[str]) -> ByteCorpus:
    """Any local file as a byte corpus (memory-mapped read-only), split 90/5/5.

    Raises:
        DataFileNotFoundError: (a ``ValueError``) if ``path`` does not exist.
        ValueError: if the file is empty.
    """
    expected = "a local file of raw bytes (any text file)"
    p = check_file(path, expected)
    return ByteCorpus(_memmap_bytes(p, expected), name=p.name)


def load_subword_text(
    path: str | os.PathLike[str], spm_model: str | os.PathLike[str]
) -> ByteCorpus:
    """A local text file encoded with a sentencepiece model (ids as int32), split 90/5/5 like
    a byte corpus: the splits cut the id sequence, not the bytes."""
    import sentencepiece as spm

    expected = "a local text file (UTF-8)"
    p = check_file(path, expected)
    model = check_file(spm_model, "a sentencepiece model file (.model)")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = np.asarray(sp.encode(p.read_text(encoding="utf-8", errors="replace")), dtype=np.int32)
    if ids.size == 0:
        raise ValueError(f"{str(p)!r} encodes to no tokens; give a non-empty text file")
    return ByteCorpus(ids, name=f"{p.name} ({model.name})", vocab_size=sp.get_piece_size())

"""Language-model tasks: one interface over the data sources (`reformer.data`) that the
recipe and `reformer eval` use.

A task yields (input_ids (B, L), targets (B, L)) batches, with -100 where a position is not
scored, and says how to report its loss (bits per character, bits per dim, or accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...data.bytes import ByteCorpus, load_enwik8, load_subword_text, load_text
from ...data.duplication import DuplicationTask
from ...data.images import ImageDataset

TASKS = ("duplication", "enwik8", "text", "images")
Batch = tuple[Tensor, Tensor]


@dataclass
class Task:
    """A data source with the metric it is reported in."""

    name: str
    vocab_size: int
    seq_len: int
    unit: str  # "bpc" | "bpd" | "accuracy" | "bpt" (bits per subword token)
    source: DuplicationTask | ByteCorpus | ImageDataset
    offset: int = 0
    """Byte corpora: token id = byte + offset (transformers' enwik8 model reserves 0 and 1)."""

    def _shift(self, batch: Batch) -> Batch:
        if not self.offset:
            return batch
        ids, targets = batch
        return ids + self.offset, torch.where(targets >= 0, targets + self.offset, targets)

    def train_batch(
        self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Batch:
        src = self.source
        if isinstance(src, DuplicationTask):
            return src.batch(step, batch_size, seed, "train", rank, world_size)
        if isinstance(src, ByteCorpus):
            batch = src.train_batch(step, batch_size, self.seq_len, seed, rank, world_size)
            return self._shift(batch)
        return src.train_batch(step, batch_size, seed, rank, world_size)

    def eval_batches(
        self, split: str, batch_size: int, max_batches: int | None, seed: int = 0
    ) -> Iterator[Batch]:
        src = self.source
        if isinstance(src, DuplicationTask):
            for i in range(max_batches if max_batches is not None else 8):
                yield src.batch(i, batch_size, seed, split)
        elif isinstance(src, ByteCorpus):
            for batch in src.eval_batches(split, self.seq_len, batch_size, max_batches):
                yield self._shift(batch)
        else:
            yield from src.eval_batches(split, batch_size, max_batches)

    def bits(self, loss_nats: float) -> float:
        return loss_nats / math.log(2)


def build_task(
    name: str,
    path: str | None,
    seq_len: int,
    image_side: int = 64,
    *,
    byte_offset: int = 0,
    tokenizer: str | None = None,
) -> Task:
    """Build a task; `path` is the data file or directory for the real-data tasks.

    byte_offset: enwik8 and text: token id = byte + byte_offset. tokenizer: text only, a
    sentencepiece model to encode the file with instead of bytes."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {name!r}")
    if name == "duplication":
        return Task(name, 128, seq_len, "accuracy", DuplicationTask(seq_len, 128))
    if path is None:
        hint = {
            "enwik8": "the enwik8 file (raw or .zip), e.g. ../shared/data/enwik8/enwik8-prefix-4M",
            "text": "any local text file",
            "images": "a directory with *train*.npz and *val*.npz (downsampled-ImageNet layout)",
        }[name]
        raise ValueError(f"task {name!r} needs --data PATH: {hint}")
    if name == "enwik8":
        return Task(name, 256 + byte_offset, seq_len, "bpc", load_enwik8(path), byte_offset)
    if name == "text":
        if tokenizer is not None:
            corpus = load_subword_text(path, tokenizer)
            return Task(name, corpus.vocab_size, seq_len, "bpt", corpus)
        return Task(name, 256 + byte_offset, seq_len, "bpc", load_text(path), byte_offset)
    p = Path(path)
    images = ImageDataset.from_directory(p, side=image_side)
    return Task(name, 256, images.seq_len, "bpd", images)


@torch.no_grad()
def accuracy_counts(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """(correct, scored) argmax predictions over positions whose target is scored."""
    scored = targets != ignore_index
    correct = (logits.argmax(-1) == targets) & scored
    return int(correct.sum()), int(scored.sum())

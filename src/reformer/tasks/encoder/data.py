"""Labelled text for the encoder: reading local files, tokenizers with mask and CLS ids, and
padded classification batches.

Shapes: B examples in a batch, T the longest row of that batch (rows are padded with id 0
and masked out by the attention mask, so the pad id never reaches a real position).

Files are ``{split}.jsonl`` (``{"text": ..., "label": ...}`` per line) or ``{split}.tsv`` (a
header row naming the ``text`` and ``label`` columns). Training batches are a pure function of
``(seed, step)``: the global batch is a slice of a per-epoch permutation, and rank ``r`` keeps
rows ``r::world_size``, so a resumed run, or one on another number of ranks with the same
global batch, sees the same examples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
from torch import Tensor

from ...data._common import (
    DataFileNotFoundError,
    check_file,
    check_positive,
    check_split,
    check_step_and_shard,
    make_generator,
)
from ...data.subword import Tokenizer
from . import listops

PathLike = str | os.PathLike[str]

_LABELLED = 'a .jsonl file of {"text": ..., "label": ...} lines or a .tsv file with a header'


# ---------------------------------------------------------------------------------------------
# Files


def _jsonl_row(line: str, where: str, require_label: bool = True) -> tuple[str, str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'{where}: not valid JSON ({e.msg}); expected an object like {{"text": "...", '
            '"label": "pos"}'
        ) from e
    text, label = (obj.get("text"), obj.get("label")) if isinstance(obj, dict) else (None, None)
    if not isinstance(text, str):
        raise ValueError(f'{where}: expected an object with a string "text", got {line[:80]!r}')
    if label is None and not require_label:
        return text, None
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f'{where}: "label" must be a string or an integer, got {label!r}')
    return text, str(label)


def read_labelled(path: PathLike, require_label: bool = True) -> list[tuple[str, str | None]]:
    """``(text, label)`` pairs of a ``.jsonl`` or ``.tsv`` file, labels as strings
    (require_label=False: texts to classify, the label None where a line has none).

    JSONL: one object per line with a string ``text`` and a string or integer ``label`` (other
    keys ignored). TSV: the first line names the tab-separated columns, which must include
    ``text`` and ``label`` (others ignored). Blank lines are skipped in both.

    Raises:
        DataFileNotFoundError: ``path`` does not exist.
        ValueError: another suffix, invalid UTF-8, a malformed line (file and line number,
            with what was expected), an empty text, or no examples at all.
    """
    p = check_file(path, _LABELLED)
    tsv = p.suffix.lower() == ".tsv"
    if not tsv and p.suffix.lower() != ".jsonl":
        raise ValueError(f"{str(p)!r}: unknown suffix {p.suffix!r}; expected {_LABELLED}")
    try:
        # split("\n"), not splitlines(): a text may hold "\r", U+2028 and the like
        lines = p.read_bytes().decode("utf-8").removeprefix("\ufeff").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(p)!r} is not valid UTF-8 ({e}); re-encode it as UTF-8") from e
    lines = [line.removesuffix("\r") for line in lines]
    if tsv:
        header = [name.strip() for name in lines[0].split("\t")]
        missing = [c for c in ("text", "label")[: 2 if require_label else 1] if c not in header]
        if missing:
            raise ValueError(
                f"{p}:1: the header {lines[0][:80]!r} has no {' and no '.join(missing)} column; "
                "the first line of a .tsv names its tab-separated columns, text and label included"
            )
        if len(set(header)) != len(header):
            raise ValueError(f"{p}:1: the header names a column twice: {header}")
        t = header.index("text")
        l = header.index("label") if "label" in header else None
    rows = []
    for n, line in enumerate(lines[1:] if tsv else lines, 2 if tsv else 1):
        if not line.strip():
            continue
        if tsv:
            fields = line.split("\t")
            if len(fields) != len(header):
                raise ValueError(
                    f"{p}:{n}: {len(fields)} tab-separated fields but the header names "
                    f"{len(header)} ({', '.join(header)}); a text may not contain a tab"
                )
            text, label = fields[t], (None if l is None else fields[l])
        else:
            text, label = _jsonl_row(line, f"{p}:{n}", require_label)
        if not text.strip():  # a row without tokens would have nothing to attend to
            raise ValueError(f"{p}:{n}: the text is empty; remove the line or give it a text")
        rows.append((text, label))
    if not rows:
        raise ValueError(f"{str(p)!r} holds no examples; expected {_LABELLED}")
    return rows


def split_file(directory: PathLike, split: str) -> Path:
    """The file of ``split`` ("train", "val" or "test"): ``{split}.jsonl`` or ``{split}.tsv``.

    Raises:
        DataFileNotFoundError: no such directory, or neither file exists (both are named).
        ValueError: an unknown split, or both files exist (which one is meant is unclear).
    """
    check_split(split)
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataFileNotFoundError(
            f"no such directory: {str(root)!r}; expected a folder of train/val/test .jsonl or "
            ".tsv files"
        )
    found = [p for p in (root / f"{split}.jsonl", root / f"{split}.tsv") if p.is_file()]
    if len(found) > 1:
        raise ValueError(f"{str(root)!r} holds both {split}.jsonl and {split}.tsv; keep one")
    if not found:
        raise DataFileNotFoundError(
            f"no {split!r} split in {str(root)!r}: looked for {split}.jsonl and {split}.tsv"
        )
    return found[0]


# ---------------------------------------------------------------------------------------------
# Tokenizers


class _Tokenizer:
    """Ordinary ids ``0 .. base_size - 1`` (what :meth:`encode` gives), then two specials:
    ``mask_id = base_size`` for masked-LM training and ``cls_id = base_size + 1``, prepended
    for first-token pooling; the model embeds ``vocab_size = base_size + 2`` ids."""

    name: str

    def __init__(self, base_size: int) -> None:
        self.base_size = base_size
        self.mask_id, self.cls_id, self.vocab_size = base_size, base_size + 1, base_size + 2

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """A JSON-able description that :func:`tokenizer_from_spec` turns back into this."""
        return {"name": self.name}


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes: 256 ordinary ids."""

    name = "bytes"

    def __init__(self) -> None:
        super().__init__(256)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class ListOpsTokenizer(_Tokenizer):
    """The 15 ListOps tokens (:data:`reformer.tasks.encoder.listops.TOKENS`)."""

    name = "listops"

    def __init__(self) -> None:
        super().__init__(len(listops.TOKENS))

    def encode(self, text: str) -> list[int]:
        return listops.encode(text)


class SentencePieceTokenizer(_Tokenizer):
    """A sentencepiece model file; all its pieces (its own specials too) are ordinary ids."""

    name = "sentencepiece"

    def __init__(self, model_path: PathLike) -> None:
        self.path = check_file(model_path, "a sentencepiece model (e.g. spm.model)")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{str(self.path)!r} is not a sentencepiece model ({e})") from e
        super().__init__(self._sp.get_piece_size())

    @classmethod
    def train(
        cls, texts: list[str], vocab_size: int, path: PathLike, seed: int = 0
    ) -> SentencePieceTokenizer:
        """Train a unigram model of exactly ``vocab_size`` pieces on ``texts``, write it to
        ``path`` atomically, load it. The translation trainer does the work (every text, in
        order, one thread, no sampling: the same texts give the same file); its pad/bos/eos/unk
        pieces are ids 0-3 here, and encode only ever gives unk of those.

        Raises:
            ValueError: ``vocab_size`` <= 4 or too large for the texts, or no non-empty text.
        """
        Tokenizer.train(texts, vocab_size, path, model_type="unigram", seed=seed)
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "model": str(self.path)}


EncoderTokenizer = ByteTokenizer | ListOpsTokenizer | SentencePieceTokenizer
_SPEC_KEYS = {"bytes": {"name"}, "listops": {"name"}, "sentencepiece": {"name", "model"}}


def tokenizer_from_spec(spec: dict[str, Any]) -> EncoderTokenizer:
    """The tokenizer a ``spec()`` describes: ``{"name": "bytes"}``, ``{"name": "listops"}`` or
    ``{"name": "sentencepiece", "model": path}``.

    Raises:
        ValueError: an unknown name, or a missing or unexpected key.
    """
    name = spec.get("name") if isinstance(spec, dict) else None
    if name not in _SPEC_KEYS or set(spec) != _SPEC_KEYS[name]:
        raise ValueError(
            f"bad tokenizer spec {spec!r}: expected {{'name': 'bytes'}}, {{'name': 'listops'}} "
            "or {'name': 'sentencepiece', 'model': PATH}"
        )
    if name == "sentencepiece":
        return SentencePieceTokenizer(spec["model"])
    return ByteTokenizer() if name == "bytes" else ListOpsTokenizer()


# ---------------------------------------------------------------------------------------------
# Datasets


def _sorted_labels(labels: set[str]) -> list[str]:
    # Integer labels in numeric order, so "2" < "10" and class i is label i for 0..N-1 data;
    # the string breaks ties ("01" and "1") so the order never depends on set iteration.
    if all(s.removeprefix("-").isdecimal() for s in labels):
        return sorted(labels, key=lambda s: (int(s), s))
    return sorted(labels)


class LabelledSet:
    """Tokenized examples and their class ids, ready to batch.

    Rows are stored end to end in one int32 array (``_flat``, cut at ``_offsets``), labels as
    an int64 array of indices into :attr:`label_names`. Build one with :meth:`from_examples`.
    """

    def __init__(
        self, flat: np.ndarray, offsets: np.ndarray, labels: np.ndarray, label_names: list[str]
    ) -> None:
        assert len(offsets) == len(labels) + 1 and offsets[-1] == len(flat)
        self._flat, self._offsets = flat, offsets
        self.labels = labels
        self._names = list(label_names)
        self._perm_key, self._perm = (-1, -1), torch.empty(0, dtype=torch.long)

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[tuple[str, str]],
        tokenizer: EncoderTokenizer,
        label_names: list[str] | None = None,
        *,
        max_len: int,
        add_cls: bool,
    ) -> LabelledSet:
        """Tokenize ``(text, label)`` pairs; each row keeps at most ``max_len`` tokens in all.

        Args:
            label_names: class names, index = class id; None takes the sorted labels of these
                examples (integers in numeric order). Pass the training set's names for val
                and test, so that ids agree.
            add_cls: prepend ``tokenizer.cls_id`` at position 0 (counted in ``max_len``).

        Raises:
            ValueError: no examples, ``max_len`` too small, an unknown label, a text with no
                tokens.
        """
        check_positive("max_len", max_len)
        if add_cls and max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for text after the CLS token")
        if not examples:
            raise ValueError("no examples to build a LabelledSet from")
        if label_names is None:
            label_names = _sorted_labels({str(label) for _, label in examples})
        index = {name: i for i, name in enumerate(label_names)}
        assert len(index) == len(label_names), f"duplicate label names: {label_names}"
        rows, labels = [], []
        keep = max_len - add_cls
        for i, (text, label) in enumerate(examples):
            label = str(label)  # listops.generate gives int labels
            if label not in index:
                raise ValueError(
                    f"example {i} has label {label!r}, not one of the {len(index)} known labels "
                    f"({', '.join(label_names[:20])}{', ...' * (len(index) > 20)}); val and "
                    "test labels must all occur in the training data"
                )
            ids = tokenizer.encode(text)[:keep]
            if not ids:
                raise ValueError(f"example {i} ({text[:40]!r}) gives no tokens")
            rows.append([tokenizer.cls_id, *ids] if add_cls else ids)
            labels.append(index[label])
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        flat = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets, np.asarray(labels, dtype=np.int64), label_names)

    @property
    def label_names(self) -> list[str]:
        return list(self._names)

    @property
    def n_classes(self) -> int:
        return len(self._names)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each row (CLS included)."""
        return np.diff(self._offsets)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int] | np.ndarray | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``indices`` -> ``(input_ids (B, T) long, attention_mask (B, T) bool, labels (B,)
        long)``, padded with id 0 to the longest of these rows."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("batch needs at least one index")
        if idx.min() < 0 or idx.max() >= len(self):
            raise ValueError(f"batch index out of range [0, {len(self)}): {idx.tolist()[:8]}")
        starts, lengths = self._offsets[idx], self.lengths[idx]
        width = int(lengths.max())
        mask = np.arange(width) < lengths[:, None]  # (B, T)
        ids = np.zeros((len(idx), width), dtype=np.int64)
        # Gather all rows at once: token j of row b sits at _flat[starts[b] + j], and ids[mask]
        # visits the cells row by row, j = 0 .. lengths[b] - 1.
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        ids[mask] = self._flat[np.repeat(starts, lengths) + within]
        return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(self.labels[idx])

    def _permutation(self, seed: int, epoch: int) -> Tensor:
        # Consecutive steps share an epoch: keep the last permutation rather than redraw it.
        if self._perm_key != (seed, epoch):
            gen = make_generator(seed, "labelled", epoch)
            self._perm_key, self._perm = (seed, epoch), torch.randperm(len(self), generator=gen)
        return self._perm

    def train_batch(
        self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's part of training batch ``step``: a pure function of ``(seed, step)``.

        Global batch ``step`` (``batch_size * world_size`` rows) is positions ``[step * G,
        (step + 1) * G)`` of the endless sequence of epoch permutations (epoch e shuffled by
        ``make_generator(seed, "labelled", e)``), so each epoch shows every example once; rank
        ``r`` keeps rows ``r::world_size``. Returns :meth:`batch` of those rows.
        """
        check_step_and_shard(step, batch_size, rank, world_size)
        n, size = len(self), batch_size * world_size
        pos = step * size
        rows = []
        while size:
            epoch, start = divmod(pos, n)
            take = min(size, n - start)
            rows.append(self._permutation(seed, epoch)[start : start + take])
            pos, size = pos + take, size - take
        return self.batch(torch.cat(rows)[rank::world_size])

    def eval_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """:meth:`batch` of consecutive examples in file order, ``batch_size`` at a time (the
        last batch may be smaller), at most ``max_batches`` of them."""
        check_positive("batch_size", batch_size)
        if max_batches is not None:
            check_positive("max_batches", max_batches)
        for b, start in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.batch(np.arange(start, min(start + batch_size, len(self))))

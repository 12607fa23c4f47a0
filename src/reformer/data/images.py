"""Downsampled-ImageNet (imagenet64) npz files as token sequences.

File layout (Chrabaszcz et al. 2017, also used for the Tiny ImageNet sample): an ``.npz`` with
``data`` of shape ``(N, 12288)`` uint8 holding each image *planar* (the 64x64 R plane, then G,
then B, each row-major) and ``labels`` of shape ``(N,)``. Other arrays (e.g. ``mean``) are
ignored.

Tokens are the image in raster order with channels interleaved, i.e. the ``(side, side, 3)``
array flattened: pixel (0, 0) R, G, B, then pixel (0, 1) R, G, B, ... giving
``3 * side * side`` tokens (12,288 for side 64) with vocabulary 256.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from reformer.data._common import (
    DataFileNotFoundError,
    check_file,
    check_positive,
    check_split,
    check_step_and_shard,
    make_generator,
    shift_targets,
)

__all__ = [
    "IMAGE_SIDE",
    "IMAGE_TOKENS",
    "ImageArrays",
    "ImageDataset",
    "downsample",
    "load_image_npz",
    "to_image",
    "to_tokens",
]

IMAGE_SIDE = 64
"""Side of the stored images."""
IMAGE_TOKENS = 3 * IMAGE_SIDE * IMAGE_SIDE
"""Values per stored image: 12,288."""

_NPZ_EXPECTED = (
    f"a downsampled-ImageNet .npz with 'data' (N, {IMAGE_TOKENS}) uint8 (R, G, B planes, each "
    f"{IMAGE_SIDE}x{IMAGE_SIDE} row-major) and 'labels' (N,) integers"
)


class ImageArrays(NamedTuple):
    """Arrays of one npz file: ``data`` (N, 12288) uint8 planar (may be a read-only memmap)
    and ``labels`` (N,) int64."""

    data: np.ndarray
    labels: np.ndarray


def _side_of(n: int, what: str) -> int:
    side = math.isqrt(n // 3) if n > 0 else 0
    if n <= 0 or 3 * side * side != n:
        raise ValueError(
            f"{what} has {n} values per image; expected 3 * side * side (e.g. {IMAGE_TOKENS} "
            f"for {IMAGE_SIDE}x{IMAGE_SIDE}x3)"
        )
    return side


def _as_uint8(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integers in 0..255, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{what} must hold values in 0..255, found range {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def to_tokens(planar: np.ndarray | torch.Tensor) -> np.ndarray:
    """Planar images -> interleaved raster tokens.

    Args:
        planar: ``(..., 3 * s * s)`` values 0..255: R plane, G plane, B plane, each ``s x s``
            row-major (the npz ``data`` layout).

    Returns:
        uint8 array ``(..., 3 * s * s)``: the ``(s, s, 3)`` image flattened, i.e. pixel
        (0, 0) R, G, B, then pixel (0, 1) R, G, B, ...
    """
    arr = _as_uint8(planar, "planar")
    n = arr.shape[-1] if arr.ndim else 0
    side = _side_of(n, "planar")
    lead = arr.shape[:-1]
    chw = arr.reshape(*lead, 3, side, side)
    return np.ascontiguousarray(np.moveaxis(chw, -3, -1)).reshape(*lead, n)


def to_image(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """Interleaved raster tokens -> image, the inverse of :func:`to_tokens` after reshaping.

    Args:
        tokens: ``(..., 3 * s * s)`` values 0..255 (a model sample may be an int64 tensor).

    Returns:
        uint8 array ``(..., s, s, 3)``; ``(64, 64, 3)`` for one imagenet64 image.
    """
    arr = _as_uint8(tokens, "tokens")
    n = arr.shape[-1] if arr.ndim else 0
    side = _side_of(n, "tokens")
    return arr.reshape(*arr.shape[:-1], side, side, 3)


def downsample(planar: np.ndarray, side: int) -> np.ndarray:
    """Area-average planar images to ``side x side`` (reshape-mean, rounded to nearest).

    Args:
        planar: ``(N, 3 * S * S)`` uint8 planar images.
        side: target side; must divide ``S``.

    Returns:
        uint8 ``(N, 3 * side * side)`` planar images.
    """
    arr = _as_uint8(planar, "planar")
    src = _side_of(arr.shape[-1], "planar")
    check_positive("side", side)
    if src % side:
        divisors = [d for d in range(1, src + 1) if src % d == 0]
        raise ValueError(
            f"side={side} does not divide the stored side {src}; choose one of {divisors}"
        )
    if side == src:
        return arr
    f = src // side
    blocks = arr.reshape(arr.shape[0], 3, side, f, side, f).astype(np.uint32)
    sums = blocks.sum(axis=(3, 5))
    area = f * f
    out = (sums + area // 2) // area
    return out.astype(np.uint8).reshape(arr.shape[0], 3 * side * side)


def _memmap_npz_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    """Memory-map an uncompressed (``np.savez``) member, or ``None`` if that is not possible."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
        except ValueError:
            return None
        if fortran or dtype.hasobject:
            return None
        offset = f.tell()
    if len(shape) == 0 or math.prod(shape) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def load_image_npz(path: str | os.PathLike[str]) -> ImageArrays:
    """Load and validate one downsampled-ImageNet npz file.

    ``data`` is memory-mapped (read-only) when the file was written uncompressed
    (``np.savez``), otherwise read into memory. ``labels`` is always read into memory.

    Returns:
        :class:`ImageArrays` with ``data`` (N, 12288) uint8 planar and ``labels`` (N,) int64.

    Raises:
        DataFileNotFoundError: (a ``ValueError``) if ``path`` does not exist.
        ValueError: if the file is not an npz, lacks ``data`` or ``labels``, or an array has
            the wrong shape or dtype; the message names the array.
    """
    p = check_file(path, _NPZ_EXPECTED)
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{str(p)!r} is not an .npz (zip) archive; expected {_NPZ_EXPECTED}")
    with zipfile.ZipFile(p) as zf:
        members = {Path(i.filename).stem: i for i in zf.infolist() if i.filename.endswith(".npy")}
    for key in ("data", "labels"):
        if key not in members:
            raise ValueError(
                f"{str(p)!r} has no array {key!r} (found: {sorted(members) or 'none'}); "
                f"expected {_NPZ_EXPECTED}"
            )
    data = _memmap_npz_member(p, members["data"])
    with np.load(p, allow_pickle=False) as npz:
        if data is None:
            data = npz["data"]
        labels = npz["labels"]
    if data.dtype != np.uint8:
        raise ValueError(
            f"array 'data' in {str(p)!r} has dtype {data.dtype}; expected uint8 pixel values "
            "(convert with data.astype(np.uint8) when the values are 0..255)"
        )
    if data.ndim != 2 or data.shape[1] != IMAGE_TOKENS:
        raise ValueError(
            f"array 'data' in {str(p)!r} has shape {data.shape}; expected (N, {IMAGE_TOKENS}) "
            f"= R, G, B planes of {IMAGE_SIDE}x{IMAGE_SIDE} per row"
        )
    if data.shape[0] == 0:
        raise ValueError(f"array 'data' in {str(p)!r} holds no images (shape {data.shape})")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"array 'labels' in {str(p)!r} has shape {labels.shape}; expected "
            f"({data.shape[0]},), one label per row of 'data'"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"array 'labels' in {str(p)!r} has dtype {labels.dtype}; expected integers"
        )
    return ImageArrays(data=data, labels=labels.astype(np.int64))


def _as_paths(files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        return [Path(files)]
    return [Path(f) for f in files]


class _Rows:
    """Row access across several ``(n_i, D)`` arrays without concatenating them."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [a.shape[0] for a in arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((index.size, self.arrays[0].shape[1]), dtype=np.uint8)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.arrays[k][index[mask] - self.offsets[k]]
        return out


class ImageDataset:
    """imagenet64-style token batches from downsampled-ImageNet npz files.

    Args:
        train: one npz path or several (e.g. ``train_data_batch_1.npz`` ...); their rows are
            used as one set, in the order given.
        val: one npz path or several.
        side: image side of the tokens; 64 keeps the stored resolution, a divisor of 64
            (e.g. 16 -> 768 tokens) area-averages each image on the fly.

    Attributes:
        vocab_size: 256.
        seq_len: tokens per image, ``3 * side * side``.
    """

    vocab_size: int = 256

    def __init__(
        self,
        train: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        val: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        side: int = IMAGE_SIDE,
    ) -> None:
        check_positive("side", side)
        if IMAGE_SIDE % side:
            divisors = [d for d in range(1, IMAGE_SIDE + 1) if IMAGE_SIDE % d == 0]
            raise ValueError(
                f"side={side} does not divide the stored side {IMAGE_SIDE}; choose one of "
                f"{divisors}"
            )
        self.side = side
        self.seq_len = 3 * side * side
        self._splits: dict[str, _Rows] = {}
        self._labels: dict[str, np.ndarray] = {}
        for split, files in (("train", train), ("val", val)):
            paths = _as_paths(files)
            if not paths:
                raise ValueError(f"no {split} files given; pass at least one .npz path")
            loaded = [load_image_npz(p) for p in paths]
            self._splits[split] = _Rows([a.data for a in loaded])
            self._labels[split] = np.concatenate([a.labels for a in loaded])

    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike[str], side: int = IMAGE_SIDE
    ) -> ImageDataset:
        """Use every ``*train*.npz`` (sorted) for training and ``*val*.npz`` for validation."""
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise DataFileNotFoundError(
                f"no such directory: {str(d)!r}; expected a folder holding *train*.npz and "
                f"*val*.npz files ({_NPZ_EXPECTED})"
            )
        found = {}
        for split in ("train", "val"):
            found[split] = sorted(d.glob(f"*{split}*.npz"))
            if not found[split]:
                raise DataFileNotFoundError(
                    f"no *{split}*.npz file in {str(d)!r}; expected {_NPZ_EXPECTED}, or pass "
                    "explicit files to ImageDataset(train=..., val=...)"
                )
        return cls(found["train"], found["val"], side=side)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(train={self.num_images('train'):,}, val={self.num_images('val'):,}, "
            f"side={self.side}, seq_len={self.seq_len})"
        )

    def num_images(self, split: str) -> int:
        """Number of images in ``split`` (``"train"`` or ``"val"``)."""
        return len(self._rows(split))

    def labels(self, split: str) -> np.ndarray:
        """Labels ``(N,)`` int64 of ``split`` as stored in the files."""
        self._rows(split)
        return self._labels[split]

    def _rows(self, split: str) -> _Rows:
        if split == "test":
            raise ValueError(
                "the downsampled-ImageNet npz layout has no test split; use split='val'"
            )
        check_split(split, ("train", "val"))
        return self._splits[split]

    def images(self, split: str, index: np.ndarray | Sequence[int]) -> np.ndarray:
        """Images ``index`` of ``split`` as uint8 ``(k, side, side, 3)``."""
        rows = self._rows(split)
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(rows)):
            raise ValueError(f"index out of range for the {split} split of {len(rows)} images")
        return to_image(self._tokens(rows, idx))

    def _tokens(self, rows: _Rows, index: np.ndarray) -> np.ndarray:
        return to_tokens(downsample(rows.take(index), self.side))

    def _batch(self, rows: _Rows, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(self._tokens(rows, index).astype(np.int64))
        return tokens, shift_targets(tokens)

    def train_batch(
        self,
        step: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training images (drawn with replacement) for ``rank`` at ``step``.

        The global batch of ``batch_size * world_size`` image indices comes from a generator
        seeded by ``(seed, step)``; rank ``r`` gets rows ``r::world_size``.

        Returns:
            ``(input_ids, targets)``, int64 ``(B, T)`` with ``T = 3 * side * side``:
            inputs are the image tokens, ``targets[:, t] = input_ids[:, t + 1]`` and the last
            target is -100 (so ``T - 1`` positions are scored per image).
        """
        check_step_and_shard(step, batch_size, rank, world_size)
        rows = self._rows("train")
        gen = make_generator(seed, "images/train", step)
        index = torch.randint(0, len(rows), (batch_size * world_size,), generator=gen)
        return self._batch(rows, index[rank::world_size].numpy())

    def eval_batches(
        self,
        split: str,
        batch_size: int,
        max_batches: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All images of ``split`` in file order, ``batch_size`` at a time.

        Yields:
            ``(input_ids, targets)`` as in :meth:`train_batch`, shape ``(b, T)`` with
            ``b <= batch_size`` (the last batch may be smaller).
        """
        check_positive("batch_size", batch_size)
        if max_batches is not None:
            check_positive("max_batches", max_batches)
        rows = self._rows(split)
        n_batches = -(-len(rows) // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            index = np.arange(b * batch_size, min((b + 1) * batch_size, len(rows)))
            yield self._batch(rows, index)

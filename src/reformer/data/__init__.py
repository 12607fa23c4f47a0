"""Data for the Reformer: the synthetic duplication task, byte corpora and imagenet64 npz.

All random batches are stateless functions of ``(seed, step)`` (and split), so a resumed run
or a different number of ranks with the same global batch sees exactly the same rows.
"""

from reformer.data._common import IGNORE_INDEX, DataFileNotFoundError
from reformer.data.bytes import ENWIK8_SIZE, ByteCorpus, load_enwik8, load_text, split_sizes
from reformer.data.duplication import DuplicationTask
from reformer.data.images import (
    IMAGE_SIDE,
    IMAGE_TOKENS,
    ImageArrays,
    ImageDataset,
    downsample,
    load_image_npz,
    to_image,
    to_tokens,
)

__all__ = [
    "ENWIK8_SIZE",
    "IGNORE_INDEX",
    "IMAGE_SIDE",
    "IMAGE_TOKENS",
    "ByteCorpus",
    "DataFileNotFoundError",
    "DuplicationTask",
    "ImageArrays",
    "ImageDataset",
    "downsample",
    "load_enwik8",
    "load_image_npz",
    "load_text",
    "split_sizes",
    "to_image",
    "to_tokens",
]

"""Tests for reformer.data: duplication task, byte corpora, imagenet64 npz files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import matplotlib.cbook
import matplotlib.image
import numpy as np
import pytest
import torch

from reformer.data import (
    ENWIK8_SIZE,
    IGNORE_INDEX,
    ByteCorpus,
    DataFileNotFoundError,
    DuplicationTask,
    ImageDataset,
    downsample,
    load_enwik8,
    load_image_npz,
    load_text,
    split_sizes,
    to_image,
    to_tokens,
)

# --------------------------------------------------------------------------- duplication


def test_duplication_structure_and_targets() -> None:
    task = DuplicationTask(seq_len=16, vocab_size=10)
    x, y = task.batch(step=3, batch_size=8, seed=0)
    L, half = 16, 8
    assert x.shape == y.shape == (8, L)
    assert x.dtype == y.dtype == torch.long
    assert (x[:, 0] == 0).all() and (x[:, half] == 0).all()
    assert torch.equal(x[:, 1:half], x[:, half + 1 :])
    w = x[:, 1:half]
    assert w.min() >= 1 and w.max() <= 9
    # scored positions t = L/2 .. L-2 predict the second copy; everything else is ignored
    assert torch.equal(y[:, half : L - 1], x[:, half + 1 :])
    assert (y[:, :half] == IGNORE_INDEX).all()
    assert (y[:, L - 1] == IGNORE_INDEX).all()
    assert int((y != IGNORE_INDEX).sum(dim=1)[0]) == task.num_targets == half - 1


def test_duplication_deterministic_in_seed_step_split() -> None:
    task = DuplicationTask(seq_len=32, vocab_size=64)
    a = task.batch(step=5, batch_size=4, seed=7)
    b = task.batch(step=5, batch_size=4, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], task.batch(step=6, batch_size=4, seed=7)[0])
    assert not torch.equal(a[0], task.batch(step=5, batch_size=4, seed=8)[0])
    val = task.batch(step=5, batch_size=4, seed=7, split="val")[0]
    test = task.batch(step=5, batch_size=4, seed=7, split="test")[0]
    assert not torch.equal(a[0], val) and not torch.equal(val, test)


@pytest.mark.parametrize("world_size", [2, 3])
def test_duplication_rank_slices_make_the_global_batch(world_size: int) -> None:
    task = DuplicationTask(seq_len=12, vocab_size=50)
    gx, gy = task.batch(step=2, batch_size=4 * world_size, seed=1)
    for rank in range(world_size):
        x, y = task.batch(step=2, batch_size=4, seed=1, rank=rank, world_size=world_size)
        assert torch.equal(x, gx[rank::world_size]) and torch.equal(y, gy[rank::world_size])


def test_duplication_validation() -> None:
    with pytest.raises(ValueError, match="even"):
        DuplicationTask(seq_len=15)
    with pytest.raises(ValueError, match="even and >= 4"):
        DuplicationTask(seq_len=2)
    with pytest.raises(ValueError, match="vocab_size"):
        DuplicationTask(seq_len=8, vocab_size=2)
    task = DuplicationTask(seq_len=8)
    with pytest.raises(ValueError, match="rank"):
        task.batch(0, 2, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split"):
        task.batch(0, 2, 0, split="dev")
    with pytest.raises(ValueError, match="step"):
        task.batch(-1, 2, 0)


# --------------------------------------------------------------------------- bytes


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_split_sizes() -> None:
    assert split_sizes(ENWIK8_SIZE) == (90_000_000, 5_000_000, 5_000_000)
    assert split_sizes(1000) == (900, 50, 50)
    assert split_sizes(1019) == (919, 50, 50)
    assert sum(split_sizes(4_154_063)) == 4_154_063


def test_enwik8_full_size_standard_split(tmp_path: Path) -> None:
    path = tmp_path / "enwik8"
    with open(path, "wb") as f:  # sparse file: 10^8 bytes without writing them
        f.truncate(ENWIK8_SIZE)
    corpus = load_enwik8(path)
    assert (corpus.train.size, corpus.val.size, corpus.test.size) == (
        90_000_000,
        5_000_000,
        5_000_000,
    )
    assert isinstance(corpus.train, np.memmap)
    assert corpus.vocab_size == 256


def test_enwik8_small_file_proportional_and_zip_identical(tmp_path: Path) -> None:
    raw = _random_bytes(10_007)
    path = tmp_path / "enwik8"
    path.write_bytes(raw)
    corpus = load_enwik8(path)
    n_train, n_val, n_test = split_sizes(len(raw))
    assert (corpus.train.size, corpus.val.size, corpus.test.size) == (n_train, n_val, n_test)
    assert (n_val, n_test) == (500, 500)
    assert corpus.train.tobytes() == raw[:n_train]
    assert corpus.val.tobytes() == raw[n_train : n_train + n_val]
    assert corpus.test.tobytes() == raw[n_train + n_val :]

    zpath = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", raw)
    zcorpus = load_enwik8(zpath)
    for split in ("train", "val", "test"):
        assert np.array_equal(zcorpus.split(split), corpus.split(split))
    a = corpus.train_batch(step=4, batch_size=3, seq_len=20, seed=9)
    b = zcorpus.train_batch(step=4, batch_size=3, seq_len=20, seed=9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    # several members: the one named enwik8 is used; otherwise an error lists them
    multi = tmp_path / "multi.zip"
    with zipfile.ZipFile(multi, "w") as zf:
        zf.writestr("README", b"readme")
        zf.writestr("data/enwik8", raw)
    assert load_enwik8(multi).val.tobytes() == corpus.val.tobytes()
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("a.txt", b"a")
        zf.writestr("b.txt", b"b")
    with pytest.raises(ValueError, match=r"a\.txt.*enwik8"):
        load_enwik8(bad)


def test_load_text_matches_file(tmp_path: Path) -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 50).encode()
    path = tmp_path / "sample.txt"
    path.write_bytes(text)
    corpus = load_text(path)
    assert len(corpus) == len(text)
    joined = corpus.train.tobytes() + corpus.val.tobytes() + corpus.test.tobytes()
    assert joined == text


def test_train_crops_are_substrings_with_shifted_targets(tmp_path: Path) -> None:
    raw = _random_bytes(20_000, seed=1)
    corpus = ByteCorpus(np.frombuffer(raw, dtype=np.uint8))
    train = corpus.train.tobytes()
    L = 32
    x, y = corpus.train_batch(step=0, batch_size=16, seq_len=L, seed=3)
    assert x.shape == y.shape == (16, L) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row_x, row_y in zip(x, y, strict=True):
        crop = bytes(row_x.tolist()) + bytes([int(row_y[-1])])
        start = train.find(crop)
        assert start >= 0 and start + L + 1 <= len(train)
    # deterministic and step-dependent
    assert torch.equal(x, corpus.train_batch(step=0, batch_size=16, seq_len=L, seed=3)[0])
    assert not torch.equal(x, corpus.train_batch(step=1, batch_size=16, seq_len=L, seed=3)[0])


def test_byte_rank_slices_make_the_global_batch() -> None:
    corpus = ByteCorpus(np.frombuffer(_random_bytes(5_000, seed=2), dtype=np.uint8))
    gx, gy = corpus.train_batch(step=11, batch_size=6, seq_len=16, seed=0)
    for rank in range(2):
        x, y = corpus.train_batch(
            step=11, batch_size=3, seq_len=16, seed=0, rank=rank, world_size=2
        )
        assert torch.equal(x, gx[rank::2]) and torch.equal(y, gy[rank::2])


def test_eval_windows_consecutive_non_overlapping() -> None:
    corpus = ByteCorpus(np.frombuffer(_random_bytes(20_000, seed=4), dtype=np.uint8))
    val = torch.from_numpy(corpus.val.astype(np.int64))
    L, B = 64, 4
    n_windows = corpus.num_eval_windows("val", L)
    assert n_windows == (val.numel() - 1) // L == 15
    batches = list(corpus.eval_batches("val", seq_len=L, batch_size=B))
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 3]
    xs = torch.cat([b[0] for b in batches]).reshape(-1)
    ys = torch.cat([b[1] for b in batches]).reshape(-1)
    assert torch.equal(xs, val[: n_windows * L])
    assert torch.equal(ys, val[1 : n_windows * L + 1])
    assert len(list(corpus.eval_batches("test", L, B, max_batches=2))) == 2


def test_short_split_raises_clear_error() -> None:
    corpus = ByteCorpus(np.frombuffer(_random_bytes(1_000), dtype=np.uint8))  # val: 50 bytes
    with pytest.raises(ValueError, match=r"val split .* 50 bytes .*seq_len <= 49"):
        next(corpus.eval_batches("val", seq_len=64, batch_size=2))
    with pytest.raises(ValueError, match="seq_len=2,000"):
        corpus.train_batch(step=0, batch_size=2, seq_len=2_000, seed=0)


def test_missing_and_empty_files_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no such file: '/nonexistent'.*enwik8"):
        load_enwik8("/nonexistent")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    assert issubclass(DataFileNotFoundError, ValueError)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_enwik8(empty)
    with pytest.raises(ValueError, match="not a regular file"):
        load_text(tmp_path)


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def hopper_images() -> np.ndarray:
    """Four real 64x64x3 uint8 images derived from matplotlib's grace_hopper.jpg."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    img = np.asarray(matplotlib.image.imread(path))
    if img.dtype != np.uint8:  # some backends return floats in [0, 1]
        img = np.round(img[..., :3] * 255).astype(np.uint8)
    h, w = img.shape[:2]
    s = min(h, w) // 64 * 64
    top, left = (h - s) // 2, (w - s) // 2
    sq = img[top : top + s, left : left + s, :3].astype(np.float64)
    f = s // 64
    base = np.round(sq.reshape(64, f, 64, f, 3).mean(axis=(1, 3))).astype(np.uint8)
    imgs = np.stack([base, base[:, ::-1], base[::-1], base[..., ::-1]])
    assert imgs.shape == (4, 64, 64, 3) and imgs.std() > 10  # a real, non-constant picture
    return np.ascontiguousarray(imgs)


def _planar(imgs: np.ndarray) -> np.ndarray:
    """(N, s, s, 3) -> (N, 3*s*s): R plane, G plane, B plane, each row-major."""
    return np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)).reshape(len(imgs), -1)


def _write_npz(path: Path, imgs: np.ndarray, compressed: bool = False) -> None:
    save = np.savez_compressed if compressed else np.savez
    save(path, data=_planar(imgs), labels=np.arange(1, len(imgs) + 1, dtype=np.int64))


def test_token_round_trip_on_real_image(hopper_images: np.ndarray) -> None:
    img = hopper_images[0]
    planar = _planar(hopper_images[:1])[0]
    assert planar.shape == (12288,)
    # the npz layout: R plane first
    assert planar[5 * 64 + 7] == img[5, 7, 0] and planar[4096 + 5 * 64 + 7] == img[5, 7, 1]
    tokens = to_tokens(planar)
    assert tokens.shape == (12288,) and tokens.dtype == np.uint8
    assert tokens[0:3].tolist() == img[0, 0].tolist()
    assert tokens[3:6].tolist() == img[0, 1].tolist()
    assert tokens[3 * (10 * 64 + 20) + 2] == img[10, 20, 2]
    back = to_image(tokens)
    assert back.shape == (64, 64, 3) and back.dtype == np.uint8
    assert np.array_equal(back, img)
    # batched, and from an int64 tensor (as a model sample would be)
    batch = to_tokens(_planar(hopper_images))
    assert np.array_equal(to_image(torch.from_numpy(batch.astype(np.int64))), hopper_images)
    with pytest.raises(ValueError, match=r"3 \* side \* side"):
        to_tokens(np.zeros(100, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"0\.\.255"):
        to_image(np.full(12, 300))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_load_and_dataset(tmp_path: Path, hopper_images: np.ndarray, compressed: bool) -> None:
    train_imgs, val_imgs = hopper_images[:3], hopper_images[3:]
    _write_npz(tmp_path / "tiny_train.npz", train_imgs, compressed)
    _write_npz(tmp_path / "tiny_val.npz", val_imgs, compressed)
    arrays = load_image_npz(tmp_path / "tiny_train.npz")
    assert isinstance(arrays.data, np.memmap) != compressed
    assert np.array_equal(arrays.data, _planar(train_imgs))
    assert arrays.labels.tolist() == [1, 2, 3]

    ds = ImageDataset.from_directory(tmp_path)
    assert ds.num_images("train") == 3 and ds.num_images("val") == 1 and ds.seq_len == 12288
    assert np.array_equal(ds.images("train", [0, 2]), train_imgs[[0, 2]])

    (x, y), *rest = list(ds.eval_batches("val", batch_size=8))
    assert not rest and x.shape == y.shape == (1, 12288) and x.dtype == torch.int64
    assert np.array_equal(to_image(x[0]), val_imgs[0])
    assert torch.equal(y[:, :-1], x[:, 1:]) and (y[:, -1] == IGNORE_INDEX).all()

    x, y = ds.train_batch(step=0, batch_size=5, seed=0)
    train_tokens = torch.from_numpy(to_tokens(_planar(train_imgs)).astype(np.int64))
    for row in x:
        assert any(torch.equal(row, t) for t in train_tokens)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x, ds.train_batch(step=0, batch_size=5, seed=0)[0])
    gx, _ = ds.train_batch(step=3, batch_size=4, seed=2)
    for rank in range(2):
        rx, _ = ds.train_batch(step=3, batch_size=2, seed=2, rank=rank, world_size=2)
        assert torch.equal(rx, gx[rank::2])
    with pytest.raises(ValueError, match="no test split"):
        next(ds.eval_batches("test", batch_size=1))


def test_dataset_smaller_side(tmp_path: Path, hopper_images: np.ndarray) -> None:
    _write_npz(tmp_path / "a_train.npz", hopper_images[:2])
    _write_npz(tmp_path / "a_val.npz", hopper_images[2:])
    ds = ImageDataset(tmp_path / "a_train.npz", [tmp_path / "a_val.npz"], side=16)
    assert ds.seq_len == 768
    expected = np.floor(
        hopper_images[2:].reshape(2, 16, 4, 16, 4, 3).astype(np.float64).mean(axis=(2, 4)) + 0.5
    ).astype(np.uint8)
    x, _ = next(ds.eval_batches("val", batch_size=2))
    assert x.shape == (2, 768)
    assert np.array_equal(to_image(x), expected)
    assert np.array_equal(downsample(_planar(hopper_images), 64), _planar(hopper_images))
    with pytest.raises(ValueError, match="does not divide"):
        ImageDataset(tmp_path / "a_train.npz", tmp_path / "a_val.npz", side=24)


def test_bad_npz_raises_naming_the_key(tmp_path: Path, hopper_images: np.ndarray) -> None:
    planar = _planar(hopper_images)
    labels = np.zeros(len(planar), dtype=np.int64)
    cases = {
        "no_labels": ({"data": planar}, r"no array 'labels'"),
        "no_data": ({"labels": labels}, r"no array 'data'"),
        "float": ({"data": planar.astype(np.float32), "labels": labels}, r"'data'.*float32"),
        "shape": ({"data": planar[:, :3072], "labels": labels}, r"'data'.*shape \(4, 3072\)"),
        "labels": ({"data": planar, "labels": labels[:2]}, r"'labels'.*shape \(2,\)"),
    }
    for name, (arrays, pattern) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=pattern):
            load_image_npz(path)
    not_npz = tmp_path / "plain.npz"
    not_npz.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"not an \.npz"):
        load_image_npz(not_npz)
    with pytest.raises(ValueError, match="no such file"):
        load_image_npz(tmp_path / "missing.npz")
    only_train = tmp_path / "only"
    only_train.mkdir()
    _write_npz(only_train / "x_train.npz", hopper_images[:1])
    with pytest.raises(ValueError, match=r"no \*val\*\.npz"):
        ImageDataset.from_directory(only_train)

"""A run that cannot write (full disk, quota, read-only, permissions) stops with one line that
names the file, the cause and the fix, exit status 4 and no traceback; nothing is left half
written, the earlier checkpoint stays loadable, and --resume after the fix continues with
the losses of an uninterrupted run. Errors are injected where each kind of file is written,
and met for real on a small filesystem where the test may mount one."""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

import reformer.checkpoint as checkpoint
import reformer.checkpoint.codec as codec
import reformer.checkpoint.store as store
import reformer.training.common as common
from helpers import logged_losses
from reformer.checkpoint import latest_checkpoint, load_checkpoint
from reformer.cli import main
from reformer.model import ReformerLM
from reformer.training.runs import saved_run_config

STEPS = 8


def train_args(run: Path, steps: int = STEPS) -> list[str]:
    return [
        "train", "--preset", "duplication-small", "--seq-len", "16", "--model.max-seq-len",
        "16", "--model.n-layers", "1", "--model.d-model", "16", "--model.d-ff", "16",
        "--model.n-heads", "2", "--model.chunk-len", "8", "--model.n-hashes", "2",
        "--batch-size", "4", "--steps", str(steps), "--checkpoint-every", "2",
        "--log-every", "1", "--eval-every", "0", "--eval-hashes", "2", "--eval-batches", "1",
        "--no-progress", "--out", str(run),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(train_args(run)) == 0
    return logged_losses(run)


def assert_intact(run: Path, step: int) -> None:
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == f"step-{step:08d}"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    load_checkpoint(ckpt, ReformerLM(saved_run_config(ckpt).model))  # checksums verified


def failing_save_file(n: int):
    """safetensors' save_file, whose n-th call fails as it does on a full disk."""
    calls = {"n": 0}
    real = codec.save_file

    def save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real(*args, **kwargs)

    return save_file


def failing_open(n: int, code: int):
    """`open`, whose n-th file opened for writing fails to write with errno `code` and no
    file name (as a write() on a full disk or over a quota does)."""
    calls = {"n": 0}

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(code, os.strerror(code))

    def fake_open(file, mode="r", *args, **kwargs):
        calls["n"] += mode != "rb"
        f = open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by the caller's with)
        return Failing(f) if mode != "rb" and calls["n"] == n else f

    return fake_open


# where -> (what to patch, the failing file, its cause, the checkpoint left)
SITES = {
    # the second checkpoint's model file (3 safetensors files a checkpoint)
    "checkpoint tensors": (
        lambda mp: mp.setattr(codec, "save_file", failing_save_file(4)),
        "checkpoints/.tmp-step-00000004",
        "No space left on device",
        2,
    ),
    # the second checkpoint's first JSON file (6 JSON files a checkpoint)
    "checkpoint json": (
        lambda mp: mp.setattr(store, "open", failing_open(7, errno.EDQUOT), raising=False),
        "checkpoints/.tmp-step-00000004",
        "Disk quota exceeded",
        2,
    ),
    # the fifth training record
    "metrics": (
        lambda mp: mp.setattr(common, "open", failing_open(5, errno.ENOSPC), raising=False),
        "metrics.jsonl",
        "No space left on device",
        4,
    ),
}


@pytest.mark.parametrize("where", list(SITES))
def test_injected_write_errors_stop_cleanly_and_resume(
    where, reference, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    patch, path, cause, kept = SITES[where]
    patch(monkeypatch)
    assert main(train_args(run)) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"reformer train: error: cannot write {run / path}")
    assert f": {cause}; " in err
    assert f"the newest checkpoint ({run}/checkpoints/step-{kept:08d}) is intact" in err
    assert f"`reformer train --config {run / 'config.yaml'} --resume` after the fix" in err
    assert_intact(run, kept)
    monkeypatch.undo()
    assert main([*train_args(run), "--resume"]) == 0
    assert logged_losses(run) == reference


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_other_verbs_name_the_file_they_cannot_write(
    code, reference, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    assert main(train_args(run, steps=2)) == 0
    capsys.readouterr()
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"reformer plot: error: cannot write {tmp_path / 'c.png'}: ")
    assert os.strerror(code) in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".c.png*"))
    args = ["eval", "--checkpoint", str(run), "--batches", "1", "--json", str(tmp_path / "e.json")]
    assert main(args) == 4
    assert f"cannot write {tmp_path / 'e.json'}" in capsys.readouterr().err
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(args) == 0


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs mounted at tmp_path/fs (root only)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(fs)], capture_output=True
    )
    if os.geteuid() != 0 or mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected errors cover the paths")
    yield fs
    subprocess.run(["umount", "-l", str(fs)], check=False)


def fill(fs: Path, leave: int) -> Path:
    """Fill `fs` until `leave` bytes are free; returns the filler file."""
    filler = fs / "filler"
    free = shutil.disk_usage(fs).free
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_for_real(small_filesystem, reference, tmp_path, monkeypatch, capsys):
    """On a real full filesystem: the free-space check refuses the save before writing; with
    the check off, the kernel's ENOSPC inside the write is caught the same way; after room
    is made the run resumes to the uninterrupted losses."""
    run = small_filesystem / "run"
    assert main(train_args(run, steps=4)) == 0
    filler = fill(small_filesystem, leave=64 << 10)
    capsys.readouterr()
    assert main([*train_args(run), "--resume"]) == 4
    err = capsys.readouterr().err
    assert f"cannot write {run / 'checkpoints'}: No space left on device (the checkpoint " in err
    assert "MiB are free)" in err and "Traceback" not in err
    assert_intact(run, 4)
    monkeypatch.setattr(checkpoint, "_check_space", lambda root, payload: None)
    assert main([*train_args(run), "--resume"]) == 4
    err = capsys.readouterr().err
    assert f"cannot write {run / 'checkpoints'}/.tmp-step-00000006" in err
    assert "No space left on device" in err and "Traceback" not in err
    assert_intact(run, 4)
    filler.unlink()
    monkeypatch.undo()
    assert main([*train_args(run), "--resume"]) == 0
    assert logged_losses(run) == reference

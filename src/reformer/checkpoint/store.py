"""Checkpoint directories: the atomic store (temporary sibling, fsync, rename), its
manifest (meta.json with the sha256 and size of every file), pruning, and the one resolver
from a run or checkpoint directory to a checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import naming

FORMAT = "reformer-checkpoint/1"
"""Format identifier written to ``meta.json``; bumped on incompatible changes."""

_FORMAT_FAMILY = "reformer-checkpoint/"
_CHECKPOINTS_SUBDIR = "checkpoints"
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"

META_FILE = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
SCHEDULER_TENSORS_FILE = "scheduler.safetensors"
SCHEDULER_JSON_FILE = "scheduler.json"
RNG_TENSORS_FILE = "rng.safetensors"
RNG_JSON_FILE = "rng.json"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"

_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint is missing, foreign, corrupt or incompatible with the objects given.

    The message names the offending path, the problem, and what to do about it.
    """


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """Return the newest complete checkpoint under ``run_dir/checkpoints``, or None.

    A checkpoint is complete when its ``meta.json`` parses, carries this library's
    format identifier and the step in the directory name, and every file it lists
    exists with the recorded size. Checksums are not verified here (that happens in
    :func:`load_checkpoint`). Temporary ``.tmp-*`` directories are never returned.
    """
    return _latest_in(Path(run_dir) / _CHECKPOINTS_SUBDIR)


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory, or a run directory (or its checkpoints/) -> the checkpoint
    directory to load (the run's newest complete one). Raises CheckpointError naming the
    path and what to pass instead."""
    return _resolve(Path(path))


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """All ``step-N`` directories (complete or not) under ``ckpt_root``."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for entry in ckpt_root.iterdir():
        match = _STEP_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            out.append((int(match.group(1)), entry))
    return out


def _latest_in(ckpt_root: Path) -> Path | None:
    """Newest complete ``step-*`` directory directly under ``ckpt_root``."""
    for _, path in sorted(_step_dirs(ckpt_root), reverse=True):
        if _is_complete(path):
            return path
    return None


def _is_complete(path: Path) -> bool:
    """Cheap completeness check used by :func:`latest_checkpoint` and pruning."""
    try:
        meta = _read_meta(path)
    except CheckpointError:
        return False
    match = _STEP_DIR_RE.match(path.name)
    if match is None or int(match.group(1)) != meta["step"]:
        return False
    for fname, info in meta["files"].items():
        f = path / fname
        try:
            if not f.is_file() or f.stat().st_size != info["size"]:
                return False
        except OSError:
            return False
    return True


def _resolve(path: Path) -> Path:
    """Map a checkpoint dir or run dir to a checkpoint dir, or raise."""
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist; pass a checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint (not a directory); pass a directory such as "
            f"run_dir/{_CHECKPOINTS_SUBDIR}/step-00000100 or the run directory itself"
        )
    if (path / META_FILE).exists():
        return path
    if (path / _CHECKPOINTS_SUBDIR).is_dir() or _step_dirs(path):
        # A run directory, or its checkpoints/ directory itself.
        root = path / _CHECKPOINTS_SUBDIR if (path / _CHECKPOINTS_SUBDIR).is_dir() else path
        latest = _latest_in(root)
        if latest is None:
            raise CheckpointError(
                f"{path}: run directory has no complete checkpoint under {root.name}/; "
                "train with checkpointing enabled first or pass a checkpoint directory "
                "explicitly"
            )
        return latest
    raise CheckpointError(
        f"{path}: not a checkpoint (no {META_FILE}) and not a run directory (no "
        f"{_CHECKPOINTS_SUBDIR}/ subdirectory); pass a directory written by "
        "save_checkpoint or its run directory"
    )


def _prune(ckpt_root: Path, keep: int, protect: Path) -> None:
    """Delete stale ``.tmp-*`` dirs and all but the newest ``keep`` complete checkpoints.

    Directories are first renamed to a ``.tmp-`` name (atomic) and then removed, so
    an interrupted prune never leaves a half-deleted ``step-*`` directory behind.
    Incomplete ``step-*`` directories are left alone (they may not be ours).
    """
    for entry in ckpt_root.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)

    complete = sorted(((s, p) for s, p in _step_dirs(ckpt_root) if _is_complete(p)), reverse=True)
    for _, path in complete[keep:]:
        if path == protect:
            continue
        doomed = ckpt_root / f"{_TMP_PREFIX}delete-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    _fsync_dir(ckpt_root)


def _fsync_dir(path: Path) -> None:
    """fsync a directory so renames/creations inside it are durable (POSIX only)."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` durably; return the file's manifest entry (sha256, size)."""
    with naming(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _read_meta(ckpt: Path) -> dict[str, Any]:
    """Read and structurally validate ``meta.json``; raise CheckpointError otherwise."""
    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{ckpt}: not a checkpoint (no {META_FILE}); pass a directory written by "
            "save_checkpoint (or its run directory)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{meta_path}: corrupt checkpoint: {META_FILE} is unreadable ({exc}); "
            "delete this checkpoint and resume from an earlier one"
        ) from exc
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith(_FORMAT_FAMILY):
        raise CheckpointError(
            f"{ckpt}: not a reformer checkpoint ({META_FILE} has format {fmt!r}, expected "
            f"{FORMAT!r}); pass a directory written by reformer.checkpoint.save_checkpoint"
        )
    if fmt != FORMAT:
        raise CheckpointError(
            f"{ckpt}: unsupported checkpoint format {fmt!r} (this version reads {FORMAT!r}); "
            "use the reformer version that wrote it"
        )
    step = meta.get("step")
    files = meta.get("files")
    if (
        isinstance(step, bool)
        or not isinstance(step, int)
        or not isinstance(files, dict)
        or MODEL_FILE not in files
        or not all(
            isinstance(v, dict)
            and isinstance(v.get("sha256"), str)
            and isinstance(v.get("size"), int)
            for v in files.values()
        )
        or not all(isinstance(k, str) and "/" not in k and "\\" not in k for k in files)
    ):
        raise CheckpointError(
            f"{meta_path}: corrupt checkpoint: {META_FILE} is malformed (bad step or file "
            "list); delete this checkpoint and resume from an earlier one"
        )
    return meta


def _verify_file(ckpt: Path, fname: str, info: Mapping[str, Any]) -> None:
    f = ckpt / fname
    if not f.is_file():
        raise CheckpointError(
            f"{f}: corrupt checkpoint: file listed in {META_FILE} is missing; "
            "delete this checkpoint and resume from an earlier one"
        )
    digest, size = _sha256_file(f)
    if size != info["size"] or digest != info["sha256"]:
        raise CheckpointError(
            f"{f}: corrupt checkpoint: sha256 mismatch (expected {info['sha256']}, got "
            f"{digest}; size {size} vs {info['size']}); the file was damaged after saving, "
            "delete this checkpoint and resume from an earlier one"
        )

"""Crash-safe training checkpoints that load without unpickling code.

A checkpoint is a directory ``run_dir/checkpoints/step-{step:08d}/`` holding only
safetensors and JSON files, so loading one never executes code from disk (no
``torch.load``, no ``pickle``):

=========================  ===================================================
``model.safetensors``      ``model.state_dict()`` (tied tensors stored per key)
``optimizer.safetensors``  tensors of ``optimizer.state_dict()`` under
                           ``state/{param_index}/{name}`` (if an optimizer)
``optimizer.json``         the rest of the optimizer state dict: param groups,
                           Python scalars, placeholders for the tensors
``scheduler.json``         ``scheduler.state_dict()`` (plus
                           ``scheduler.safetensors`` if it holds tensors)
``rng.safetensors``        torch CPU (and CUDA) generator states as uint8
``rng.json``               Python ``random`` and NumPy generator states
``state.json``             caller's training state (data position, metrics)
``config.json``            caller's resolved config (to rebuild the model)
``meta.json``              format identifier, step, torch version and the
                           sha256 and size of every other file
=========================  ===================================================

Atomicity: everything is written into a temporary sibling directory
(``.tmp-step-...``), each file and the directory are fsynced, ``meta.json`` is
written last, and the directory is moved into place with :func:`os.replace`.
A crash at any moment therefore leaves either the previous complete checkpoints
or the new complete one; leftover ``.tmp-*`` directories are never picked by
:func:`latest_checkpoint` and are deleted by the next :func:`save_checkpoint`.

Nested Python structures (optimizer and scheduler state dicts, RNG states) are
stored as JSON with a small tagging scheme so they round-trip exactly: tensors
become ``{"__tensor__": key}`` (the tensor lives in the sibling safetensors
file), tuples become ``{"__tuple__": [...]}`` and dicts with non-string keys
become ``{"__items__": [[key, value], ...]}``.

Checkpoints are ordered by step: "newest" means "highest step". A single writer
per run directory is assumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "FORMAT",
    "CheckpointError",
    "LoadedCheckpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_checkpoint",
]

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

_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"
_ITEMS_TAG = "__items__"
_TAGS = frozenset({_TENSOR_TAG, _TUPLE_TAG, _ITEMS_TAG})

_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint is missing, foreign, corrupt or incompatible with the objects given.

    The message names the offending path, the problem, and what to do about it.
    """


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns besides the restored objects.

    Attributes:
        step: Training step the checkpoint was saved at.
        state: The JSON training state passed to :func:`save_checkpoint`.
        config: The JSON config passed to :func:`save_checkpoint`.
        path: The checkpoint directory that was loaded.
    """

    step: int
    state: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Atomically write a checkpoint to ``run_dir/checkpoints/step-{step:08d}/``.

    Args:
        run_dir: Run directory; checkpoints go to its ``checkpoints`` subdirectory.
        step: Non-negative training step; names the checkpoint and orders checkpoints.
        model: Module whose ``state_dict()`` is saved (tied weights are fine).
        optimizer: Optional optimizer whose full state is saved.
        scheduler: Optional learning-rate scheduler whose state is saved.
        state: JSON-serialisable training state (data position, best metric, ...).
        config: JSON-serialisable resolved config, readable with
            :func:`read_checkpoint_config` before the model exists.
        keep: Number of newest complete checkpoints to keep (>= 1); older ones and
            stale ``.tmp-*`` directories are deleted after a successful save.

    Returns:
        The path of the new checkpoint directory.

    Raises:
        ValueError: ``step`` is negative or ``keep`` < 1.
        TypeError: ``state``/``config`` (or an optimizer/scheduler state) cannot be
            represented as JSON + tensors.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")

    ckpt_root = Path(run_dir) / _CHECKPOINTS_SUBDIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = _step_dir_name(step)
    final = ckpt_root / name
    tmp = ckpt_root / f"{_TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # Serialise the JSON payloads first so that bad input fails before any I/O.
    state_bytes = _json_bytes(dict(state or {}), "state")
    config_bytes = _json_bytes(dict(config or {}), "config")

    displaced: Path | None = None
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}

        files[MODEL_FILE] = _write_tensors(tmp / MODEL_FILE, _model_tensors(model))

        if optimizer is not None:
            tensors: dict[str, torch.Tensor] = {}
            encoded = _encode(optimizer.state_dict(), "", tensors)
            files[OPTIMIZER_TENSORS_FILE] = _write_tensors(tmp / OPTIMIZER_TENSORS_FILE, tensors)
            files[OPTIMIZER_JSON_FILE] = _write_bytes(
                tmp / OPTIMIZER_JSON_FILE, _json_bytes(encoded, "optimizer state")
            )

        if scheduler is not None:
            tensors = {}
            encoded = _encode(scheduler.state_dict(), "", tensors)
            if tensors:
                files[SCHEDULER_TENSORS_FILE] = _write_tensors(
                    tmp / SCHEDULER_TENSORS_FILE, tensors
                )
            files[SCHEDULER_JSON_FILE] = _write_bytes(
                tmp / SCHEDULER_JSON_FILE, _json_bytes(encoded, "scheduler state")
            )

        tensors = {}
        encoded = _encode(_capture_rng(), "", tensors)
        files[RNG_TENSORS_FILE] = _write_tensors(tmp / RNG_TENSORS_FILE, tensors)
        files[RNG_JSON_FILE] = _write_bytes(tmp / RNG_JSON_FILE, _json_bytes(encoded, "rng"))

        files[STATE_FILE] = _write_bytes(tmp / STATE_FILE, state_bytes)
        files[CONFIG_FILE] = _write_bytes(tmp / CONFIG_FILE, config_bytes)

        meta = {
            "format": FORMAT,
            "step": step,
            "torch_version": torch.__version__,
            "model_class": type(model).__qualname__,
            "optimizer_class": None if optimizer is None else type(optimizer).__qualname__,
            "scheduler_class": None if scheduler is None else type(scheduler).__qualname__,
            "files": files,
        }
        # meta.json last: a directory with a valid meta.json has all its files.
        _write_bytes(tmp / META_FILE, _json_bytes(meta, "meta"))
        _fsync_dir(tmp)

        if final.exists():
            # Re-saving a step: os.replace cannot overwrite a non-empty directory,
            # so move the old one aside (it then counts as stale) and drop it after.
            displaced = ckpt_root / f"{_TMP_PREFIX}replaced-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, displaced)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        if displaced is not None and displaced.exists() and not final.exists():
            with contextlib.suppress(OSError):  # put the previous copy of this step back
                os.replace(displaced, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)
    _prune(ckpt_root, keep=keep, protect=final)
    return final


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """Return the newest complete checkpoint under ``run_dir/checkpoints``, or None.

    A checkpoint is complete when its ``meta.json`` parses, carries this library's
    format identifier and the step in the directory name, and every file it lists
    exists with the recorded size. Checksums are not verified here (that happens in
    :func:`load_checkpoint`). Temporary ``.tmp-*`` directories are never returned.
    """
    return _latest_in(Path(run_dir) / _CHECKPOINTS_SUBDIR)


def load_checkpoint(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Restore ``model`` (and optionally optimizer, scheduler, RNG) from a checkpoint.

    Everything is validated before anything is modified: the format identifier,
    the sha256 of every file, the model's keys and shapes (strict), and that the
    optimizer/scheduler match what was saved.

    Args:
        path: A checkpoint directory, or a run directory (its latest complete
            checkpoint is used).
        model: Module to load weights into; must have exactly the saved keys/shapes.
        optimizer: Optional optimizer to restore; it must be of the saved class with
            the same parameter-group layout.
        scheduler: Optional scheduler to restore; must be of the saved class.
        restore_rng: Restore torch (CPU and CUDA), Python and NumPy RNG states.
        map_location: Device the model weights are staged on before being copied into
            the model (whose parameters keep their own devices). Optimizer state is
            staged on CPU; ``optimizer.load_state_dict`` moves it next to its params.

    Returns:
        The step, training state and config stored in the checkpoint.

    Raises:
        CheckpointError: not a checkpoint, corrupt, or incompatible with the objects.
    """
    ckpt = _resolve(Path(path))
    meta = _read_meta(ckpt)
    for fname in meta["files"]:
        _verify_file(ckpt, fname, meta["files"][fname])

    device = str(map_location) if isinstance(map_location, torch.device) else map_location

    # ---- read and validate everything before mutating anything -----------------
    model_sd = _read_tensors(ckpt / MODEL_FILE, device)
    _check_model_compat(ckpt, model, model_sd)

    opt_sd: dict[str, Any] | None = None
    if optimizer is not None:
        opt_sd = _read_structured(
            ckpt, meta, OPTIMIZER_JSON_FILE, OPTIMIZER_TENSORS_FILE, "cpu", "optimizer"
        )
        _check_optimizer_compat(ckpt, meta, optimizer, opt_sd)

    sched_sd: dict[str, Any] | None = None
    if scheduler is not None:
        sched_sd = _read_structured(
            ckpt, meta, SCHEDULER_JSON_FILE, SCHEDULER_TENSORS_FILE, "cpu", "scheduler"
        )
        saved_cls = meta.get("scheduler_class")
        if saved_cls != type(scheduler).__qualname__:
            raise CheckpointError(
                f"{ckpt}: scheduler mismatch: checkpoint holds {saved_cls} state but a "
                f"{type(scheduler).__qualname__} was given; pass the same scheduler class "
                "or scheduler=None to skip restoring it"
            )

    rng: dict[str, Any] | None = None
    if restore_rng and RNG_JSON_FILE in meta["files"]:
        rng = _read_structured(ckpt, meta, RNG_JSON_FILE, RNG_TENSORS_FILE, "cpu", "rng")

    state = _read_json(ckpt / STATE_FILE) if STATE_FILE in meta["files"] else {}
    config = _read_json(ckpt / CONFIG_FILE) if CONFIG_FILE in meta["files"] else {}

    # ---- apply -------------------------------------------------------------------
    model.load_state_dict(model_sd, strict=True)
    if optimizer is not None and opt_sd is not None:
        try:
            optimizer.load_state_dict(opt_sd)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"{ckpt}: optimizer state does not fit the given optimizer ({exc}); "
                "build the optimizer exactly as in the saved run or pass optimizer=None"
            ) from exc
    if scheduler is not None and sched_sd is not None:
        scheduler.load_state_dict(sched_sd)
    if rng is not None:
        _restore_rng(rng)

    return LoadedCheckpoint(step=int(meta["step"]), state=state, config=config, path=ckpt)


def read_checkpoint_config(path: Path | str) -> dict[str, Any]:
    """Return the config stored in a checkpoint (or a run dir's latest checkpoint).

    Only ``meta.json`` and ``config.json`` are read (config checksum verified), so a
    CLI can rebuild the model from the saved config before calling
    :func:`load_checkpoint`.

    Raises:
        CheckpointError: not a checkpoint, or the config is corrupt.
    """
    ckpt = _resolve(Path(path))
    meta = _read_meta(ckpt)
    if CONFIG_FILE not in meta["files"]:
        return {}
    _verify_file(ckpt, CONFIG_FILE, meta["files"][CONFIG_FILE])
    return _read_json(ckpt / CONFIG_FILE)


# --------------------------------------------------------------------------------------
# Directory layout helpers
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Low-level I/O
# --------------------------------------------------------------------------------------


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
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def file_mode() -> int:
    """The mode a new file gets from the user's umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors' save_file, with the file's mode following the umask like every other
    file (save_file writes through a private temporary file: 0600, which a group sharing
    the run directory could not read)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, file_mode())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Save tensors with safetensors, fsync, and return the manifest entry."""
    save_tensors(path, _standalone(tensors))
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "size": size}


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        text = json.dumps(obj, indent=2, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc
    return (text + "\n").encode("utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: cannot read JSON ({exc}); "
            "delete this checkpoint and resume from an earlier one"
        ) from exc


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


def _read_tensors(path: Path, device: str | int) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"{path}: corrupt checkpoint: unreadable safetensors file ({exc}); "
            "delete this checkpoint and resume from an earlier one"
        ) from exc


def _read_structured(
    ckpt: Path,
    meta: Mapping[str, Any],
    json_name: str,
    tensors_name: str,
    device: str | int,
    what: str,
) -> dict[str, Any]:
    """Read a JSON-encoded structure plus its tensors and decode it."""
    if json_name not in meta["files"]:
        raise CheckpointError(
            f"{ckpt}: checkpoint has no {what} state (it was saved with {what}=None); "
            f"pass {what}=None to load without it"
        )
    encoded = _read_json(ckpt / json_name)
    tensors = _read_tensors(ckpt / tensors_name, device) if tensors_name in meta["files"] else {}
    try:
        decoded = _decode(encoded, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{ckpt / json_name}: corrupt checkpoint: cannot decode {what} state ({exc}); "
            "delete this checkpoint and resume from an earlier one"
        ) from exc
    if not isinstance(decoded, dict):
        raise CheckpointError(
            f"{ckpt / json_name}: corrupt checkpoint: {what} state is not a mapping; "
            "delete this checkpoint and resume from an earlier one"
        )
    return decoded


# --------------------------------------------------------------------------------------
# Tensors and structure encoding
# --------------------------------------------------------------------------------------


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``, checked to hold only tensors."""
    sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"model.state_dict()[{key!r}] is a {type(value).__name__}, not a tensor; "
                "only tensor state can be checkpointed"
            )
        tensors[key] = value
    return tensors


def _standalone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU, make contiguous and un-share storages.

    safetensors refuses tensors that share storage (tied weights, views). Each
    storage is kept for its first tensor; later tensors on the same storage, and
    tensors viewing only part of a storage, are cloned.
    """
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        partial = storage.nbytes() != t.numel() * t.element_size()
        if ptr != 0 and (ptr in seen or partial):
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr != 0:
            seen.add(ptr)
        out[key] = t
    return out


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Encode ``obj`` as JSON-able data, moving tensors into ``tensors`` by path.

    Tensors are collected as-is; :func:`_write_tensors` makes them standalone.
    """
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        if key in tensors:
            raise TypeError(f"two tensors map to the same key {key!r}")
        tensors[key] = obj
        return {_TENSOR_TAG: key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE_TAG: [_encode(v, _join(path, str(i)), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, str(i)), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj)
        if plain:
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"unsupported mapping key {k!r} at {path or '<root>'}")
            items.append([k, _encode(v, _join(path, str(k)), tensors)])
        return {_ITEMS_TAG: items}
    raise TypeError(
        f"cannot checkpoint value of type {type(obj).__name__} at {path or '<root>'}; "
        "only tensors, JSON scalars, lists, tuples and dicts are supported"
    )


def _join(path: str, part: str) -> str:
    return f"{path}/{part}" if path else part


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((tag, value),) = obj.items()
            if tag == _TENSOR_TAG:
                if value not in tensors:
                    raise KeyError(f"tensor {value!r} missing from safetensors file")
                return tensors[value]
            if tag == _TUPLE_TAG:
                return tuple(_decode(v, tensors) for v in value)
            if tag == _ITEMS_TAG:
                return {k: _decode(v, tensors) for k, v in value}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------
# Compatibility checks
# --------------------------------------------------------------------------------------


def _check_model_compat(ckpt: Path, model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in saved
        and isinstance(expected[k], torch.Tensor)
        and tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_few(mismatched)}")
    raise CheckpointError(
        f"{ckpt}: incompatible model: " + "; ".join(problems) + ". Build the model from the "
        "checkpoint's config (read_checkpoint_config) before loading"
    )


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
    return f"[{shown}{more}]"


def _check_optimizer_compat(
    ckpt: Path, meta: Mapping[str, Any], optimizer: torch.optim.Optimizer, saved: Mapping
) -> None:
    saved_cls = meta.get("optimizer_class")
    if saved_cls != type(optimizer).__qualname__:
        raise CheckpointError(
            f"{ckpt}: optimizer mismatch: checkpoint holds {saved_cls} state but a "
            f"{type(optimizer).__qualname__} was given; pass the same optimizer class or "
            "optimizer=None to load only the weights"
        )
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(
            f"{ckpt / OPTIMIZER_JSON_FILE}: corrupt checkpoint: optimizer state has no "
            "param_groups/state; delete this checkpoint and resume from an earlier one"
        )
    saved_sizes = [len(g.get("params", [])) for g in groups if isinstance(g, dict)]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise CheckpointError(
            f"{ckpt}: optimizer mismatch: checkpoint has parameter groups of sizes "
            f"{saved_sizes}, the given optimizer has {sizes}; build the optimizer over the "
            "same parameters in the same order, or pass optimizer=None"
        )


# --------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------


def _capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            str(np_state[0]),
            [int(x) for x in np_state[1]],
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    if torch.cuda.is_available():
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    return rng


def _restore_rng(rng: Mapping[str, Any]) -> None:
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"].to("cpu", torch.uint8))
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda_states = rng.get("cuda")
    if cuda_states:
        if torch.cuda.is_available():
            n = min(len(cuda_states), torch.cuda.device_count())
            for i in range(n):
                torch.cuda.set_rng_state(cuda_states[i].to("cpu", torch.uint8), device=i)
        else:
            warnings.warn(
                "checkpoint holds CUDA RNG states but CUDA is not available; "
                "they were not restored",
                stacklevel=3,
            )

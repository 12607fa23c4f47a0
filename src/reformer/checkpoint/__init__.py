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
per run directory is assumed (the Trainer holds the run directory's lock,
``files.run_lock``). A save the filesystem has no room for is refused before
anything is written; any write error names its file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from ..files import naming, write_failure
from .codec import (
    _check_model_compat,
    _check_optimizer_compat,
    _encode,
    _json_bytes,
    _model_tensors,
    _read_json,
    _read_structured,
    _read_tensors,
    _write_tensors,
    check_saved_class,
    file_mode,
    save_tensors,
)
from .rng import _capture_rng, _restore_rng
from .store import (
    _CHECKPOINTS_SUBDIR,
    _TMP_PREFIX,
    CONFIG_FILE,
    FORMAT,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_JSON_FILE,
    OPTIMIZER_TENSORS_FILE,
    RNG_JSON_FILE,
    RNG_TENSORS_FILE,
    SCHEDULER_JSON_FILE,
    SCHEDULER_TENSORS_FILE,
    STATE_FILE,
    CheckpointError,
    _fsync_dir,
    _prune,
    _read_meta,
    _resolve,
    _step_dir_name,
    _verify_file,
    _write_bytes,
    latest_checkpoint,
    resolve_checkpoint,
)

__all__ = [
    "FORMAT",
    "CheckpointError",
    "LoadedCheckpoint",
    "file_mode",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_tensors",
]


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
    # Everything is serialised before any I/O, so bad input fails first.
    payload = _payload(model, optimizer, scheduler, state, config)
    meta = {
        "format": FORMAT,
        "step": step,
        "torch_version": torch.__version__,
        "model_class": type(model).__qualname__,
        "optimizer_class": None if optimizer is None else type(optimizer).__qualname__,
        "scheduler_class": None if scheduler is None else type(scheduler).__qualname__,
    }
    ckpt_root = Path(run_dir) / _CHECKPOINTS_SUBDIR
    with naming(ckpt_root):
        ckpt_root.mkdir(parents=True, exist_ok=True)
    _check_space(ckpt_root, payload)
    final = _commit(ckpt_root, _step_dir_name(step), payload, meta)
    _prune(ckpt_root, keep=keep, protect=final)
    return final


Payload = dict[str, "dict[str, torch.Tensor] | bytes"]


def _payload(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: LRScheduler | None,
    state: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> Payload:
    """A checkpoint's files, in writing order: file name -> tensors (a safetensors file)
    or bytes (JSON). The RNG states are captured here, at the moment of the save."""
    state_bytes = _json_bytes(dict(state or {}), "state")
    config_bytes = _json_bytes(dict(config or {}), "config")
    files: Payload = {MODEL_FILE: _model_tensors(model)}
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        encoded = _encode(optimizer.state_dict(), "", tensors)
        files[OPTIMIZER_TENSORS_FILE] = tensors
        files[OPTIMIZER_JSON_FILE] = _json_bytes(encoded, "optimizer state")
    if scheduler is not None:
        tensors = {}
        encoded = _encode(scheduler.state_dict(), "", tensors)
        if tensors:
            files[SCHEDULER_TENSORS_FILE] = tensors
        files[SCHEDULER_JSON_FILE] = _json_bytes(encoded, "scheduler state")
    tensors = {}
    encoded = _encode(_capture_rng(), "", tensors)
    files[RNG_TENSORS_FILE] = tensors
    files[RNG_JSON_FILE] = _json_bytes(encoded, "rng")
    files[STATE_FILE] = state_bytes
    files[CONFIG_FILE] = config_bytes
    return files


#: room kept free beyond a checkpoint's bytes: safetensors headers, meta.json, the filesystem
SPACE_MARGIN = 1 << 20


def _check_space(ckpt_root: Path, payload: Payload) -> None:
    """Refuse a save the filesystem has no room for before anything is written (ENOSPC,
    naming the directory, the size needed and the space free). A filesystem that reports no
    size at all (some FUSE and network mounts) is not checked."""
    need = SPACE_MARGIN + sum(
        len(v) if isinstance(v, bytes) else sum(t.numel() * t.element_size() for t in v.values())
        for v in payload.values()
    )
    usage = shutil.disk_usage(ckpt_root)
    if usage.total > 0 and need > usage.free:
        mib = 1 << 20
        raise write_failure(
            errno.ENOSPC,
            f"No space left on device (the checkpoint needs {need / mib:,.1f} MiB, "
            f"{usage.free / mib:,.1f} MiB are free)",
            ckpt_root,
        )


def _commit(ckpt_root: Path, name: str, payload: Payload, meta: dict[str, Any]) -> Path:
    """Write `payload` into a temporary sibling directory, fsync, write meta.json last and
    move the directory to ckpt_root/name; a crash or error at any point leaves the earlier
    checkpoints (and an earlier copy of this step) as they were."""
    final = ckpt_root / name
    tmp = ckpt_root / f"{_TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    displaced: Path | None = None
    try:
        with naming(tmp):
            tmp.mkdir()
        files = {
            fname: _write_bytes(tmp / fname, data)
            if isinstance(data, bytes)
            else _write_tensors(tmp / fname, data)
            for fname, data in payload.items()
        }
        # meta.json last: a directory with a valid meta.json has all its files.
        _write_bytes(tmp / META_FILE, _json_bytes(meta | {"files": files}, "meta"))
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
    return final


def load_checkpoint(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
    fresh: tuple[str, ...] = (),
) -> LoadedCheckpoint:
    """Restore ``model`` (and optionally optimizer, scheduler, RNG) from a checkpoint.

    Everything is validated before anything is modified: the format identifier,
    the sha256 of every file, the model's keys and shapes (strict), and that the
    optimizer/scheduler match what was saved.

    Args:
        path: A checkpoint directory, or a run directory (its newest complete one).
        model: Module to load weights into; must have exactly the saved keys/shapes.
        optimizer: Optional optimizer to restore; it must be of the saved class with
            the same parameter-group layout.
        scheduler: Optional scheduler to restore; must be of the saved class.
        restore_rng: Restore torch (CPU and CUDA), Python and NumPy RNG states.
        map_location: Device the model weights are staged on before being copied into
            the model (whose parameters keep their own devices). Optimizer state is
            staged on CPU; ``optimizer.load_state_dict`` moves it next to its params.
        fresh: names of submodules (e.g. "head") whose weights are not loaded: they keep
            the model's own values, whatever the checkpoint holds there (fine-tuning an
            encoder with a new task head). Every other key is still checked strictly.

    Returns:
        The step, training state and config stored in the checkpoint.

    Raises:
        CheckpointError: not a checkpoint, corrupt, or incompatible with the objects.
    """
    ckpt = _resolve(Path(path))
    meta = _read_meta(ckpt)
    for fname in meta["files"]:
        _verify_file(ckpt, fname, meta["files"][fname])
    # Read and validate everything before mutating anything.
    model_sd = _model_state(ckpt, model, str(map_location), fresh)
    opt_sd, sched_sd, rng = _training_states(ckpt, meta, optimizer, scheduler, restore_rng)
    state = _read_json(ckpt / STATE_FILE) if STATE_FILE in meta["files"] else {}
    config = _read_json(ckpt / CONFIG_FILE) if CONFIG_FILE in meta["files"] else {}
    # Apply.
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


def _training_states(
    ckpt: Path,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    scheduler: LRScheduler | None,
    restore_rng: bool,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """The saved optimizer, scheduler and RNG states asked for (None where not), each
    checked against the object it is for."""
    opt_sd = sched_sd = rng = None
    if optimizer is not None:
        opt_sd = _read_structured(
            ckpt, meta, OPTIMIZER_JSON_FILE, OPTIMIZER_TENSORS_FILE, "cpu", "optimizer"
        )
        _check_optimizer_compat(ckpt, meta, optimizer, opt_sd)
    if scheduler is not None:
        sched_sd = _read_structured(
            ckpt, meta, SCHEDULER_JSON_FILE, SCHEDULER_TENSORS_FILE, "cpu", "scheduler"
        )
        check_saved_class(ckpt, meta, "scheduler", scheduler, "to skip restoring it")
    if restore_rng and RNG_JSON_FILE in meta["files"]:
        rng = _read_structured(ckpt, meta, RNG_JSON_FILE, RNG_TENSORS_FILE, "cpu", "rng")
    return opt_sd, sched_sd, rng


def _model_state(
    ckpt: Path, model: nn.Module, device: str, fresh: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The saved weights, checked against `model` (strict keys and shapes); the submodules
    named in `fresh` keep the model's own values."""
    model_sd = _read_tensors(ckpt / MODEL_FILE, device)
    if fresh:
        own = model.state_dict()

        def is_fresh(key: str) -> bool:
            return any(key == f or key.startswith(f + ".") for f in fresh)

        model_sd = {k: v for k, v in model_sd.items() if not is_fresh(k)}
        model_sd |= {k: v for k, v in own.items() if is_fresh(k)}
    _check_model_compat(ckpt, model, model_sd)
    return model_sd


def read_checkpoint_config(path: Path | str) -> dict[str, Any]:
    """Return the config stored in a checkpoint (or a run dir's latest checkpoint).

    Only ``meta.json`` and ``config.json`` are read (config checksum verified), so a
    CLI can rebuild the model from the saved config before calling
    :func:`load_checkpoint`.

    Raises:
        CheckpointError: not a checkpoint, or the config is corrupt.
    """
    return _read_verified_json(path, CONFIG_FILE)


def read_checkpoint_state(path: Path | str) -> dict[str, Any]:
    """Return the training state (the recipe's JSON: step, and e.g. a classifier's label
    names) stored in a checkpoint or a run dir's latest checkpoint, checksum verified, so
    a CLI can build the model it needs before :func:`load_checkpoint`.

    Raises:
        CheckpointError: not a checkpoint, or the state is corrupt.
    """
    return _read_verified_json(path, STATE_FILE)


def _read_verified_json(path: Path | str, name: str) -> dict[str, Any]:
    """One JSON file of a checkpoint (or a run dir's latest), checksum verified; {} when the
    checkpoint has none."""
    ckpt = _resolve(Path(path))
    meta = _read_meta(ckpt)
    if name not in meta["files"]:
        return {}
    _verify_file(ckpt, name, meta["files"][name])
    return _read_json(ckpt / name)

"""The checkpoint codec: tensors in safetensors files, nested Python state (optimizer and
scheduler state dicts, RNG states) as tagged JSON with the tensors beside it, and the
checks that saved tensors fit the objects they are loaded into."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import file_mode, naming
from .store import OPTIMIZER_JSON_FILE, CheckpointError, _sha256_file

_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"
_ITEMS_TAG = "__items__"
_TAGS = frozenset({_TENSOR_TAG, _TUPLE_TAG, _ITEMS_TAG})


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors' save_file, with the file's mode following the umask like every other
    file (save_file writes through a private temporary file: 0600, which a group sharing
    the run directory could not read)."""
    with naming(path):
        save_file(tensors, str(path), metadata={"format": "pt"})
        os.chmod(path, file_mode())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Save tensors with safetensors, fsync, and return the manifest entry."""
    save_tensors(path, _standalone(tensors))
    with naming(path), open(path, "rb") as f:
        os.fsync(f.fileno())
    digest, size = _sha256_file(path)
    return {"sha256": digest, "size": size}


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


def check_saved_class(ckpt: Path, meta: Mapping[str, Any], what: str, obj: Any, skip: str) -> None:
    """The optimizer or scheduler given is of the class the checkpoint saved, or a
    CheckpointError saying what to pass instead."""
    saved_cls = meta.get(f"{what}_class")
    if saved_cls != type(obj).__qualname__:
        raise CheckpointError(
            f"{ckpt}: {what} mismatch: checkpoint holds {saved_cls} state but a "
            f"{type(obj).__qualname__} was given; pass the same {what} class or {what}=None "
            f"{skip}"
        )


def _check_optimizer_compat(
    ckpt: Path, meta: Mapping[str, Any], optimizer: torch.optim.Optimizer, saved: Mapping
) -> None:
    check_saved_class(ckpt, meta, "optimizer", optimizer, "to load only the weights")
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

"""Run configs as plain data: strict parsing into the task's class (`config_from_dict`),
lenient reading of configs saved by older versions (`saved_config_from_dict`), the way back
(`config_to_dict`), config files, presets and the merging of layers."""

from __future__ import annotations

import copy
import warnings
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import nest_run_compat
from .tasks import TrainConfig, any_task_paths, config_class, refusal, task_paths


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into `base` key by key, either's flat model compat keys nested first."""
    out = copy.deepcopy(nest_run_compat(base))
    for key, value in nest_run_compat(over).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- presets ---------------------------------------------------------------------------------
# One YAML file per preset in the package (presets/NAME.yaml), in the same nested keys as a
# --config file; `reformer train --list-presets` lists them.
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def _load_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.yaml"), key=lambda p: p.stem):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"preset file {path} must hold a mapping of config keys")
        presets[path.stem] = data
    return presets


PRESETS: dict[str, dict[str, Any]] = _load_presets()


def _sections_and_values(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of each value in nested `data`, descending into the mappings
    that some task's config has as a section; an empty or null section gives nothing."""
    out = []
    known = any_task_paths()
    for key, value in data.items():
        path = prefix + key
        if isinstance(known.get(path), type):  # a section
            if value:
                out += _sections_and_values(dict(value), path + ".")
        else:
            out.append((path, value))
    return out


def _without(
    data: dict[str, Any], paths: set[str], own: dict[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """`data` without the values at `paths`, nor the sections that the task has not (not in
    `own`) and that are empty (or left empty)."""
    out = {}
    for key, value in data.items():
        path = prefix + key
        if path in paths:
            continue
        if isinstance(value, dict):
            value = _without(value, paths, own, path + ".")
        if not value and path not in own and isinstance(any_task_paths().get(path), type):
            continue
        out[key] = value
    return out


def _build(cls: type, data: dict[str, Any], where: str, section: str = "", check: bool = True):
    """`cls(**data)`, its sections built alike; a key without a field is refused by name.
    check=False: `cls`'s own checks are skipped (its sections' still run)."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        at = f" [{section}]" if section else ""
        raise ValueError(f"unknown key(s) {unknown} in {where}{at}; allowed: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        factory = known[key].default_factory
        if is_dataclass(factory) and isinstance(factory, type):
            value = _build(factory, dict(value or {}), where, f"{section}.{key}".lstrip("."))
        kwargs[key] = value
    if check:
        return cls(**kwargs)
    obj = object.__new__(cls)  # (not cls(): no __post_init__)
    for f in fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        setattr(obj, f.name, kwargs.get(f.name, default))
    return obj


def _split(data: dict[str, Any]) -> tuple[type[TrainConfig], dict[str, Any], list[tuple]]:
    """(the task's class, the data, the (path, value)s of fields that the task does not read
    but another does)."""
    data = nest_run_compat(dict(data))
    cls = config_class(data.get("task", "duplication"))
    own, known = task_paths()[cls.task], any_task_paths()
    unread = [(p, v) for p, v in _sections_and_values(data) if p not in own and p in known]
    return cls, data, unread


def config_from_dict(
    data: dict[str, Any], where: str = "config", *, check: bool = True
) -> TrainConfig:
    """The config of `data`'s task (default duplication) from nested plain data, refusing
    unknown keys and the fields that the task does not read. A field of another task at its
    default value is left out, not refused: files that hold every task's fields at their
    defaults (the run configs that versions before the per-task classes saved, which the
    resume command names) keep working. check=False: the run's own checks are skipped (its
    sections' still run), for a default that flags complete (the CLI's `--task mlm
    --model.no-causal`: the final config is checked)."""
    cls, data, unread = _split(data)
    changed = _set_fields(unread)
    if changed:
        raise refusal(cls.task, changed)
    own = task_paths()[cls.task]
    return _build(cls, _without(data, {p for p, _ in unread}, own), where, check=check)


def _set_fields(unread: list[tuple[str, Any]]) -> list[str]:
    """The paths among (path, value)s of fields the task does not read whose values are not
    their defaults (an empty eval_hashes, which asks for no table, counts as a default)."""
    defaults = any_task_paths()
    return [
        p
        for p, v in unread
        if v not in (None, [], ()) and config_to_dict(v) != config_to_dict(defaults[p])
    ]


def saved_config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """A run config saved by this or an older version (which saved every task's fields, and
    allowed some to be set that the run's task did not read): those fields are left out,
    with a warning when they were not at their defaults. Unknown keys are still errors."""
    cls, data, unread = _split(data)
    changed = _set_fields(unread)
    if changed:
        warnings.warn(
            f"the saved config sets fields its task {cls.task!r} does not use, left out (as "
            f"the run did): {', '.join(changed)}",
            stacklevel=2,
        )
    own = task_paths()[cls.task]
    return _build(cls, _without(data, {p for p, _ in unread}, own), where)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (lists for tuples) for YAML/JSON."""

    def plain(x: Any) -> Any:
        if is_dataclass(x):
            return {k: plain(v) for k, v in asdict(x).items()}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of nested overrides."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of config keys at the top level")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return _merge(PRESETS[name], {"preset": name})

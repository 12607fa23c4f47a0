"""`reformer train`'s configuration from the command line: defaults < --preset < --config
FILE < flags, resolved into a TrainConfig (shared by `reformer train` and `reformer plan`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import tyro

from .config import moved_compat_flag
from .run_config import (
    TrainConfig,
    _merge,
    config_from_dict,
    load_config_file,
    preset_dict,
    unused_fields,
)


def parse_train_args(argv: list[str]) -> TrainConfig:
    """`reformer train` flags -> the resolved TrainConfig (defaults < preset < file < flags)."""
    for arg in argv:
        if (new := moved_compat_flag(arg)) is not None:
            raise ValueError(
                f"{arg}: the transformers-compatibility switches are in model.compat now; use {new}"
            )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    pre.add_argument("--init-from", "--init_from", dest="init_from")
    known, _ = pre.parse_known_args(argv)
    layers: dict = {}
    if known.init_from:
        # The architecture comes with the weights: their run's model config is the base.
        from .checkpoint import read_checkpoint_config, resolve_checkpoint

        ckpt = resolve_checkpoint(known.init_from)
        saved = read_checkpoint_config(ckpt)
        layers = {k: saved[k] for k in ("model", "task", "byte_offset") if k in saved}
        if layers.get("task") == "translation":
            layers["translation"] = saved.get("translation", {})
        if saved.get("tokenizer"):  # the init run's tokenizer file, wherever that run is
            tok = Path(saved["tokenizer"])
            in_run = ckpt.parent.parent / tok
            layers["tokenizer"] = str(in_run.resolve() if in_run.exists() else tok)
    if known.preset:
        layers = _merge(layers, preset_dict(known.preset))
    if known.config:
        layers = _merge(layers, load_config_file(known.config) | {"config": known.config})
    # The layers below the flags are checked for unused fields only once the flags (which
    # may change the task) are applied: tyro builds the final config with the rule on.
    with unused_fields("defer"):
        default = config_from_dict(layers, where=known.config or "preset")
    return tyro.cli(
        TrainConfig,
        default=default,
        args=argv,
        prog="reformer train",
        description="Train a Reformer. Layers: defaults < --preset < --config FILE < flags. "
        "`--list-presets` lists the presets.",
    )

"""Loading a finished (or running) run: its saved config, its tokenizer file, and a
language model with its weights, from a run or checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
)
from ..model import ReformerLM
from ..run_config import TrainConfig, saved_config_from_dict


def saved_run_config(ckpt: Path) -> TrainConfig:
    """The run config saved in checkpoint directory `ckpt`, its `out` pointing at the run
    directory wherever that is now. Raises CheckpointError when it is not a run config."""
    try:
        # (leniently: older versions saved, and allowed, fields the task does not read)
        cfg = saved_config_from_dict(read_checkpoint_config(ckpt), where=f"{ckpt}/config.json")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: its saved config is not a reformer run config ({e})") from e
    if ckpt.parent.name == "checkpoints":
        cfg.out = str(ckpt.parent.parent)
    return cfg


def load_run(path: Path, device: torch.device) -> tuple[ReformerLM, TrainConfig, Path, int]:
    """A run or checkpoint directory -> (model in eval mode, its run config, the checkpoint
    directory used, its step). Raises CheckpointError when there is nothing to load."""
    ckpt = resolve_checkpoint(path)
    cfg = saved_run_config(ckpt)
    model = ReformerLM(cfg.model).to(device)
    step = load_checkpoint(ckpt, model, restore_rng=False).step
    return model.eval(), cfg, ckpt, step


def resolve_tokenizer(cfg: TrainConfig) -> str | None:
    """cfg.tokenizer as a path: a relative one is looked up in the run directory first."""
    if cfg.tokenizer is None:
        return None
    in_run = Path(cfg.out) / cfg.tokenizer
    return (
        str(in_run) if not Path(cfg.tokenizer).is_absolute() and in_run.exists() else cfg.tokenizer
    )

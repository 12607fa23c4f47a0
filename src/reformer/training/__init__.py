"""The training engine: one loop (`Trainer`) for every task, each task a small `Recipe`.

A new task plugs in by subclassing `Recipe` and adding it to `RECIPES` (a task name ->
"module:Class"); the loop itself does not change.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..run_config import TrainConfig
from .common import RunWriteFailed, TrainingDiverged
from .interrupt import RunStopped
from .recipe import Recipe
from .trainer import Trainer, register_callback

__all__ = [
    "RECIPES",
    "Recipe",
    "RunStopped",
    "RunWriteFailed",
    "Trainer",
    "TrainingDiverged",
    "recipe_for",
    "register_callback",
    "train",
]

# Imported by name when a run needs them, so the engine imports no task code.
RECIPES: dict[str, str] = {
    "duplication": "reformer.tasks.lm.recipe:LMRecipe",
    "enwik8": "reformer.tasks.lm.recipe:LMRecipe",
    "text": "reformer.tasks.lm.recipe:LMRecipe",
    "images": "reformer.tasks.lm.recipe:LMRecipe",
    "translation": "reformer.tasks.translation.recipe:TranslationRecipe",
    "mlm": "reformer.tasks.encoder.recipe:MLMRecipe",
    "classify": "reformer.tasks.encoder.recipe:ClassifyRecipe",
    "listops": "reformer.tasks.encoder.recipe:ListOpsRecipe",
}


def recipe_for(task: str) -> type[Recipe]:
    """The Recipe class of a task name."""
    if task not in RECIPES:
        raise ValueError(f"no training recipe for task {task!r}; known: {sorted(RECIPES)}")
    module, name = RECIPES[task].split(":")
    return getattr(importlib.import_module(module), name)


def train(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the final eval metrics.

    With world_size > 1 this is one rank of a data-parallel run and torch.distributed must
    be initialised (the CLI does it under torchrun); every rank calls train() with its rank.
    Ranks other than 0 return an empty dict. The task's recipe (`recipe_for`) plugs into
    the one training loop, `Trainer`; the resolved config is saved as DIR/config.yaml and
    inside every checkpoint.
    """
    return Trainer(cfg, recipe_for(cfg.task), rank, world_size).run()

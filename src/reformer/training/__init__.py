"""The training engine: one loop (`Trainer`) for every task, each task a small `Recipe`.

A new task plugs in by subclassing `Recipe` and adding it to `RECIPES` (a task name ->
"module:Class"); the loop itself does not change.
"""

from __future__ import annotations

import importlib

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
]

# Imported by name when a run needs them, so the engine imports no task code.
RECIPES: dict[str, str] = {
    "duplication": "reformer.train:LMRecipe",
    "enwik8": "reformer.train:LMRecipe",
    "text": "reformer.train:LMRecipe",
    "images": "reformer.train:LMRecipe",
    "translation": "reformer.translation.train:TranslationRecipe",
    "mlm": "reformer.encoder.train:MLMRecipe",
    "classify": "reformer.encoder.train:ClassifyRecipe",
    "listops": "reformer.encoder.train:ListOpsRecipe",
}


def recipe_for(task: str) -> type[Recipe]:
    """The Recipe class of a task name."""
    if task not in RECIPES:
        raise ValueError(f"no training recipe for task {task!r}; known: {sorted(RECIPES)}")
    module, name = RECIPES[task].split(":")
    return getattr(importlib.import_module(module), name)

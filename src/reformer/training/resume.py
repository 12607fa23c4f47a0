"""Which checkpoint a run continues from, and what a resumed run must share with it: the
config sections a recipe names, its data-derived state, and (after an elastic restart
by torchrun) the very same config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import latest_checkpoint, read_checkpoint_config, read_checkpoint_state
from ..distributed import broadcast_object, restart_count, torchrun_env
from ..run_config import config_to_dict, saved_config_from_dict
from .recipe import Recipe


def newest_checkpoint(out: Path, rank: int) -> Path | None:
    """The run directory's newest complete checkpoint, as rank 0 sees it, on every rank."""
    ckpt = latest_checkpoint(out) if rank == 0 and out.exists() else None
    # Rank 0 picks the checkpoint and every rank loads that one (the run directory must
    # be on a filesystem all ranks see); deciding once keeps the ranks from disagreeing.
    return broadcast_object(ckpt)


def pick_checkpoint(
    ckpt: Path | None, out: Path, resume: bool, resolved: dict[str, Any], recipe: Recipe
) -> Path | None:
    """`ckpt` (the newest) if the run continues from it, None for a fresh run; refuses to
    overwrite a run, or to resume one with another config."""
    if ckpt is None:
        return None
    if not (resume or _elastic_restart_resumes(ckpt, resolved)):
        raise ValueError(
            f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to "
            "continue it or choose another --out"
        )
    saved = with_defaults(read_checkpoint_config(ckpt))
    for section in recipe.resume_sections:
        if saved.get(section) != resolved[section]:
            diff = sorted(
                k
                for k in resolved[section]
                if saved.get(section, {}).get(k) != resolved[section][k]
            )
            raise ValueError(
                f"--resume: {ckpt} was trained with a different {section} config (fields "
                f"{diff}); resume with the run's own config (DIR/config.yaml) or start "
                "a new --out"
            )
    return ckpt


def check_resume_state(ckpt: Path | None, recipe: Recipe) -> None:
    """A resumed run's data-derived state (Recipe.resume_state) must be the saved one."""
    if ckpt is None or not recipe.resume_state:
        return
    saved, now = read_checkpoint_state(ckpt), recipe.state(0)
    for key in recipe.resume_state:
        if key in saved and saved[key] != now[key]:
            raise ValueError(
                f"--resume: {ckpt} was trained with the {key} {saved[key]}, but this "
                f"run has {now[key]}; resume with the run's own data and settings, "
                "or start a new --out"
            )


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config with the fields added since it was written at their defaults (a
    newer library compares like with like on --resume); as saved if it no longer parses."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config_to_dict(saved_config_from_dict(saved))
    except (TypeError, ValueError):
        return saved


def _elastic_restart_resumes(ckpt: Path | None, resolved: dict[str, Any]) -> bool:
    """A worker group restarted by torchrun (--max-restarts) continues from the newest
    checkpoint without --resume, but only from one written with this very config, so that a
    restart never continues some other run that was in --out. The saved config is read as
    today's library writes it (`with_defaults`: newer fields, the nested compat section)."""
    if ckpt is None or torchrun_env() is None or restart_count() == 0:
        return False
    saved = with_defaults(read_checkpoint_config(ckpt))
    return {k: v for k, v in saved.items() if k != "resume"} == {
        k: v for k, v in resolved.items() if k != "resume"
    }

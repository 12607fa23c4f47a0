"""`reformer train`: the configuration from the command line (defaults < --preset <
--config FILE < flags, resolved into a TrainConfig; `reformer plan` reads the same layers),
then the run, and its final evaluation (for LSH language models, with each of
--eval-hashes hash-round counts)."""

from __future__ import annotations

import argparse
from pathlib import Path

import tyro

from ..config import moved_compat_flag
from ..distributed import process_group
from ..run_config import (
    ENCODER_TASKS,
    PRESET_DIR,
    PRESETS,
    TrainConfig,
    _merge,
    config_from_dict,
    load_config_file,
    preset_dict,
    unused_fields,
)
from ..tasks.lm.recipe import hash_table, task_of
from ..training import train
from ..training.common import resolve_device
from ..training.evaluation import format_table
from ..training.runs import load_run


def parse_train_args(argv: list[str]) -> TrainConfig:
    """`reformer train` flags -> the resolved TrainConfig (defaults < preset < file < flags).

    A pre-scan (argparse's parse_known_args, every other flag left alone) finds --preset,
    --config and --init-from first: they choose tyro's defaults, and tyro needs its defaults
    before it parses. tyro alone parses the flags, these three included (TrainConfig has
    them as fields).
    """
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
        from ..checkpoint import read_checkpoint_config, resolve_checkpoint

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


def cmd_train(argv: list[str]) -> int:
    """`reformer train ARGV`: train (or resume) the run; rank 0 prints the final
    evaluation. Returns the exit status."""
    if "--list-presets" in argv:
        _list_presets()
        return 0
    cfg = parse_train_args(argv)
    # Under torchrun: one process group for the whole run, destroyed when train() returns;
    # every rank trains, rank 0 alone reports below.
    with process_group(resolve_device(cfg.device)) as (rank, world_size):
        final = train(cfg, rank, world_size)
    if rank != 0:
        return 0
    if cfg.task == "translation":
        if final:
            print(f"final eval: loss {final['loss']:.4f}, BLEU {final['bleu']:.2f}")
        return 0
    if final:
        print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    if (
        cfg.task not in ENCODER_TASKS
        and "lsh" in cfg.model.attention.split(",")
        and cfg.eval_hashes
    ):
        _print_hash_table(cfg, world_size)
    return 0


def _list_presets() -> None:
    print(f"presets (files in {PRESET_DIR}; `--preset NAME`, or copy one as --config):")
    for name, p in PRESETS.items():
        m = p.get("model", {})
        shape = f"layers={m.get('n_layers')} d_model={m.get('d_model')}"
        if p.get("task") != "translation":
            shape += f" attention={m.get('attention')} seq_len={p.get('seq_len')}"
        about = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"  {name:18} task={p.get('task')} {shape}\n  {'':18} {about}")


def _print_hash_table(cfg: TrainConfig, world_size: int) -> None:
    """A language model's final weights evaluated with each of cfg.eval_hashes."""
    device = resolve_device(cfg.device)
    model, _, _, _ = load_run(Path(cfg.out), device)
    rows = hash_table(
        model,
        task_of(cfg),
        tuple(cfg.eval_hashes),
        batch_size=cfg.eval_batch_size or cfg.batch_size * world_size,
        max_batches=cfg.eval_batches or None,
        device=device,
        precision=cfg.precision,
        seed=cfg.seed,
    )
    second_copy = " - accuracy on the second copy" if cfg.task == "duplication" else ""
    print(
        f"\nevaluation with different numbers of hash rounds (trained with "
        f"{cfg.model.n_hashes}){second_copy}:"
    )
    print(format_table(rows))

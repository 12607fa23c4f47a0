"""`reformer train`: the configuration from the command line (defaults < --preset <
--config FILE < flags, resolved into the config class of the run's task; `reformer plan`
reads the same layers), then the run, and its final evaluation (for LSH language models,
with each of --eval-hashes hash-round counts)."""

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
    config_class,
    config_from_dict,
    config_to_dict,
    load_config_file,
    preset_dict,
    saved_config_from_dict,
)
from ..run_config.tasks import any_task_paths, refusal, task_paths
from ..tasks.lm.recipe import hash_table, task_of
from ..training import train
from ..training.common import resolve_device
from ..training.evaluation import format_table
from ..training.runs import load_run


def parse_train_args(argv: list[str]) -> TrainConfig:
    """`reformer train` flags -> the resolved config of the run's task (defaults < preset <
    file < flags), an instance of its class in `run_config.TASK_CONFIGS`.

    A pre-scan (argparse's parse_known_args, every other flag left alone) finds --preset,
    --config, --init-from and --task first: the first three give tyro its defaults, and the
    task (the flag's, else the layers') chooses the class whose flags tyro builds. A flag of
    a field that task does not read is refused by name before tyro sees it. tyro alone
    parses the flags, these four included (the config classes have them as fields).
    """
    for arg in argv:
        if (new := moved_compat_flag(arg)) is not None:
            raise ValueError(
                f"{arg}: the transformers-compatibility switches are in model.compat now; use {new}"
            )
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--preset", "--config", "--task"):
        pre.add_argument(flag)
    pre.add_argument("--init-from", "--init_from", dest="init_from")
    known, _ = pre.parse_known_args(argv)
    layers = _layers(known.init_from, known.preset, known.config)
    if known.task:
        layers["task"] = known.task
    cls = config_class(layers.get("task", "duplication"))
    _refuse_unread_flags(cls, argv)
    # A --task flag may need other flags to complete the layers' config for it (--task mlm
    # --model.no-causal): the run's own checks then wait for tyro's final construction.
    default = config_from_dict(layers, where=known.config or "preset", check=not known.task)
    return tyro.cli(
        cls,
        default=default,
        args=argv,
        prog="reformer train",
        description="Train a Reformer. Layers: defaults < --preset < --config FILE < flags. "
        f"The flags below are those of task {cls.task!r} (`--task T --help` lists task T's). "
        "`--list-presets` lists the presets.",
    )


def _layers(init_from: str | None, preset: str | None, config: str | None) -> dict:
    """The layers below the flags, merged: --init-from's model (and the fields that its
    task's data need), < --preset < --config."""
    layers: dict = {}
    if init_from:
        # The architecture comes with the weights: their run's model config is the base.
        from ..checkpoint import read_checkpoint_config, resolve_checkpoint

        ckpt = resolve_checkpoint(init_from)
        saved = config_to_dict(saved_config_from_dict(read_checkpoint_config(ckpt)))
        layers = {k: saved[k] for k in ("model", "task", "translation") if k in saved}
        if saved.get("byte_offset"):
            layers["byte_offset"] = saved["byte_offset"]
        if saved.get("tokenizer"):  # the init run's tokenizer file, wherever that run is
            tok = Path(saved["tokenizer"])
            in_run = ckpt.parent.parent / tok
            layers["tokenizer"] = str(in_run.resolve() if in_run.exists() else tok)
    if preset:
        layers = _merge(layers, preset_dict(preset))
    if config:
        layers = _merge(layers, load_config_file(config) | {"config": config})
    return layers


def _refuse_unread_flags(cls: type[TrainConfig], argv: list[str]) -> None:
    """A ValueError naming each flag of a field that task `cls.task` does not read (but
    another task does); a flag no task has is left to tyro."""
    own, unread = task_paths()[cls.task], []
    for arg in argv:
        if not arg.startswith("--"):
            continue
        path = arg[2:].split("=", 1)[0].replace("-", "_")
        section, _, name = path.rpartition(".")
        if name.startswith("no_"):  # a boolean's --no- form: --model.no-causal
            path = f"{section}.{name[3:]}".lstrip(".") if path not in own else path
        if path not in own and path in any_task_paths():
            unread.append(path)
    if unread:
        raise refusal(cls.task, unread)


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

"""Language models: their training recipe, evaluation, and loading a run (configs:
`run_config.py`; the loop every task runs: `training/trainer.py`).

`train(cfg, rank, world_size)` runs any task through `training.Trainer` with the task's
recipe; the resolved config is saved as DIR/config.yaml and inside every checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    load_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
)
from .data.tasks import Task, accuracy_counts, build_task
from .feedforward import chunked_cross_entropy
from .model import ReformerLM
from .run_config import (  # noqa: F401  (re-exported: the loop's public names)
    PRESETS,
    OptimConfig,
    TrainConfig,
    _merge,
    config_from_dict,
    config_to_dict,
    load_config_file,
    preset_dict,
    unused_fields,
)
from .training import Recipe, Trainer, recipe_for
from .training.common import (  # noqa: F401  (re-exported: the loop's public names)
    MetricsLog,
    TrainingDiverged,
    atomic_write_text,
    autocast_for,
    build_optimizer,
    check_tensorboard,
    lr_factor,
    out_of_time,
    resolve_device,
)


@torch.no_grad()
def evaluate(
    model: ReformerLM,
    task: Task,
    *,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = 4,
    n_hashes: int | None = None,
    attention: str | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> dict[str, float]:
    """Loss (nats), bits per token and, for duplication, accuracy on `split`.

    `attention` ("lsh" or "full") evaluates the shared-QK layers with that kind instead of
    the trained one (`ReformerLM.set_attention`); `n_hashes` overrides the hash rounds.

    Runs on a forked RNG seeded with `seed`: hash rotations are reproducible and the
    training RNG stream is untouched (exact resume does not depend on when evals ran).
    """
    device = device or next(model.parameters()).device
    total, count, correct = 0.0, 0, 0
    with seeded_eval(model, seed, device), evaluated_as(model, n_hashes, attention):
        for ids, targets in task.eval_batches(split, batch_size, max_batches, seed=seed):
            ids, targets = ids.to(device), targets.to(device)
            with autocast_for(device, precision):
                hidden = model.hidden_states(ids)
                if task.unit == "accuracy":
                    logits = model.logits_from_hidden(hidden)
                    c, _ = accuracy_counts(logits, targets)
                    correct += c
                loss_sum, n = chunked_cross_entropy(
                    hidden,
                    targets,
                    model.logits_from_hidden,
                    chunk_len=model.config.loss_chunk_len,
                )
            total += float(loss_sum)
            count += int(n)
    if count == 0:
        raise ValueError(f"no scored tokens in the {split!r} split (too short for seq_len?)")
    loss = total / count
    out = {"loss": loss, task.unit if task.unit != "accuracy" else "bits": loss / math.log(2)}
    if task.unit == "accuracy":
        out["accuracy"] = correct / count
    return out


def task_of(cfg: TrainConfig, data: str | None = None) -> Task:
    """The run's task (data: another path than the run's)."""
    return build_task(
        cfg.task,
        data or cfg.data,
        cfg.seq_len,
        cfg.image_side,
        byte_offset=cfg.byte_offset,
        tokenizer=resolve_tokenizer(cfg),
    )


def resolve_tokenizer(cfg: TrainConfig) -> str | None:
    """cfg.tokenizer as a path: a relative one is looked up in the run directory first."""
    if cfg.tokenizer is None:
        return None
    in_run = Path(cfg.out) / cfg.tokenizer
    return (
        str(in_run) if not Path(cfg.tokenizer).is_absolute() and in_run.exists() else cfg.tokenizer
    )


def check_compatible(cfg: TrainConfig, task: Task) -> None:
    if cfg.model.vocab_size < task.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {task.name} task's "
            f"vocabulary ({task.vocab_size}); set --model.vocab-size {task.vocab_size}"
        )
    if cfg.model.max_seq_len < task.seq_len:
        raise ValueError(
            f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the task's sequences "
            f"({task.seq_len}); set --model.max-seq-len {task.seq_len} or a shorter --seq-len"
        )


def build_model(cfg: TrainConfig, device: torch.device) -> ReformerLM:
    return ReformerLM(copy.deepcopy(cfg.model)).to(device)


# --- the loop ----------------------------------------------------------------------------------
class LMRecipe(Recipe):
    """Language models on the tasks of `data.tasks` (duplication, enwik8, text, images):
    rows of (input_ids, targets), each rank its own rows of the same global batch."""

    def prepare(self, out: Path) -> None:
        self.task = task_of(self.cfg)
        check_compatible(self.cfg, self.task)

    def build_model(self) -> ReformerLM:
        return build_model(self.cfg, self.device)

    def loss(self, model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor):
        return model.loss(input_ids, targets)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        acc, cfg = self.cfg.optim.accumulate, self.cfg
        out = []
        for micro in range(acc):
            ids, targets = self.task.train_batch(
                step * acc + micro, cfg.batch_size, cfg.seed, self.rank, self.world_size
            )
            out.append((ids.to(self.device), targets.to(self.device)))
        return out

    def micro_loss(self, output: torch.Tensor, micros) -> torch.Tensor:
        return output / len(micros)  # a mean over the micro-batch's tokens already

    def tokens(self, micros) -> int:
        return sum(ids.numel() for ids, _ in micros) * self.world_size

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model, self.task, **self.eval_settings())

    def state(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        per_step = cfg.batch_size * self.task.seq_len * cfg.optim.accumulate * self.world_size
        return {"step": step, "tokens": step * per_step}


def train(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the final eval metrics.

    With world_size > 1 this is one rank of a data-parallel run and torch.distributed must
    be initialised (the CLI does it under torchrun); every rank calls train() with its rank.
    Ranks other than 0 return an empty dict. The task's recipe (`recipe_for`) plugs into
    the one training loop, `training.Trainer`.
    """
    return Trainer(cfg, recipe_for(cfg.task), rank, world_size).run()


def saved_run_config(ckpt: Path) -> TrainConfig:
    """The run config saved in checkpoint directory `ckpt`, its `out` pointing at the run
    directory wherever that is now. Raises CheckpointError when it is not a run config."""
    from .checkpoint import CheckpointError

    try:
        with unused_fields("reset"):  # runs saved before unused fields were refused
            cfg = config_from_dict(read_checkpoint_config(ckpt), where=f"{ckpt}/config.json")
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


@contextlib.contextmanager
def seeded_eval(model: torch.nn.Module, seed: int, device: torch.device) -> Iterator[None]:
    """Eval mode on a forked RNG seeded with `seed` inside the block: hash rotations are
    reproducible and the training RNG stream is untouched (exact resume does not depend on
    when evaluations ran); the model's training mode is restored after."""
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


@contextlib.contextmanager
def evaluated_as(
    model: ReformerLM, n_hashes: int | None = None, attention: str | None = None
) -> Iterator[ReformerLM]:
    """`model` with `n_hashes` hash rounds and its shared-QK layers run as `attention`
    ("lsh" or "full") inside the block, each restored after; None leaves that setting as it
    is (so an evaluation inside another's block keeps the outer setting)."""
    old = model.config.n_hashes
    if n_hashes is not None:
        model.set_n_hashes(n_hashes)
    if attention is not None:
        model.set_attention(attention)
    try:
        yield model
    finally:
        model.set_n_hashes(old)
        if attention is not None:
            model.set_attention(None)


def per_hash_count(
    model: ReformerLM,
    counts: tuple[int | str | None, ...],
    evaluate_one: Callable[[], dict[str, float]],
) -> list[dict[str, float]]:
    """One row of `evaluate_one()`'s metrics per entry of `counts`: a number evaluates the
    shared-QK layers with LSH and that many rounds (even when trained with full shared-QK
    attention), "full" with full attention, None as trained (row label "trained")."""
    rows = []
    for n in counts:
        if n not in (None, "full") and (isinstance(n, bool) or not isinstance(n, int)):
            raise ValueError(f"evaluation hash rounds must be ints or 'full'; got {n!r}")
        as_int = isinstance(n, int)
        with evaluated_as(model, n if as_int else None, "lsh" if as_int else n):
            res = evaluate_one()
        rows.append({"n_hashes": "trained" if n is None else n} | res)
    return rows


def hash_table(
    model: ReformerLM,
    task: Task,
    counts: tuple[int | str | None, ...],
    *,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = 4,
    device: torch.device | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> list[dict[str, float]]:
    """`evaluate` of the same weights with each number of hash rounds (`per_hash_count`)."""
    return per_hash_count(
        model,
        counts,
        lambda: evaluate(
            model,
            task,
            split=split,
            batch_size=batch_size,
            max_batches=max_batches,
            device=device,
            precision=precision,
            seed=seed,
        ),
    )


def report_eval(
    title: str, rows: list[dict[str, float]], ckpt: Path, step: int, split: str, json_path
) -> None:
    """`reformer eval`'s output: the title line and the table, and the rows as JSON in
    `json_path` when given."""
    print(title)
    print(format_table(rows))
    if json_path:
        result = {"checkpoint": str(ckpt), "step": step, "split": split, "rows": rows}
        atomic_write_text(Path(json_path), json.dumps(result, indent=2))


def format_table(rows: list[dict[str, float]]) -> str:
    keys = [k for k in rows[0] if k != "n_hashes"]
    w = max(10, *map(len, keys))  # columns as wide as the longest metric name
    head = "n_hashes  " + "  ".join(f"{k:>{w}}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['n_hashes']:>8}  " + "  ".join(f"{r[k]:>{w}.4f}" for k in keys))
    return "\n".join(lines)

"""Language models: their training recipe, evaluation, and loading a run (configs:
`run_config.py`; the loop every task runs: `training/trainer.py`).

`train(cfg, rank, world_size)` runs any task through `training.Trainer` with the task's
recipe; the resolved config is saved as DIR/config.yaml and inside every checkpoint.
"""

from __future__ import annotations

import copy
import math
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
    was_training, old_hashes = model.training, model.config.n_hashes
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        model.eval()
        if n_hashes is not None:
            model.set_n_hashes(n_hashes)
        model.set_attention(attention)
        total, count, correct = 0.0, 0, 0
        try:
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
        finally:
            model.set_n_hashes(old_hashes)
            model.set_attention(None)
            model.train(was_training)
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
        # Rank 0 evaluates alone, on as many rows as one process with the global batch would.
        cfg = self.cfg
        return evaluate(
            model,
            self.task,
            batch_size=cfg.eval_batch_size or cfg.batch_size * self.world_size,
            max_batches=cfg.eval_batches or None,
            device=self.device,
            precision=cfg.precision,
            seed=cfg.seed,
        )

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


def load_run(path: Path, device: torch.device) -> tuple[ReformerLM, TrainConfig, Path, int]:
    """A run or checkpoint directory -> (model in eval mode, its run config, the checkpoint
    directory used, its step). Raises CheckpointError when there is nothing to load."""
    from .checkpoint import CheckpointError

    ckpt = resolve_checkpoint(path)
    try:
        with unused_fields("reset"):  # runs saved before unused fields were refused
            cfg = config_from_dict(read_checkpoint_config(ckpt), where=f"{ckpt}/config.json")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: its saved config is not a reformer run config ({e})") from e
    if ckpt.parent.name == "checkpoints":  # the run directory, wherever it is now
        cfg.out = str(ckpt.parent.parent)
    model = ReformerLM(cfg.model).to(device)
    step = load_checkpoint(ckpt, model, restore_rng=False).step
    return model.eval(), cfg, ckpt, step


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
    """Evaluate the same weights with each number of hash rounds; "full" in `counts`
    evaluates the shared-QK layers with full attention instead, and a number evaluates
    them with LSH even when the model was trained with full shared-QK attention; None
    evaluates the model as trained (row label "trained")."""
    rows = []
    for n in counts:
        if n not in (None, "full") and (isinstance(n, bool) or not isinstance(n, int)):
            raise ValueError(f"evaluation hash rounds must be ints or 'full'; got {n!r}")
        as_int = isinstance(n, int)
        res = evaluate(
            model,
            task,
            split=split,
            batch_size=batch_size,
            max_batches=max_batches,
            n_hashes=n if as_int else None,
            attention="lsh" if as_int else n,
            device=device,
            precision=precision,
            seed=seed,
        )
        rows.append({"n_hashes": "trained" if n is None else n} | res)
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    keys = [k for k in rows[0] if k != "n_hashes"]
    head = "n_hashes  " + "  ".join(f"{k:>10}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['n_hashes']:>8}  " + "  ".join(f"{r[k]:>10.4f}" for k in keys))
    return "\n".join(lines)

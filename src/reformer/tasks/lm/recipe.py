"""Language models (tasks duplication, enwik8, text, images): their training recipe and
evaluation. The loop every task runs is `training.Trainer`; runs are loaded with
`training.runs.load_run`."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from ...feedforward import chunked_cross_entropy
from ...model import ReformerLM
from ...run_config import TrainConfig
from ...training import Recipe
from ...training.common import autocast_for
from ...training.evaluation import evaluated_as, per_hash_count, seeded_eval
from ...training.runs import resolve_tokenizer
from .data import Task, accuracy_counts, build_task


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


class LMRecipe(Recipe):
    """Language models on the tasks of `tasks.lm.data` (duplication, enwik8, text, images):
    rows of (input_ids, targets), each rank its own rows of the same global batch."""

    def prepare(self, out: Path) -> None:
        self.task = task_of(self.cfg)
        check_compatible(self.cfg, self.task)

    def build_model(self) -> ReformerLM:
        return ReformerLM(copy.deepcopy(self.cfg.model)).to(self.device)

    def loss(self, model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor):
        return model.loss(input_ids, targets)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        acc, cfg = self.cfg.optim.accumulate, self.cfg
        out = []
        for micro in range(acc):
            ids, targets = self.task.train_batch(
                step * acc + micro, cfg.batch_size, cfg.seed, self.data_rank, self.data_world
            )
            out.append((ids.to(self.device), targets.to(self.device)))
        return out

    def micro_loss(self, output: torch.Tensor, micros) -> torch.Tensor:
        return output / len(micros)  # a mean over the micro-batch's tokens already

    def tokens(self, micros) -> int:
        return sum(ids.numel() for ids, _ in micros) * self.data_world

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model, self.task, **self.eval_settings())

    def state(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        per_step = cfg.batch_size * self.task.seq_len * cfg.optim.accumulate * self.data_world
        return {"step": step, "tokens": step * per_step}

"""What a task brings to the training loop: a `Recipe` (its data, model, loss, evaluation
and saved state). The loop itself, `Trainer`, lives in trainer.py and reads no task code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint
from ..run_config import TrainConfig


class Recipe:
    """What a task brings to the Trainer. Subclasses implement the methods that raise.

    The loss of a step is the sum over its micro-batches of `micro_loss(output)`, averaged
    over ranks: a recipe scales each micro-batch's loss so that this is the loss of the
    whole global batch (DDP averages the gradients over ranks the same way).
    """

    #: config sections a resumed run must share with its checkpoint
    resume_sections: tuple[str, ...] = ("model",)
    #: keys of `state()` (what `prepare` derived from the data: a classifier's label
    #: names, its tokenizer) a resumed run must share with its checkpoint's saved state
    resume_state: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        # the batch's split: by rank, or by sequence group under --parallel sequence (whose
        # ranks all hold the same rows; `training.sequence` sets these)
        self.data_rank, self.data_world = rank, world_size

    def prepare(self, out: Path) -> None:
        """Data and tokenizers, on every rank, before the model is built. Files it writes
        (rank 0, in `out`) come after the run-directory checks have passed."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, *inputs: Tensor) -> Any:
        """The wrapped module's forward (what DDP and FSDP see): model -> loss output."""
        raise NotImplementedError

    def micro_batches(self, step: int) -> list[tuple[Tensor, ...]]:
        """This rank's inputs of each micro-batch of optimiser step `step`, on the device."""
        raise NotImplementedError

    def micro_loss(self, output: Any, micros: list[tuple[Tensor, ...]]) -> Tensor:
        """The tensor to back-propagate for one micro-batch's `loss` output."""
        raise NotImplementedError

    def tokens(self, micros: list[tuple[Tensor, ...]]) -> int:
        """Tokens this step processes on all ranks (for tokens_per_s)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (rank 0 alone, unwrapped model)."""
        raise NotImplementedError

    def eval_settings(self) -> dict[str, Any]:
        """The evaluation's batch size, batch count, device, precision and seed: rank 0
        evaluates alone, on as many rows per batch as one process with the global batch."""
        cfg = self.cfg
        return dict(
            batch_size=cfg.eval_batch_size or cfg.batch_size * self.data_world,
            max_batches=cfg.eval_batches or None,
            device=self.device,
            precision=cfg.precision,
            seed=cfg.seed,
        )

    def logged_loss(self, step_loss: float, micros: list[tuple[Tensor, ...]]) -> float | None:
        """Called after every step with its loss; returns the loss to log at this step, or
        None for the last step's own. Translation returns the token-weighted mean since
        its previous log line (`reset_logged_loss`)."""
        return None

    def reset_logged_loss(self) -> None:
        """A log line was written."""

    def state(self, step: int) -> dict[str, Any]:
        """The JSON training state saved with each checkpoint."""
        return {"step": step}

    def describe(self, model: nn.Module) -> str | None:
        """A line printed (rank 0) once the model is built, or None."""
        return None

    def init_from(self, path: Path, model: nn.Module) -> Any:
        """Fine-tuning (--init-from): load another run's weights into the fresh model (a
        `LoadedCheckpoint`). A recipe whose head differs from the source's loads the rest."""
        return load_checkpoint(path, model, restore_rng=False)

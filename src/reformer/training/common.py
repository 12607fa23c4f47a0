"""Pieces of the training engine every recipe shares: files, devices, the optimiser and its
schedule, the metrics log, the time limit."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write, naming
from ..run_config import OptimConfig, TrainConfig


# --- pieces of the loop ------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use cpu")
    return device


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )


def lr_factor(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based)."""
    s = step + 1
    warm = max(1, cfg.warmup_steps)
    if cfg.schedule == "constant":
        return min(1.0, s / warm)
    if cfg.schedule == "wsd":
        start = total_steps - cfg.decay_steps if cfg.decay_start is None else cfg.decay_start
        decayed = min(1.0, max(0, step - start) / cfg.decay_steps)
        return min(1.0, s / warm) * (1 - (1 - cfg.min_lr_ratio) * decayed)
    if s <= warm:
        return s / warm
    if cfg.schedule == "rsqrt":
        return math.sqrt(warm / s)
    progress = min(1.0, (s - warm) / max(1, total_steps - warm))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class RunWriteFailed(RuntimeError):
    """A run could not write a file (full disk, quota, permissions, read-only): the message
    names the file, the fix and the checkpoint to resume from."""


class MetricsLog:
    """DIR/metrics.jsonl: one JSON object per line, appended and flushed as it goes; with
    `tensorboard` set, every numeric field of each record also goes to TensorBoard event
    files in that directory (torch.utils.tensorboard; needs the tensorboard package)."""

    def __init__(self, path: Path, tensorboard: Path | None = None) -> None:
        self.path = path
        self._tb_dir = tensorboard
        self._tb = None
        self._purge_step: int | None = None
        if tensorboard is not None:
            check_tensorboard()

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, events past the checkpoint are dropped, as in metrics.jsonl.
            self._tb = SummaryWriter(log_dir=str(self._tb_dir), purge_step=self._purge_step)
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (and any torn last line) when resuming."""
        self._purge_step = step + 1
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write(self.path, "".join(x + "\n" for x in keep))

    def write(self, record: dict[str, Any]) -> None:
        with naming(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb_dir is not None and "step" in record:
            tb = self._writer()
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    tb.add_scalar(key.replace("eval_", "eval/"), value, record["step"])
            tb.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


def check_tensorboard() -> None:
    """Fail early, before any file is written, when TensorBoard logging cannot work."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "--tensorboard needs the tensorboard package: pip install -c constraints.txt "
            "'.[tensorboard]' (or run without --tensorboard)"
        ) from e


def out_of_time(cfg: TrainConfig, t_start: float) -> bool:
    return cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes

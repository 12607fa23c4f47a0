"""`reformer plan`: what a training step will need before it runs, and what fits a budget.

    reformer plan --preset enwik8-small [--length 65536] [--batch 1] [--budget 20GiB]
                  [--measure] [--json FILE] [any `reformer train` flag]

The model, precision, optimiser and device come from the same layers as `reformer train`
(defaults < --preset < --config FILE < flags); --length and --batch default to the run's
seq_len and batch_size. `--measure` also runs two real steps in a fresh process and prints
the measured peak beside the prediction.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from ..config import sequence_parallel_problem
from ..files import atomic_write
from ..plan import (
    GiB,
    MemoryPlan,
    MiB,
    longest_fitting,
    measure_step_fresh,
    parse_size,
    plan_memory,
)
from ..run_config import TrainConfig
from ..training.common import resolve_device
from ..training.precision import resolve_precision
from .train import parse_train_args


@dataclass
class PlanArgs:
    """Predict a training step's peak memory by component (and the longest length that fits
    --budget). Model and run flags: as `reformer train --help` lists them."""

    length: int | None = None
    """Tokens per sequence; default: the run's seq_len (an image run: 3 x side^2)."""
    batch: int | None = None
    """Sequences per step; default: the run's batch_size."""
    budget: str | None = None
    """A memory budget (e.g. 20GiB, 512MiB): also print the longest length that fits it."""
    measure: bool = False
    """Also run two real steps in a fresh process and print their measured peak."""
    json: str | None = None
    """Also write the plan to this JSON file."""
    sequence_ranks: int = 1
    """Plan one rank of --parallel sequence over this many ranks (its slice of every
    sequence; LSH and local layers only)."""


def parse_plan_args(argv: list[str]) -> tuple[PlanArgs, list[str]]:
    """`reformer plan` flags -> (its own flags, the rest: `reformer train`'s flags)."""
    return tyro.cli(
        PlanArgs, args=argv, prog="reformer plan", return_unknown_args=True,
        description=__doc__.split("\n\n", 1)[1].strip()
        + "\n\nModel and run flags: as `reformer train --help` lists them.",
    )  # fmt: skip


def cmd_plan(argv: list[str]) -> int:
    """`reformer plan ARGV`: print the predicted step memory (and what fits --budget, and the
    measured peak with --measure); write it as JSON with --json. Returns the exit status."""
    args, rest = parse_plan_args(argv)
    budget = parse_size(args.budget) if args.budget is not None else None  # checked first
    cfg = parse_train_args(rest)
    length, batch = _length_and_batch(cfg, args)
    device = str(resolve_device(cfg.device))
    cfg.precision = resolve_precision(cfg.precision, torch.device(device))[0]  # auto: as train
    if args.sequence_ranks < 1:
        raise ValueError(f"--sequence-ranks must be >= 1 (got {args.sequence_ranks})")
    problem = sequence_parallel_problem(cfg.model, 0) if args.sequence_ranks > 1 else None
    if problem:
        raise ValueError(problem)
    plan = plan_memory(cfg.model, length, batch, cfg.precision, cfg.optim.name, args.sequence_ranks)
    print(plan.table())
    if length > cfg.model.max_seq_len:
        print(
            f"note: planned with model.max_seq_len raised from {cfg.model.max_seq_len:,} to "
            f"{length:,}; training at this length needs --model.max-seq-len {length}"
        )
    if device != "cpu":
        print(f"(device {device}: figures are for torch.cuda.max_memory_allocated)")
    out: dict = {
        "length": length,
        "batch": batch,
        "precision": cfg.precision,
        "optimizer": cfg.optim.name,
        "device": device,
        "parameters_bytes": plan.parameters * 4,
        "components_bytes": plan.components,
        "phases_bytes": plan.phases,
        "predicted_peak_bytes": plan.peak,
        "predicted_total_bytes": plan.total,
        "sequence_ranks": args.sequence_ranks,
    }
    if budget is not None:
        best = _print_longest_fitting(cfg, budget, args.budget, batch, args.sequence_ranks)
        out["budget_bytes"], out["longest_fitting"] = budget, best[0] if best else None
    if args.measure:
        out["measured_peak_bytes"] = _print_measured(cfg, plan, length, batch, device)
    if args.json:
        atomic_write(Path(args.json), json.dumps(out, indent=2))
    return 0


def _length_and_batch(cfg: TrainConfig, args: PlanArgs) -> tuple[int, int]:
    """The planned (length, batch): the flags, else the run's (an image run: 3 x side^2);
    refuses a translation run, which the plan does not model."""
    if cfg.task == "translation":
        raise ValueError(
            "reformer plan covers language-model runs; task=translation (an encoder-decoder) "
            "is not modelled yet"
        )
    length = args.length
    if length is None and cfg.task == "images":
        if cfg.image_side is None:
            raise ValueError(
                "task=images: the length is 3 x side^2 of the data's images; give --length "
                "or --image-side"
            )
        length = 3 * cfg.image_side**2
    length = length if length is not None else cfg.seq_len
    batch = args.batch if args.batch is not None else cfg.batch_size
    for name, value in (("--length", length), ("--batch", batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    return length, batch


def _print_longest_fitting(
    cfg: TrainConfig, budget: float, budget_text: str, batch: int, ranks: int = 1
) -> tuple[int, MemoryPlan] | None:
    """Print the longest length whose model + step fits the budget (per rank of `ranks`);
    return it with its plan."""
    best = longest_fitting(cfg.model, budget, batch, cfg.precision, cfg.optim.name, ranks=ranks)
    if best is None:
        print(f"\nnothing fits {budget_text}: even one chunk needs more")
    else:
        n, fit = best
        more = " (the model's max_seq_len is lower)" if n > cfg.model.max_seq_len else ""
        print(
            f"\nlongest length that fits {budget_text} (model + step): {n:,} tokens{more} "
            f"x batch {batch} ({fit.total / GiB:.2f} GiB)"
        )
    return best


def _print_measured(
    cfg: TrainConfig, plan: MemoryPlan, length: int, batch: int, device: str
) -> int:
    """Run two real steps in a fresh process; print and return their peak bytes (>= 1)."""
    print(
        "\nmeasuring two real steps in a fresh process (MALLOC_MMAP_THRESHOLD_=65536: "
        "RSS tracks live tensors) ...",
        flush=True,
    )
    try:
        got = measure_step_fresh(cfg.model, length, batch, cfg.precision, cfg.optim.name, device)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"--measure: {e}") from None
    got = max(got, 1)  # a step too small to move the peak RSS
    err = plan.peak / got - 1
    print(f"measured step peak above the model: {got / MiB:,.1f} MiB (prediction {err:+.1%})")
    return got

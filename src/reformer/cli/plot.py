"""`reformer plot`: a run's learning curves (DIR/metrics.jsonl) as a PNG: the training and
evaluation loss, and each further evaluation metric beside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from ..files import atomic_output
from ..training.common import MetricsLog


@dataclass
class PlotArgs:
    """Draw a run's learning curves from DIR/metrics.jsonl."""

    run: Annotated[str, tyro.conf.Positional]
    """The run directory."""
    out: str | None = None
    """Output PNG; default: DIR/plots/curves.png."""


def cmd_plot(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = tyro.cli(PlotArgs, args=argv, prog="reformer plot")
    run = Path(args.run)
    records = MetricsLog(run / "metrics.jsonl").read()
    if not records:
        raise ValueError(f"{run}/metrics.jsonl is missing or empty: nothing to plot")
    train_rec = [r for r in records if "loss" in r]
    eval_rec = [r for r in records if any(k.startswith("eval_") for k in r)]
    eval_keys = [k for k in (eval_rec[0] if eval_rec else {}) if k.startswith("eval_")]
    extra = [k for k in eval_keys if k not in ("eval_loss", "eval_s")]
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(5 * (1 + len(extra)), 3.6))
    axes = list(axes) if len(extra) else [axes]
    ax = axes[0]
    ax.plot([r["step"] for r in train_rec], [r["loss"] for r in train_rec], label="train")
    if eval_rec:
        ax.plot(
            [r["step"] for r in eval_rec], [r["eval_loss"] for r in eval_rec], "o-", label="eval"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    for ax, key in zip(axes[1:], extra):
        ax.plot([r["step"] for r in eval_rec], [r[key] for r in eval_rec], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel(key.removeprefix("eval_"))
    fig.suptitle(str(run))
    out = Path(args.out) if args.out else run / "plots" / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    print(f"wrote {out}")
    return 0

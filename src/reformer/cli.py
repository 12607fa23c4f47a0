"""`reformer train | eval | plot | generate | translate | predict | convert | plan`: the CLI.

Each verb's flags are generated from its typed dataclass by tyro (`reformer VERB --help`);
there is no second list of options to keep in sync.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from .checkpoint import CheckpointError
from .distributed import process_group
from .files import is_write_error, write_error_message
from .run_config import ENCODER_TASKS, PRESETS
from .tasks.lm.recipe import hash_table, task_of
from .train_args import parse_train_args
from .training import RunStopped, RunWriteFailed, TrainingDiverged, train
from .training.common import MetricsLog, resolve_device
from .training.evaluation import format_table, report_eval
from .training.interrupt import exit_code
from .training.runs import load_run

USAGE = """usage: reformer {train,eval,plot,generate,translate,predict,convert,plan} ...

Train and run Reformer models (LSH attention, reversible layers, chunked feed-forward).

verbs:
  train     train a model from a preset, a config file and flags; resumable
  eval      evaluate a checkpoint, optionally over several numbers of hash rounds
  plot      draw a run's learning curves (PNG)
  generate  sample text (or an image) from a checkpoint with the cached decoder
  translate translate text (stdin or a file) with a translation run's checkpoint
  predict   classify texts (stdin or a file) with a classify or listops run's checkpoint
  convert   import a transformers Reformer directory as a run, or export a run to one
  plan      predict a training step's peak memory by component; the longest length that fits

`reformer VERB --help` lists a verb's options. Examples:
  reformer train --preset duplication-small --out runs/dup
  reformer eval --checkpoint runs/dup --n-hashes 1 2 4 8
  reformer plot runs/dup
  reformer train --preset multi30k-small --data ../shared/data/translation/multi30k --out runs/mt
  echo "A man rides a bike." | reformer translate --checkpoint runs/mt
  reformer train --preset listops-small --out runs/listops
  echo "[MAX 2 9 [MIN 4 7 ] 0 ]" | reformer predict --checkpoint runs/listops
  torchrun --nproc-per-node 2 -m reformer train --preset duplication-small --out runs/dup2
  reformer convert --from-transformers path/to/reformer-enwik8 --out runs/enwik8-hf
  reformer convert --to-transformers runs/dup --out exported/dup
  reformer plan --preset enwik8-small --length 65536 --budget 20GiB
"""


# --- train -------------------------------------------------------------------------------------
def cmd_train(argv: list[str]) -> int:
    if "--list-presets" in argv:
        from .run_config import PRESET_DIR

        print(f"presets (files in {PRESET_DIR}; `--preset NAME`, or copy one as --config):")
        for name, p in PRESETS.items():
            m = p.get("model", {})
            shape = f"layers={m.get('n_layers')} d_model={m.get('d_model')}"
            if p.get("task") != "translation":
                shape += f" attention={m.get('attention')} seq_len={p.get('seq_len')}"
            about = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"  {name:18} task={p.get('task')} {shape}\n  {'':18} {about}")
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
    if cfg.task in ENCODER_TASKS:
        if final:
            print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
        return 0
    task_unit = "accuracy" if cfg.task == "duplication" else None
    lsh = "lsh" in cfg.model.attention.split(",")
    if final:
        print("final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    if lsh and cfg.eval_hashes:
        device = resolve_device(cfg.device)
        model, _, _, _ = load_run(Path(cfg.out), device)
        task = task_of(cfg)
        rows = hash_table(
            model,
            task,
            tuple(cfg.eval_hashes),
            batch_size=cfg.eval_batch_size or cfg.batch_size * world_size,
            max_batches=cfg.eval_batches or None,
            device=device,
            precision=cfg.precision,
            seed=cfg.seed,
        )
        print(
            f"\nevaluation with different numbers of hash rounds (trained with "
            f"{cfg.model.n_hashes}){' - accuracy on the second copy' if task_unit else ''}:"
        )
        print(format_table(rows))
    return 0


# --- eval --------------------------------------------------------------------------------------
@dataclass
class EvalArgs:
    """Evaluate a checkpoint on the validation or test split."""

    checkpoint: str
    """A run directory (its newest checkpoint is used) or a checkpoint directory."""
    n_hashes: tuple[int | Literal["full"], ...] = ()
    """Hash-round counts to evaluate with (a table when several); "full" evaluates the
    shared-QK layers with full attention, and a count evaluates a model trained with full
    shared-QK attention with LSH (paper Table 2). Default: as trained."""
    split: Literal["val", "test"] = "val"
    batches: int = 16
    """Evaluation batches (0: the whole split)."""
    batch_size: int | None = None
    data: str | None = None
    """Data path; default: the one the run was trained on."""
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    json: str | None = None
    """Also write the results to this JSON file."""
    src: str | None = None
    """Translation runs: score this source file (lines or WMT .sgm) instead of a split..."""
    ref: str | None = None
    """...against this reference file."""
    beam: int | None = None
    """Translation runs: beam width (default: the run's translation.beam)."""
    output: str | None = None
    """Translation runs: also write the translations here, one per line."""


def cmd_eval(argv: list[str]) -> int:
    args = tyro.cli(EvalArgs, args=argv, prog="reformer eval")
    device = resolve_device(args.device)
    task = _run_task(Path(args.checkpoint))
    if task == "translation":
        from .tasks.translation.cli import eval_translation

        return eval_translation(args, device)
    if task in ENCODER_TASKS:
        from .tasks.encoder.cli import eval_encoder

        return eval_encoder(args, device)
    model, cfg, ckpt, step = load_run(Path(args.checkpoint), device)
    task = task_of(cfg, args.data)
    counts = tuple(args.n_hashes) or (None,)
    rows = hash_table(
        model,
        task,
        counts,
        split=args.split,
        batch_size=args.batch_size or cfg.eval_batch_size or cfg.batch_size,
        max_batches=args.batches or None,
        device=device,
        precision=args.precision,
        seed=args.seed,
    )
    title = (
        f"{ckpt} (step {step}), {cfg.task} {args.split} split, trained with "
        f"{cfg.model.n_hashes} hash rounds"
    )
    report_eval(title, rows, ckpt, step, args.split, args.json)
    return 0


# --- plot --------------------------------------------------------------------------------------
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
    from .files import atomic_output

    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    print(f"wrote {out}")
    return 0


def cmd_generate(argv: list[str]) -> int:
    from .generate_cli import cmd_generate as run

    return run(argv)


def cmd_convert(argv: list[str]) -> int:
    from .convert_cli import cmd_convert as run

    return run(argv)


def cmd_plan(argv: list[str]) -> int:
    from .plan_cli import cmd_plan as run

    return run(argv)


def cmd_translate(argv: list[str]) -> int:
    from .tasks.translation.cli import cmd_translate as run

    return run(argv)


def _run_task(path: Path) -> str | None:
    from .checkpoint import read_checkpoint_config

    # read_checkpoint_config resolves a run directory and says what is wrong with a path
    return read_checkpoint_config(path).get("task")


def cmd_predict(argv: list[str]) -> int:
    from .tasks.encoder.cli import cmd_predict as run

    return run(argv)


VERBS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "plot": cmd_plot,
    "generate": cmd_generate,
    "translate": cmd_translate,
    "predict": cmd_predict,
    "convert": cmd_convert,
    "plan": cmd_plan,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"reformer: unknown verb {verb!r}; choose from {', '.join(VERBS)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return VERBS[verb](rest)
    except RunStopped as e:
        if e.rank == 0:
            print(f"reformer {verb}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C outside a training loop (or a third signal)
        print(f"reformer {verb}: interrupted", file=sys.stderr, flush=True)
        return exit_code(getattr(e, "signum", signal.SIGINT))
    except TrainingDiverged as e:
        print(f"reformer {verb}: {e}", file=sys.stderr)
        return 3
    except RunWriteFailed as e:
        print(f"reformer {verb}: error: {e}", file=sys.stderr)
        return 4
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as e:
        print(f"reformer {verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_write_error(e):
            raise
        print(f"reformer {verb}: error: {write_error_message(e)}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())

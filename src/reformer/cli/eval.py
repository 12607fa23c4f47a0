"""`reformer eval`: a checkpoint's metrics on a split. Language models and encoders: one
row per hash-round count (--n-hashes), as a table; translation: loss and BLEU of a split
or of --src/--ref files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from ..checkpoint import read_checkpoint_config
from ..files import atomic_write
from ..run_config import ENCODER_TASKS
from ..tasks.encoder.recipe import evaluate_split, load_encoder_run
from ..tasks.lm.recipe import hash_table, task_of
from ..tasks.translation.recipe import eval_pairs, evaluate_translation, load_translation_run
from ..training.common import resolve_device
from ..training.evaluation import per_hash_count, report_eval
from ..training.runs import load_run


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
    """`reformer eval ARGV`: print the metrics (and write them with --json); exit status."""
    args = tyro.cli(EvalArgs, args=argv, prog="reformer eval")
    device = resolve_device(args.device)
    # read_checkpoint_config resolves a run directory and says what is wrong with a path
    task = read_checkpoint_config(Path(args.checkpoint)).get("task")
    if task == "translation":
        return _eval_translation(args, device)
    if task in ENCODER_TASKS:
        return _eval_encoder(args, device)
    model, cfg, ckpt, step = load_run(Path(args.checkpoint), device)
    rows = hash_table(
        model,
        task_of(cfg, args.data),
        tuple(args.n_hashes) or (None,),
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


def _eval_encoder(args: EvalArgs, device: torch.device) -> int:
    """An encoder run (mlm, classify, listops): one row per hash-round count."""
    model, cfg, ckpt, step, state = load_encoder_run(Path(args.checkpoint), device)
    settings = dict(
        data=args.data,
        batch_size=args.batch_size or cfg.eval_batch_size or cfg.batch_size,
        max_batches=args.batches or None,
        precision=args.precision,
        seed=args.seed,
    )
    rows = per_hash_count(
        model,
        tuple(args.n_hashes) or (None,),
        lambda: evaluate_split(model, cfg, state, args.split, **settings),
    )
    title = f"{ckpt} (step {step}), {cfg.task} {args.split} split"
    report_eval(title, rows, ckpt, step, args.split, args.json)
    return 0


def _eval_translation(args: EvalArgs, device: torch.device) -> int:
    """A translation run: loss and sacrebleu BLEU of a split or of --src/--ref files."""
    run = load_translation_run(Path(args.checkpoint), device)
    t = run.config.translation
    pairs = eval_pairs(run.config, args.split, args.src, args.ref)
    beam = args.beam or t.beam
    res = evaluate_translation(
        run.model, run.tokenizer, pairs, beam=beam, alpha=t.length_penalty, device=device
    )
    what = f"{args.src} -> {args.ref}" if args.src else f"{args.split} split"
    print(f"{run.checkpoint} (step {run.step}), {what}, {len(pairs)} sentences, beam {beam}")
    print(f"loss {res['loss']:.4f} nats/token, BLEU {res['bleu']:.2f}")
    print(res["signature"])
    if args.output:
        atomic_write(Path(args.output), "".join(h + "\n" for h in res["hypotheses"]))
    if args.json:
        result = {
            "checkpoint": str(run.checkpoint),
            "step": run.step,
            "data": what,
            "sentences": len(pairs),
            "beam": beam,
            "loss": res["loss"],
            "bleu": res["bleu"],
            "signature": res["signature"],
        }
        atomic_write(Path(args.json), json.dumps(result, indent=2))
    return 0

"""`reformer translate` and the translation side of `reformer eval`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tyro

from ...files import atomic_write
from .recipe import eval_pairs, evaluate_translation, load_translation_run, translate_texts


@dataclass
class TranslateArgs:
    """Translate sentences (one per line) with a translation run's checkpoint."""

    checkpoint: str
    """A run directory (its newest checkpoint is used) or a checkpoint directory."""
    input: str | None = None
    """Source text file, one sentence per line (or a WMT .sgm file); default: stdin."""
    output: str | None = None
    """Write the translations here (default: stdout)."""
    beam: int | None = None
    """Beam width (1: greedy); default: the run's translation.beam."""
    length_penalty: float | None = None
    """GNMT length-penalty exponent alpha; default: the run's."""
    device: str = "auto"


def cmd_translate(argv: list[str]) -> int:
    from ...training.common import resolve_device
    from .data import read_lines

    args = tyro.cli(TranslateArgs, args=argv, prog="reformer translate")
    device = resolve_device(args.device)
    run = load_translation_run(Path(args.checkpoint), device)
    t = run.config.translation
    sentences = read_lines(args.input) if args.input else [x.rstrip("\n") for x in sys.stdin]
    hyps = translate_texts(
        run.model,
        run.tokenizer,
        sentences,
        beam=args.beam or t.beam,
        alpha=t.length_penalty if args.length_penalty is None else args.length_penalty,
        device=device,
    )
    text = "".join(h + "\n" for h in hyps)
    if args.output:
        atomic_write(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def eval_translation(args: Any, device: torch.device) -> int:
    """`reformer eval` on a translation run: loss and sacrebleu BLEU of a split or files."""
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

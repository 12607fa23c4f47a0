"""`reformer translate`: translate sentences (a file, or standard input, one per line)
with a translation run's checkpoint."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from ..files import atomic_write
from ..tasks.translation.data import read_lines
from ..tasks.translation.recipe import load_translation_run, translate_texts
from ..training.common import resolve_device


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

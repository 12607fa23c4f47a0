"""`reformer predict`: classify texts (a file, or standard input) with a classify or
listops run; one JSON line per input, and the accuracy when the inputs are labelled."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import tyro

from ..files import atomic_write
from ..tasks.encoder.data import read_labelled
from ..tasks.encoder.recipe import labelled_set, load_encoder_run, run_tokenizer
from ..training.common import autocast_for, resolve_device


@dataclass
class PredictArgs:
    """Classify texts with a classify or listops run: one JSON line per input."""

    checkpoint: str
    """A run directory (its newest checkpoint) or a checkpoint directory."""
    input: str | None = None
    """A .jsonl file (a "text" field per line), a .tsv file (a header naming a "text"
    column) or any other file of one text per line; default: standard input, one text per
    line. A "label" field or column, when present, is scored (accuracy on stderr)."""
    output: str | None = None
    """Write the predictions (JSON lines) here; default: standard output."""
    probs: bool = False
    """Also give every class's probability."""
    batch_size: int = 16
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    """Seeds the LSH hash rotations: the same command gives the same predictions. (LSH
    draws its rotations per batch, and with model.n_buckets None the bucket count follows
    the batch's longest row: a text's prediction can change with its batch.)"""


def _read_inputs(path: str | None) -> tuple[list[str], list[str] | None]:
    """(texts, labels, or None unless every input has one)."""
    if path is not None and Path(path).suffix.lower() in (".jsonl", ".tsv"):
        rows = read_labelled(path, require_label=False)
        labels = [label for _, label in rows]
        return [t for t, _ in rows], None if None in labels else labels  # type: ignore[return-value]
    if path is not None and not Path(path).is_file():
        raise ValueError(f"--input {path}: no such file")
    text = Path(path).read_text(encoding="utf-8") if path else sys.stdin.read()
    return [line for line in text.splitlines() if line.strip()], None


def cmd_predict(argv: list[str]) -> int:
    args = tyro.cli(PredictArgs, args=argv, prog="reformer predict")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    device = resolve_device(args.device)
    model, cfg, ckpt, _, state = load_encoder_run(Path(args.checkpoint), device)
    if cfg.task == "mlm":
        raise ValueError(
            f"{ckpt} is a masked-LM run: `reformer predict` classifies with a classify or "
            "listops run (fine-tune one from it with --init-from)"
        )
    texts, labels = _read_inputs(args.input)
    if not texts:
        raise ValueError("no input texts to classify")
    names = state["labels"]
    examples = list(zip(texts, labels or [names[0]] * len(texts)))
    dataset = labelled_set(cfg, examples, run_tokenizer(cfg, state), names)
    lines, correct = [], 0
    torch.manual_seed(args.seed)
    with torch.no_grad():
        for ids, mask, y in dataset.eval_batches(args.batch_size):
            with autocast_for(device, args.precision):
                probs = torch.softmax(model(ids.to(device), mask.to(device)).float(), -1).cpu()
            for row, true in zip(probs, y.tolist()):
                k = int(row.argmax())
                correct += k == true
                rec: dict[str, Any] = {"label": names[k], "confidence": round(float(row[k]), 6)}
                if args.probs:
                    rec["probs"] = {n: round(float(p), 6) for n, p in zip(names, row)}
                lines.append(json.dumps(rec))
    text = "".join(line + "\n" for line in lines)
    if args.output:
        atomic_write(Path(args.output), text)
    else:
        sys.stdout.write(text)
    if labels is not None:
        print(
            f"accuracy {correct / len(texts):.4f} on {len(texts)} labelled inputs", file=sys.stderr
        )
    return 0

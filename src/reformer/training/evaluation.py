"""Evaluation helpers every task's recipe and `reformer eval` share: a seeded eval block,
a model evaluated with other hash rounds or attention, one row per hash-round count, and
the table `reformer eval` prints."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..files import atomic_write
from ..model import ReformerLM


@contextlib.contextmanager
def seeded_eval(model: torch.nn.Module, seed: int, device: torch.device) -> Iterator[None]:
    """Eval mode on a forked RNG seeded with `seed` inside the block: hash rotations are
    reproducible and the training RNG stream is untouched (exact resume does not depend on
    when evaluations ran); the model's training mode is restored after."""
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


@contextlib.contextmanager
def evaluated_as(
    model: ReformerLM, n_hashes: int | None = None, attention: str | None = None
) -> Iterator[ReformerLM]:
    """`model` with `n_hashes` hash rounds and its shared-QK layers run as `attention`
    ("lsh" or "full") inside the block, each restored after; None leaves that setting as it
    is (so an evaluation inside another's block keeps the outer setting)."""
    old = model.config.n_hashes
    if n_hashes is not None:
        model.set_n_hashes(n_hashes)
    if attention is not None:
        model.set_attention(attention)
    try:
        yield model
    finally:
        model.set_n_hashes(old)
        if attention is not None:
            model.set_attention(None)


def per_hash_count(
    model: ReformerLM,
    counts: tuple[int | str | None, ...],
    evaluate_one: Callable[[], dict[str, float]],
) -> list[dict[str, float]]:
    """One row of `evaluate_one()`'s metrics per entry of `counts`: a number evaluates the
    shared-QK layers with LSH and that many rounds (even when trained with full shared-QK
    attention), "full" with full attention, None as trained (row label "trained")."""
    rows = []
    for n in counts:
        if n not in (None, "full") and (isinstance(n, bool) or not isinstance(n, int)):
            raise ValueError(f"evaluation hash rounds must be ints or 'full'; got {n!r}")
        as_int = isinstance(n, int)
        with evaluated_as(model, n if as_int else None, "lsh" if as_int else n):
            res = evaluate_one()
        rows.append({"n_hashes": "trained" if n is None else n} | res)
    return rows


def report_eval(
    title: str, rows: list[dict[str, float]], ckpt: Path, step: int, split: str, json_path
) -> None:
    """`reformer eval`'s output: the title line and the table, and the rows as JSON in
    `json_path` when given."""
    print(title)
    print(format_table(rows))
    if json_path:
        result = {"checkpoint": str(ckpt), "step": step, "split": split, "rows": rows}
        atomic_write(Path(json_path), json.dumps(result, indent=2))


def format_table(rows: list[dict[str, float]]) -> str:
    keys = [k for k in rows[0] if k != "n_hashes"]
    w = max(10, *map(len, keys))  # columns as wide as the longest metric name
    head = "n_hashes  " + "  ".join(f"{k:>{w}}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['n_hashes']:>8}  " + "  ".join(f"{r[k]:>{w}.4f}" for k in keys))
    return "\n".join(lines)

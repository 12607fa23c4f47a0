"""Small helpers shared by the tests."""

import json
from pathlib import Path

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| (absolute when b is 0)."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def logged_losses(run: Path) -> dict[int, float]:
    """The training losses a run logged in DIR/metrics.jsonl, by step."""
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in recs if "loss" in r}

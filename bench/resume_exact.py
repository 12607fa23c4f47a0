"""Bit-exact resume after kill -9, in many fresh process pairs (not a CI test: it runs for
tens of minutes). Each pair is an uninterrupted run and a run killed with SIGKILL once it
has written a checkpoint and moved on, then resumed with --resume; every logged loss must be
equal, bit for bit, and every uninterrupted run must equal the first (fresh processes agree).

    python -m bench.resume_exact --pairs 50

The configuration is tests/test_cli.py's kill -9 test (duplication, 24 steps, dropout,
a checkpoint every 3 steps). Writes bench/results/resume_exact.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reformer.checkpoint import latest_checkpoint
from reformer.files import atomic_write

ARGS = [
    "train", "--preset", "duplication-small", "--seq-len", "16", "--model.max-seq-len", "16",
    "--model.n-hashes", "2", "--steps", "24", "--batch-size", "4", "--checkpoint-every", "3",
    "--eval-every", "5", "--log-every", "1", "--model.dropout", "0.1", "--eval-hashes", "2",
    "--model.d-model", "16", "--model.d-ff", "16", "--model.n-heads", "2",
    "--model.chunk-len", "8", "--no-progress", "--eval-batches", "1",
]  # fmt: skip


def losses(run: Path) -> dict[int, float]:
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def reformer(*args: str) -> None:
    cmd = [sys.executable, "-m", "reformer", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def killed_and_resumed(run: Path, after_step: int) -> int:
    """Train into `run`, kill -9 once a checkpoint of at least `after_step` exists, resume."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "reformer", *ARGS, "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None:
        ck = latest_checkpoint(run) if run.exists() else None
        if ck is not None and int(ck.name.split("-")[1]) >= after_step:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(run).name.split("-")[1])
    reformer(*ARGS, "--out", str(run), "--resume")
    return killed_at


def differences(a: dict[int, float], b: dict[int, float]) -> list[tuple[int, float, float]]:
    return [(s, a[s], b.get(s, float("nan"))) for s in a if a[s] != b.get(s)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--out", default="bench/results/resume_exact.json")
    args = p.parse_args()
    print(f"python -m bench.resume_exact --pairs {args.pairs}", flush=True)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            ref, run = Path(tmp) / f"ref{i}", Path(tmp) / f"run{i}"
            reformer(*ARGS, "--out", str(ref))
            killed_at = killed_and_resumed(run, after_step=3 + 3 * (i % 6))
            a, b = losses(ref), losses(run)
            first = a if first is None else first
            row = {
                "pair": i,
                "killed_at": killed_at,
                "resume_differs": differences(a, b),
                "ref_differs_from_first": differences(first, a),
            }
            rows.append(row)
            same = not row["resume_differs"] and not row["ref_differs_from_first"]
            print(f"pair {i}: killed at {killed_at}, {'identical' if same else row}", flush=True)
    exact = sum(not r["resume_differs"] and not r["ref_differs_from_first"] for r in rows)
    print(f"{exact}/{len(rows)} pairs identical")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps({"args": ARGS, "identical": exact, "pairs": rows}, indent=1))


if __name__ == "__main__":
    main()

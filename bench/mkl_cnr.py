"""What reproducible oneMKL costs (src/reformer/reproducible.py): the best 4096 x 4096 fp32
matmul rate and one LM training step (the issue's shape: 1 layer, L = 16,384, d_model 256, 4
heads, d_ff 1024, LSH-4, chunk 64, reversible, batch 1, loss + backward), with oneMKL's
defaults (MKL_CBWR and MKL_DYNAMIC set empty: CNR off, dynamic threads on) and with the
library's settings (CNR AUTO, dynamic threads off), in alternating fresh processes.

    python -m bench.mkl_cnr [--rounds 3]

Prints a table of medians over the rounds and the ratio; writes bench/results/mkl_cnr.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench._harness import RESULTS, command_line, environment, write_json

MODES = {"defaults": {"MKL_CBWR": "", "MKL_DYNAMIC": ""}, "reproducible": {}}


def worker() -> None:
    import torch

    from reformer import ReformerConfig, ReformerLM

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(5))
    cfg = ReformerConfig(
        vocab_size=256, d_model=256, n_heads=4, d_ff=1024, n_layers=1, max_seq_len=16384,
        attention="lsh", n_hashes=4, chunk_len=64,
    )  # fmt: skip
    model = ReformerLM(cfg)
    ids = torch.randint(0, 256, (1, 16384))

    def step() -> None:
        model.loss(ids, ids).backward()

    step()  # warm-up (and the tile kernels' compilation)
    steps = [_seconds(step) for _ in range(3)]
    print(json.dumps({"gflops": 2 * 4096**3 / best / 1e9, "step_s": statistics.median(steps)}))


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker()
    print(command_line(), flush=True)
    got: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, env in MODES.items():
            out = subprocess.run(
                [sys.executable, "-m", "bench.mkl_cnr", "--worker"],
                env=os.environ | env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            got[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(mode, got[mode][-1], flush=True)
    rows = {
        mode: {k: statistics.median(r[k] for r in runs) for k in ("gflops", "step_s")}
        for mode, runs in got.items()
    }
    print("| oneMKL | 4096^2 matmul GFLOP/s | 1-layer 16K step (s) |\n|---|---|---|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['gflops']:.0f} | {row['step_s']:.3f} |")
    ratio = rows["reproducible"]["step_s"] / rows["defaults"]["step_s"]
    print(f"step time, reproducible over defaults: {ratio:.3f}")
    write_json(
        RESULTS / "mkl_cnr.json",
        {"command": command_line(), "env": environment(), "runs": got, "medians": rows},
    )


if __name__ == "__main__":
    main()

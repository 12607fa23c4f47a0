"""bf16 against fp32 over a whole training run (issue 22): the enwik8-small preset, 300
steps, the same data order and seed, once per precision.

    python -m repro.precision [--data ../shared/data] [--steps 300]

Writes results/precision/{fp32,bf16}/ (config, metrics.jsonl) and results/precision/
summary.md: validation bpc at every evaluation and the training time of each run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from repro.run import DEFAULT_DATA, ROOT, atomic_write, eval_curve, reformer, train_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.precision", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    root = args.results / "precision"
    enwik8 = args.data / "enwik8" / "enwik8-prefix-4M"
    curves, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        out = root / precision
        reformer("train", "--preset", "enwik8-small", "--data", str(enwik8), "--steps",
                 str(args.steps), "--precision", precision, "--out", str(out), "--resume",
                 "--no-progress")  # fmt: skip
        curves[precision] = dict(zip(*eval_curve(out, "eval_bpc")))
        seconds[precision] = train_seconds(out)
    lines = ["| step | fp32 bpc | bf16 bpc | bf16 - fp32 |", "|---|---|---|---|"]
    for step, fp32 in curves["fp32"].items():
        bf16 = curves["bf16"].get(step, float("nan"))
        lines.append(f"| {step} | {fp32:.4f} | {bf16:.4f} | {bf16 - fp32:+.4f} |")
    lines.append("")
    lines.append("Training time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()))
    text = "\n".join(lines)
    atomic_write(root / "summary.json", json.dumps({"bpc": curves, "train_s": seconds}, indent=2))
    atomic_write(root / "summary.md", "# enwik8-small, bf16 against fp32\n\n"
                 f"`python -m repro.precision --steps {args.steps}`\n\n{text}\n")  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

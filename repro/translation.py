"""Issue 8's experiment: the multi30k-small model, reversible against ordinary residual layers.

    python -m repro.translation [--steps N] [--data ../shared/data]

Both runs train at the same time, one CPU thread each (so their wall-clock is comparable),
from the same seed and the same batches; then each is scored with sacrebleu on Multi30k's
test_2016_flickr and on the real newstest2014 (beam 4). Results: results/translation/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from repro.run import DEFAULT_DATA, ROOT, atomic_write, records

RUNS = {"reversible": "--model.reversible", "ordinary": "--model.no-reversible"}


def launch_all(commands: dict[str, list[str]], log_dir: Path) -> dict[str, float]:
    """Run `reformer` commands concurrently, one thread each; returns wall-clock seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs, started, wall = {}, {}, {}
    for name, args in commands.items():
        print("$ OMP_NUM_THREADS=1 reformer " + " ".join(args), flush=True)
        log = open(log_dir / f"{name}.log", "a")  # noqa: SIM115 (closed below)
        procs[name] = (
            subprocess.Popen(
                [sys.executable, "-m", "reformer", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            log,
        )
        started[name] = time.perf_counter()
    while len(wall) < len(procs):  # note each process's own finishing time
        for name, (proc, log) in procs.items():
            if name in wall or proc.poll() is None:
                continue
            wall[name] = time.perf_counter() - started[name]
            log.close()
            if proc.returncode:
                raise SystemExit(
                    f"{name}: reformer exited with {proc.returncode}; see {log_dir / name}.log"
                )
        time.sleep(1)
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.translation")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval-every", type=int, default=300)
    args = parser.parse_args(argv)
    multi30k = args.data / "translation" / "multi30k"
    news = args.data / "translation" / "newstest2014"
    if not multi30k.is_dir():
        parser.error(f"{multi30k} not found: pass --data with the shared data folder")
    root = args.results / "translation"
    root.mkdir(parents=True, exist_ok=True)
    common = [
        "--preset",
        "multi30k-small",
        "--data",
        str(multi30k),
        "--steps",
        str(args.steps),
        "--eval-every",
        str(args.eval_every),
        "--no-progress",
        "--resume",
    ]
    launch_all(
        {n: ["train", *common, flag, "--out", str(root / n)] for n, flag in RUNS.items()}, root
    )
    # Training time from each run's own metrics (its last step's elapsed_s).
    train_wall = {
        n: [r for r in records(root / n) if "elapsed_s" in r][-1]["elapsed_s"] for n in RUNS
    }
    evals: dict[str, dict] = {}
    for what, extra in {
        "test_2016_flickr": ["--split", "test"],
        "newstest2014": [
            "--src",
            str(news / "newstest2014-deen-src.en.sgm"),
            "--ref",
            str(news / "newstest2014-deen-ref.de.sgm"),
        ],
    }.items():
        cmds = {
            n: [
                "eval",
                "--checkpoint",
                str(root / n),
                *extra,
                "--beam",
                "4",
                "--json",
                str(root / n / f"bleu-{what}.json"),
                "--output",
                str(root / n / f"hyp-{what}.de"),
            ]
            for n in RUNS
        }
        eval_wall = launch_all(cmds, root)
        for n in RUNS:
            res = json.loads((root / n / f"bleu-{what}.json").read_text())
            evals.setdefault(n, {})[what] = res | {"eval_wall_s": eval_wall[n]}
    curves = {
        n: [(r["step"], r["eval_bleu"]) for r in records(root / n) if "eval_bleu" in r]
        for n in RUNS
    }
    summary = {
        "command": f"python -m repro.translation --steps {args.steps}",
        "train_wall_s": train_wall,
        "bleu": evals,
        "val_bleu_curve": curves,
    }
    rows = [
        "| residual layers | BLEU test_2016_flickr | BLEU newstest2014 | training wall-clock |",
        "|---|---|---|---|",
    ]
    for n in RUNS:
        e = evals[n]
        rows.append(
            f"| {n} | {e['test_2016_flickr']['bleu']:.2f} | "
            f"{e['newstest2014']['bleu']:.2f} | {train_wall[n] / 60:.0f} min |"
        )
    sig = evals["reversible"]["test_2016_flickr"]["signature"]
    text = "\n".join(rows) + f"\n\nBeam 4, length penalty 0.6; sacrebleu {sig}\n"
    summary["table_md"] = text
    atomic_write(root / "summary.json", json.dumps(summary, indent=2))
    atomic_write(
        root / "summary.md",
        f"# Multi30k en-de, {args.steps} steps\n\n`{summary['command']}`\n\n{text}",
    )
    plot(curves, root / "curves.png")
    print(text)
    return 0


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([s for s, _ in pts], [b for _, b in pts], marker="o", ms=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation BLEU (greedy)")
    ax.set_title("Multi30k en-de, multi30k-small: reversible vs ordinary")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

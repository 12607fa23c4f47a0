"""The paper's evidence at this machine's scale (issue 7): one command per experiment.

    python -m repro.run duplication      # Table 2: train full / LSH-1/2/4, evaluate each 5 ways
    python -m repro.run ablations        # Figure 3: shared-QK and reversible vs the baseline
    python -m repro.run lsh-vs-full      # LSH-4 (window, chunk) against full attention
    python -m repro.run lsh-vs-full-long # LSH-4/8 against full, 3000 steps (a decayed tail)
    python -m repro.run listops          # encoders on ListOps: LSH-2/4, local, full
    python -m repro.run mlm              # masked LM on the enwik8 prefix: LSH-4 against full
    python -m repro.run all

Every run is an ordinary `reformer train` in a fresh process, written to
results/EXPERIMENT/RUN/ (config.yaml, metrics.jsonl, plots; checkpoints are not committed)
and resumed when it exists, so an interrupted experiment continues where it stopped. The
summary of each experiment is results/EXPERIMENT/summary.{json,md} plus a PNG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"


@dataclass
class Run:
    name: str
    args: list[str]
    label: str = ""


@dataclass
class Experiment:
    name: str
    title: str
    common: list[str]
    runs: list[Run]
    eval_args: list[str] = field(default_factory=list)


def experiments(data: Path) -> dict[str, Experiment]:
    enwik8 = str(data / "enwik8" / "enwik8-prefix-4M")
    # A byte-level model small enough for many CPU steps: 2 layers, d_model 128.
    e8_model = [
        "--model.d-model",
        "128",
        "--model.d-ff",
        "512",
        "--model.n-heads",
        "4",
        "--model.n-layers",
        "2",
        "--model.dropout",
        "0.0",
    ]
    return {
        "duplication": Experiment(
            "duplication",
            "Duplication task (paper Table 2), length 512",
            [
                "--preset",
                "duplication-small",
                "--seq-len",
                "512",
                "--model.max-seq-len",
                "512",
                "--model.chunk-len",
                "32",
                "--steps",
                "600",
                "--eval-every",
                "100",
            ],
            [
                Run("full", ["--model.attention", "full"], "Full attention"),
                Run("lsh-4", ["--model.n-hashes", "4"], "LSH-4"),
                Run("lsh-2", ["--model.n-hashes", "2"], "LSH-2"),
                Run("lsh-1", ["--model.n-hashes", "1"], "LSH-1"),
            ],
            ["--n-hashes", "full", "8", "4", "2", "1", "--batches", "16"],
        ),
        "ablations": Experiment(
            "ablations",
            "enwik8 prefix, full attention, length 512, 2 layers (paper Figure 3)",
            [
                "--preset",
                "enwik8-small",
                "--data",
                enwik8,
                "--seq-len",
                "512",
                "--model.max-seq-len",
                "512",
                "--model.attention",
                "full",
                "--batch-size",
                "8",
                "--steps",
                "600",
                "--eval-every",
                "100",
                "--eval-batches",
                "8",
                *e8_model,
            ],
            [
                Run(
                    "baseline",
                    ["--model.shared-qk", "False", "--model.no-reversible"],
                    "Transformer (separate Q/K, ordinary residual)",
                ),
                Run(
                    "shared-qk",
                    ["--model.shared-qk", "True", "--model.no-reversible"],
                    "shared-QK attention",
                ),
                Run(
                    "reversible",
                    ["--model.shared-qk", "False", "--model.reversible"],
                    "reversible layers",
                ),
            ],
            ["--batches", "32"],
        ),
        "lsh-vs-full": Experiment(
            "lsh-vs-full",
            "enwik8 prefix, length 2048, 2 reversible layers: LSH-4 against full attention",
            [
                "--preset",
                "enwik8-small",
                "--data",
                enwik8,
                "--seq-len",
                "2048",
                "--model.max-seq-len",
                "2048",
                "--batch-size",
                "2",
                "--steps",
                "300",
                "--eval-every",
                "50",
                "--eval-batches",
                "8",
                "--model.chunk-len",
                "64",
                *e8_model,
            ],
            [
                Run("full", ["--model.attention", "full"], "full shared-QK attention"),
                Run(
                    "lsh-4-window",
                    [
                        "--model.attention",
                        "lsh",
                        "--model.n-hashes",
                        "4",
                        "--model.lsh-mode",
                        "window",
                    ],
                    "LSH-4, window (strict)",
                ),
                Run(
                    "lsh-4-chunk",
                    [
                        "--model.attention",
                        "lsh",
                        "--model.n-hashes",
                        "4",
                        "--model.lsh-mode",
                        "chunk",
                    ],
                    "LSH-4, chunk (leaky)",
                ),
            ],
            ["--batches", "32"],
        ),
    }


# --- running ---------------------------------------------------------------------------------
def reformer(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "reformer", *args]
    print("$ reformer " + " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_run(exp: Experiment, run: Run, out: Path) -> float:
    """Train (or finish) one run; returns its training wall-clock in seconds, summed over
    the sessions that trained it (elapsed_s restarts when a run is resumed)."""
    reformer(
        "train",
        *exp.common,
        *run.args,
        "--out",
        str(out),
        "--resume",
        "--no-progress",
        "--eval-hashes",
    )
    return train_seconds(out)


def train_seconds(run_dir: Path, upto: int | None = None) -> float:
    """A run's training seconds from its log (up to step `upto` if given), summed over the
    sessions that trained it (elapsed_s restarts when a run is resumed)."""
    total, last = 0.0, 0.0
    for r in records(run_dir):
        if "elapsed_s" in r and (upto is None or r["step"] <= upto):
            if r["elapsed_s"] < last:
                total += last
            last = r["elapsed_s"]
    return total + last


def step_seconds(exp: Experiment, run: Run, scratch: Path, steps: int = 30) -> float:
    """Median seconds per training step, measured alone in a fresh process (10-step windows
    after the first), so the equal-wall-clock comparison does not depend on what else the
    machine did while the real run trained."""
    shutil.rmtree(scratch, ignore_errors=True)  # a fresh run every time
    scratch.mkdir(parents=True)
    reformer(
        "train",
        *exp.common,
        *run.args,
        "--steps",
        str(steps),
        "--eval-every",
        "0",
        "--log-every",
        "10",
        "--out",
        str(scratch),
        "--no-progress",
        "--eval-hashes",
        "--checkpoint-every",
        str(steps),
    )
    recs = [r for r in records(scratch) if "tokens_per_s" in r]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(recs)]
    return median(times) / 10


def evaluate_run(exp: Experiment, out: Path) -> list[dict]:
    target = out / "eval.json"
    reformer("eval", "--checkpoint", str(out), *exp.eval_args, "--json", str(target))
    return json.loads(target.read_text())["rows"]


def causality_probe(out: Path, trials: int = 4) -> float:
    """Largest change of any logit at positions < j when token j of a real validation sequence
    changes (j in the middle): 0 means strictly causal. Runs on the trained checkpoint."""
    import torch

    from reformer.tasks.lm.data import build_task
    from reformer.training.runs import load_run

    model, cfg, _, _ = load_run(out, torch.device("cpu"))
    task = build_task(cfg.task, cfg.data, cfg.seq_len, cfg.image_side)
    ids, _ = next(iter(task.eval_batches("val", trials, 1, seed=0)))
    j = ids.shape[1] // 2
    worst = 0.0
    for t in range(trials):
        other = ids[t : t + 1].clone()
        other[0, j] = (other[0, j] + 1 + t) % cfg.model.vocab_size
        with torch.no_grad():
            torch.manual_seed(t)
            a = model(ids[t : t + 1])
            torch.manual_seed(t)
            b = model(other)
        worst = max(worst, float((a[:, :j] - b[:, :j]).abs().max()))
    return worst


# --- summaries -------------------------------------------------------------------------------
PAPER_TABLE2 = {  # accuracy (%) as published: rows trained with, columns evaluated with
    "full": {"full": 100.0, 8: 94.8, 4: 92.5, 2: 76.9, 1: 52.5},
    "lsh-4": {"full": 0.8, 8: 100.0, 4: 99.9, 2: 99.4, 1: 91.9},
    "lsh-2": {"full": 0.8, 8: 100.0, 4: 99.9, 2: 98.1, 1: 86.8},
    "lsh-1": {"full": 0.8, 8: 99.9, 4: 99.6, 2: 94.8, 1: 77.9},
}


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def eval_curve(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    recs = [r for r in records(run_dir) if key in r]
    return [r["step"] for r in recs], [r[key] for r in recs]


def plot(exp: Experiment, root: Path, key: str, ylabel: str, seconds: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if seconds else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    for run in exp.runs:
        steps, values = eval_curve(root / run.name, key)
        axes[0][0].plot(steps, values, marker="o", ms=3, label=run.label or run.name)
        if seconds:
            axes[0][1].plot(
                [s * seconds[run.name] / 60 for s in steps],
                values,
                marker="o",
                ms=3,
                label=run.label or run.name,
            )
    axes[0][0].set_xlabel("training step")
    if seconds:
        axes[0][1].set_xlabel("training time on this machine (minutes, measured step time)")
    for ax in axes[0]:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(exp.title)
    fig.tight_layout()
    tmp = root / "curves.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, root / "curves.png")
    plt.close(fig)


def summarise_duplication(exp: Experiment, root: Path, evals: dict, wall: dict) -> str:
    cols = ["full", 8, 4, 2, 1]
    head = "| trained with | " + " | ".join(
        "full attention" if c == "full" else f"LSH-{c}" for c in cols
    )
    lines = [head + " |", "|---" * (len(cols) + 1) + "|"]
    for run in exp.runs:
        acc = {r["n_hashes"]: 100 * r["accuracy"] for r in evals[run.name]}
        paper = PAPER_TABLE2[run.name]
        cells = [f"{acc[c]:.1f}% ({paper[c]}%)" for c in cols]
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Accuracy on the second copy, ours (the paper's in brackets). Training "
        "wall-clock: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items())
    )
    return "\n".join(lines)


def summarise_bpc(exp: Experiment, root: Path, evals: dict, wall: dict, extra: dict) -> str:
    base = exp.runs[0].name
    bpc = {name: rows[0]["bpc"] for name, rows in evals.items()}
    lines = [
        "| run | val bpc (32 batches) | minus " + base + " | s/step | training wall-clock |",
        "|---|---|---|---|---|",
    ]
    for run in exp.runs:
        sec = extra.get("step_seconds", {}).get(run.name)
        lines.append(
            f"| {run.label} | {bpc[run.name]:.4f} | {bpc[run.name] - bpc[base]:+.4f} | "
            f"{f'{sec:.2f}' if sec else '-'} | {wall[run.name] / 60:.1f} min |"
        )
    return "\n".join(lines)


def at_time(run_dir: Path, sec_per_step: float, budget_s: float) -> tuple[int, float]:
    """The last evaluation reached within `budget_s` of training at `sec_per_step`."""
    steps, values = eval_curve(run_dir, "eval_bpc")
    best = [(s, v) for s, v in zip(steps, values) if s * sec_per_step <= budget_s + 1e-9]
    return best[-1] if best else (0, float("nan"))


def run_experiment(name: str, data: Path, results: Path) -> dict:
    exp = experiments(data)[name]
    root = results / name
    root.mkdir(parents=True, exist_ok=True)
    summary_path = root / "summary.json"
    wall = {}
    evals = {}
    for run in exp.runs:
        out = root / run.name
        wall[run.name] = train_run(exp, run, out)
        evals[run.name] = evaluate_run(exp, out)
    summary: dict = {
        "experiment": name,
        "title": exp.title,
        "command": f"python -m repro.run {name}",
        "common_args": exp.common,
        "runs": {r.name: r.args for r in exp.runs},
        "train_wall_s": wall,
        "final_eval": evals,
    }
    if name == "duplication":
        summary["paper_table2"] = {
            k: {str(c): v for c, v in d.items()} for k, d in PAPER_TABLE2.items()
        }
        text = summarise_duplication(exp, root, evals, wall)
        plot(exp, root, "eval_accuracy", "validation accuracy (trained hash count)")
    else:
        seconds = {r.name: step_seconds(exp, r, results / "tmp" / name / r.name) for r in exp.runs}
        summary["step_seconds"] = seconds
        text = summarise_bpc(exp, root, evals, wall, summary)
        if name == "lsh-vs-full":
            lsh = exp.runs[1].name
            budget = seconds[lsh] * int(exp.common[exp.common.index("--steps") + 1])
            equal = {r.name: at_time(root / r.name, seconds[r.name], budget) for r in exp.runs}
            summary["equal_wall_clock"] = {"budget_s": budget, "at": equal}
            summary["causality_max_logit_change"] = {
                r.name: causality_probe(root / r.name) for r in exp.runs[1:]
            }
            text += f"\n\nAt equal training time ({budget / 60:.1f} min, LSH-4 window's):\n\n"
            text += "| run | step reached | val bpc (8 batches) |\n|---|---|---|\n"
            for r in exp.runs:
                s, v = equal[r.name]
                text += f"| {r.label} | {s} | {v:.4f} |\n"
            text += (
                "\nStrict-causality probe on the trained models (largest change of an "
                "earlier logit when one token changes):\n\n"
            )
            for k, v in summary["causality_max_logit_change"].items():
                text += f"- {k}: {v:.3g}\n"
        plot(exp, root, "eval_bpc", "validation bits per character", seconds)
    summary["table_md"] = text
    atomic_write(summary_path, json.dumps(summary, indent=2))
    atomic_write(root / "summary.md", f"# {exp.title}\n\n`{summary['command']}`\n\n{text}\n")
    print(text, flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "experiment",
        choices=[
            "duplication",
            "ablations",
            "lsh-vs-full",
            "lsh-vs-full-long",
            "listops",
            "mlm",
            "all",
        ],
    )
    parser.add_argument("--minutes", type=float, default=600, help="lsh-vs-full-long: stop after")
    parser.add_argument("--stage", type=int, default=200, help="lsh-vs-full-long: steps per stage")
    parser.add_argument("--steps", type=int, help="listops, mlm: training steps per run")
    parser.add_argument("--length", type=int, default=1024, help="listops: longest expression")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="the shared data folder (enwik8/enwik8-prefix-4M)",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    names = (
        ["duplication", "ablations", "lsh-vs-full"]
        if args.experiment == "all"
        else [args.experiment]
    )
    needs_data = [n for n in names if n not in ("duplication", "listops")]
    if needs_data and not (args.data / "enwik8").is_dir():
        parser.error(f"{args.data / 'enwik8'} not found: pass --data with the shared data folder")
    for name in names:
        try:
            if name == "lsh-vs-full-long":
                from repro import long

                long.run(args.data, args.results, args.stage, 2.5, args.minutes)
                continue
            if name in ("listops", "mlm"):
                from repro import encoder

                steps = args.steps or (500 if name == "listops" else 300)
                encoder.run(name, args.data, args.results, steps, args.length)
                continue
            run_experiment(name, args.data, args.results)
        except subprocess.CalledProcessError as e:
            print(e.stdout[-3000:], e.stderr[-3000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"{name}: a reformer command failed (exit {e.returncode})") from e
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

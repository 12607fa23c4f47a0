"""Issue 15's evidence: encoders on ListOps and masked-LM pre-training on the enwik8 prefix.

    python -m repro.run listops [--length 1024] [--steps 500]   # LSH-2, LSH-4, local, full
    python -m repro.run mlm [--steps 300]                        # LSH-4 against full attention

Each run is an ordinary `reformer train` in a fresh process, in results/EXPERIMENT/RUN/
(resumed when it exists); then `reformer eval` on the test split, and a separate short run
alone in a fresh process for the step time and the peak RSS (os.wait4's ru_maxrss of that
process), so the figures do not depend on what else the machine did meanwhile. Summary:
results/EXPERIMENT/summary.{json,md} and curves.png.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from repro.run import atomic_write, records, train_seconds

# Long Range Arena (Tay et al. 2021), ListOps test accuracy at length 2K, as published.
LRA_LISTOPS = {"full": 36.37, "lsh": 37.27, "local": 15.82}

LISTOPS_RUNS = {
    "lsh-2": (["--model.attention", "lsh", "--model.n-hashes", "2"], "LSH-2"),
    "lsh-4": (["--model.attention", "lsh", "--model.n-hashes", "4"], "LSH-4"),
    "local": (["--model.attention", "local", "--model.shared-qk", "False"], "local"),
    "full": (["--model.attention", "full", "--model.shared-qk", "False"], "full (Transformer)"),
}
MLM_RUNS = {
    "lsh-4": (["--model.attention", "lsh", "--model.n-hashes", "4"], "LSH-4"),
    "full": (["--model.attention", "full"], "full shared-QK"),
}


def listops_common(length: int, steps: int) -> list[str]:
    return [
        "--preset", "listops-small", "--seq-len", str(length),
        "--model.max-seq-len", str(length), "--model.chunk-len", "64",
        "--encoder.listops-min-len", str(length // 4), "--steps", str(steps),
        "--batch-size", "8", "--eval-batches", "16",
        "--eval-every", str(max(1, steps // 6)), "--checkpoint-every", str(max(1, steps // 6)),
    ]  # fmt: skip


def mlm_common(data: Path, steps: int) -> list[str]:
    return [
        "--preset", "mlm-small", "--data", str(data / "enwik8" / "enwik8-prefix-4M"),
        "--model.n-layers", "2", "--model.d-model", "128", "--model.d-ff", "512",
        "--steps", str(steps), "--eval-every", str(max(1, steps // 6)), "--eval-batches", "8",
        "--checkpoint-every", str(max(1, steps // 6)),
    ]  # fmt: skip


def reformer(*args: str) -> subprocess.CompletedProcess:
    print("$ reformer " + " ".join(args), flush=True)
    cmd = [sys.executable, "-m", "reformer", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def measured(args: list[str]) -> tuple[float, int]:
    """Run `reformer ARGS` alone; (wall seconds, peak RSS in bytes of that process)."""
    print("$ reformer " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reformer", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"reformer {' '.join(args)} failed: {proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024  # Linux: kilobytes


def step_figures(common: list[str], args: list[str], scratch: Path, steps: int = 12):
    """(median seconds per step over steps 3.., peak RSS bytes) of a fresh short run."""
    shutil.rmtree(scratch, ignore_errors=True)
    _, rss = measured([
        "train", *common, *args, "--steps", str(steps), "--eval-every", "0", "--log-every", "1",
        "--checkpoint-every", str(steps), "--out", str(scratch), "--no-progress",
    ])  # fmt: skip
    t = [r["elapsed_s"] for r in records(scratch) if "tokens_per_s" in r]
    per_step = median(b - a for a, b in itertools.pairwise(t[2:]))
    shutil.rmtree(scratch, ignore_errors=True)
    return per_step, rss


def _plot(root: Path, runs: dict, key: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (_, label) in runs.items():
        recs = [r for r in records(root / name) if key in r]
        ax.plot([r["step"] for r in recs], [r[key] for r in recs], marker="o", ms=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    tmp = root / "curves.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, root / "curves.png")
    plt.close(fig)


def run(name: str, data: Path, results: Path, steps: int, length: int) -> dict:
    listops_task = name == "listops"
    runs = LISTOPS_RUNS if listops_task else MLM_RUNS
    common = listops_common(length, steps) if listops_task else mlm_common(data, steps)
    root = results / name
    root.mkdir(parents=True, exist_ok=True)
    rows = {}
    for run_name, (args, label) in runs.items():
        out = root / run_name
        reformer("train", *common, *args, "--out", str(out), "--resume", "--no-progress")
        wall = train_seconds(out)  # from the run's log: a finished run retrains nothing
        target = out / "eval.json"
        reformer("eval", "--checkpoint", str(out), "--split", "test", "--batches", "0"
                 if listops_task else "32", "--json", str(target))  # fmt: skip
        test = json.loads(target.read_text())["rows"][0]
        sec, rss = step_figures(common, args, results / "tmp" / name / run_name)
        rows[run_name] = {"label": label, "test": test, "s_per_step": sec, "peak_rss": rss}
        rows[run_name]["train_wall_s"] = wall
    if listops_task:
        head = "| attention | test accuracy | macro-F1 | LRA (2K) | s/step | peak RSS |"
        lines = [head, "|---|---|---|---|---|---|"]
        for run_name, r in rows.items():
            lra = LRA_LISTOPS.get(run_name.split("-")[0])
            lines.append(
                f"| {r['label']} | {100 * r['test']['accuracy']:.1f}% | "
                f"{r['test']['macro_f1']:.3f} | {f'{lra:.1f}%' if lra else '-'} | "
                f"{r['s_per_step']:.2f} | {r['peak_rss'] / 2**20:,.0f} MiB |"
            )
        key, ylabel = "eval_accuracy", "validation accuracy"
    else:
        head = "| attention | test masked accuracy | test bits/masked byte | s/step | peak RSS |"
        lines = [head, "|---|---|---|---|---|"]
        for r in rows.values():
            t = r["test"]
            lines.append(
                f"| {r['label']} | {100 * t['masked_accuracy']:.1f}% | {t['bits']:.3f} | "
                f"{r['s_per_step']:.2f} | {r['peak_rss'] / 2**20:,.0f} MiB |"
            )
        key, ylabel = "eval_masked_accuracy", "validation masked-token accuracy"
    title = (
        f"ListOps, length {length}, {steps} steps" if listops_task
        else f"masked LM, enwik8 prefix, 1,024 bytes, {steps} steps"
    )  # fmt: skip
    _plot(root, runs, key, ylabel, title)
    text = "\n".join(lines)
    command = f"python -m repro.run {name} --steps {steps}"
    command += f" --length {length}" if listops_task else ""
    summary = {"experiment": name, "title": title, "command": command, "common_args": common}
    summary |= {"runs": rows, "table_md": text}
    atomic_write(root / "summary.json", json.dumps(summary, indent=2))
    atomic_write(root / "summary.md", f"# {title}\n\n`{command}`\n\n{text}\n")
    print(text, flush=True)
    return summary

"""LSH against full attention past the early plateau (issue 26; the paper's Figure 4).

    python -m repro.run lsh-vs-full-long [--minutes M] [--stage 200]

Three runs of one model, data order and seed: full (shared-QK) attention, LSH-4 and LSH-8
(window mode), trained in stages of `--stage` steps, all three to the same step before any goes
further, so that they always have evaluations at common steps. Every stage resumes the runs
(`reformer train --resume`), so the experiment stops anywhere (`--minutes`, Ctrl-C) and
continues from there when the command is run again. It ends at step END, where the learning
rate's decay ends; the summary says which runs are at or below the target (2.5 bpc) on
validation there. Then: each final checkpoint evaluated with 1, 2, 4, 8 and 16
hash rounds and full attention, and the share of the trained full-attention model's attention
mass that falls outside LSH's candidate sets (where a gap between LSH and full would come from).

The equal-time axis uses each run's own training seconds: the runs train one after another
in the same conditions (`taskset` one core and one thread when the script is started so).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from repro.run import (
    Experiment,
    Run,
    atomic_write,
    eval_curve,
    evaluate_run,
    plot,
    reformer,
    train_seconds,
)

NAME = "lsh-vs-full-long"
HASH_COUNTS = (1, 2, 4, 8, 16)

# The model (chosen by brief measurements: docs/reproductions.md, lr_sweep.txt): 3 reversible
# layers of d_model 256 at length 2048, 4 x 2048 bytes per step, bf16. The learning rate: warm-up,
# constant to DECAY_START, then linear decay to a tenth over the last DECAY_STEPS (a schedule
# fixed in absolute steps, so that the staged runs follow one schedule). The runs first trained
# at the constant rate alone; the decay was added at step 2400, where the curves had flattened
# (docs/reproductions.md); steps 1-2400 are the same under either schedule.
DECAY_START, DECAY_STEPS = 2400, 600
END = DECAY_START + DECAY_STEPS
MODEL = [
    "--preset", "enwik8-small",
    "--seq-len", "2048", "--model.max-seq-len", "2048",
    "--batch-size", "4",
    "--model.d-model", "256", "--model.d-ff", "1024", "--model.n-heads", "4",
    "--model.n-layers", "3", "--model.chunk-len", "64", "--model.dropout", "0.0",
    "--model.lsh-mode", "window",
    "--optim.lr", "0.002", "--optim.warmup-steps", "100", "--optim.schedule", "wsd",
    "--optim.decay-start", str(DECAY_START), "--optim.decay-steps", str(DECAY_STEPS),
    "--optim.min-lr-ratio", "0.1",
    "--precision", "bf16",
    "--eval-batches", "8", "--eval-hashes", "--log-every", "20", "--no-progress",
]  # fmt: skip


def experiment(data: Path, stage: int) -> Experiment:
    enwik8 = str(data / "enwik8" / "enwik8-prefix-4M")
    return Experiment(
        NAME,
        "enwik8 prefix, length 2048, 3 reversible layers, bf16: LSH-4/8 (window) vs full",
        [*MODEL, "--data", enwik8, "--eval-every", str(stage), "--checkpoint-every", str(stage)],
        [
            Run("full", ["--model.attention", "full"], "full attention (shared QK)"),
            Run("lsh-4", ["--model.attention", "lsh", "--model.n-hashes", "4"], "LSH-4"),
            Run("lsh-8", ["--model.attention", "lsh", "--model.n-hashes", "8"], "LSH-8"),
        ],
        ["--n-hashes", "full", *map(str, reversed(HASH_COUNTS)), "--batches", "16"],
    )


def last_bpc(run_dir: Path) -> tuple[int, float]:
    steps, values = eval_curve(run_dir, "eval_bpc")
    return (steps[-1], values[-1]) if steps else (0, float("inf"))


def bpc_at(run_dir: Path, step: int) -> float:
    """A run's validation bpc at `step` (an evaluation step)."""
    return dict(zip(*eval_curve(run_dir, "eval_bpc")))[step]


def train_stages(exp: Experiment, root: Path, stage: int, minutes: float) -> bool:
    """Advance the three runs stage by stage; True when all three reached step END."""
    start = time.monotonic()
    while True:
        reached = min(last_bpc(root / r.name)[0] for r in exp.runs)
        if reached >= END:
            return True
        if (time.monotonic() - start) / 60 >= minutes:
            return False
        goal = min(END, (reached // stage + 1) * stage)
        for run in exp.runs:
            if last_bpc(root / run.name)[0] < goal:
                reformer(
                    "train",
                    *exp.common,
                    *run.args,
                    "--steps",
                    str(goal),
                    "--out",
                    str(root / run.name),
                    "--resume",
                )
        print(
            f"step {goal}: "
            + ", ".join(f"{r.name} {last_bpc(root / r.name)[1]:.3f}" for r in exp.runs),
            flush=True,
        )


def mass_outside(run_dir: Path, n_hashes: int = 8, batches: int = 2) -> dict[str, float]:
    """On the trained full-attention model: the mean share of each query's attention mass
    (layer by layer, over heads and validation positions) on keys outside LSH-`n_hashes`'s
    candidate sets (window mode, the model's chunk length, rotations drawn afresh)."""
    import torch

    from reformer.attention.common import unit_keys
    from reformer.attention.hashing import auto_n_buckets, draw_rotations, hash_vectors
    from reformer.attention.reference import lsh_candidate_sets
    from reformer.tasks.lm.data import build_task
    from reformer.training.runs import load_run

    model, cfg, _, _ = load_run(run_dir, torch.device("cpu"))
    task = build_task(cfg.task, cfg.data, cfg.seq_len, cfg.image_side)
    C, gen = cfg.model.chunk_len, torch.Generator().manual_seed(0)
    shares: list[list[float]] = []
    import reformer.attention as attention_package

    original = attention_package.full_attention

    def probe(q, k, v, *, causal, attention_mask=None, key_norm="l2"):
        B, H, L, D = q.shape
        scores = q.float() @ unit_keys(q, key_norm).float().transpose(-1, -2)
        allowed = torch.ones(L, L, dtype=torch.bool).tril(-1)  # j < i: the self rule
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)[:, :, 1:]
        rot = draw_rotations(H, D, n_hashes, auto_n_buckets(L, C), generator=gen)
        cands = lsh_candidate_sets(
            hash_vectors(q.float(), rot),
            torch.ones(B, L, dtype=torch.bool),
            chunk_len=C,
            causal=True,
            mode="window",
        ).any(2)
        shares.append([float((p * ~cands[:, :, 1:]).sum(-1).mean())])
        return original(q, k, v, causal=causal, attention_mask=attention_mask, key_norm=key_norm)

    attention_package.full_attention = probe  # Attention.core calls it through the package
    try:
        with torch.no_grad():
            for ids, _ in task.eval_batches("val", 1, batches, seed=0):
                model(ids)
    finally:
        attention_package.full_attention = original
    layers = cfg.model.n_layers
    per_layer = [sum(s[0] for s in shares[i::layers]) / batches for i in range(layers)]
    return {f"layer {i}": v for i, v in enumerate(per_layer)}


def summarise(exp: Experiment, root: Path, evals: dict, seconds: dict, outside: dict) -> str:
    common = min(last_bpc(root / r.name)[0] for r in exp.runs)
    at = {r.name: bpc_at(root / r.name, common) for r in exp.runs}
    lines = [f"At step {common} (validation bpc, 8 batches of 4 x 2048):", ""]
    lines += ["| run | bpc | minus full | s/step | training time |", "|---|---|---|---|---|"]
    for r in exp.runs:
        per = seconds[r.name] / max(1, common)
        lines.append(
            f"| {r.label} | {at[r.name]:.4f} | {at[r.name] - at['full']:+.4f} | "
            f"{per:.2f} | {seconds[r.name] / 60:.1f} min |"
        )
    cols = ["full", *reversed(HASH_COUNTS)]
    lines += ["", "Final checkpoints evaluated with other hash counts (bpc, 16 batches):", ""]
    lines += [
        "| trained with | "
        + " | ".join("full" if c == "full" else f"LSH-{c}" for c in cols)
        + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for r in exp.runs:
        got = {row["n_hashes"]: row["bpc"] for row in evals[r.name]}
        lines.append(f"| {r.label} | " + " | ".join(f"{got[c]:.4f}" for c in cols) + " |")
    budget = min(seconds.values())
    lines += ["", f"At equal training time ({budget / 60:.1f} min, the fastest run's):", ""]
    lines += ["| run | step reached | bpc |", "|---|---|---|"]
    for r in exp.runs:
        steps, values = eval_curve(root / r.name, "eval_bpc")
        per = seconds[r.name] / max(1, common)
        s, v = max(
            ((s, v) for s, v in zip(steps, values) if s * per <= budget + 1e-9),
            default=(0, float("nan")),
        )
        lines.append(f"| {r.label} | {s} | {v:.4f} |")
    lines += [
        "",
        "Attention mass of the trained full-attention model outside LSH-8's "
        "candidate sets (mean per query):",
        "",
    ]
    lines += [f"- {k}: {v:.4f}" for k, v in outside.items()]
    return "\n".join(lines)


def run(data: Path, results: Path, stage: int, target: float, minutes: float) -> dict:
    exp = experiment(data, stage)
    root = results / NAME
    root.mkdir(parents=True, exist_ok=True)
    done = train_stages(exp, root, stage, minutes)
    common = min(last_bpc(root / r.name)[0] for r in exp.runs)
    seconds = {r.name: train_seconds(root / r.name, common) for r in exp.runs}
    evals = {r.name: evaluate_run(exp, root / r.name) for r in exp.runs}
    outside = mass_outside(root / "full")
    text = summarise(exp, root, evals, seconds, outside)
    below = {r.name: bpc_at(root / r.name, common) <= target for r in exp.runs}
    text += f"\n\nAt or below {target} bpc at step {common}: " + ", ".join(
        f"{name} {'yes' if ok else 'no'}" for name, ok in below.items()
    )
    if not done:
        text += f"\n\nStopped before step {END}; `python -m repro.run {NAME}` continues the runs."
    plot(
        exp,
        root,
        "eval_bpc",
        "validation bits per character",
        {r.name: seconds[r.name] / max(1, common) for r in exp.runs},
    )
    summary = {
        "experiment": NAME,
        "title": exp.title,
        "command": f"python -m repro.run {NAME}",
        "common_args": exp.common,
        "runs": {r.name: r.args for r in exp.runs},
        "finished": done,
        "target_bpc": target,
        "at_or_below_target": below,
        "common_step": common,
        "train_seconds": seconds,
        "final_eval": evals,
        "mass_outside_lsh8": outside,
        "table_md": text,
    }
    atomic_write(root / "summary.json", json.dumps(summary, indent=2))
    atomic_write(root / "summary.md", f"# {exp.title}\n\n`{summary['command']}`\n\n{text}\n")
    print(text, flush=True)
    return summary

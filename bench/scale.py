"""The longest sequence whose training step fits a memory budget (peak RSS), per model.

One ReformerLM training step (loss + backward + AdamW step), batch 1, LSH with 4 hashes,
chunk 64, reversible layers, for two models:

    small     d_model 256, d_ff 1024, 4 heads, 6 layers
    ablation  d_model 1024, d_ff 4096, 8 heads, 3 layers (the paper's ablation model)

L doubles from --start (4K) towards --max-length (2^20); past the first L that does not fit
(measured over --budget-gib, failed, or predicted over it), --refine-steps bisections
between the last fitting L and that one, in multiples of --granularity. A length is not
run when its prediction (linear in L from the last two measured lengths) passes the budget,
this machine's available memory or --max-step-seconds; a time stop ends the search there.

    python -m bench.scale [--budget-gib 20] [--models small ablation] [--max-step-seconds 600]
    python -m bench.scale --models small --lengths 1048576 --one-process --name scale_2e20

Memory is measured on one step in a fresh process (peak RSS minus the RSS after building
the model), time on --repeats steps after --warmup in another (bench/_harness.py). The
default is one timed step after one warm-up (not a median of three): steps here take
minutes, and memory is what this benchmark measures.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from bench._harness import (
    RESULTS,
    add_common_args,
    command_line,
    environment,
    extrapolate,
    markdown_table,
    measure,
    pyplot,
    run_measured,
    save_png,
    skip_reason,
    write_json,
)
from bench.flat import lm_training

MODELS: dict[str, dict[str, int]] = {
    "small": dict(d_model=256, d_ff=1024, heads=4, layers=6),
    "ablation": dict(d_model=1024, d_ff=4096, heads=8, layers=3),
}


def worker(args: dict[str, Any]) -> dict[str, Any]:
    _, step = lm_training(args)
    return measure(step, args, torch.device(args.get("device", "cpu")))


class Search:
    """The search for one model: runs (or skips) lengths and remembers what it measured."""

    def __init__(self, ns: argparse.Namespace, model: str) -> None:
        self.ns, self.model = ns, model
        self.rows: list[dict[str, Any]] = []
        self.measured: list[tuple[int, float, float]] = []  # (L, seconds, peak MiB)

    def attempt(self, length: int) -> dict[str, Any]:
        """Measure `length` unless predicted over a cap; row["fits"] says if it fitted and
        row["limit"] names the cap ("memory" or "time") a non-fitting row hit."""
        ns = self.ns
        row: dict[str, Any] = {"model": self.model, "length": length}
        pts = sorted(self.measured)
        pred_s = extrapolate([(n, s) for n, s, _ in pts if n < length], length, 1.0)
        pred_m = extrapolate([(n, m) for n, _, m in pts if n < length], length, 1.0)
        reason = skip_reason(pred_m, pred_s, ns.budget_gib, ns.max_step_seconds, ns.device)
        if reason:
            row |= {"skipped": reason, "fits": False}
            row["limit"] = "time" if reason.endswith(" s") else "memory"
        else:
            args = MODELS[self.model] | dict(
                attention="lsh",
                n_hashes=ns.n_hashes,
                length=length,
                batch=1,
                reversible=True,
                repeats=ns.repeats,
                warmup=ns.warmup,
                threads=ns.threads,
                device=ns.device,
                dtype=ns.dtype,
            )
            timeout = 600 + 3 * (ns.repeats + ns.warmup + 1) * (pred_s or ns.max_step_seconds)
            row |= run_measured("bench.scale", args, timeout, ns.device, ns.one_process)
            if "error" in row:
                row |= {"fits": False, "limit": "memory" if "memory" in row["error"] else "error"}
            else:
                self.measured.append((length, row["seconds"], row["peak_mib"]))
                row["fits"] = row["peak_mib"] <= ns.budget_gib * 1024
                row["limit"] = None if row["fits"] else "memory"
                row["tokens_per_second"] = length / row["seconds"]
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def run(self) -> dict[str, Any]:
        ns = self.ns
        if ns.lengths:  # exactly these lengths, no search
            for length in ns.lengths:
                self.attempt(length)
            return self.result(max((r["length"] for r in self.rows if r["fits"]), default=None),
                               None, "ran --lengths")  # fmt: skip
        lower, upper, stop = None, None, f"reached --max-length {ns.max_length}"
        length = ns.start
        while length <= ns.max_length:
            row = self.attempt(length)
            if not row["fits"]:
                upper, stop = length, row.get("skipped") or row.get("error") or "over budget"
                break
            lower, length = length, length * 2
        if lower is not None and upper is not None and self.rows[-1]["limit"] == "memory":
            for _ in range(ns.refine_steps):
                g = ns.granularity
                mid = round((lower + upper) / 2 / g) * g
                if not lower < mid < upper:
                    break
                row = self.attempt(mid)
                if row["fits"]:
                    lower = mid
                elif row["limit"] == "memory":
                    upper = mid
                else:
                    stop = row.get("skipped") or row.get("error") or stop
                    break
        return self.result(lower, upper, stop)

    def result(self, lower: int | None, upper: int | None, stop: str) -> dict[str, Any]:
        best = max((r for r in self.rows if r["fits"]), key=lambda r: r["length"], default=None)
        return {
            "model": self.model,
            "config": MODELS[self.model],
            "longest_fitting": lower,
            "peak_mib_at_longest": best["peak_mib"] if best else None,
            "first_not_fitting": upper,
            "stopped_because": stop,
            "rows": self.rows,
        }


def report(ns: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "command": command_line(),
        "environment": environment() | {"threads": ns.threads},
        "settings": {k: v for k, v in vars(ns).items() if k != "worker"}
        | {"chunk_len": 64, "optimizer": "AdamW", "reversible": True, "batch": 1},
        "models": results,
    }


def plot(ns: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        sel = sorted((r for r in res["rows"] if "peak_mib" in r), key=lambda r: r["length"])
        if sel:
            ax.plot(
                [r["length"] for r in sel],
                [r["peak_mib"] / 1024 for r in sel],
                "o-",
                label=f"{res['model']} (longest {res['longest_fitting']})",
            )
    ax.axhline(ns.budget_gib, color="gray", ls="--", label=f"budget {ns.budget_gib:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L (batch 1)")
    ax.set_ylabel("peak memory of one training step (GiB)")
    ax.set_title(f"LSH-{ns.n_hashes}, reversible, {ns.device} {ns.dtype}")
    ax.legend(fontsize=8)
    save_png(fig, RESULTS / f"{ns.name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budget-gib", "--max-rss-gib", type=float, default=20.0)
    parser.add_argument("--max-step-seconds", type=float, default=600.0)
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=2**20)
    parser.add_argument("--refine-steps", type=int, default=2)
    parser.add_argument("--granularity", type=int, default=4096)
    parser.add_argument("--n-hashes", type=int, default=4)
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="measure exactly these L (no search)"
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="time the memory process's one step instead of a second process (first step, "
        "under the fixed mmap threshold; for steps of many minutes)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: small model, 256 to 2048 tokens under a 0.2 GiB budget",
    )
    add_common_args(parser, "scale")
    parser.set_defaults(repeats=1)
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    if ns.quick:
        ns.models, ns.start, ns.max_length, ns.budget_gib = ["small"], 256, 2048, 0.2
        ns.granularity = 256
        if ns.name == "scale":  # keep quick results out of the real ones (git-ignored)
            ns.name = "tmp/scale"
    print("reproduce with:", command_line(), flush=True)
    torch.set_num_threads(ns.threads)
    print(f"threads: {ns.threads}", flush=True)
    results = []
    for model in ns.models:
        results.append(Search(ns, model).run())
        write_json(RESULTS / f"{ns.name}.json", report(ns, results))
    print()
    summary = [r | {"longest_gib": (r["peak_mib_at_longest"] or 0) / 1024 or None} for r in results]
    cols = [("model", "model"), ("longest L", "longest_fitting"), ("GiB", "longest_gib")]
    cols += [("first not fitting", "first_not_fitting"), ("stopped because", "stopped_because")]
    print(markdown_table(summary, cols))
    rows = [r for res in results for r in res["rows"]]
    cols = [("model", "model"), ("L", "length"), ("peak MiB", "peak_mib"), ("s", "seconds")]
    cols += [("fits", "fits"), ("skipped", "skipped"), ("error", "error")]
    print()
    print(markdown_table(rows, cols))
    plot(ns, results)
    print("wrote", RESULTS / f"{ns.name}.json", "and", RESULTS / f"{ns.name}.png")


if __name__ == "__main__":
    main()

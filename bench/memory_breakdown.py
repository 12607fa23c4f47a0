"""What the memory of a long training step consists of, and the paper's accounting beside it.

One training step of bench.scale's `small` model (d_model 256, d_ff 1024, 4 heads, 6
reversible layers, LSH-4, AdamW, batch 1) at L tokens runs under torch.profiler's memory
tracking in a fresh process. At the moment the live tensors peak, each live tensor is listed
with its profiler category (activation, gradient, temporary, parameter, optimizer state,
...) and its size per token. Beside it: the terms of the paper's memory accounting for this
model (the (L, d_model) activations of every layer, the (L, d_ff) feed-forward
intermediate, the n_h L^2 attention matrix), and, measured in the same run, the matmul
ceiling and the GFLOP/s of the LSH-4 attention core at the same L.

    python -m bench.memory_breakdown [--length 16384]
    python -m bench.memory_breakdown --quick

Live tensor bytes are what the profiler sees allocated; peak RSS (bench.scale) adds the
allocator's slack and the process's fixed cost.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Any

from bench._harness import (
    RESULTS,
    command_line,
    environment,
    run_fresh,
    run_measured,
    save_png,
    write_json,
)
from bench.flat import lm_training
from bench.scale import MODELS

# bench.scale's `small` model; bench.flat.lm_training uses chunk 64.
MODEL = MODELS["small"] | dict(n_hashes=4, chunk_len=64)


def worker(args: dict[str, Any]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    L = args["length"]
    model, step = lm_training(
        args | MODEL | dict(attention="lsh", batch=1, reversible=True, device="cpu")
    )
    step()  # optimizer state exists from here on, as in training
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    mp = prof._memory_profile()
    live: dict[Any, tuple[int, str]] = {}
    total = best = 0
    best_live: dict[Any, tuple[int, str]] = {}
    for _, action, (key, version), size in mp.timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.CREATE, Action.INCREMENT_VERSION):
            if key in live:
                total -= live[key][0]
            category = mp._categories.get(key, version)
            live[key] = (size, category.name.lower() if category else "unknown")
            total += size
        elif action == Action.DESTROY and key in live:
            total -= live.pop(key)[0]
        if total > best:
            best, best_live = total, dict(live)
    by_category: collections.Counter[str] = collections.Counter()
    by_size: collections.Counter[tuple[str, int]] = collections.Counter()
    for size, category in best_live.values():
        by_category[category] += size
        if size >= 2**20:  # tensors that scale with L; the rest are small and few
            by_size[(category, size)] += 1
    return {
        "length": L,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_live_mib": best / 2**20,
        "peak_live_bytes_per_token": best / L,
        "by_category_mib": {k: v / 2**20 for k, v in by_category.most_common()},
        "large_tensors": [
            {"category": c, "count": n, "mib": s / 2**20, "bytes_per_token": s / L}
            for (c, s), n in sorted(by_size.items(), key=lambda kv: -kv[0][1] * kv[1])
        ],
    }


def paper_terms(length: int) -> dict[str, float]:
    """The paper's memory terms for MODEL at batch 1, float32 (4 bytes), MiB."""
    d, d_ff, h, n_l = MODEL["d_model"], MODEL["d_ff"], MODEL["heads"], MODEL["layers"]
    r, c = MODEL["n_hashes"], MODEL["chunk_len"]
    mib = 4 / 2**20
    return {
        "activations b l d_model, one layer": length * d * mib,
        "activations b l d_model x n_l (no reversible layers)": length * d * n_l * mib,
        "feed-forward b l d_ff, one layer (no chunking)": length * d_ff * mib,
        "dense attention b n_h l^2, one layer": h * length * length * mib,
        "LSH scores b n_h n_r l 2C, one layer (stored by naive LSH)": h * r * length * 2 * c * mib,
        "our int8 pair codes n_h n_r l 2C bytes, one layer": h * r * length * 2 * c / 2**20,
    }


def plot(result: dict[str, Any], path) -> None:
    """One bar per quantity (log scale): the live tensors at the peak, by category, beside
    the paper's memory terms for the same model and L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("live tensors at the peak, total", result["breakdown"]["peak_live_mib"], "C0")]
    bars += [
        (f"  live: {name}", mib, "C0")
        for name, mib in result["breakdown"]["by_category_mib"].items()
        if mib >= 1
    ]
    bars += [(f"paper: {name}", mib, "grey") for name, mib in result["paper_terms_mib"].items()]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(bars) + 1.2))
    names, values, colors = zip(*bars)
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("MiB (log scale)")
    ax.set_title(f"one training step, small model, L = {result['length']}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="memory_breakdown")
    parser.add_argument("--quick", action="store_true", help="tiny run: L 1024")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    if ns.quick:
        ns.length = 1024
        if ns.name == "memory_breakdown":  # keep quick results out of the real ones (git-ignored)
            ns.name = "tmp/memory_breakdown"
    print("reproduce with:", command_line(), flush=True)
    from bench.attention import flop_count, matmul_ceiling

    ceiling = matmul_ceiling(ns.threads, "cpu", "float32")
    core = run_measured(
        "bench.attention",
        dict(config="lsh-4-core", length=ns.length, threads=ns.threads, repeats=3, warmup=1),
        timeout=1800,
    )
    if "seconds" in core:
        core["gflops"] = flop_count("lsh-4-core", ns.length) / core["seconds"] / 1e9
        core["of_ceiling"] = core["gflops"] / ceiling["square_2048"]
    breakdown = run_fresh("bench.memory_breakdown", dict(length=ns.length, threads=ns.threads))
    result = {
        "command": command_line(),
        "environment": environment() | {"threads": ns.threads},
        "model": MODEL,
        "length": ns.length,
        "matmul_ceiling_gflops": ceiling,
        "lsh_4_core": core,
        "breakdown": breakdown,
        "paper_terms_mib": paper_terms(ns.length),
    }
    print(json.dumps(result, indent=1))
    write_json(RESULTS / f"{ns.name}.json", result)
    if "error" not in breakdown:
        plot(result, RESULTS / f"{ns.name}.png")
    print("wrote", RESULTS / f"{ns.name}.json", "and", RESULTS / f"{ns.name}.png")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

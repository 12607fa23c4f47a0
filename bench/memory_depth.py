"""Activation memory against depth: one training step at L = 16,384 for 2, 12 and 24 layers.

The reversible stack stores no per-layer activations, so the deeper model's peak RSS should
exceed the shallower one's by no more than its extra parameters, their gradients and the
optimiser state.

    python -m bench.memory_depth [--length 16384] [--layers 2 12 24] [--reversible both]
    python -m bench.memory_depth --name memory_length --lengths 4096 16384 65536 \
        --layers 12 --reversible both --chunking both      # against length and chunking

--chunking no turns off the chunked feed-forward and the chunked logits and loss (the
paper's third memory lever): their (L, d_ff) and (L, vocab) intermediates then exist whole.

Each configuration runs in a fresh process; peak RSS is the peak (VmHWM, reset just before
the first step) over --steps steps (default 1; from the second on AdamW's state exists during
the backward pass) minus the RSS
measured in that process after building the model and optimiser. --allocators runs each
configuration under several malloc settings side by side: `default` (glibc as a user's
process has it, with the library's trim between layers, reformer/memory.py), `no-trim`
(REFORMER_MALLOC_TRIM=0: glibc alone), `fixed-64k` (MALLOC_MMAP_THRESHOLD_=65536, the
other benchmarks' setting: RSS tracks live tensors) and `cpu-cache` (the default with
reformer.cpu_cache, 2 GiB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench._harness import (
    RESULTS,
    PeakMemory,
    command_line,
    environment,
    run_fresh,
    save_png,
    warm_lsh_kernels,
    write_json,
)


def worker(args: dict) -> dict:
    import os

    from bench._harness import use_cpu_cache
    from reformer import ReformerConfig, ReformerLM

    use_cpu_cache(float(os.environ.get("BENCH_CPU_CACHE_GIB", 0)))
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, args["length"]))
    chunked = args.get("chunking", True)
    cfg = ReformerConfig(
        ff_chunk_len=4096 if chunked else None,
        loss_chunk_len=4096 if chunked else None,
        vocab_size=256,
        d_model=256,
        n_heads=4,
        d_ff=1024,
        n_layers=args["layers"],
        max_seq_len=args["length"],
        attention="lsh",
        n_hashes=args["n_hashes"],
        chunk_len=64,
        reversible=args["reversible"],
    )
    model = ReformerLM(cfg)
    warm_lsh_kernels(torch.device("cpu"), torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if args.get("optimizer", "sgd") == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # stateless: only the gradients
    meter = PeakMemory(torch.device("cpu"))  # DESIGN 7: from the RSS with the model built
    times = []
    for _ in range(args.get("steps", 1)):  # from the second on, AdamW's state exists
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    seconds = times[-1]
    return {
        "length": args["length"],
        "chunking": chunked,
        "layers": args["layers"],
        "reversible": args["reversible"],
        "params": n_params,
        "param_mib": n_params * 4 / 2**20,
        "peak_rss_mib": meter.mib(),
        "step_seconds": seconds,
        "step_times": times,
        "loss": float(loss.detach()),
    }


ALLOCATORS = {
    # glibc's malloc as a user's process has it, with the library's trim between layers
    "default": {"MALLOC_MMAP_THRESHOLD_": None},
    # the same without the trim (REFORMER_MALLOC_TRIM=0): glibc alone
    "no-trim": {"MALLOC_MMAP_THRESHOLD_": None, "REFORMER_MALLOC_TRIM": "0"},
    # the benchmarks' fixed 64 KiB mmap threshold: RSS tracks live tensors
    "fixed-64k": {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)},
    # the default, with reformer.cpu_cache keeping up to 2 GiB of freed blocks
    "cpu-cache": {"MALLOC_MMAP_THRESHOLD_": None, "BENCH_CPU_CACHE_GIB": "2"},
}


def label(row: dict) -> str:
    text = "reversible" if row["reversible"] else "ordinary residual"
    text += "" if row["chunking"] else ", unchunked ff and loss"
    return text + f", {row['allocator']}"


def plot(rows: list[dict], by_depth: bool, name: str, title: str) -> None:
    """Peak RSS against depth (several layer counts), else against length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    key = "layers" if by_depth else "length"
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            extra = f", L = {r['length']}" if by_depth else f", {r['layers']} layers"
            lines.setdefault(label(r) + extra, []).append(r)
    for text, sel in lines.items():
        sel.sort(key=lambda r: r[key])
        ax.plot([r[key] for r in sel], [r["peak_rss_mib"] for r in sel], "o-", label=text)
    if not by_depth:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel("layers" if by_depth else "sequence length L (batch 1)")
    ax.set_ylabel("peak RSS of a training step (MiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    save_png(fig, RESULTS / f"{name}.png")
    print("wrote", RESULTS / f"{name}.json", "and", RESULTS / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", "--lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--chunking", choices=["yes", "no", "both"], default="yes")
    parser.add_argument("--name", default="memory_depth", help="bench/results/NAME.json, .png")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 12, 24])
    parser.add_argument("--n-hashes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reversible", choices=["yes", "no", "both"], default="yes")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument(
        "--steps",
        type=int,
        default=1,
        help="steps measured (peak over all; from the second "
        "on, AdamW's state exists during the backward pass)",
    )
    parser.add_argument(
        "--allocators",
        nargs="+",
        choices=list(ALLOCATORS),
        default=["default", "fixed-64k"],
        help="default: glibc with the library's trim; no-trim: glibc alone; fixed-64k: "
        "MALLOC_MMAP_THRESHOLD_=65536; cpu-cache: default with reformer.cpu_cache",
    )
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    print("reproduce with:", command_line(), flush=True)
    choice = {"yes": [True], "no": [False], "both": [True, False]}
    revs, chunkings = choice[ns.reversible], choice[ns.chunking]
    rows = []
    for allocator in ns.allocators:
        for length in ns.length:
            for chunking in chunkings:
                for reversible in revs:
                    for layers in ns.layers:
                        args = dict(length=length, layers=layers, n_hashes=ns.n_hashes)
                        args |= dict(threads=ns.threads, reversible=reversible)
                        args |= dict(chunking=chunking, optimizer=ns.optimizer, steps=ns.steps)
                        row = run_fresh("bench.memory_depth", args, env=ALLOCATORS[allocator])
                        rows.append(args | {"allocator": allocator} | row)
                        print(json.dumps(rows[-1]), flush=True)
    # Budget: the extra parameters, their gradients and the optimiser state (AdamW: two
    # moments). The parameters are in each process's baseline already.
    per_param = 4 * (2 + (2 if ns.optimizer == "adamw" else 0))
    summary = {}
    for allocator in ns.allocators:
        for reversible in revs:
            sel = sorted(
                (
                    r
                    for r in rows
                    if (r["allocator"], r["reversible"]) == (allocator, reversible)
                    and r["length"] == ns.length[0]
                    and r["chunking"] == chunkings[0]
                    and "error" not in r
                ),
                key=lambda r: r["layers"],
            )
            if len(sel) < 2:
                continue
            lo, hi = sel[0], sel[-1]
            bound = (hi["params"] - lo["params"]) * per_param / 2**20
            growth = hi["peak_rss_mib"] - lo["peak_rss_mib"]
            key = f"{'reversible' if reversible else 'ordinary'}, {allocator}"
            summary[key] = {
                "layers": [lo["layers"], hi["layers"]],
                "peak_rss_mib": [lo["peak_rss_mib"], hi["peak_rss_mib"]],
                "growth_mib": growth,
                "bound_mib": bound,
                "within_bound": growth <= bound,
                "step_seconds": [lo["step_seconds"], hi["step_seconds"]],
            }
            print(
                f"{key}: {lo['layers']} layers {lo['peak_rss_mib']:.0f} MiB, {hi['layers']} "
                f"layers {hi['peak_rss_mib']:.0f} MiB: growth {growth:+.1f} MiB; extra "
                f"parameters, gradients and optimiser state {bound:.1f} MiB -> "
                f"{'OK' if growth <= bound else 'EXCEEDS'}; step {lo['step_seconds']:.1f} / "
                f"{hi['step_seconds']:.1f} s"
            )
    out = {
        "command": command_line(),
        "environment": environment() | {"threads": ns.threads},
        "lengths": ns.length,
        "optimizer": ns.optimizer,
        "rows": rows,
        "summary": summary,
    }
    write_json(RESULTS / f"{ns.name}.json", out)
    by_depth = len(ns.layers) > 1
    title = f"LSH-{ns.n_hashes}, d_model 256, {ns.optimizer}, peak over {ns.steps} step(s)"
    plot(rows, by_depth, ns.name, title)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

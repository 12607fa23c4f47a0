"""Activation memory against depth: one training step at L = 16,384 for 2, 12 and 24 layers.

The reversible stack stores no per-layer activations, so the deeper model's peak RSS should
exceed the shallower one's by no more than its extra parameters and their gradients.

    python -m bench.memory_depth [--length 16384] [--layers 2 12 24] [--reversible both]
    python -m bench.memory_depth --name memory_length --lengths 4096 16384 65536 \
        --layers 12 --reversible both --chunking both      # against length and chunking

--chunking no turns off the chunked feed-forward and the chunked logits and loss (the
paper's third memory lever): their (L, d_ff) and (L, vocab) intermediates then exist whole.

Each configuration runs in a fresh process; peak RSS is the peak (VmHWM, reset just before
the step) minus the RSS measured in that process after building the model and optimiser. Workers run
with glibc's mmap threshold fixed at 64 KiB (bench/_harness.py says why);
`--glibc-default` measures without it.
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
    from reformer import ReformerConfig, ReformerLM

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
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # stateless: adds only the gradients
    meter = PeakMemory(torch.device("cpu"))  # DESIGN 7: from the RSS with the model built
    t0 = time.perf_counter()
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    return {
        "length": args["length"],
        "chunking": chunked,
        "layers": args["layers"],
        "reversible": args["reversible"],
        "params": n_params,
        "param_mib": n_params * 4 / 2**20,
        "peak_rss_mib": meter.mib(),
        "step_seconds": seconds,
        "loss": float(loss.detach()),
    }


def plot(rows, layers, lengths, revs, chunkings, n_hashes: int, name: str) -> None:
    """Peak RSS against depth (several layer counts), else against length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    by_depth = len(layers) > 1
    for length in lengths if by_depth else [None]:
        for chunking in chunkings:
            for reversible in revs:
                sel = [
                    r
                    for r in rows
                    if (r["chunking"], r["reversible"]) == (chunking, reversible)
                    and (length is None or r["length"] == length)
                    and "error" not in r
                ]
                key = "layers" if by_depth else "length"
                sel.sort(key=lambda r: r[key])
                label = "reversible" if reversible else "ordinary residual"
                label += "" if chunking else ", unchunked ff and loss"
                if by_depth and len(lengths) > 1:
                    label += f", L = {length}"
                ax.plot([r[key] for r in sel], [r["peak_rss_mib"] for r in sel], "o-", label=label)
    if by_depth:
        ax.set_xlabel("layers")
        title = f", L = {lengths[0]}" if len(lengths) == 1 else ""
    else:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (batch 1)")
        title = f", {layers[0]} layers"
    ax.set_ylabel("peak RSS of one training step (MiB)")
    ax.set_title(f"LSH-{n_hashes}, d_model 256" + title)
    ax.legend(fontsize=7)
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
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (RSS then includes heap "
        "fragmentation that grows with the number of layers)",
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
    for length in ns.length:
        for chunking in chunkings:
            for reversible in revs:
                for layers in ns.layers:
                    args = dict(length=length, layers=layers, n_hashes=ns.n_hashes)
                    args |= dict(threads=ns.threads, reversible=reversible, chunking=chunking)
                    env = {"MALLOC_MMAP_THRESHOLD_": None} if ns.glibc_default else None
                    row = run_fresh("bench.memory_depth", args, env=env)
                    rows.append(args | row)
                    print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for reversible in revs:
        # Depth: the first length, chunked as asked first.
        sel = sorted(
            (
                r
                for r in rows
                if r["reversible"] == reversible
                and r["length"] == ns.length[0]
                and r["chunking"] == chunkings[0]
                and "error" not in r
            ),
            key=lambda r: r["layers"],
        )
        if len(sel) >= 2:
            lo, hi = sel[0], sel[-1]
            # Budget (issue 2): the extra parameters and gradients. The parameters are in each
            # process's baseline already, so the growth should be about the extra gradients.
            extra = hi["param_mib"] - lo["param_mib"]
            growth = hi["peak_rss_mib"] - lo["peak_rss_mib"]
            key = "reversible" if reversible else "ordinary"
            summary[key] = {
                "layers": [lo["layers"], hi["layers"]],
                "peak_rss_mib": [lo["peak_rss_mib"], hi["peak_rss_mib"]],
                "growth_mib": growth,
                "extra_grads_mib": extra,
                "extra_params_and_grads_mib": 2 * extra,
                "beyond_extra_grads_mib": growth - extra,
                "within_budget": growth <= 2 * extra,
            }
            print(
                f"{key}: {lo['layers']} layers {lo['peak_rss_mib']:.0f} MiB, {hi['layers']} "
                f"layers {hi['peak_rss_mib']:.0f} MiB: growth {growth:.1f} MiB vs extra "
                f"gradients {extra:.1f} MiB (params+grads {2 * extra:.1f} MiB) -> "
                f"{'OK' if growth <= 2 * extra else 'EXCEEDS'} ({growth - extra:+.1f} MiB "
                "beyond the extra gradients; one (B, L, d_model) fp32 activation is "
                f"{ns.length[0] * 256 * 4 / 2**20:.0f} MiB)"
            )
    out = {
        "command": command_line(),
        "environment": environment()
        | {
            "threads": ns.threads,
            "glibc_mmap_threshold": "dynamic" if ns.glibc_default else "64 KiB",
        },
        "lengths": ns.length,
        "rows": rows,
        "summary": summary,
    }
    write_json(RESULTS / f"{ns.name}.json", out)
    plot(rows, ns.layers, ns.length, revs, chunkings, ns.n_hashes, ns.name)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

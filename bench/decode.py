"""Per-token generation latency: cached decoding against full recomputation.

    python -m bench.decode [--prefixes 1024 16384 65536] [--tokens 16]

The model is enwik8-small's shape (4 layers alternating local and LSH-2 attention,
d_model 256) with a 64K context. For each prefix length P: prefill a cache with P tokens,
then time each of the next --tokens decode steps (median); the baseline is what a decoder
without a cache pays per token, one full forward over P + 1 tokens (median of 3 after a
warm-up at the shortest prefix). All in one process, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench._harness import RESULTS, command_line, environment, save_png, write_json


def build(max_len: int):
    from reformer import ReformerConfig, ReformerLM

    cfg = ReformerConfig(
        vocab_size=256, d_model=256, d_ff=512, n_heads=4, n_layers=4, max_seq_len=max_len,
        attention="local,lsh", n_hashes=2, chunk_len=64,
    )  # fmt: skip
    return ReformerLM(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefixes", type=int, nargs="+", default=[1024, 16384, 65536])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-repeats", type=int, default=3)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    print("reproduce with:", command_line(), flush=True)
    max_len = max(ns.prefixes) + ns.tokens + 1
    model = build(max_len)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, max_len))
    rows = []
    with torch.no_grad():
        model(ids[:, : min(ns.prefixes)])  # warm-up
        for P in ns.prefixes:
            t0 = time.perf_counter()
            _, cache = model.decode(ids[:, :P], total_len=P + ns.tokens)
            prefill = time.perf_counter() - t0
            steps = []
            for i in range(ns.tokens):
                t0 = time.perf_counter()
                _, cache = model.decode(ids[:, P + i : P + i + 1], cache)
                steps.append(time.perf_counter() - t0)
            full = []
            for _ in range(ns.full_repeats):
                t0 = time.perf_counter()
                model(ids[:, : P + 1])
                full.append(time.perf_counter() - t0)
            row = {
                "prefix": P,
                "prefill_s": prefill,
                "cached_ms_per_token": 1e3 * statistics.median(steps),
                "full_recompute_ms_per_token": 1e3 * statistics.median(full),
            }
            row["speedup"] = row["full_recompute_ms_per_token"] / row["cached_ms_per_token"]
            rows.append(row)
            print(
                f"prefix {P:>6}: cached {row['cached_ms_per_token']:.1f} ms/token, full "
                f"recompute {row['full_recompute_ms_per_token']:.0f} ms/token "
                f"({row['speedup']:.0f}x); prefill {prefill:.1f} s",
                flush=True,
            )
    out = {
        "command": command_line(),
        "environment": environment() | {"threads": ns.threads},
        "model": "4 layers local/lsh-2, d_model 256, d_ff 512, 4 heads, chunk 64",
        "rows": rows,
        "peers": "reformer-pytorch and transformers generation not measured here",
    }
    write_json(RESULTS / "decode.json", out)
    print("| prefix | cached ms/token | full recompute ms/token | speedup |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prefix']:,} | {r['cached_ms_per_token']:.1f} | "
            f"{r['full_recompute_ms_per_token']:.0f} | {r['speedup']:.0f}x |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["prefix"] for r in rows]
    ax.loglog(xs, [r["cached_ms_per_token"] for r in rows], "o-", label="cached decode")
    ax.loglog(xs, [r["full_recompute_ms_per_token"] for r in rows], "s-", label="full recompute")
    ax.set_xlabel("prefix length (tokens)")
    ax.set_ylabel("ms per generated token")
    ax.legend()
    save_png(fig, RESULTS / "decode.png")
    print("wrote", RESULTS / "decode.json", "and", RESULTS / "decode.png")


if __name__ == "__main__":
    main()

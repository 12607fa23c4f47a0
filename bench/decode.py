"""Per-token generation latency: cached decoding against full recomputation.

    python -m bench.decode [--prefixes 1024 16384 65536] [--tokens 16]

Peers (when installed): reformer-pytorch's generation (a full forward per token) and
transformers' cached Reformer decoding, same shape, at --peer-prefixes.

The model is enwik8-small's shape (4 layers alternating local and LSH-2 attention,
d_model 256) with a 64K context. For each prefix length P: prefill a cache with P tokens,
then time each of the next --tokens decode steps (median); the baseline is what a decoder
without a cache pays per token, one full forward over P + 1 tokens (median of 3 after a
warm-up at the shortest prefix). All in one process, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
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


def peer_rows(prefixes: list[int], tokens: int) -> list[dict]:
    """Per-token generation latency of the peers, same shape (4 layers, d 256, LSH-2 / local,
    chunk 64). reformer-pytorch's generate re-runs the model over the whole sequence for every
    token, so its per-token cost is one forward over the prefix; transformers' Reformer
    decodes with its LSH cache (past_buckets_states)."""
    rows: list[dict] = []
    try:
        from reformer_pytorch import ReformerLM as RPLM

        for P in prefixes:
            m = RPLM(num_tokens=256, dim=256, depth=4, max_seq_len=P, heads=4, bucket_size=32,
                     n_hashes=2, causal=True, ff_mult=2).eval()  # fmt: skip
            ids = torch.randint(0, 256, (1, P))
            with torch.no_grad():
                m(ids[:, : min(P, 1024)])  # warm-up
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    m(ids)
                    times.append(time.perf_counter() - t0)
            rows.append({"peer": "reformer-pytorch", "prefix": P,
                         "ms_per_token": 1e3 * statistics.median(times)})  # fmt: skip
    except Exception as e:  # a missing or failing peer is recorded, not fatal
        rows.append({"peer": "reformer-pytorch", "error": f"{type(e).__name__}: {e}"})
    try:
        from transformers import ReformerConfig as HFConfig
        from transformers import ReformerModelWithLMHead

        for P in prefixes:
            cfg = HFConfig(
                vocab_size=256, hidden_size=256, num_attention_heads=4, attention_head_size=64,
                attn_layers=["local", "lsh", "local", "lsh"], feed_forward_size=512,
                is_decoder=True, axial_pos_embds=False, max_position_embeddings=P + tokens + 64,
                lsh_attn_chunk_length=64, local_attn_chunk_length=64, num_hashes=2,
                hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                local_attention_probs_dropout_prob=0.0,
            )  # fmt: skip
            m = ReformerModelWithLMHead(cfg).eval()
            ids = torch.randint(0, 256, (1, P + tokens))
            with torch.no_grad():
                t0 = time.perf_counter()
                past = m(ids[:, :P], use_cache=True).past_buckets_states
                prefill = time.perf_counter() - t0
                times = []
                for i in range(tokens):
                    t0 = time.perf_counter()
                    o = m(ids[:, P + i : P + i + 1], past_buckets_states=past, use_cache=True)
                    past = o.past_buckets_states
                    times.append(time.perf_counter() - t0)
            rows.append({"peer": "transformers", "prefix": P, "prefill_s": prefill,
                         "ms_per_token": 1e3 * statistics.median(times)})  # fmt: skip
    except Exception as e:
        rows.append({"peer": "transformers", "error": f"{type(e).__name__}: {e}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefixes", type=int, nargs="+", default=[1024, 16384, 65536])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-repeats", type=int, default=3)
    parser.add_argument(
        "--peer-prefixes",
        type=int,
        nargs="*",
        default=[1024, 16384],
        help="prefixes at which to time the peers' generation (if installed)",
    )
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
    peers = peer_rows(ns.peer_prefixes, ns.tokens) if ns.peer_prefixes else []
    for r in peers:
        print(json.dumps(r), flush=True)
    out = {
        "command": command_line(),
        "environment": environment() | {"threads": ns.threads},
        "model": "4 layers local/lsh-2, d_model 256, d_ff 512, 4 heads, chunk 64",
        "rows": rows,
        "peers": peers,
    }
    write_json(RESULTS / "decode.json", out)
    print("| prefix | cached ms/token | full recompute ms/token | speedup |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prefix']:,} | {r['cached_ms_per_token']:.1f} | "
            f"{r['full_recompute_ms_per_token']:.0f} | {r['speedup']:.0f}x |"
        )
    for r in peers:
        if "error" not in r:
            print(f"| {r['prefix']:,} | {r['peer']}: {r['ms_per_token']:.1f} ms/token |")
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

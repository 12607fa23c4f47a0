"""One causal attention layer, forward + backward, against peers and dense SDPA.

d_model 256, 4 heads of 64, batch 1, causal, at L = 1K, 4K, 16K, 64K (--lengths):

    ours lsh-R   reformer.attention.Attention, LSH with R hash rounds, chunk 64, window mode
    ours local   the same module, local attention over chunk + previous chunk (64)
    ours full    the same module, dense shared-QK attention (O(L^2) bias)
    lsh-4-core   the LSH-4 core alone (no projections; inputs laid out as the projections
                 make them). The matmul ceiling is measured at the start of the run (square
                 2048 products and the core's tile shape); each row's "of_ceiling" is its
                 achieved GFLOP/s over the square ceiling
    sdpa         dense causal F.scaled_dot_product_attention(is_causal=True) with q/k/v/out
                 projections: the baseline every row's "x sdpa" ratio divides by
    reformer-pytorch  reformer_pytorch.LSHSelfAttention(causal, n_hashes 4, bucket_size 64:
                 its chunks hold bucket_size positions, as our chunk_len 64)
    transformers      transformers' ReformerAttention (layer norm + causal LSH, 4 hashes,
                 chunk 64, one chunk back; its LayerNorm is extra work ours does not do)

    python -m bench.attention [--lengths 1024 4096 16384 65536] [--configs ...]
    python -m bench.attention --compare bench/results/attention.json   # regression check

Each (configuration, L) runs in a fresh process (peak RSS, or CUDA max_memory_allocated,
minus the memory before the work); time is the median of --repeats calls after a warm-up.
A configuration predicted (from its last measured L) to pass --max-mem-gib or --max-seconds
per call is recorded as skipped, as are the longer lengths after it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    setup_worker,
    skip_reason,
    sync,
    warm_lsh_kernels,
    write_json,
)

D_MODEL, HEADS, HEAD_DIM, CHUNK = 256, 4, 64, 64

# name -> implementation, kind, hash rounds, and how time and memory grow with L (the
# expected exponents used to predict the next length before running it).
CONFIGS: dict[str, dict[str, Any]] = {
    **{
        f"lsh-{r}": dict(impl="ours", kind="lsh", n_hashes=r, time_exp=1, mem_exp=1)
        for r in (1, 2, 4, 8)
    },
    "local": dict(impl="ours", kind="local", n_hashes=1, time_exp=1, mem_exp=1),
    "full": dict(impl="ours", kind="full", n_hashes=1, time_exp=2, mem_exp=2),
    "sdpa": dict(impl="sdpa", time_exp=2, mem_exp=1),
    # The LSH-4 core alone (lsh_attention on (1, H, L, D) inputs, no projections): the
    # number to hold against the matmul ceiling measured in the same run.
    "lsh-4-core": dict(impl="core", kind="lsh", n_hashes=4, time_exp=1, mem_exp=1),
    "reformer-pytorch": dict(impl="reformer_pytorch", n_hashes=4, time_exp=1, mem_exp=1),
    "transformers": dict(impl="transformers", n_hashes=4, time_exp=1, mem_exp=1),
}
FLOP_FORMULA = (
    "multiply-adds count 2 FLOPs; batch B = 1, H heads, D head dim, C chunk, Lp = L rounded "
    "up to C, R hash rounds. Forward: projections P * 2 * L * d_model * H * D (P = 3 with "
    "shared QK: qk, v, out; 4 otherwise) + core: lsh 2 * (2 * H * R * Lp * 2C * D) (QK^T and "
    "PV over chunk + previous chunk), local the same with R = 1, full 2 * (2 * H * L^2 * D) "
    "(every pair is computed), sdpa 2 * (2 * H * L(L+1)/2 * D) (causal half). Backward = 2 x "
    "forward. LSH hashing, forward only: 2 * H * Lp * D * R * sum(K_f / 2) over the bucket "
    "factors K_f. Elementwise work (masks, softmax, sorting, gathers) is not counted."
)


def flop_count(config: str, length: int) -> float | None:
    """FLOPs of one forward + backward of `config` at `length` (FLOP_FORMULA)."""
    from reformer.attention import auto_n_buckets, bucket_factors

    spec = CONFIGS[config]
    if spec["impl"] not in ("ours", "sdpa", "core"):
        return None
    kind = spec.get("kind", "sdpa")
    H, D, C, L = HEADS, HEAD_DIM, CHUNK, length
    Lp = math.ceil(L / C) * C
    n_proj = 3 if kind in ("lsh", "full") else 4
    proj = 0 if spec["impl"] == "core" else n_proj * 2 * L * D_MODEL * H * D
    rounds = spec["n_hashes"] if kind == "lsh" else 1
    core = {
        "lsh": 2 * (2 * H * rounds * Lp * 2 * C * D),
        "local": 2 * (2 * H * Lp * 2 * C * D),
        "full": 2 * (2 * H * L * L * D),
        "sdpa": 2 * (2 * H * L * (L + 1) / 2 * D),
    }[kind]
    hashing = 0
    if kind == "lsh":
        factors = bucket_factors(auto_n_buckets(Lp, C))
        hashing = 2 * H * Lp * D * rounds * sum(k // 2 for k in factors)
    return 3 * (proj + core) + hashing


class DenseCausal(nn.Module):
    """Dense causal multi-head attention through SDPA (its fused kernel, no mask tensor)."""

    def __init__(self) -> None:
        super().__init__()
        inner = HEADS * HEAD_DIM
        self.q, self.k, self.v = (nn.Linear(D_MODEL, inner, bias=False) for _ in range(3))
        self.out = nn.Linear(inner, D_MODEL)

    def forward(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        q, k, v = (
            p(x).view(B, L, HEADS, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(out.transpose(1, 2).reshape(B, L, -1))


def build(config: str, length: int) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    """The layer for `config` and how to call it: (B, L, d_model) -> (B, L, d_model)."""
    spec = CONFIGS[config]
    if spec["impl"] == "ours":
        from reformer import ReformerConfig
        from reformer.attention import Attention

        cfg = ReformerConfig(
            d_model=D_MODEL,
            n_heads=HEADS,
            n_hashes=spec["n_hashes"],
            chunk_len=CHUNK,
            lsh_mode="window",
            causal=True,
            max_seq_len=max(length, 2),
        )
        return Attention(cfg, spec["kind"]), lambda m, x: m(x)
    if spec["impl"] == "sdpa":
        return DenseCausal(), lambda m, x: m(x)
    if spec["impl"] == "reformer_pytorch":
        from reformer_pytorch import LSHSelfAttention

        layer = LSHSelfAttention(
            dim=D_MODEL, heads=HEADS, bucket_size=CHUNK, n_hashes=spec["n_hashes"], causal=True
        )
        return layer, lambda m, x: m(x)
    from transformers import ReformerConfig as HFReformerConfig
    from transformers.models.reformer.modeling_reformer import ReformerAttention

    cfg = HFReformerConfig(
        is_decoder=True,
        attn_layers=["lsh"],
        hidden_size=D_MODEL,
        num_attention_heads=HEADS,
        attention_head_size=HEAD_DIM,
        lsh_attn_chunk_length=CHUNK,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        num_hashes=spec["n_hashes"],
        num_buckets=None,  # its automatic rule: 2 L / chunk, factorised when large
        max_position_embeddings=length,
        axial_pos_shape=(max(1, length // 64), 64),
        axial_pos_embds_dim=(D_MODEL // 2, D_MODEL // 2),
        lsh_attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    return ReformerAttention(cfg, layer_id=0), lambda m, x: m(x).hidden_states


def core_worker(args: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict:
    """The LSH core alone: hashing, sorting, pair codes, attention, forward + backward."""
    from reformer.attention import auto_n_buckets, draw_rotations, lsh_attention

    spec, L = CONFIGS[args["config"]], args["length"]
    # Leaves in the layout the projections make, (B, L, H, D), seen as (B, H, L, D) heads.
    qk_, v_ = (
        torch.randn(1, L, HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        for _ in range(2)
    )
    n_buckets = auto_n_buckets(math.ceil(L / CHUNK) * CHUNK, CHUNK)
    warm_lsh_kernels(device, dtype, CHUNK)

    def step() -> None:
        qk_.grad = v_.grad = None
        qk, v = qk_.transpose(1, 2), v_.transpose(1, 2)
        rot = draw_rotations(HEADS, HEAD_DIM, spec["n_hashes"], n_buckets, device=device)
        lsh_attention(
            qk, v, rot, chunk_len=CHUNK, causal=True, mode="window"
        ).float().sum().backward()

    return measure(step, args, device)


def matmul_ceiling(threads: int, device: str, dtype: str, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of this machine's matmul in this run: square 2048 x 2048 products, and the
    attention core's tile shape (256 bmm's of (64 x 64) @ (64 x 128))."""
    torch.set_num_threads(threads)
    dev, dt = torch.device(device), getattr(torch, dtype)
    out = {}
    for name, (a_shape, b_shape) in {
        "square_2048": ((2048, 2048), (2048, 2048)),
        "chunk_tiles": ((256, CHUNK, HEAD_DIM), (256, HEAD_DIM, 2 * CHUNK)),
    }.items():
        a, b = (
            torch.randn(a_shape, device=dev, dtype=dt),
            torch.randn(b_shape, device=dev, dtype=dt),
        )
        flops = 2 * a.numel() * b.shape[-1]
        times = []
        for i in range(repeats + 1):
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(10):
                torch.matmul(a, b)
            sync(dev)
            if i:  # the first pass warms up
                times.append((time.perf_counter() - t0) / 10)
        out[name] = flops / sorted(times)[len(times) // 2] / 1e9
    return out


def worker(args: dict[str, Any]) -> dict[str, Any]:
    device, dtype = setup_worker(args)
    if CONFIGS[args["config"]]["impl"] == "core":
        return core_worker(args, device, dtype)
    length = args["length"]
    module, call = build(args["config"], length)
    module = module.to(device=device, dtype=dtype).train()
    if CONFIGS[args["config"]].get("kind") == "lsh" and CONFIGS[args["config"]]["impl"] == "ours":
        warm_lsh_kernels(device, dtype, CHUNK)
    x = torch.randn(1, length, D_MODEL, device=device, dtype=dtype, requires_grad=True)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        call(module, x).float().sum().backward()

    return measure(step, args, device)


def run(ns: argparse.Namespace) -> list[dict[str, Any]]:
    ns.ceiling = matmul_ceiling(ns.threads, ns.device, ns.dtype)
    print("matmul ceiling, GFLOP/s:", json.dumps(ns.ceiling), flush=True)
    rows: list[dict[str, Any]] = []
    history: dict[str, list[tuple[int, float, float]]] = {c: [] for c in ns.configs}
    stopped: dict[str, str] = {}  # config -> why its longer lengths are skipped
    t_start = time.monotonic()
    for length in sorted(ns.lengths):
        for config in ns.configs:
            spec = CONFIGS[config]
            if spec["impl"] != "ours" and length > ns.max_peer_length:
                continue
            row: dict[str, Any] = {"config": config, "length": length}
            hist = history[config]
            pred_s = extrapolate([(n, s) for n, s, _ in hist], length, spec["time_exp"])
            pred_m = extrapolate([(n, m) for n, _, m in hist], length, spec["mem_exp"])
            reason = stopped.get(config) or skip_reason(
                pred_m, pred_s, ns.max_mem_gib, ns.max_seconds, ns.device
            )
            if ns.time_budget is not None and time.monotonic() - t_start > ns.time_budget:
                reason = reason or f"--time-budget {ns.time_budget:g} s spent"
            elif reason and config not in stopped:
                stopped[config] = f"{reason} at L={length}"
            if reason:
                row["skipped"] = reason
            else:
                args = dict(
                    config=config,
                    length=length,
                    repeats=ns.repeats,
                    threads=ns.threads,
                    device=ns.device,
                    dtype=ns.dtype,
                )
                timeout = 300 + 3 * (ns.repeats + 1) * (pred_s or ns.max_seconds)
                row |= run_measured("bench.attention", args, timeout, ns.device)
                if "error" in row:
                    stopped[config] = f"failed at L={length}"
                else:
                    flops = flop_count(config, length)
                    row["gflops"] = flops / row["seconds"] / 1e9 if flops else None
                    if flops:
                        row["of_ceiling"] = row["gflops"] / ns.ceiling["square_2048"]
                    hist.append((length, row["seconds"], row["peak_mib"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            add_ratios(rows)
            write_json(RESULTS / f"{ns.name}.json", report(ns, rows))
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's seconds over SDPA's at the same L in the same run."""
    sdpa = {r["length"]: r["seconds"] for r in rows if r["config"] == "sdpa" and "seconds" in r}
    for r in rows:
        if "seconds" in r and r["length"] in sdpa:
            r["x_sdpa"] = r["seconds"] / sdpa[r["length"]]


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the optional peers (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("reformer-pytorch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def report(ns: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    settings = {k: v for k, v in vars(ns).items() if k not in ("worker", "compare", "ceiling")}
    return {
        "matmul_ceiling_gflops": getattr(ns, "ceiling", None),
        "command": command_line(),
        "environment": environment() | {"threads": ns.threads},
        "settings": settings | {"d_model": D_MODEL, "heads": HEADS, "chunk_len": CHUNK},
        "peers": peer_versions(),
        "flop_formula": FLOP_FORMULA,
        "rows": rows,
    }


def compare(rows: list[dict[str, Any]], old_path: Path) -> str:
    """new/old seconds per (config, L), raw and with each run's SDPA time divided out."""
    old = {(r["config"], r["length"]): r for r in json.loads(old_path.read_text())["rows"]}
    out = []
    for r in rows:
        o = old.get((r["config"], r["length"]))
        if o is None or "seconds" not in r or "seconds" not in o:
            continue
        item = {"config": r["config"], "length": r["length"], "new": r["seconds"]}
        item |= {"old": o["seconds"], "ratio": r["seconds"] / o["seconds"]}
        if "x_sdpa" in r and "x_sdpa" in o:
            item["ratio_sdpa"] = r["x_sdpa"] / o["x_sdpa"]
        out.append(item)
    cols = [("config", "config"), ("L", "length"), ("new s", "new"), ("old s", "old")]
    cols += [("new/old", "ratio"), ("new/old (x sdpa)", "ratio_sdpa")]
    return markdown_table(out, cols)


def plot(ns: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for config in ns.configs:
        sel = [r for r in rows if r["config"] == config and "seconds" in r]
        if sel:
            lengths = [r["length"] for r in sel]
            ax_t.plot(lengths, [r["seconds"] for r in sel], "o-", label=config)
            ax_m.plot(lengths, [r["peak_mib"] for r in sel], "o-", label=config)
    for ax, label in ((ax_t, "seconds, forward + backward"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
    if ax_t.get_legend_handles_labels()[0]:
        ax_t.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.suptitle(f"one attention layer, d_model {D_MODEL}, {HEADS} heads, {ns.device} {ns.dtype}")
    save_png(fig, RESULTS / f"{ns.name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--max-peer-length",
        type=int,
        default=65536,
        help="longer lengths run ours only (no peers, no SDPA ratio)",
    )
    parser.add_argument("--max-mem-gib", "--max-rss-gib", type=float, default=20.0)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="cap per call")
    parser.add_argument("--compare", type=Path, default=None, help="OLD.json: print new/old")
    parser.add_argument("--quick", action="store_true", help="tiny run: L 256, 1 repeat")
    add_common_args(parser, "attention")
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    if ns.quick:
        ns.lengths, ns.repeats = [256], 1
        if ns.name == "attention":  # keep quick results out of the real ones (git-ignored)
            ns.name = "tmp/attention"
    print("reproduce with:", command_line(), flush=True)
    torch.set_num_threads(ns.threads)
    print(f"threads: {ns.threads}", flush=True)
    rows = run(ns)
    print()
    cols = [("config", "config"), ("L", "length"), ("seconds", "seconds"), ("x sdpa", "x_sdpa")]
    cols += [("peak MiB", "peak_mib"), ("GFLOP/s", "gflops"), ("of ceiling", "of_ceiling")]
    cols.append(("skipped", "skipped"))
    cols.append(("error", "error"))
    print(markdown_table(rows, cols))
    plot(ns, rows)
    print("wrote", RESULTS / f"{ns.name}.json", "and", RESULTS / f"{ns.name}.png")
    if ns.compare:
        print(f"\ncompared with {ns.compare}:\n" + compare(rows, ns.compare))


if __name__ == "__main__":
    main()

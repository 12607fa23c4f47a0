"""Time per token of a training step at a fixed number of tokens: the paper's Figure 5.

A ReformerLM training step (loss + backward + AdamW step; 2 layers, d_model 256, d_ff 1024,
4 heads, reversible) on --tokens tokens (2^16) as batch = tokens / L sequences of length L,
L = 1K ... 64K. With LSH attention (1, 2, 4, 8 hashes) the work per token does not depend
on L, so the time per token stays flat; with full attention it grows linearly with L.

    python -m bench.flat [--tokens 65536] [--lengths 1024 4096 16384 65536] [--kinds ...]

Each (kind, L) runs in fresh processes (bench/_harness.py: run_measured); the reported time
is the median of --repeats steps after --warmup untimed ones (default 1), and "norm" is the
time per token over the same kind's time per token at the shortest L measured. A kind
predicted (from its last L) to pass --max-mem-gib or --max-step-seconds is skipped at that L
and beyond.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
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
    setup_worker,
    skip_reason,
    warm_lsh_kernels,
    write_json,
)

KINDS: dict[str, dict[str, Any]] = {
    **{f"lsh-{r}": dict(attention="lsh", n_hashes=r) for r in (1, 2, 4, 8)},
    "full": dict(attention="full", n_hashes=1),
}
# Growth with L at fixed tokens, used to predict the next L: LSH flat, full linear (B L^2).
EXPONENT = {"lsh": 0.0, "full": 1.0}


def lm_training(args: dict[str, Any]) -> tuple[torch.nn.Module, Callable[[], None]]:
    """The ReformerLM described by args and one training step of it (shared with bench.scale
    and bench.memory_breakdown).

    args: attention, n_hashes, length, batch, layers, d_model, d_ff, heads, reversible;
    device/dtype from setup_worker (bfloat16 runs under autocast, parameters in float32).
    """
    from reformer import ReformerConfig, ReformerLM

    device, dtype = setup_worker(args)
    length = args["length"]
    cfg = ReformerConfig(
        vocab_size=256,
        d_model=args["d_model"],
        n_heads=args["heads"],
        d_ff=args["d_ff"],
        n_layers=args["layers"],
        max_seq_len=length,
        attention=args["attention"],
        n_hashes=args["n_hashes"],
        chunk_len=64,
        reversible=args.get("reversible", True),
    )
    model = ReformerLM(cfg).to(device).train()
    if "lsh" in cfg.layer_kinds:
        warm_lsh_kernels(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (args["batch"], length + 1), device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if dtype == torch.bfloat16
        else contextlib.nullcontext()
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()

    return model, step


def worker(args: dict[str, Any]) -> dict[str, Any]:
    _, step = lm_training(args)
    return measure(step, args, torch.device(args.get("device", "cpu")))


def run(ns: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    history: dict[str, list[tuple[int, float, float]]] = {k: [] for k in ns.kinds}
    stopped: dict[str, str] = {}
    t_start = time.monotonic()
    for length in sorted(ns.lengths):
        batch = max(1, ns.tokens // length)
        for kind in ns.kinds:
            spec = KINDS[kind]
            row: dict[str, Any] = {"kind": kind, "length": length, "batch": batch}
            exp = EXPONENT[spec["attention"]]
            hist = history[kind]
            pred_s = extrapolate([(n, s) for n, s, _ in hist], length, exp)
            pred_m = extrapolate([(n, m) for n, _, m in hist], length, exp)
            reason = stopped.get(kind) or skip_reason(
                pred_m, pred_s, ns.max_mem_gib, ns.max_step_seconds, ns.device
            )
            if ns.time_budget is not None and time.monotonic() - t_start > ns.time_budget:
                reason = reason or f"--time-budget {ns.time_budget:g} s spent"
            elif reason and kind not in stopped:
                stopped[kind] = f"{reason} at L={length}"
            if reason:
                row["skipped"] = reason
            else:
                args = spec | dict(
                    length=length,
                    batch=batch,
                    layers=ns.layers,
                    d_model=256,
                    d_ff=1024,
                    heads=4,
                    repeats=ns.repeats,
                    warmup=ns.warmup,
                    threads=ns.threads,
                    device=ns.device,
                    dtype=ns.dtype,
                )
                timeout = 300 + 3 * (ns.repeats + 1) * (pred_s or ns.max_step_seconds)
                row |= run_measured("bench.flat", args, timeout, ns.device)
                if "error" in row:
                    stopped[kind] = f"failed at L={length}"
                else:
                    row["us_per_token"] = row["seconds"] / (batch * length) * 1e6
                    hist.append((length, row["seconds"], row["peak_mib"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            normalise(rows)
            write_json(RESULTS / f"{ns.name}.json", report(ns, rows))
    return rows


def normalise(rows: list[dict[str, Any]]) -> None:
    """norm: time per token over the same kind's at its shortest measured L."""
    first: dict[str, float] = {}
    for r in sorted((r for r in rows if "us_per_token" in r), key=lambda r: r["length"]):
        first.setdefault(r["kind"], r["us_per_token"])
        r["norm"] = r["us_per_token"] / first[r["kind"]]


def report(ns: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "command": command_line(),
        "environment": environment() | {"threads": ns.threads},
        "settings": {k: v for k, v in vars(ns).items() if k != "worker"}
        | {"d_model": 256, "d_ff": 1024, "heads": 4, "optimizer": "AdamW", "reversible": True},
        "rows": rows,
    }


def plot(ns: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    fig, (ax_n, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ns.kinds:
        sel = [r for r in rows if r["kind"] == kind and "norm" in r]
        if sel:
            lengths = [r["length"] for r in sel]
            ax_n.plot(lengths, [r["norm"] for r in sel], "o-", label=kind)
            ax_s.plot(lengths, [r["seconds"] for r in sel], "o-", label=kind)
    ax_n.set_ylabel("time per token / time per token at the shortest L")
    ax_s.set_ylabel("seconds per training step")
    for ax in (ax_n, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"sequence length L (batch = {ns.tokens} / L)")
    ax_s.set_yscale("log")
    if ax_n.get_legend_handles_labels()[0]:
        ax_n.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.suptitle(f"ReformerLM training step, {ns.tokens} tokens, {ns.device} {ns.dtype}")
    save_png(fig, RESULTS / f"{ns.name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2**16, help="tokens per step")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps before timing, in the timing process (the kernels are compiled "
        "before either process measures)",
    )
    parser.add_argument("--max-mem-gib", "--max-rss-gib", type=float, default=20.0)
    parser.add_argument("--max-step-seconds", type=float, default=300.0, help="cap per step")
    parser.add_argument(
        "--quick", action="store_true", help="tiny run: 1024 tokens, L 256 and 1024, 1 repeat"
    )
    add_common_args(parser, "flat")
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    if ns.quick:
        ns.tokens, ns.lengths, ns.repeats = 1024, [256, 1024], 1
        if ns.name == "flat":  # keep quick results out of the real ones (git-ignored)
            ns.name = "tmp/flat"
    print("reproduce with:", command_line(), flush=True)
    torch.set_num_threads(ns.threads)
    print(f"threads: {ns.threads}", flush=True)
    rows = run(ns)
    print()
    cols = [("kind", "kind"), ("L", "length"), ("batch", "batch"), ("s/step", "seconds")]
    cols += [("us/token", "us_per_token"), ("norm", "norm"), ("peak MiB", "peak_mib")]
    cols += [("skipped", "skipped"), ("error", "error")]
    print(markdown_table(rows, cols))
    plot(ns, rows)
    print("wrote", RESULTS / f"{ns.name}.json", "and", RESULTS / f"{ns.name}.png")


if __name__ == "__main__":
    main()

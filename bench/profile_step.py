"""Where the time of one LM training step goes, by operator (torch.profiler), in fp32 and
under bf16 autocast: the issue's shape (1 layer, L = 16,384, d_model 256, 4 heads, d_ff 1024,
vocab 256, LSH-4, chunk 64, reversible, batch 1, `model.loss` + backward): the median of
five timed steps, then one profiled step, after two warm-up steps, each precision in a
fresh process.

    python -m bench.profile_step [--length 16384] [--top 15] [--cpu-cache GIB] [--name NAME]

Prints the top operators by self CPU time with their share of the step, the matmul share
(mm, bmm, addmm, baddbmm, matmul, linear) and the step's model-FLOP utilisation against the
best 4096 x 4096 matmul in the same process and precision; writes
bench/results/NAME.json (default profile_step). --cpu-cache runs the steps with
reformer.cpu_cache keeping up to GIB of freed blocks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench._harness import RESULTS, command_line, environment, write_json

MATMULS = (
    "aten::mm",
    "aten::bmm",
    "aten::addmm",
    "aten::baddbmm",
    "aten::baddbmm_",
    "aten::matmul",
)


def worker(precision: str, length: int, top: int, cache_gib: float = 0.0) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench._harness import matmul_rate, use_cpu_cache
    from bench.step import CHUNK, D_FF, HASHES, HEADS, VOCAB, D, model_flops
    from reformer import ReformerConfig, ReformerLM

    torch.set_num_threads(2)
    use_cpu_cache(cache_gib)
    cfg = ReformerConfig(
        vocab_size=VOCAB, d_model=D, n_heads=HEADS, d_ff=D_FF, n_layers=1,
        max_seq_len=length, attention="lsh", n_hashes=HASHES, chunk_len=CHUNK,
    )  # fmt: skip
    model = ReformerLM(cfg)
    ids = torch.randint(0, VOCAB, (1, length + 1))
    bf16 = precision == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()

    step(), step()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    seconds = sorted(times)[len(times) // 2]  # the median of 5: one step is too noisy here
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(
        ({"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events),
        key=lambda r: -r["ms"],
    )
    matmul = sum(r["ms"] for r in rows if r["op"] in MATMULS)
    flops = model_flops("ours", 1, length)
    rate = matmul_rate(torch.bfloat16 if bf16 else torch.float32, torch.device("cpu"))
    return {
        "precision": precision,
        "step_s": seconds,
        "self_ms": total / 1e3,
        "matmul_share": matmul / (total / 1e3),
        "matmul_gflops": rate / 1e9,
        "mfu": flops / (seconds * rate),
        # The MFU if everything but the matmuls took no time: their profiled self time.
        "mfu_matmul_bound": flops / (matmul / 1e3 * rate),
        "top": rows[:top],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--cpu-cache", type=float, default=0.0, help="GiB: reformer.cpu_cache")
    p.add_argument("--name", default="profile_step", help="bench/results/NAME.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.length, args.top, args.cpu_cache)))
        return
    print(command_line(), flush=True)
    results = []
    for precision in ("fp32", "bf16"):
        cmd = [sys.executable, "-m", "bench.profile_step", "--worker", precision]
        cmd += ["--length", str(args.length), "--top", str(args.top)]
        cmd += ["--cpu-cache", str(args.cpu_cache)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results.append(r)
        print(
            f"\n{precision}: step {r['step_s']:.3f} s, MFU {100 * r['mfu']:.1f}% of "
            f"{r['matmul_gflops']:.0f} GFLOP/s, matmuls {100 * r['matmul_share']:.0f}% of "
            f"{r['self_ms']:.0f} ms self time; with no time outside the matmuls the MFU would "
            f"be {100 * r['mfu_matmul_bound']:.1f}%"
        )
        print("| operator | self ms | share | calls |\n|---|---|---|---|")
        for row in r["top"]:
            share = 100 * row["ms"] / r["self_ms"]
            print(f"| {row['op']} | {row['ms']:.1f} | {share:.1f}% | {row['calls']} |")
    write_json(
        RESULTS / f"{args.name}.json",
        {
            "command": command_line(),
            "env": environment() | {"cpu_cache_gib": args.cpu_cache},
            "results": results,
        },
    )


if __name__ == "__main__":
    main()

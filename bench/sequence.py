"""One sequence over N processes (`--parallel sequence`) against one process: per-rank peak
memory of a training step, its time, and the bytes each rank sends per attention layer
against the prediction.

    python -m bench.sequence --length 65536 --ranks 2 [--preset enwik8-small]

Every measurement runs in fresh processes with one thread each (gloo on the CPU); the one
process and the ranks build the same model from the preset and train one step (loss and
backward) after a warm-up step at 1/8 of the length. Memory: peak RSS above the RSS before the
step (VmHWM reset through /proc/self/clear_refs). Results: bench/results/sequence.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _config(preset: str, length: int):
    from reformer.cli.train import parse_train_args

    cfg = parse_train_args(["--preset", preset, "--seq-len", str(length),
                            "--model.max-seq-len", str(length)])  # fmt: skip
    cfg.model.dropout = 0.0
    return cfg.model


def predicted_bytes(cfg, length: int, ranks: int) -> dict[str, int]:
    """Bytes a rank sends to the other ranks in one training step (batch 1, fp32). Per LSH
    layer and direction, every token's rows (qk and v) and metadata (7 + 2 R int64) for each
    head and round go to the owner of their slot, 1/N of them to the rank itself, and each
    query's output and log-sum-exp come back; the forward exchange runs three times (the
    forward pass, the reversible recompute, the checkpointed head group's recompute in the
    backward pass), the backward exchange once, without the metadata. Local layers send a
    halo of about `before` chunks to the next rank."""
    H, R, D, C = cfg.n_heads, cfg.n_hashes, cfg.head_dim, cfg.chunk_len_for("lsh")
    entries = H * R * length // ranks
    off = (ranks - 1) / ranks
    forward = entries * (2 * D * 4 + (7 + 2 * R) * 8 + (D + 1) * 4) * off
    backward = entries * (2 * D * 4 + (D + 1) * 4) * off
    lsh = sum(k == "lsh" for k in cfg.layer_kinds)
    halo = (len(cfg.layer_kinds) - lsh) * 2 * C * H * (3 * D + 1) * 4
    return {
        "per_lsh_layer_forward": int(forward),
        "step": int(lsh * (3 * forward + backward) + halo),
    }


def worker(preset: str, length: int, out: str) -> None:
    """One process of the measurement (RANK/WORLD_SIZE in the environment for the ranks)."""
    import torch
    import torch.distributed as dist

    from reformer import ReformerLM
    from reformer.plan import _reset_rss_peak, _rss_peak_bytes
    from reformer.sequence import SequenceShard, shard

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})  # each rank a core of its own
    sent = {"bytes": 0}
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        plain = shard._all_to_all

        def counted(x, send, recv, group):
            rows = sum(n for r, n in enumerate(send) if r != rank)  # to other ranks
            sent["bytes"] += rows * x[0].numel() * x.element_size() if len(x) else 0
            return plain(x, send, recv, group)

        shard._all_to_all = counted
    cfg = _config(preset, length)
    torch.manual_seed(0)
    model = ReformerLM(cfg).train()

    def step(L: int) -> float:
        ids = torch.randint(
            0, cfg.vocab_size, (1, L + 1), generator=torch.Generator().manual_seed(1)
        )
        model.shard_sequence(SequenceShard(L, rank, world) if world > 1 else None)
        torch.manual_seed(2)
        t = time.perf_counter()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step(length // 8)
    sent["bytes"] = 0
    _reset_rss_peak()
    base = _rss_peak_bytes()
    seconds = step(length)
    peak = _rss_peak_bytes() - base
    layers = sum(k == "lsh" for k in cfg.layer_kinds)
    Path(f"{out}.{rank}.json").write_text(json.dumps(
        {"rank": rank, "peak_bytes": peak, "seconds": seconds, "sent_bytes": sent["bytes"],
         "lsh_layers": layers, "local_layers": len(cfg.layer_kinds) - layers}))  # fmt: skip
    if world > 1:
        dist.destroy_process_group()


def launch(preset: str, length: int, world: int, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}  # fmt: skip
    cmd = [sys.executable, "-m", "bench.sequence", "--worker", str(out),
           "--preset", preset, "--length", str(length)]  # fmt: skip
    procs = [subprocess.Popen(cmd, env=env | {"RANK": str(r)}) for r in range(world)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a worker of the {world}-process measurement failed")
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sequence", description=__doc__)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--preset", default="enwik8-small")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.preset, args.length, args.worker)
        return 0
    scratch = RESULTS / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    one = launch(args.preset, args.length, 1, scratch / "one")[0]
    ranks = launch(args.preset, args.length, args.ranks, scratch / "seq")
    cfg = _config(args.preset, args.length)
    worst = max(r["peak_bytes"] for r in ranks)
    result = {
        "command": "python -m bench.sequence " + " ".join(argv or sys.argv[1:]),
        "length": args.length, "ranks": args.ranks, "preset": args.preset,
        "one_process": one, "per_rank": ranks,
        "peak_ratio": worst / one["peak_bytes"],
        "predicted_sent_bytes": predicted_bytes(cfg, args.length, args.ranks),
    }  # fmt: skip
    MiB = 2**20
    print(f"{args.length:,} tokens, {args.preset}: one process {one['peak_bytes'] / MiB:,.0f} MiB "
          f"in {one['seconds']:.1f} s; {args.ranks} ranks: peak per rank "
          f"{worst / MiB:,.0f} MiB ({result['peak_ratio']:.2f}x), "
          f"{max(r['seconds'] for r in ranks):.1f} s")  # fmt: skip
    for r in ranks:
        print(f"rank {r['rank']}: sent {r['sent_bytes'] / MiB:,.1f} MiB to other ranks in the "
              f"step ({r['lsh_layers']} LSH, {r['local_layers']} local layers)")  # fmt: skip
    pred = result["predicted_sent_bytes"]
    print(f"predicted: {pred['step'] / MiB:,.1f} MiB per step "
          f"({pred['per_lsh_layer_forward'] / MiB:,.1f} MiB per LSH layer forward)")  # fmt: skip
    (RESULTS / "sequence.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

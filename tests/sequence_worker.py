"""One rank of the sequence-parallel attention checks (tests/test_sequence_parallel.py):
every case's routed attention on this rank's slice against one process's attention on the
whole sequence, float64, outputs and input gradients. Writes {case: [output error, gradient
error]} to OUT.rank.json. Launched as RANK=r WORLD_SIZE=n MASTER_PORT=p python THIS OUT."""

import json
import os
import sys

import torch
import torch.distributed as dist

from reformer.attention import local_attention, lsh_attention
from reformer.attention.hashing import auto_n_buckets, draw_rotations, hash_vectors
from reformer.sequence.routed import Route, routed_attention
from reformer.sequence.shard import SequenceShard

F64 = torch.float64
# name: (kind, mode, causal, rounds, before, after, shared)
CASES = {
    "lsh-window-1": ("lsh", "window", True, 1, 1, 0, True),
    "lsh-window-2": ("lsh", "window", True, 2, 1, 0, True),
    "lsh-window-4": ("lsh", "window", True, 4, 1, 0, True),
    "lsh-chunk-3": ("lsh", "chunk", True, 3, 1, 0, True),
    "lsh-encoder-2": ("lsh", "chunk", False, 2, 1, 1, True),
    "lsh-encoder-wide": ("lsh", "chunk", False, 2, 2, 1, True),
    "local-causal": ("local", "local", True, 1, 1, 0, True),
    "local-encoder-qk": ("local", "local", False, 1, 1, 1, False),
}


def inputs(L: int, kind: str, shared: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, 2, 6
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=F64) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, -7:] = False  # padding at the end of one sequence
    mask[1, 3] = False  # and one inside it
    w = torch.randn(B, H, L, D, generator=g, dtype=F64)
    return q, (None if shared else k), v, mask, w


def one_case(name: str, shard: SequenceShard, C: int = 4) -> list[float]:
    kind, mode, causal, R, nb, na, shared = CASES[name]
    L = shard.length
    q, k, v, mask, w = inputs(L, kind, shared, seed=len(name))
    full = [t.clone().requires_grad_(True) for t in (q, v)] + (
        [] if k is None else [k.clone().requires_grad_(True)])
    if kind == "lsh":
        g = torch.Generator().manual_seed(7)
        rot = draw_rotations(2, 6, R, auto_n_buckets(-(-L // C) * C, C), generator=g, dtype=F64)
        ref = lsh_attention(full[0], full[1], rot, chunk_len=C, causal=causal, mode=mode,
                            attention_mask=mask, chunks_before=nb, chunks_after=na)
    else:
        ref = local_attention(full[0], None if k is None else full[2], full[1], chunk_len=C,
                              causal=causal, attention_mask=mask, chunks_before=nb,
                              chunks_after=na)
    (ref * w * mask[:, None, :, None]).sum().backward()
    mine = [shard.local(t.detach(), 2).clone().requires_grad_(True) for t in full]
    valid = shard.local(mask, 1)
    buckets = hash_vectors(mine[0], rot) if kind == "lsh" else None
    route = Route(C, mode, causal, nb, na, True, shared)
    out = routed_attention(mine[0], None if k is None else mine[2], mine[1], buckets, valid,
                           shard, route)
    (out * shard.local(w, 2) * valid[:, None, :, None]).sum().backward()
    m = valid[:, None, :, None]
    err = float(((out - shard.local(ref.detach(), 2)) * m).abs().max())
    grad = max(float((a.grad - shard.local(b.grad, 2)).abs().max()) for a, b in zip(mine, full))
    return [err, grad]


def main() -> None:
    out = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for L in (37, 64):
        for name in CASES:
            shard = SequenceShard(L, rank, world)
            results[f"{name}/L{L}"] = one_case(name, shard)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One rank of the sequence-parallel attention checks (tests/test_sequence_parallel.py):
every case's routed attention on this rank's slice against one process's attention on the
whole sequence, float64, outputs and input gradients. Writes {case: [output error, gradient
error]} to OUT.rank.json. Launched as RANK=r WORLD_SIZE=n MASTER_PORT=p python THIS OUT."""

import json
import os
import sys

import torch
import torch.distributed as dist

from reformer.attention import local_attention, lsh_attention, routed
from reformer.attention.halo import halo_local_attention
from reformer.attention.hashing import auto_n_buckets, draw_rotations, hash_vectors
from reformer.attention.routed import Route, routed_attention
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
    "local-wide-qk": ("local", "local", False, 1, 3, 2, False),
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


def one_case(name: str, shard: SequenceShard, C: int = 4, dtype=F64) -> list[float]:
    """Routed attention of this rank's slice in `dtype` against one process in float64:
    [output error, input-gradient error], relative to the largest reference value outside
    float64."""
    kind, mode, causal, R, nb, na, shared = CASES[name]
    L = shard.length
    q, k, v, mask, w = inputs(L, kind, shared, seed=len(name))
    full = [t.clone().requires_grad_(True) for t in (q, v)] + (
        [] if k is None else [k.clone().requires_grad_(True)]
    )
    if kind == "lsh":
        g = torch.Generator().manual_seed(7)
        rot = draw_rotations(2, 6, R, auto_n_buckets(-(-L // C) * C, C), generator=g, dtype=F64)
        ref = lsh_attention(
            full[0],
            full[1],
            rot,
            chunk_len=C,
            causal=causal,
            mode=mode,
            attention_mask=mask,
            chunks_before=nb,
            chunks_after=na,
        )
    else:
        ref = local_attention(
            full[0],
            None if k is None else full[2],
            full[1],
            chunk_len=C,
            causal=causal,
            attention_mask=mask,
            chunks_before=nb,
            chunks_after=na,
        )
    (ref * w * mask[:, None, :, None]).sum().backward()
    mine = [shard.local(t.detach(), 2).to(dtype).requires_grad_(True) for t in full]
    valid = shard.local(mask, 1)
    # the reference's buckets (hashing rounded vectors could move a token to another bucket)
    buckets = hash_vectors(shard.local(q, 2), rot) if kind == "lsh" else None
    if kind == "lsh":
        route = Route(C, mode, causal, nb, na, True)
        out = routed_attention(mine[0], mine[1], buckets, valid, shard, route)
    else:
        out = halo_local_attention(
            mine[0],
            None if k is None else mine[2],
            mine[1],
            valid,
            shard,
            chunk_len=C,
            causal=causal,
            chunks_before=nb,
            chunks_after=na,
        )
    (out.to(F64) * shard.local(w, 2) * valid[:, None, :, None]).sum().backward()
    m = valid[:, None, :, None]
    ref_out = shard.local(ref.detach(), 2)
    scale = 1.0 if dtype == F64 else float(ref_out.abs().max())
    err = float(((out.detach().to(F64) - ref_out) * m).abs().max()) / scale
    grad = 0.0
    for a, b in zip(mine, full):
        ref_grad = shard.local(b.grad, 2)
        g_scale = 1.0 if dtype == F64 else float(ref_grad.abs().max())
        grad = max(grad, float((a.grad.to(F64) - ref_grad).abs().max()) / g_scale)
    return [err, grad]


def main() -> None:
    out = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    routed.SLICE_SCORES = 300  # a few query chunks per checkpointed slice
    routed.GROUP_ENTRIES = 1500  # and several head groups (one head each from 2 rounds on)
    results = {}
    for L in (8, 37, 64):  # 8: fewer sorted chunks than 4 ranks, some own none
        for name in CASES:
            shard = SequenceShard(L, rank, world)
            results[f"{name}/L{L}"] = one_case(name, shard)
        for name in MODELS:
            results[f"{name}/L{L}"] = model_case(name, SequenceShard(L, rank, world))
    results["dropout"] = dropout_case(SequenceShard(37, rank, world))
    for name in ("lsh-window-2", "lsh-encoder-2", "local-causal"):
        results[f"{name}/bf16"] = one_case(
            name, SequenceShard(37, rank, world), dtype=torch.bfloat16
        )
    for pooling in ("mean", "first"):
        results[f"classify-{pooling}/L37"] = classify_case(SequenceShard(37, rank, world), pooling)
        results[f"classify-{pooling}/narrow"] = classify_case(
            SequenceShard(37, rank, world), pooling, width=9
        )
    results["group-mismatch-refused"] = group_mismatch_case(rank, world)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


MODELS = {
    # name: config overrides; every model has 3 reversible layers of d_model 16
    "lm-lsh-window": dict(attention="lsh", n_hashes=2, lsh_mode="window"),
    "lm-mixed-chunk": dict(attention="local,lsh", n_hashes=3, lsh_mode="chunk"),
    "encoder-lsh-local": dict(attention="lsh,local", n_hashes=2, causal=False),
}


def model_case(name: str, shard: SequenceShard) -> list[float]:
    """A whole model: logits at real positions, the loss and every parameter's gradient of
    the sequence-parallel model against the same model on whole sequences."""
    from reformer import ReformerConfig, ReformerLM

    L = shard.length
    cfg = ReformerConfig(
        vocab_size=11,
        d_model=16,
        d_ff=24,
        n_heads=2,
        n_layers=3,
        chunk_len=4,
        max_seq_len=64,
        dropout=0.0,
        **MODELS[name],
    )
    torch.manual_seed(0)
    ref = ReformerLM(cfg).double()
    mine = ReformerLM(cfg).double()
    mine.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, -5:] = False
    if cfg.causal:
        targets = torch.roll(ids, -1, 1)
        targets[:, -1] = -100
    else:
        targets = torch.where(torch.rand(2, L, generator=g) < 0.3, ids, -100)
    targets = targets.masked_fill(~mask, -100)
    torch.manual_seed(5)
    total, count = ref.loss_terms(ids, targets, mask)
    (total / count).backward()
    torch.manual_seed(5)
    ref_logits = ref(ids, mask).detach()
    mine.shard_sequence(shard)
    torch.manual_seed(5)
    part, n = mine.loss_terms(shard.local(ids), shard.local(targets), shard.local(mask))
    counts = n.detach().clone()
    dist.all_reduce(counts)
    (part / counts).backward()
    loss = part.detach().clone()
    dist.all_reduce(loss)
    for p in mine.parameters():  # a slice that scores nothing leaves the head without one
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(p.grad)
    torch.manual_seed(5)
    logits = mine(shard.local(ids), shard.local(mask)).detach()
    m = shard.local(mask)[..., None]
    err = float(((logits - shard.local(ref_logits)) * m).abs().max())
    err = max(err, abs(float(loss / counts) - float(total / count)))
    grads = max(
        float((a.grad - b.grad).abs().max()) for a, b in zip(mine.parameters(), ref.parameters())
    )
    scale = min(float(b.grad.abs().max()) for b in ref.parameters())
    return [err, grads, scale]


def classify_case(shard: SequenceShard, pooling: str, width: int | None = None) -> list[float]:
    """A classifier (mean or first-position pooling, padding): class logits, the loss and
    every parameter's gradient against one process. width < shard.length: a batch padded only
    to its longest row, as the encoder tasks make them (loss splits it as it is: fit_shard)."""
    from reformer import ReformerConfig
    from reformer.tasks.encoder.model import ReformerClassifier

    L = shard.length
    cfg = ReformerConfig(vocab_size=11, d_model=16, d_ff=24, n_heads=2, n_layers=2,
                         chunk_len=4, max_seq_len=64, dropout=0.0, causal=False,
                         attention="lsh,local", n_hashes=2)  # fmt: skip
    torch.manual_seed(0)
    ref = ReformerClassifier(cfg, 3, pooling).double()
    mine = ReformerClassifier(cfg, 3, pooling).double()
    mine.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    W = width or L
    ids = torch.randint(0, 11, (2, W), generator=g)
    mask = torch.ones(2, W, dtype=torch.bool)
    mask[1, -6:] = False
    labels = torch.tensor([2, 0])
    torch.manual_seed(5)
    loss_ref = ref.loss(ids, labels, mask)
    loss_ref.backward()
    mine.shard_sequence(shard)
    torch.manual_seed(5)
    part = mine.loss(ids, labels, mask)
    part.backward()
    loss = shard.total(part)
    for p in mine.parameters():  # a slice that scores nothing leaves the head without one
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(p.grad)
    with torch.no_grad():
        torch.manual_seed(5)
        a = ref(ids, mask)
        torch.manual_seed(5)
        b = mine(mine.shard.local(ids), mine.shard.local(mask))  # the batch's own split
    err = max(float((a - b).abs().max()), abs(float(loss) - float(loss_ref)))
    grads = max(
        float((x.grad - y.grad).abs().max()) for x, y in zip(mine.parameters(), ref.parameters())
    )
    return [err, grads, min(float(y.grad.abs().max()) for y in ref.parameters())]


def group_mismatch_case(rank: int, world: int) -> bool:
    """shard_sequence refuses a SequenceShard whose rank and size are not its group's."""
    from reformer import ReformerConfig, ReformerLM

    model = ReformerLM(ReformerConfig(vocab_size=11, d_model=8, d_ff=8, n_heads=2, n_layers=1,
                                      chunk_len=4, max_seq_len=64))  # fmt: skip
    try:
        model.shard_sequence(SequenceShard(37, rank, world + 1))
    except ValueError as exc:
        return "does not match its process group" in str(exc)
    return False


def dropout_case(shard: SequenceShard) -> list[float]:
    """Dropout 0.1 under sequence parallelism: two runs from the same seed give the same
    loss and gradients; the masks do act (the loss differs from dropout 0's)."""
    from reformer import ReformerConfig, ReformerLM

    L = shard.length
    runs = []
    for p in (0.1, 0.1, 0.0):
        cfg = ReformerConfig(
            vocab_size=11,
            d_model=16,
            d_ff=24,
            n_heads=2,
            n_layers=2,
            chunk_len=4,
            max_seq_len=64,
            dropout=p,
            attention="local,lsh",
        )
        torch.manual_seed(0)
        model = ReformerLM(cfg).double().train()
        model.shard_sequence(shard)
        ids = torch.randint(0, 11, (2, L + 1), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        part, _n = model.loss_terms(shard.local(ids[:, :-1]), shard.local(ids[:, 1:]))
        part.backward()
        runs.append((float(part), torch.cat([q.grad.flatten() for q in model.parameters()])))
    same = abs(runs[0][0] - runs[1][0]) + float((runs[0][1] - runs[1][1]).abs().max())
    # the ranks' slices draw different masks from the same seed (seeding.rank_generator)
    from reformer.seeding import dropout_mask, rank_generator, seeded_generator

    cpu = torch.device("cpu")
    gen = rank_generator(seeded_generator(9), shard.rank, cpu)
    mask = dropout_mask((64,), 0.5, gen, cpu, F64)
    masks = [torch.empty_like(mask) for _ in range(shard.size)]
    dist.all_gather(masks, mask)
    alike = sum(bool((masks[a] == masks[b]).all()) for a in range(shard.size) for b in range(a))
    return [same, abs(runs[0][0] - runs[2][0]), alike]


if __name__ == "__main__":
    main()

"""The whole training step of a language model, against the peers and a dense SDPA model.

One step (loss, backward, AdamW step) of a byte-level LM, batch 1, d_model 256, d_ff 1024, 4
heads of 64, at --layers (1 and 6) and --lengths (16K and 64K):

    ours              reformer.ReformerLM: LSH-4 (chunk 64, window mode), reversible,
                      chunked feed-forward and loss, axial positions
    reformer-pytorch  reformer_pytorch.ReformerLM: LSH-4 (bucket_size 64), reversible,
                      feed-forward in chunks of 4096 positions, axial positions
    transformers      transformers' ReformerModelWithLMHead: causal LSH-4 (chunk 64, one
                      chunk back), reversible, feed-forward chunks of 4096, axial positions
    sdpa              a plain pre-norm Transformer (ordinary residuals, dense causal
                      F.scaled_dot_product_attention, full logits): the ratios' baseline

    python -m bench.step [--lengths 16384 65536] [--layers 1 6] [--configs ...]
                         [--precisions fp32 bf16]

Ours and sdpa run in every --precisions entry (bf16: autocast, as `reformer train
--precision bf16`); the peers in fp32 only. "x sdpa" compares each row with the sdpa model
in the row's own precision. "MFU" (model-FLOP utilisation) is the step's model FLOPs (6 x
non-embedding matmul parameters x tokens + 3 x attention matmul FLOPs, the reversible
recompute not credited; `model_flops`) over its time x the best 4096 x 4096 matmul rate in
the row's precision, measured in the same worker.

Each (configuration, layers, L) runs in fresh processes (bench/_harness.py: run_measured;
peak RSS above the memory before the step); "x sdpa" is its time over the sdpa model's at
the same layers and L, in the same run. Steps predicted (from the configuration's time at
the previous L) to take more than --one-process-above seconds are timed in the memory
process itself (one first step, no warm-up: slower by its one-off costs).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench._harness import (
    RESULTS,
    add_common_args,
    command_line,
    environment,
    extrapolate,
    markdown_table,
    matmul_rate,
    measure,
    run_measured,
    setup_worker,
    skip_reason,
    warm_lsh_kernels,
    write_json,
)

D, D_FF, HEADS, CHUNK, HASHES, VOCAB, FF_CHUNK = 256, 1024, 4, 64, 4, 256, 4096
CONFIGS = ["ours", "reformer-pytorch", "transformers", "sdpa"]


class DenseLM(nn.Module):
    """The baseline: embeddings, pre-norm blocks of dense causal SDPA and a GELU MLP, logits."""

    def __init__(self, layers: int, length: int) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(length, D)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    n1=nn.LayerNorm(D),
                    qkv=nn.Linear(D, 3 * D, bias=False),
                    out=nn.Linear(D, D),
                    n2=nn.LayerNorm(D),
                    ff=nn.Sequential(nn.Linear(D, D_FF), nn.GELU(), nn.Linear(D_FF, D)),
                )
            )
            for _ in range(layers)
        )
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        x = self.emb(ids) + self.pos.weight[:L]
        for b in self.blocks:
            q, k, v = b["qkv"](b["n1"](x)).view(B, L, 3, HEADS, D // HEADS).unbind(2)
            a = F.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True
            )
            x = x + b["out"](a.transpose(1, 2).reshape(B, L, D))
            x = x + b["ff"](b["n2"](x))
        return self.head(self.norm(x))


def model_flops(config: str, layers: int, length: int) -> float:
    """Model FLOPs of one step: 6 x non-embedding matmul parameters x tokens + 3 x the
    attention matmuls' forward FLOPs (QK^T and PV: 2 x 2 x queries x keys x d_head x heads);
    LSH attends to 2 chunks per query per hash round, dense causal SDPA to L / 2 keys on
    average."""
    d_head = D // HEADS
    qkv = 3 * D * D if config == "sdpa" else 2 * D * D  # shared QK: qk and v
    params = layers * (qkv + D * D + 2 * D * D_FF) + D * VOCAB
    keys = length / 2 if config == "sdpa" else 2 * CHUNK * HASHES
    attention = layers * 2 * 2 * length * keys * d_head * HEADS
    return 6 * params * length + 3 * attention


def build(config: str, layers: int, length: int):
    """The model and its loss function loss(model, ids) for one configuration."""
    if config == "ours":
        from reformer import ReformerConfig, ReformerLM

        cfg = ReformerConfig(
            vocab_size=VOCAB, d_model=D, n_heads=HEADS, d_ff=D_FF, n_layers=layers,
            max_seq_len=length, attention="lsh", n_hashes=HASHES, chunk_len=CHUNK,
            ff_chunk_len=FF_CHUNK, reversible=True,
        )  # fmt: skip
        return ReformerLM(cfg), lambda m, ids: m.loss(ids[:, :-1], ids[:, 1:])
    if config == "reformer-pytorch":
        from reformer_pytorch import ReformerLM as RPLM

        model = RPLM(
            num_tokens=VOCAB, dim=D, depth=layers, max_seq_len=length, heads=HEADS,
            bucket_size=CHUNK, n_hashes=HASHES, causal=True, ff_chunks=max(1, length // FF_CHUNK),
            axial_position_emb=True, axial_position_shape=(length // 64, 64),
        )  # fmt: skip

        def rp_loss(m, ids):
            logits = m(ids[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

        return model, rp_loss
    if config == "transformers":
        from transformers import ReformerConfig as HFConfig
        from transformers import ReformerModelWithLMHead

        cfg = HFConfig(
            is_decoder=True, attn_layers=["lsh"] * layers, hidden_size=D,
            num_attention_heads=HEADS, attention_head_size=D // HEADS, feed_forward_size=D_FF,
            vocab_size=VOCAB, lsh_attn_chunk_length=CHUNK, lsh_num_chunks_before=1,
            lsh_num_chunks_after=0, num_hashes=HASHES, num_buckets=None,
            max_position_embeddings=length, axial_pos_shape=(length // 64, 64),
            axial_pos_embds_dim=(D // 2, D // 2), chunk_size_feed_forward=min(FF_CHUNK, length),
            hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0, axial_pos_embds=True,
        )  # fmt: skip
        # transformers shifts the labels itself: L inputs score L - 1 next tokens.
        return ReformerModelWithLMHead(cfg), lambda m, ids: m(ids[:, 1:], labels=ids[:, 1:]).loss
    model = DenseLM(layers, length)

    def dense_loss(m, ids):
        return F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

    return model, dense_loss


def worker(args: dict[str, Any]) -> dict[str, Any]:
    device, _ = setup_worker(args)  # with args["cpu_cache"]: every configuration alike
    length, config = args["length"], args["config"]
    model, loss_fn = build(config, args["layers"], length)
    model = model.to(device).train()
    bf16 = args.get("precision", "fp32") == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if config == "ours":
        warm_lsh_kernels(device, dtype, CHUNK)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (1, length + 1), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()

    out = measure(step, args, device)
    if "seconds" in out:
        rate = matmul_rate(dtype, device)
        out["matmul_gflops"] = rate / 1e9
        out["mfu"] = model_flops(config, args["layers"], length) / (out["seconds"] * rate)
    return out


def run(ns: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    runs = [
        (config, precision)
        for precision in ns.precisions
        for config in ns.configs
        if precision == "fp32" or config in ("ours", "sdpa")
    ]
    for layers in ns.layers:
        history: dict[tuple[str, str], list[tuple[int, float, float]]] = {r: [] for r in runs}
        for length in sorted(ns.lengths):
            for config, precision in runs:
                row: dict[str, Any] = {"config": config, "precision": precision}
                row |= {"layers": layers, "length": length}
                hist = history[config, precision]
                exp = 2.0 if config == "sdpa" else 1.0
                pred_s = extrapolate([(n, s) for n, s, _ in hist], length, exp)
                pred_m = extrapolate([(n, m) for n, _, m in hist], length, 1.0)
                reason = skip_reason(pred_m, pred_s, ns.max_mem_gib, ns.max_seconds, ns.device)
                if ns.time_budget is not None and time.monotonic() - t_start > ns.time_budget:
                    reason = reason or f"--time-budget {ns.time_budget:g} s spent"
                if reason:
                    row["skipped"] = reason
                else:
                    args = dict(config=config, layers=layers, length=length, repeats=ns.repeats)
                    args |= dict(threads=ns.threads, device=ns.device, precision=precision)
                    args["cpu_cache"] = ns.cpu_cache
                    one = pred_s is not None and pred_s > ns.one_process_above
                    timeout = 600 + 4 * (ns.repeats + 2) * (pred_s or ns.max_seconds)
                    row |= run_measured("bench.step", args, timeout, ns.device, one)
                    row["timed"] = "first step, memory process" if one else "median"
                    if "error" not in row:
                        hist.append((length, row["seconds"], row["peak_mib"]))
                rows.append(row)
                print(json.dumps(row), flush=True)
                add_ratios(rows)
                write_json(RESULTS / f"{ns.name}.json", report(ns, rows))
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    def key(r: dict[str, Any]) -> tuple:
        return r["layers"], r["length"], r.get("precision", "fp32")

    base = {key(r): r for r in rows if r["config"] == "sdpa" and "seconds" in r}
    for r in rows:
        b = base.get(key(r))
        if "seconds" in r and b:
            r["x_sdpa"] = r["seconds"] / b["seconds"]
            r["mem_x_sdpa"] = r["peak_mib"] / b["peak_mib"]


def report(ns: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from bench.attention import peer_versions

    return {
        "command": command_line(),
        "environment": environment()
        | {"threads": ns.threads, "peers": peer_versions(), "cpu_cache_gib": ns.cpu_cache},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument("--max-mem-gib", type=float, default=16.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="per step")
    parser.add_argument("--one-process-above", type=float, default=60.0)
    parser.add_argument(
        "--cpu-cache", type=float, default=0.0, help="GiB: reformer.cpu_cache in every worker"
    )
    add_common_args(parser, "step")
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    print("reproduce with:", command_line(), flush=True)
    rows = run(ns)
    cols = [("config", "config"), ("precision", "precision"), ("layers", "layers")]
    cols += [("L", "length"), ("s", "seconds"), ("MFU", "mfu"), ("x sdpa", "x_sdpa")]
    cols += [("peak MiB", "peak_mib"), ("mem x sdpa", "mem_x_sdpa")]
    cols += [("timed", "timed"), ("skipped", "skipped"), ("error", "error")]
    print(markdown_table(rows, cols))
    print("wrote", RESULTS / f"{ns.name}.json")


if __name__ == "__main__":
    main()

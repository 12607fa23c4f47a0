"""One forward of a model shaped like the authors' enwik8 Reformer, as imported from
transformers (`google/reformer-enwik8`'s config, random weights).

    python -m bench.hf_enwik8 [--lengths 4096 65536]

12 layers (local, local, lsh, local), d_model 1024, 8 heads x 128, d_ff 4096, ReLU, LSH chunk
256 with 4 hashes and 512 unfactorised buckets, local chunk 128, axial positions [128, 512]:
the config `reformer.interop` builds from that checkpoint's config.json, with its semantics
(chunk layout, look-back wrap, no duplicate correction). For each length, a fresh process
measures the peak RSS above the pre-forward RSS of one no-grad forward, and another its time
(`--repeats`, median; 1 by default: a 64K forward takes minutes here). The model's own weights
(about 600 MiB in float32) are in the pre-forward RSS, not the peak.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench._harness import (
    RESULTS,
    add_common_args,
    command_line,
    environment,
    markdown_table,
    measure,
    run_measured,
    setup_worker,
    warm_lsh_kernels,
    write_json,
)

# google/reformer-enwik8's config.json, the fields that shape the model
ENWIK8 = dict(
    model_type="reformer", is_decoder=True, attn_layers=["local", "local", "lsh", "local"] * 3,
    hidden_size=1024, num_attention_heads=8, attention_head_size=128, feed_forward_size=4096,
    hidden_act="relu", lsh_attn_chunk_length=256, local_attn_chunk_length=128, num_buckets=512,
    num_hashes=4, axial_pos_embds=True, axial_pos_shape=[128, 512],
    axial_pos_embds_dim=[256, 768], layer_norm_eps=1e-12, vocab_size=258,
    max_position_embeddings=65536, hash_seed=None, hidden_dropout_prob=0.0,
)  # fmt: skip


def worker(args: dict) -> dict:
    from reformer import ReformerLM
    from reformer.interop import config_from_hf

    device, dtype = setup_worker(args)
    model = ReformerLM(config_from_hf(ENWIK8)).to(device=device, dtype=dtype).eval()
    warm_lsh_kernels(device, dtype, chunk_len=256)
    ids = torch.randint(0, 258, (1, args["length"]), device=device)

    def step() -> None:
        with torch.no_grad():
            model(ids)

    params = sum(p.numel() for p in model.parameters())
    return {"length": args["length"], "params": params} | measure(step, args, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 65536])
    add_common_args(parser, "hf_enwik8")
    parser.set_defaults(repeats=1)
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    torch.set_num_threads(ns.threads)
    rows = []
    for length in ns.lengths:
        args = dict(length=length, threads=ns.threads, repeats=ns.repeats, warmup=0,
                    device=ns.device, dtype=ns.dtype)  # fmt: skip
        row = run_measured("bench.hf_enwik8", args, timeout=3600, device=ns.device)
        row["length"] = length
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = [("length", "length"), ("forward s", "seconds"), ("peak MiB", "peak_mib")]
    print(markdown_table(rows, cols))
    write_json(
        RESULTS / f"{ns.name}.json",
        {"command": command_line(), "environment": environment(), "rows": rows},
    )


if __name__ == "__main__":
    main()

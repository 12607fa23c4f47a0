"""One sequence across 2 and 4 gloo processes (`--parallel sequence`, issue 25): routed LSH
and local attention, and whole models, equal one process in float64 (tests/sequence_worker.py
runs the cases on every rank); dropout is deterministic."""

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.sequence import SequenceShard, split_bounds

WORKER = str(Path(__file__).with_name("sequence_worker.py"))
sys.path.insert(0, str(Path(__file__).parent))
import sequence_worker  # noqa: E402

EXACT = 1e-10


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def ranks(request, tmp_path_factory) -> list[dict]:
    """Every case's errors on every rank of a group of `param` processes."""
    world, out = request.param, tmp_path_factory.mktemp(f"seq{request.param}") / "r"
    env = os.environ | {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(out)], env=env | {"RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-5000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("length", [8, 37, 64])
@pytest.mark.parametrize("case", list(sequence_worker.CASES))
def test_routed_attention_equals_one_process(ranks, case, length):
    for rank in ranks:
        out_err, grad_err = rank[f"{case}/L{length}"]
        assert out_err < EXACT and grad_err < EXACT, (case, length, out_err, grad_err)


@pytest.mark.parametrize("case", ["lsh-window-2", "lsh-encoder-2", "local-causal"])
def test_routed_attention_in_bf16_is_within_its_tolerance(ranks, case):
    """bf16 slices (fp32 scores and accumulation) against one float64 process: errors
    relative to the largest reference value, as tests/test_bf16_attention.py keys them."""
    for rank in ranks:
        out_err, grad_err = rank[f"{case}/bf16"]
        assert out_err < 0.03 and grad_err < 0.03, (case, out_err, grad_err)


@pytest.mark.parametrize("length", [8, 37, 64])
@pytest.mark.parametrize("case", list(sequence_worker.MODELS))
def test_model_logits_loss_and_gradients_equal_one_process(ranks, case, length):
    for rank in ranks:
        err, grad_err, smallest_grad = rank[f"{case}/L{length}"]
        assert err < EXACT and grad_err < EXACT, (case, length, err, grad_err)
        assert smallest_grad > 1e3 * EXACT  # every parameter's gradient is a real number


@pytest.mark.parametrize("batch", ["L37", "narrow"])
@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_classifier_logits_loss_and_gradients_equal_one_process(ranks, pooling, batch):
    """narrow: a batch of width 9 (rows of 9 and 3 real tokens) under a shard of 37 is split
    as it is (fewer sorted chunks than 4 ranks: some own none and still take part in every
    exchange)."""
    for rank in ranks:
        err, grad_err, smallest_grad = rank[f"classify-{pooling}/{batch}"]
        assert err < EXACT and grad_err < EXACT, (pooling, err, grad_err)
        assert smallest_grad > 1e3 * EXACT


def test_a_shard_that_is_not_its_groups_is_refused(ranks):
    assert all(rank["group-mismatch-refused"] for rank in ranks)


def test_dropout_is_deterministic_acts_and_differs_per_rank(ranks):
    for rank in ranks:
        rerun_diff, dropout_effect, ranks_with_equal_masks = rank["dropout"]
        assert rerun_diff == 0.0
        assert dropout_effect > 1e-6
        assert ranks_with_equal_masks == 0


_RSS_PROBE = """
import sys, torch
from reformer import ReformerConfig, ReformerLM
from reformer.sequence import SequenceShard

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

model = ReformerLM(ReformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=2,
                                  d_ff=16, max_seq_len=32, chunk_len=4))
if sys.argv[1] == "rank":
    model.shard_sequence(SequenceShard(32, 0, 2))  # a rank of a sequence-parallel run
big = torch.ones(4 << 20)  # 16 MiB, mapped; freeing it raises glibc's dynamic threshold
del big
blocks = [torch.ones(1 << 20) for _ in range(16)]  # 4 MiB each
before = rss()
del blocks[0::2]  # 32 MiB, each block between two live ones: no heap top to trim
print((before - rss()) >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_a_rank_returns_freed_blocks_to_the_os():
    """A rank's freed blocks of 4 MiB leave its RSS (memory.fixed_mmap_threshold): without
    the fixed threshold glibc keeps them resident in the heap, which cost 200-500 MiB per
    rank at 64K tokens (bench/sequence.py)."""
    freed = {}
    for mode in ("rank", "plain"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env |= {"OMP_NUM_THREADS": "1", "REFORMER_MALLOC_TRIM": "1"}  # glibc's defaults
        cmd = [sys.executable, "-c", _RSS_PROBE, mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        freed[mode] = int(out.stdout.split()[-1])
    assert freed["rank"] >= 30, freed  # 32 MiB back to the OS
    assert freed["plain"] < 8, freed  # the control: glibc alone keeps them


def test_split_bounds_are_contiguous_and_even():
    assert split_bounds(37, 4) == [0, 9, 18, 27, 37]
    shard = SequenceShard(37, 3, 4)
    assert (shard.start, shard.stop) == (27, 37)
    x = torch.arange(37)[None]
    assert torch.equal(shard.local(x), x[:, 27:])


def test_inputs_of_the_wrong_width_and_full_attention_are_refused_while_sharded():
    model = ReformerLM(ReformerConfig(vocab_size=8, d_model=8, d_ff=8, n_heads=2, n_layers=1,
                                      chunk_len=4, max_seq_len=16))  # fmt: skip
    shard = SequenceShard(16, 1, 2)
    model.shard_sequence(shard)
    ids = torch.randint(0, 8, (2, 16))
    with pytest.raises(ValueError, match=r"holds positions \[8, 16\) of 16: pass shard.local"):
        model(ids)  # the forward takes this rank's slice
    with pytest.raises(ValueError, match=r"raise --model\.max-seq-len"):
        model.loss(torch.randint(0, 8, (2, 17)), torch.randint(0, 8, (2, 17)))
    with pytest.raises(ValueError, match=r"call shard_sequence\(None\) first"):
        model.set_attention("full")
    model.shard_sequence(None)
    model.set_attention("full")
    with pytest.raises(ValueError, match=r"call set_attention\(None\) first"):
        model.shard_sequence(shard)


def test_refusals_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        SequenceShard(3, 0, 4)
    full = ReformerLM(ReformerConfig(vocab_size=8, d_model=8, d_ff=8, n_heads=2, n_layers=1,
                                     attention="full", max_seq_len=16))  # fmt: skip
    with pytest.raises(ValueError, match="full attention needs the whole sequence"):
        full.shard_sequence(SequenceShard(16, 0, 2))
    lsh = ReformerLM(ReformerConfig(vocab_size=8, d_model=8, d_ff=8, n_heads=2, n_layers=1,
                                    chunk_len=4, max_seq_len=16))  # fmt: skip
    with pytest.raises(ValueError, match=r"raise --model\.max-seq-len"):
        lsh.shard_sequence(SequenceShard(32, 0, 2))
    lsh.shard_sequence(SequenceShard(16, 0, 2))
    with pytest.raises(ValueError, match="shard_sequence"):
        lsh.decode(torch.zeros(1, 4, dtype=torch.long))


# --- the command line: torchrun --parallel sequence logs one process's losses ----------------
RUN = [
    "train", "--model.dropout", "0", "--steps", "4", "--log-every", "1", "--eval-every", "2",
    "--eval-batches", "1", "--checkpoint-every", "2", "--optim.lr", "3e-3",
    "--optim.warmup-steps", "2", "--no-progress",
]  # fmt: skip
SMALL = [
    "--model.d-model", "16", "--model.d-ff", "16", "--model.n-heads", "2",
    "--model.n-layers", "2", "--model.chunk-len", "8", "--model.max-seq-len", "64",
]  # fmt: skip


def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] if "loss" in r else r["eval_loss"] for r in recs]


def _bytes_file(path: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    words = [b"alpha ", b"beta ", b"gamma\n", b"delta ", b"<page> ", b"x=1; "]
    picks = torch.randint(0, len(words), (6000,), generator=g).tolist()
    path.write_bytes(b"".join(words[i] for i in picks))
    return path


def _one_process(tmp_path: Path, name: str, args: list[str]) -> list[float]:
    from reformer.cli import main

    assert main([*args, "--out", str(tmp_path / name)]) == 0
    return _losses(tmp_path / name)


@pytest.mark.parametrize(
    "task, nproc, sequence_ranks, model",
    [
        ("duplication", 2, None, "--preset duplication-small --seq-len 250"),
        ("enwik8", 4, None, "--model.attention local,lsh"),
        ("mlm", 2, None, "--model.attention lsh,local --model.no-causal --model.vocab-size 258"),
        ("duplication", 4, 2, "--preset duplication-small --seq-len 250"),
        (
            "classify",
            2,
            None,
            "--model.attention lsh,local --model.no-causal --model.vocab-size 258",
        ),
    ],
    ids=["duplication-2", "enwik8-4", "mlm-2", "duplication-2x2", "classify-2"],
)
def test_torchrun_sequence_parallel_logs_the_one_process_losses(
    tmp_path, task, nproc, sequence_ranks, model
):
    """fp32: the same losses (training and evaluation) as one process with the same global
    batch: the duplication preset (LSH-4), and small local/LSH models on text, masked LM and
    classification; with --sequence-ranks 2 on 4 processes, two groups of two split the
    batch. Lengths are not multiples of chunk x ranks."""
    from test_distributed import torchrun

    if task == "duplication":
        args = [*RUN, "--task", task, *model.split()]
    else:
        if task == "classify":
            from test_encoder_cli import _labelled_dir

            data = _labelled_dir(tmp_path / "labelled", "jsonl")
        else:
            data = _bytes_file(tmp_path / "text.txt")
        args = [*RUN, *SMALL, "--task", task, "--data", str(data), "--seq-len", "45",
                *model.split()]  # fmt: skip
    ref = _one_process(tmp_path, "one", [*args, "--batch-size", "4"])
    groups = nproc // (sequence_ranks or nproc)
    par = ["--parallel", "sequence", "--batch-size", str(4 // groups)]
    if sequence_ranks:
        par += ["--sequence-ranks", str(sequence_ranks)]
    torchrun([*args, *par, "--out", str(tmp_path / "seq")], nproc=nproc)
    got = _losses(tmp_path / "seq")
    assert len(got) == len(ref) == 6
    assert got == pytest.approx(ref, rel=1e-5)


def test_torchrun_sequence_parallel_resumes_bit_exactly_with_dropout(tmp_path):
    """Dropout 0.1 under --parallel sequence: 3 steps, then --resume to 6, logs exactly the
    losses of 6 steps in one go (every rank replays the same seeds and its own masks)."""
    from test_distributed import torchrun

    args = [*RUN[:1], "--preset", "duplication-small", "--seq-len", "250", "--model.dropout",
            "0.1", "--log-every", "1", "--eval-every", "3", "--eval-batches", "1",
            "--checkpoint-every", "3", "--no-progress", "--batch-size", "4",
            "--parallel", "sequence"]  # fmt: skip
    torchrun([*args, "--steps", "6", "--out", str(tmp_path / "whole")])
    torchrun([*args, "--steps", "3", "--out", str(tmp_path / "parts")])
    torchrun([*args, "--steps", "6", "--out", str(tmp_path / "parts"), "--resume"])
    assert _losses(tmp_path / "parts") == _losses(tmp_path / "whole")
    assert len(_losses(tmp_path / "whole")) == 8  # 6 steps and 2 evaluations

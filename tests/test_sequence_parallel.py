"""One sequence across 2 and 4 gloo processes (`--parallel sequence`, issue 25): routed LSH
and local attention, and whole models, equal one process in float64 (tests/sequence_worker.py
runs the cases on every rank); dropout is deterministic."""

import json
import os
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


@pytest.mark.parametrize("length", [37, 64])
@pytest.mark.parametrize("case", list(sequence_worker.CASES))
def test_routed_attention_equals_one_process(ranks, case, length):
    for rank in ranks:
        out_err, grad_err = rank[f"{case}/L{length}"]
        assert out_err < EXACT and grad_err < EXACT, (case, length, out_err, grad_err)


@pytest.mark.parametrize("length", [37, 64])
@pytest.mark.parametrize("case", list(sequence_worker.MODELS))
def test_model_logits_loss_and_gradients_equal_one_process(ranks, case, length):
    for rank in ranks:
        err, grad_err, smallest_grad = rank[f"{case}/L{length}"]
        assert err < EXACT and grad_err < EXACT, (case, length, err, grad_err)
        assert smallest_grad > 1e3 * EXACT  # every parameter's gradient is a real number


def test_dropout_is_deterministic_and_acts(ranks):
    for rank in ranks:
        rerun_diff, dropout_effect = rank["dropout"]
        assert rerun_diff == 0.0
        assert dropout_effect > 1e-6


def test_split_bounds_are_contiguous_and_even():
    assert split_bounds(37, 4) == [0, 9, 18, 27, 37]
    shard = SequenceShard(37, 3, 4)
    assert (shard.start, shard.stop) == (27, 37)
    x = torch.arange(37)[None]
    assert torch.equal(shard.local(x), x[:, 27:])


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

"""`reformer plan` and the memory it predicts, against real training steps.

The measured steps run in fresh processes, two steps each (the optimiser state exists in
the second, as in training); memory is peak RSS above the RSS before the step. The plan is
compared with RSS under a fixed mmap threshold (RSS = live tensors, the plan's quantity);
the depth test runs under the default allocator (glibc and the library's trim: what a user
gets).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.plan import (
    longest_fitting,
    measure_step_fresh,
    parse_size,
    plan_memory,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS: Linux")


def lsh_model(layers: int = 2, **kw) -> ReformerConfig:
    """bench.scale's `small` model at a given depth (LSH-2 to keep the test short)."""
    base = dict(
        vocab_size=256, d_model=256, n_heads=4, d_ff=1024, n_layers=layers,
        max_seq_len=16384, attention="lsh", n_hashes=2, chunk_len=64,
    )  # fmt: skip
    return ReformerConfig(**(base | kw))


@linux_only
@pytest.mark.parametrize("length", [8192, 16384, 32768])
def test_plan_is_within_15_percent_of_a_measured_step(length):
    cfg = lsh_model()
    predicted = plan_memory(cfg, length).peak
    measured = measure_step_fresh(cfg, length, threads=2)
    assert abs(predicted / measured - 1) < 0.15, (length, predicted / 2**20, measured / 2**20)


@linux_only
def test_peak_memory_is_flat_in_depth_under_the_default_allocator():
    """The reversible stack's promise as a user sees it: one training step (AdamW's state
    is allocated in it), 2 -> 12 layers, adds no more than the extra parameters, their
    gradients and AdamW's two moments."""
    small, deep = lsh_model(2), lsh_model(12)
    extra = (
        4
        * 4
        * (
            sum(p.numel() for p in ReformerLM(deep).parameters())
            - sum(p.numel() for p in ReformerLM(small).parameters())
        )
    )
    growth = measure_step_fresh(
        deep, 16384, threads=2, fixed_mmap_threshold=False, steps=1
    ) - measure_step_fresh(small, 16384, threads=2, fixed_mmap_threshold=False, steps=1)
    assert growth <= extra, (growth / 2**20, extra / 2**20)


def test_plan_counts_the_real_parameters_and_optimizer_state():
    cfg = lsh_model(3, attention="local,lsh", d_ff=96, d_model=32, n_heads=2)
    model = ReformerLM(cfg)
    ids = torch.randint(0, 256, (1, 65))
    for name, make in {
        "adamw": lambda p: torch.optim.AdamW(p),
        "adafactor": lambda p: torch.optim.Adafactor(p),
    }.items():
        plan = plan_memory(cfg, 64, optimizer=name)
        assert plan.parameters == sum(p.numel() for p in model.parameters())
        opt = make(model.parameters())
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        state = sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        assert plan.components["optimizer state"] == state, name
        model.zero_grad()


def test_longest_fitting_is_the_boundary_of_the_budget():
    cfg = lsh_model(6, n_hashes=4)
    n, plan = longest_fitting(cfg, 2 * 2**30)
    assert n % 64 == 0 and plan.total <= 2 * 2**30
    assert plan_memory(cfg, n + 64).total > 2 * 2**30
    assert longest_fitting(cfg, 1024) is None  # not even one chunk


def test_parse_size():
    assert parse_size("20GiB") == 20 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5G") == 1.5 * 2**30
    for bad in ("twenty", "20XB", "-1GiB", "0", "1e999G", "20iBiB", "20GiBiB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reformer", "plan", *args], capture_output=True, text=True
    )


def test_cli_plan_prints_the_breakdown_and_the_longest_fit(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_cli(
        "--preset", "enwik8-small", "--length", "8192", "--batch", "1", "--budget", "3GiB",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "recomputed attention layer" in proc.stdout and "<- peak" in proc.stdout
    data = json.loads(out.read_text())
    assert data["length"] == 8192 and data["batch"] == 1
    kept = ("gradients", "optimizer state", "runtime (first step's one-off buffers)")
    assert data["predicted_peak_bytes"] == sum(data["components_bytes"][k] for k in kept) + max(
        data["phases_bytes"].values()
    )
    longest = data["longest_fitting"]
    assert f"{longest:,} tokens" in proc.stdout
    assert math.isclose(data["budget_bytes"], 3 * 2**30)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "enwik8-small", "--budget", "lots"], "not a positive size"),
        (["--preset", "enwik8-small", "--length", "0"], "--length must be >= 1"),
        (["--preset", "multi30k-small"], "language-model runs"),
        (["--preset", "enwik8-small", "--model.d-model", "-3"], "d_model"),
        (
            ["--preset", "enwik8-small", "--model.attention", "full", "--sequence-ranks", "2"],
            "full attention needs the whole sequence",
        ),
        (["--preset", "enwik8-small", "--sequence-ranks", "0"], "--sequence-ranks must be >= 1"),
    ],
)
def test_cli_plan_refuses_bad_input_clearly(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr


def test_cli_plan_per_rank_of_a_sequence_group(tmp_path):
    """--sequence-ranks N plans one rank: its slice of the positions and LSH's routed working
    set, so the per-rank peak falls with N (bench.sequence measured 843-846 MiB per rank of 2
    against the plan's 867 at 64K: docs/distributed.md), and the longest fit grows."""
    peaks, longest = {}, {}
    for n in (1, 2, 8):
        out = tmp_path / f"plan{n}.json"
        proc = run_cli(
            "--preset", "enwik8-small", "--length", "65536", "--batch", "1", "--budget", "4GiB",
            "--sequence-ranks", str(n), "--json", str(out),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        data = json.loads(out.read_text())
        peaks[n], longest[n] = data["predicted_peak_bytes"], data["longest_fitting"]
        assert data["sequence_ranks"] == n
    assert "per rank of 8 sharing each sequence" in proc.stdout
    assert 0.45 < peaks[2] / peaks[1] < 0.65
    assert peaks[8] < peaks[2] and longest[1] < longest[2] < longest[8]
    config = lsh_model(layers=4, attention="local,lsh")
    assert plan_memory(config, 65536, ranks=2).peak < plan_memory(config, 32768).peak * 1.2

"""Multi-process training under torchrun (gloo, CPU): two ranks with half the batch each
train exactly like one process with the whole batch, and a killed rank makes torchrun
restart the group, which resumes from the newest checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

import reformer
from reformer.cli import main
from reformer.run_config import config_from_dict
from reformer.training import train

STEPS = 20
RUN = [
    "train", "--model.d-model", "16", "--model.d-ff", "16", "--model.n-heads", "2",
    "--model.n-layers", "2", "--model.chunk-len", "8", "--seq-len", "32",
    "--model.max-seq-len", "32", "--model.dropout", "0", "--steps", str(STEPS),
    "--log-every", "1", "--eval-every", "10", "--eval-batches", "1", "--eval-hashes", "2",
    "--checkpoint-every", "5", "--optim.lr", "3e-3", "--optim.warmup-steps", "2",
    "--no-progress",
]  # fmt: skip
PER_RANK = 2  # rows per rank; the one-process reference uses 2 * PER_RANK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CRASH_RUN = str(Path(__file__).with_name("crash_run.py"))
PACKAGE = Path(reformer.__file__).parent


def torchrun(
    args: list[str],
    nproc: int = 2,
    max_restarts: int = 0,
    env: dict[str, str] | None = None,
    crash_at: int | None = None,
    status: int = 0,
) -> subprocess.CompletedProcess:
    """`reformer ARGS` under torchrun, expecting exit `status`; crash_at: through
    tests/crash_run.py, whose trainer callback kills (or signals) rank 1 after that many
    steps on the first attempt."""
    proc = subprocess.run(
        torchrun_command(args, nproc, max_restarts, crash_at),
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | (env or {}),
    )
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def torchrun_command(
    args: list[str], nproc: int = 2, max_restarts: int = 0, crash_at: int | None = None
) -> list[str]:
    target = ["-m", "reformer"] if crash_at is None else [CRASH_RUN, str(crash_at)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(_free_port()), "--max-restarts", str(max_restarts),
        *target, *args,
    ]  # fmt: skip


def _records(run: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training records, eval records) of DIR/metrics.jsonl by step; duplicates fail."""
    train_recs: dict[int, dict] = {}
    eval_recs: dict[int, dict] = {}
    for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        into = train_recs if "loss" in rec else eval_recs
        assert rec["step"] not in into, f"step {rec['step']} logged twice (only rank 0 logs)"
        into[rec["step"]] = rec
    return train_recs, eval_recs


def assert_same_curves(ref: Path, run: Path, rel: float = 1e-5) -> None:
    (a, a_eval), (b, b_eval) = _records(ref), _records(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert sorted(a_eval) == sorted(b_eval) == [10, 20]
    pairs = [(s, k, a[s][k], b[s][k]) for s in a for k in ("loss", "grad_norm", "lr")]
    pairs += [(s, k, a_eval[s][k], b_eval[s][k]) for s in a_eval for k in ("eval_loss",)]
    bad = [(s, k, x, y) for s, k, x, y in pairs if abs(x - y) > rel * abs(x)]
    assert not bad, bad
    assert a[1]["loss"] - a[STEPS]["loss"] > 0.1, "the reference did not learn: weak test"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One-process reference runs with the global batch, by accumulation steps."""
    runs: dict[int, Path] = {}

    def get(accumulate: int) -> Path:
        if accumulate not in runs:
            out = tmp_path_factory.mktemp(f"ref-acc{accumulate}") / "run"
            args = [*RUN, "--batch-size", str(2 * PER_RANK), "--optim.accumulate", str(accumulate)]
            assert main([*args, "--out", str(out)]) == 0
            runs[accumulate] = out
        return runs[accumulate]

    return get


@pytest.mark.parametrize(("parallel", "accumulate"), [("ddp", 1), ("ddp", 2), ("fsdp", 2)], ids=str)
def test_two_ranks_train_like_one_process(parallel, accumulate, one_process, tmp_path):
    out = tmp_path / "run"
    args = [*RUN, "--batch-size", str(PER_RANK), "--optim.accumulate", str(accumulate)]
    proc = torchrun([*args, "--parallel", parallel, "--out", str(out)])
    assert_same_curves(one_process(accumulate), out)
    # Rank 0 alone reports and writes: one final eval line, one config, one checkpoint set.
    assert proc.stdout.count("final eval:") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000010",
        "step-00000015",
        "step-00000020",
    ]
    assert yaml.safe_load((out / "config.yaml").read_text())["parallel"] == parallel


def test_killed_rank_restarts_and_resumes_from_newest_checkpoint(one_process, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(
        [*RUN, "--batch-size", str(PER_RANK), "--out", str(out)],
        max_restarts=1,
        crash_at=7,  # rank 1 exits after step 7; the newest checkpoint is step 5
    )
    assert "crash callback: rank 1 exits at step 7" in proc.stdout
    assert "from step 5 (step-00000005)" in proc.stdout  # resumed without --resume
    assert_same_curves(one_process(1), out)


def test_sigterm_to_one_rank_stops_every_rank_at_one_step(one_process, tmp_path):
    """SIGTERM reaches rank 1 alone as step 8 starts: both ranks finish step 8 and stop,
    rank 0 saves it (not a checkpoint step), and --resume gives one process's curves."""
    out = tmp_path / "run"
    args = [*RUN, "--batch-size", str(PER_RANK), "--out", str(out)]
    proc = torchrun(args, crash_at=7, env={"CRASH_SIGNAL": "TERM"}, status=1)
    assert "rank 1 gets SIGTERM at step 7" in proc.stdout
    assert proc.stderr.count("reformer train: stopped by SIGTERM after step 8") == 1
    assert f'File "{PACKAGE}' not in proc.stderr  # torchrun reports its workers' status 143
    assert f"resume with: torchrun --nproc-per-node 2 -m reformer train --config {out}" in (
        proc.stderr
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000005",
        "step-00000008",
    ]
    torchrun([*args, "--resume"])
    assert_same_curves(one_process(1), out)


def test_sigterm_to_torchrun_stops_the_ranks_with_a_checkpoint(one_process, tmp_path):
    """The agent passes its SIGTERM to every worker (as on pre-emption): the ranks agree on
    a step, rank 0 saves it, and the run resumes to one process's curves."""
    out = tmp_path / "run"
    args = [*RUN, "--batch-size", str(PER_RANK), "--out", str(out)]
    agent = subprocess.Popen(
        torchrun_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and agent.poll() is None:  # early: the run has 20 steps
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=120)
    step = max(_records(out)[0])
    assert step < STEPS, "the run finished before it could be stopped"
    assert f"stopped by SIGTERM after step {step}: saved" in err
    assert (out / "checkpoints" / f"step-{step:08d}").is_dir()
    torchrun([*args, "--resume"])
    assert_same_curves(one_process(1), out)


def test_rank_arguments_need_a_process_group(tmp_path):
    cfg = config_from_dict(dict(steps=1, seq_len=16, out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="process group"):
        train(cfg, rank=1, world_size=2)


def test_fsdp_with_adafactor_is_refused(tmp_path):
    cfg = config_from_dict(
        dict(steps=1, seq_len=16, batch_size=1, parallel="fsdp", out=str(tmp_path / "r"),
             optim=dict(name="adafactor"),
             model=dict(d_model=16, d_ff=16, n_heads=2, n_layers=1, max_seq_len=16,
                        chunk_len=8))
    )  # fmt: skip
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        with pytest.raises(ValueError, match="adafactor"):
            train(cfg, rank=0, world_size=1)
    finally:
        dist.destroy_process_group()


def test_translation_two_ranks_train_like_one_process(tmp_path):
    """Translation runs on the same engine: under torchrun each rank takes its rows of the
    same token-budget batch, and the curves equal one process's."""
    from test_translation_cli import write_corpus

    data = write_corpus(tmp_path)
    args = ["train", "--preset", "multi30k-small", "--data", str(data), "--steps", "8",
            "--log-every", "1", "--eval-every", "4", "--checkpoint-every", "4",
            "--model.d-model", "32", "--model.d-ff", "64", "--model.n-heads", "2",
            "--model.n-layers", "1", "--model.dropout", "0", "--translation.n-enc-layers", "1",
            "--translation.vocab-size", "60", "--translation.max-tokens", "256",
            "--translation.bleu-sentences", "4", "--optim.lr", "3e-3",
            "--optim.warmup-steps", "2", "--no-progress"]  # fmt: skip
    ref = tmp_path / "one"
    assert main([*args, "--out", str(ref)]) == 0
    run = tmp_path / "two"
    torchrun([*args, "--out", str(run)])
    (a, a_eval), (b, b_eval) = _records(ref), _records(run)
    assert sorted(a) == sorted(b) == list(range(1, 9)) and sorted(a_eval) == sorted(b_eval)
    for s in a:
        for k in ("loss", "grad_norm", "lr"):
            assert abs(a[s][k] - b[s][k]) <= 1e-5 * abs(a[s][k]), (s, k, a[s][k], b[s][k])
    for s in a_eval:
        assert abs(a_eval[s]["eval_loss"] - b_eval[s]["eval_loss"]) <= 1e-5 * a_eval[s]["eval_loss"]
    assert a[1]["loss"] - a[8]["loss"] > 0.1, "the reference did not learn: weak test"

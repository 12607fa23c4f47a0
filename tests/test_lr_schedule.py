"""The learning-rate schedules, and the warm-up-stable-decay one trained in stages."""

import json
from pathlib import Path

import pytest

from reformer.cli import main
from reformer.run_config import OptimConfig
from reformer.training.common import lr_factor

TINY = [
    "--preset", "duplication-small", "--seq-len", "16", "--model.max-seq-len", "16",
    "--model.n-layers", "1", "--batch-size", "2", "--model.d-model", "16", "--model.d-ff", "16",
    "--model.n-heads", "2", "--model.chunk-len", "8", "--no-progress", "--eval-batches", "1",
    "--log-every", "1", "--checkpoint-every", "2", "--optim.lr", "0.01",
    "--optim.warmup-steps", "2", "--optim.min-lr-ratio", "0.25",
]  # fmt: skip


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    cfg = OptimConfig(schedule="wsd", warmup_steps=4, decay_steps=10, min_lr_ratio=0.1)
    got = [lr_factor(cfg, 30, s) for s in range(30)]
    want = [min(1, (s + 1) / 4) for s in range(20)] + [1 - 0.9 * i / 10 for i in range(10)]
    assert got == pytest.approx(want, abs=1e-12)
    # a fixed start makes the factor independent of the run's length, and it stays at the floor
    fixed = OptimConfig(schedule="wsd", warmup_steps=4, decay_steps=10, decay_start=20)
    for total in (25, 30, 100):
        assert [lr_factor(fixed, total, s) for s in range(30)] == pytest.approx(want)
    assert lr_factor(fixed, 100, 60) == pytest.approx(0.1)
    # before the decay it is the constant schedule, step for step
    const = OptimConfig(schedule="constant", warmup_steps=4)
    assert got[:20] == [lr_factor(const, 30, s) for s in range(20)]


def _lrs(run: Path) -> dict[int, float]:
    recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["lr"] for r in recs if "lr" in r}


def test_wsd_with_a_fixed_start_trains_in_stages_as_in_one_run(tmp_path):
    wsd = ["--optim.schedule", "wsd", "--optim.decay-steps", "4", "--optim.decay-start", "3"]
    one, staged = tmp_path / "one", tmp_path / "staged"
    assert main(["train", *TINY, *wsd, "--steps", "8", "--out", str(one)]) == 0
    assert main(["train", *TINY, *wsd, "--steps", "4", "--out", str(staged)]) == 0
    assert main(["train", *TINY, *wsd, "--steps", "8", "--out", str(staged), "--resume"]) == 0
    a, b = _lrs(one), _lrs(staged)
    assert sorted(a) == sorted(b) == list(range(1, 9)) and a == b
    cfg = OptimConfig(
        schedule="wsd", warmup_steps=2, decay_steps=4, decay_start=3, min_lr_ratio=0.25
    )
    assert [a[s] for s in range(1, 9)] == pytest.approx(
        [0.01 * lr_factor(cfg, 8, s - 1) for s in range(1, 9)]
    )
    assert a[8] == pytest.approx(0.01 * 0.25)


@pytest.mark.parametrize(
    "fields,names",
    [
        ({"schedule": "wsd"}, "optim.decay_steps"),
        ({"schedule": "cosine", "decay_steps": 5}, "optim.decay_steps"),
        ({"schedule": "wsd", "decay_steps": 5, "decay_start": -1}, "optim.decay_start"),
    ],
)
def test_wsd_fields_are_refused_out_of_place(fields, names):
    with pytest.raises(ValueError, match=names):
        OptimConfig(**fields)

"""The reproduction drivers (repro/) stay in step with the CLI: every run's flags parse."""

import sys
from pathlib import Path

import pytest

from reformer.cli.train import parse_train_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from repro.run import PAPER_TABLE2, experiments, train_seconds


@pytest.mark.parametrize("name", ["duplication", "ablations", "lsh-vs-full"])
def test_every_reproduction_run_parses(name, tmp_path):
    exp = experiments(tmp_path)[name]
    configs = {}
    for run in exp.runs:
        cfg = parse_train_args([*exp.common, *run.args, "--out", str(tmp_path / run.name)])
        configs[run.name] = cfg
        assert cfg.steps == int(exp.common[exp.common.index("--steps") + 1])
    if name == "duplication":
        full = configs["full"].model
        assert full.attention == "full" and full.shared_qk_for("full")
        assert [configs[f"lsh-{n}"].model.n_hashes for n in (1, 2, 4)] == [1, 2, 4]
        assert set(PAPER_TABLE2) == set(configs)
    if name == "ablations":
        b, s, r = configs["baseline"].model, configs["shared-qk"].model, configs["reversible"].model
        assert (b.shared_qk, b.reversible) == (False, False)
        assert (s.shared_qk, s.reversible) == (True, False)
        assert (r.shared_qk, r.reversible) == (False, True)
    if name == "lsh-vs-full":
        modes = [configs[n].model.lsh_mode for n in ("lsh-4-window", "lsh-4-chunk")]
        assert modes == ["window", "chunk"]


@pytest.mark.parametrize("name", ["listops", "mlm"])
def test_encoder_reproduction_runs_parse(name, tmp_path):
    from repro import encoder

    runs = encoder.LISTOPS_RUNS if name == "listops" else encoder.MLM_RUNS
    if name == "listops":
        common = encoder.listops_common(1024, 500)
    else:
        common = encoder.mlm_common(tmp_path, 300)
    kinds = {}
    for run_name, (args, _) in runs.items():
        cfg = parse_train_args([*common, *args, "--out", str(tmp_path / run_name)])
        assert (
            cfg.task == name
            and not cfg.model.causal
            and cfg.steps == int(common[common.index("--steps") + 1])
        )
        kinds[run_name] = (cfg.model.attention, cfg.model.n_hashes)
    if name == "listops":
        assert kinds == {"lsh-2": ("lsh", 2), "lsh-4": ("lsh", 4), "local": ("local", 2),
                         "full": ("full", 2)}  # fmt: skip


def test_long_comparison_runs_parse_and_differ_only_in_attention(tmp_path):
    """repro.long: full, LSH-4 and LSH-8 share every flag but the attention, and a run's
    training seconds up to a step add its resumed sessions."""
    import json

    from repro import long

    exp = long.experiment(tmp_path, stage=100)
    cfgs = {r.name: parse_train_args([*exp.common, *r.args, "--out", "x"]) for r in exp.runs}
    kinds = {n: (c.model.attention, c.model.n_hashes) for n, c in cfgs.items()}
    assert kinds["full"][0] == "full"
    assert (kinds["lsh-4"], kinds["lsh-8"]) == (("lsh", 4), ("lsh", 8))
    base = cfgs["full"]
    for c in cfgs.values():
        assert (c.seed, c.seq_len, c.optim, c.precision) == (
            base.seed, base.seq_len, base.optim, base.precision)  # fmt: skip
        assert c.model.lsh_mode == "window" and c.eval_every == 100
    # the schedule is fixed in absolute steps: every stage (--steps 100, 200, ...) follows it
    assert base.optim.schedule == "wsd" and base.optim.decay_start == long.DECAY_START
    assert base.optim.decay_start + base.optim.decay_steps == long.END
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": 20, "elapsed_s": 10.0}, {"step": 40, "elapsed_s": 20.0},
            {"step": 60, "elapsed_s": 5.0}, {"step": 80, "elapsed_s": 12.0}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert train_seconds(run, 60) == 25.0  # 20 s in the first session, 5 in the second
    assert train_seconds(run, 80) == 32.0

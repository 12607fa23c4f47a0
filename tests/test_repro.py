"""The reproduction drivers (repro/) stay in step with the CLI: every run's flags parse."""

import sys
from pathlib import Path

import pytest

from reformer.cli.train import parse_train_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from repro.run import PAPER_TABLE2, experiments


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

"""The reproduction drivers (repro/) stay in step with the CLI: every run's flags parse."""

import sys
from pathlib import Path

import pytest

from reformer.cli import parse_train_args

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

"""Importing reformer pins oneMKL to reproducible results (reproducible.py): conditional
numerical reproducibility on and dynamic threads off, as oneMKL itself reports
(MKL_VERBOSE), unless the user chose otherwise."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="this torch does not use oneMKL"
)

MATMUL = "import torch\nimport reformer\ntorch.randn(64, 32) @ torch.randn(32, 256)\n"


def mkl_report(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_DYNAMIC")}
    proc = subprocess.run(
        [sys.executable, "-c", MATMUL],
        capture_output=True,
        text=True,
        env=clean | {"MKL_VERBOSE": "1"} | env,
        check=True,
    )
    lines = [x for x in proc.stdout.splitlines() if "SGEMM" in x]
    assert lines, proc.stdout
    return lines[0]


def test_import_turns_on_cnr_and_turns_off_dynamic_threads():
    line = mkl_report()
    assert "CNR:AUTO" in line and "Dyn:0" in line, line


def test_the_users_own_settings_win():
    line = mkl_report(MKL_CBWR="COMPATIBLE", MKL_DYNAMIC="TRUE")
    assert "CNR:COMPATIBLE" in line and "Dyn:1" in line, line

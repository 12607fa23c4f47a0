"""Shared benchmark plumbing: fresh-process measurement, environment record, atomic output."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# glibc raises its mmap threshold dynamically (up to 32 MiB) as large blocks are freed, after
# which freed tensors stay in the heap and fragment it: peak RSS then grows with the number of
# allocations (e.g. with depth) although live memory does not. A fixed threshold returns every
# block >= 64 KiB to the OS when freed, so RSS tracks live tensors. Workers run with it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}


def run_fresh(
    module: str,
    args: dict[str, Any],
    timeout: float = 1800,
    env: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Run `python -m module --worker JSON` in a fresh process; it prints one JSON line."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(args)]
    full_env = {k: v for k, v in (os.environ | MALLOC_ENV | (env or {})).items() if v is not None}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=2)
        tmp = f.name
    os.replace(tmp, path)


def save_png(fig, path: Path) -> None:
    """Save a matplotlib figure atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def command_line() -> str:
    return "python -m " + " ".join(shlex.quote(a) for a in [_module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem

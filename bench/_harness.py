"""Shared benchmark plumbing: fresh-process measurement, environment record, atomic output."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reformer.files import atomic_output, atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    VmHWM from /proc/self/status where it exists: getrusage's ru_maxrss also counts the
    RSS the parent had when it forked this process (kept across exec), so a worker started
    by a large parent would read that instead of its own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> None:
    """Reset the peak RSS to the current RSS (Linux >= 4.0), so that a peak reached before
    (imports, building the model) cannot hide the peak of the work measured next. Where
    the kernel does not allow it the old peak stays, and small peaks may read as 0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


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
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        if proc.stderr.strip():
            return {"error": proc.stderr.strip().splitlines()[-1]}
        if proc.returncode < 0:  # killed by a signal; SIGKILL is usually the OOM killer
            return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
        return {"error": f"failed with exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2))


def save_png(fig, path: Path) -> None:
    """Save a matplotlib figure atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def command_line() -> str:
    return "python -m " + " ".join(shlex.quote(a) for a in [_module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


# --- helpers shared by attention, flat and scale -------------------------------------------


def use_cpu_cache(gib: float) -> None:
    """In a worker: serve its tensors from reformer.cpu_cache (GiB of freed blocks kept; 0:
    PyTorch's allocator). Fails the worker if the cache cannot be built."""
    if gib:
        from reformer import cpu_cache

        assert cpu_cache.enable(gib), "--cpu-cache: the caching allocator did not build"


def setup_worker(args: dict[str, Any]) -> tuple[torch.device, torch.dtype]:
    """Fix threads and seed in a worker, and its allocator (args["cpu_cache"], GiB);
    returns its device and dtype."""
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    use_cpu_cache(args.get("cpu_cache", 0.0))
    return torch.device(args.get("device", "cpu")), getattr(torch, args.get("dtype", "float32"))


def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    """The best of six 4096 x 4096 matmuls in dtype (the first warms up), FLOP/s: the
    ceiling that MFU is measured against."""
    a = torch.randn(4096, 4096, dtype=dtype, device=device)
    b = torch.randn(4096, 4096, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * 4096**3 / best


def warm_lsh_kernels(device: torch.device, dtype: torch.dtype, chunk_len: int = 64) -> bool:
    """Compile our LSH tile kernels before anything is measured (when "auto" would use
    them): compilation is a one-off cost of the process (about 150 MiB of RSS, seconds with
    the on-disk cache warm), not of the sequence length."""
    from reformer.attention import tiles

    return tiles.warm_up(chunk_len, dtype, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of the work that follows construction, MiB (DESIGN.md section 7): on the
    CPU peak RSS minus the process's RSS now; on CUDA max_memory_allocated minus allocated now.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device) / 2**20
        else:
            reset_peak_rss()
            self.base = peak_rss_mib()

    def mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return peak_rss_mib() - self.base


def time_median(
    fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1
) -> tuple[float, list[float]]:
    """Median wall time of `repeats` calls after `warmup` untimed calls; and all the times."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def available_mib() -> float:
    """MemAvailable of this machine, MiB (inf where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.inf


def extrapolate(points: list[tuple[int, float]], length: int, exponent: float) -> float | None:
    """Predict a quantity at `length` from measured (length, value) points, ascending.

    value_last * (length / length_last) ** e, where e is the log-log slope of the last two
    points, at least `exponent` (the expected scaling) and at most 3; a lone point uses
    `exponent`. None without points.
    """
    if not points:
        return None
    (l1, v1), (l0, v0) = points[-1], points[-2] if len(points) > 1 else points[-1]
    slope = exponent
    if l1 != l0 and v0 > 0 and v1 > 0:
        slope = min(3.0, max(exponent, math.log(v1 / v0) / math.log(l1 / l0)))
    return v1 * (length / l1) ** slope


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table; columns are (header, key), values formatted by `fmt`."""
    lines = [
        "| " + " | ".join(h for h, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(fmt(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """Options every benchmark has: threads, repeats, device, dtype, output name, worker."""
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--name", default=name, help=f"output name: bench/results/NAME.json, .png ({name})"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="wall seconds for the whole benchmark; configurations not started by then are "
        "recorded as skipped",
    )
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def skip_reason(
    mem_mib: float | None,
    seconds: float | None,
    max_mem_gib: float,
    max_seconds: float,
    device: str = "cpu",
) -> str | None:
    """Why a configuration predicted to use `mem_mib` and `seconds` (per call) is not run.
    On the CPU the prediction must also leave 1 GiB of this machine's available memory."""
    if mem_mib is not None and mem_mib > max_mem_gib * 1024:
        return f"predicted {mem_mib / 1024:.3g} GiB > cap {max_mem_gib:g} GiB"
    if device == "cpu" and mem_mib is not None and mem_mib > available_mib() - 1024:
        return f"predicted {mem_mib / 1024:.3g} GiB > this machine's available memory"
    if seconds is not None and seconds > max_seconds:
        return f"predicted {seconds:.0f} s > cap {max_seconds:g} s"
    return None


def run_measured(
    module: str,
    args: dict[str, Any],
    timeout: float,
    device: str = "cpu",
    one_process: bool = False,
) -> dict[str, Any]:
    """Measure one configuration in fresh processes; the worker gets args["measure"].

    On the CPU two processes: "memory" with the fixed mmap threshold (MALLOC_ENV: peak RSS
    tracks live tensors) and "time" with glibc's default (the fixed threshold returns every
    freed block to the OS, and the page faults that follow slow some kernels down 2x). On
    CUDA one process measures "both" (max_memory_allocated does not depend on malloc).
    one_process (CPU): only the memory process, whose one step's wall time is the time (a
    first step, under the fixed threshold: slower; for steps that take many minutes).
    """
    if device != "cpu":
        return run_fresh(module, args | {"measure": "both"}, timeout=timeout)
    row = run_fresh(module, args | {"measure": "memory"}, timeout=timeout)
    if "error" in row or one_process:  # one_process: the memory step's own time (first step)
        return row | ({"seconds": row["memory_step_seconds"]} if "error" not in row else {})
    default_malloc = {"MALLOC_MMAP_THRESHOLD_": None}
    return row | run_fresh(module, args | {"measure": "time"}, timeout=timeout, env=default_malloc)


def measure(step: Callable[[], object], args: dict[str, Any], device: torch.device) -> dict:
    """In a worker: peak memory of one `step` ("memory"), the median time of args["repeats"]
    steps after args.get("warmup", 1) untimed ones ("time"), or both, the memory step then
    serving as the warm-up."""
    what = args.get("measure", "both")
    out: dict[str, Any] = {}
    meter = PeakMemory(device)
    if what in ("memory", "both"):
        t0 = time.perf_counter()
        step()
        sync(device)
        out["memory_step_seconds"] = time.perf_counter() - t0
        out["peak_mib"] = meter.mib()
    if what in ("time", "both"):
        warmup = 0 if what == "both" else args.get("warmup", 1)
        out["seconds"], out["times"] = time_median(step, args["repeats"], device, warmup)
    return out

"""A run's precision: fp32, bf16 autocast, or auto, which chooses bf16 where the device
multiplies bf16 natively (a CPU with AMX or AVX-512 BF16, a CUDA device with bf16) and fp32
elsewhere. The choice is made once, before the run's config is saved, so a resumed run
knows what it was trained in."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

#: CPU flags (Linux /proc/cpuinfo) of native bf16 matrix multiplication, best first
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them; empty where that is unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device) -> str | None:
    """Why `device` multiplies bf16 natively (a flag or a device name), or None."""
    if device.type == "cuda":
        # bf16 tensor cores from compute capability 8.0 (Ampere) on; earlier devices only
        # emulate bf16 (torch.cuda.is_bf16_supported counts emulation), slower than fp32.
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        return f"{name} (sm_{major}{minor}) has bf16 tensor cores" if major >= 8 else None
    if device.type == "cpu":
        flags = cpu_flags()
        return next((f"this CPU has {f}" for f in BF16_CPU_FLAGS if f in flags), None)
    return None


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """ "fp32" | "bf16" | "auto" -> (the precision to train in, why)."""
    if precision != "auto":
        return precision, "as asked"
    why = native_bf16(device)
    if why is not None:
        return "bf16", why
    return "fp32", f"{device.type} has no native bf16 matrix multiplication"

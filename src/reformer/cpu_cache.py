"""A caching CPU allocator: a training step's large tensors reuse freed memory instead of
faulting in fresh pages.

PyTorch's CPU allocator hands every tensor to malloc, and malloc returns large blocks to the
kernel when they are freed (they are mapped on their own, or trimmed: `reformer.memory`). The
next tensor of that size faults its pages in again, 4 KiB at a time, each one zeroed by the
kernel: at 16K tokens a step of one LSH layer spends 0.2-0.4 s of system time so (100-150K
faults). The shapes of a step repeat, layer after layer and step after step, so a cache of
freed blocks by size class (`csrc/cpu_cache.cpp`: eight classes per power of two, blocks of
1 MiB and more) serves nearly every request from memory that is already mapped.

`enable(limit_gib)` installs it for the process (PyTorch's `c10::SetCPUAllocator`): tensors
allocated before keep their own deleter, those after come from the cache. The free blocks it
keeps never exceed `limit_gib`; `empty()` returns them. It builds once with the system's C++
compiler (a few seconds, cached under `REFORMER_BUILD_DIR` or ~/.cache/reformer) and loads
through ctypes; without a compiler it warns once and PyTorch's allocator stays.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_cache.cpp"
_lib: ctypes.CDLL | None = None
_failed = False


@dataclass(frozen=True)
class CacheStats:
    cached_bytes: int
    """Free blocks the cache holds."""
    in_use_bytes: int
    """Blocks of 1 MiB and more that tensors hold now."""
    limit_bytes: int
    hits: int
    """Requests served from a cached block."""
    misses: int
    """Requests that needed fresh memory."""


def _build_dir() -> Path:
    root = os.environ.get("REFORMER_BUILD_DIR")
    return Path(root) if root else Path.home() / ".cache" / "reformer"


def _compile() -> Path:
    """The shared library for this source and this torch, built if it is not there yet."""
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__} {abi}".encode()).hexdigest()
    target = _build_dir() / f"cpu_cache-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [
        os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-fPIC", "-shared",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}", str(SOURCE),
        f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", tmp,
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # atomic: a concurrent build of the same key is harmless
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _library() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is None and not _failed:
        try:
            if not sys.platform.startswith("linux"):
                raise OSError(f"built for Linux only, not {sys.platform}")
            lib = ctypes.CDLL(str(_compile()))
            lib.reformer_cache_install.argtypes = [ctypes.c_int64]
            lib.reformer_cache_install.restype = ctypes.c_int
            lib.reformer_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
            lib.reformer_cache_empty.restype = ctypes.c_int64
            _lib = lib
        except (OSError, subprocess.CalledProcessError) as e:
            _failed = True
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(
                f"the caching CPU allocator could not be built ({detail.strip()[:300]}); "
                "PyTorch's allocator stays (install a C++ compiler, or set CXX, to use it)",
                stacklevel=3,
            )
    return _lib


def enable(limit_gib: float) -> bool:
    """Serve this process's CPU tensors from the cache, keeping at most `limit_gib` GiB of
    free blocks (called again, it sets a new limit). True when the cache is active."""
    if limit_gib <= 0:
        raise ValueError(f"cpu_cache limit must be > 0 GiB; got {limit_gib!r}")
    lib = _library()
    return lib is not None and lib.reformer_cache_install(int(limit_gib * 2**30)) in (1, 2)


def stats() -> CacheStats:
    out = (ctypes.c_int64 * 5)()
    if _lib is not None:
        _lib.reformer_cache_stats(out)
    return CacheStats(*out)


def empty() -> int:
    """Return every free block to the system; the bytes returned."""
    return int(_lib.reformer_cache_empty()) if _lib is not None else 0

"""Heap memory that the reversible backward pass hands back to the operating system (glibc).

glibc's malloc raises its mmap threshold as large blocks are freed (up to 32 MiB), after
which the (L, d_model) tensors of long sequences are carved out of the heap. Each layer's
recomputation in the backward pass then leaves freed but still resident heap pages that the
next layer's differently sized blocks do not fit, so peak RSS grows with depth although live
memory does not (about 30 MiB per layer at 16K tokens). `release_free_memory`, called by the
reversible engine between the layers it recomputes, runs glibc's `malloc_trim(0)`: free heap
pages go back to the kernel and the next layer faults in only what it uses. It changes no
allocator setting, runs only on glibc, only for CPU tensors of at least `MIN_BYTES`, and is
switched off with `REFORMER_MALLOC_TRIM=0` in the environment or `set_release(False)`.

`fixed_mmap_threshold` is the one setting changed, and only by a rank of a sequence-parallel
run (`ReformerLM.shard_sequence`), whose reason to exist is memory: with the threshold fixed at
`RANK_MMAP_THRESHOLD`, every block at least that large is mapped and unmapped on its own, so
the rank's peak is its live tensors. Measured at 64K tokens with 2 ranks (`bench/sequence.py`):
about 850 MiB per rank with it, 1,000-1,350 MiB without it (the routed exchanges' buffers of
every size left resident in the heap), for a step up to a third slower (fresh pages fault in).
The same switches turn it off when set before `shard_sequence` (the threshold then stays
for the process, evaluation on whole sequences included), and a threshold the user set
through `MALLOC_MMAP_THRESHOLD_` is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# Below this size per stream tensor (e.g. L * d_model * 4 bytes = 4 MiB at L 4096, d 256)
# the heap a layer leaves behind is too small to matter and the trim's cost would show.
MIN_BYTES = 4 << 20

_enabled = os.environ.get("REFORMER_MALLOC_TRIM", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)
# glibc's mallopt parameter number of M_MMAP_THRESHOLD, and the value a sequence-parallel rank
# fixes it at: the blocks of the routed exchanges and the reversible stack are larger.
_M_MMAP_THRESHOLD = -3
RANK_MMAP_THRESHOLD = 4 << 20
_libc = None
_loaded = False


def _glibc():
    """glibc with malloc_trim and mallopt typed, or None off glibc (looked up once)."""
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _ = libc.gnu_get_libc_version  # AttributeError off glibc
            libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _libc = libc
        except (OSError, AttributeError):
            _libc = None
    return _libc


def fixed_mmap_threshold(nbytes: int = RANK_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `nbytes` for the rest of the process (it stops rising
    as blocks are freed), so that freed blocks of at least that size leave no resident pages.
    True when set; False off glibc, when switched off (see the module's docstring; switch
    before `shard_sequence`: the setting stays for the process) or when the user set one
    through MALLOC_MMAP_THRESHOLD_, which wins."""
    libc = _glibc() if _enabled and "MALLOC_MMAP_THRESHOLD_" not in os.environ else None
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1


def set_release(enabled: bool) -> None:
    """Turn the between-layers trim on or off for this process (default: on, unless
    REFORMER_MALLOC_TRIM=0)."""
    global _enabled
    _enabled = bool(enabled)


def release_free_memory(like: torch.Tensor) -> None:
    """Return free heap pages to the OS if `like` (a stream tensor of the reversible stack)
    lives on the CPU and is at least MIN_BYTES; a no-op elsewhere."""
    if not _enabled or like.device.type != "cpu" or like.numel() * like.element_size() < MIN_BYTES:
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

"""Writing files so that a crash never leaves half of one: write beside the final name,
fsync, give the file the mode the user's umask asks for, rename over the final name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    # Linux says it without changing it; elsewhere set-and-restore (racy with threads that
    # create files at that instant).
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from the user's umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """`with atomic_output(p) as tmp:` write the file at `tmp` (any writer: open, savefig,
    safetensors); on success it is fsynced, given the umask's mode and renamed to `p`; on
    an error it is removed and `p` is untouched."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # tempfile-style writers make 0600 files
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically (`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)

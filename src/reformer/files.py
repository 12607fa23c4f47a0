"""Writing files so that a crash never leaves half of one: write beside the final name,
fsync, give the file the mode the user's umask asks for, rename over the final name. Errors
that stop a write (a full disk, a quota, permissions, a read-only filesystem) come out as an
OSError that names the file (`naming`), which `write_error_message` turns into one line
with the fix. `run_lock` keeps a second writer out of a run directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

#: errnos that stop a write and what the user can do about each
WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full: free space on that filesystem or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free space or raise the quota",
    errno.EACCES: "permission denied: make the directory writable or write elsewhere",
    errno.EPERM: "permission denied: make the directory writable or write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
}


def is_write_error(exc: BaseException) -> bool:
    """Whether `exc` is an OSError that `WRITE_ERRORS` explains."""
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRORS


def write_error_message(exc: OSError) -> str:
    """One line: the path, the cause and the fix of a write that failed."""
    cause = exc.strerror or os.strerror(exc.errno or 0)
    return f"cannot write {exc.filename}: {cause}; {WRITE_ERRORS.get(exc.errno, 'check the path')}"


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Inside the block an OSError without a file name (write, flush and fsync raise those)
    gets `path`'s, and safetensors' I/O errors become the OSError they wrap."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:
        # safetensors reports "I/O error: No space left on device (os error 28)" as its own
        # exception type; the OS error number is in the message.
        code = re.search(r"\(os error (\d+)\)", str(e))
        if type(e).__name__ != "SafetensorError" or code is None:
            raise
        num = int(code.group(1))
        raise OSError(num, os.strerror(num), str(path)) from e


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
        with naming(final):
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


LOCK_FILE = ".lock"


class RunDirectoryBusy(ValueError):
    """Another process holds a run directory's lock."""


@contextlib.contextmanager
def run_lock(run_dir: Path | str) -> Iterator[None]:
    """Hold `run_dir`'s lock (DIR/.lock, an OS lock: flock) inside the block; the directory is
    made if needed. The OS drops the lock when the holder exits however it exits (kill -9
    included), so a lock is never stale. A second holder gets RunDirectoryBusy naming the
    first. A directory this call made and nothing else wrote into is removed again."""
    run_dir = Path(run_dir)
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunDirectoryBusy(
                f"{run_dir} is in use: {holder} is training into it; wait for it to end, "
                "stop it (kill -TERM PID saves a checkpoint and exits), or choose another --out"
            ) from None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
        if made and {p.name for p in run_dir.iterdir()} == {LOCK_FILE}:
            path.unlink(missing_ok=True)
            run_dir.rmdir()

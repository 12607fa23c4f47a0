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
import warnings
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
    """Whether `exc` is an OSError raised while writing (inside `naming`) that
    `WRITE_ERRORS` explains: a read that fails on permissions is not one."""
    return (
        isinstance(exc, OSError)
        and exc.errno in WRITE_ERRORS
        and getattr(exc, "while_writing", False)
    )


def write_error_message(exc: OSError) -> str:
    """One line: the path, the cause and the fix of a write that failed."""
    cause = exc.strerror or os.strerror(exc.errno or 0)
    return f"cannot write {exc.filename}: {cause}; {WRITE_ERRORS.get(exc.errno, 'check the path')}"


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Inside the block (a write) an OSError is marked as a write's (`is_write_error`); one
    without a file name (write, flush and fsync raise those) gets `path`'s, and safetensors'
    I/O errors become the OSError they wrap."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise _written(OSError(e.errno, e.strerror, str(path))) from e
        _written(e)
        raise
    except Exception as e:
        # safetensors reports "I/O error: No space left on device (os error 28)" as its own
        # exception type; the OS error number is in the message.
        code = re.search(r"\(os error (\d+)\)", str(e))
        if type(e).__name__ != "SafetensorError" or code is None:
            raise
        num = int(code.group(1))
        raise _written(OSError(num, os.strerror(num), str(path))) from e


def write_failure(code: int, message: str, path: Path | str) -> OSError:
    """The OSError of a write refused before it began (e.g. no room for a checkpoint)."""
    return _written(OSError(code, message, str(path)))


def _written(exc: OSError) -> OSError:
    exc.while_writing = True  # type: ignore[attr-defined]
    return exc


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
    first. A directory this call made and nothing else wrote into is removed again, by the
    holder only. On a filesystem without flock the run goes on unlocked, with a warning."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file, not a run directory; choose another --out")
    made = not run_dir.exists()
    with naming(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    with naming(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        locked = _flock(fd, run_dir)
        yield
    finally:
        # The holder removes a directory it made that holds nothing but the lock, the lock
        # file first and while still holding it, so no waiter locks an unlinked file.
        if made and locked and {p.name for p in run_dir.iterdir()} == {LOCK_FILE}:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        os.close(fd)  # releases the lock


#: flock errors of filesystems that do not support it (NFS without lockd, Lustre noflock)
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _flock(fd: int, run_dir: Path) -> bool:
    """Lock `fd` (and write who holds it); False when the filesystem cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        raise RunDirectoryBusy(
            f"{run_dir} is in use: {holder} is training into it; wait for it to end, "
            "stop it (kill -TERM PID saves a checkpoint and exits), or choose another --out"
        ) from None
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        warnings.warn(
            f"{run_dir}: this filesystem cannot lock files ({e.strerror}); the run goes on "
            "without a lock, so do not start a second `reformer train` into it",
            stacklevel=3,
        )
        return False
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
    return True

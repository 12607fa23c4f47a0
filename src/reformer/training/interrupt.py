"""Stopping a run cleanly when the cluster or the user asks: SIGTERM (what SLURM, Kubernetes
and torchrun's agent send before they kill a job), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
`--signal` warning ahead of the time limit).

The first signal only sets a flag; the Trainer reads it at the next step boundary, saves a
checkpoint of the last completed step, and exits with `128 + signal number` (the status a
shell reports for a process a signal ended: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1).
A second signal is noted and ignored: torchrun's agent passes the signal it got on to
workers that the terminal (Ctrl-C) or SLURM (scancel) signalled already, and a repeat of the
same signal within REPEAT_WINDOW seconds (one signal delivered along several such paths)
is not counted at all. A third raises `Interrupted` at once: the user insists, and the
checkpoint store is atomic, so a save cut short leaves the earlier checkpoints as they were.
Handlers are installed only for the duration of a run, and only in the main thread (Python
delivers signals there); elsewhere a run cannot be stopped this way.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by signal `signum`: 128 + signum, as a shell reports."""
    return 128 + signum


#: seconds within which a repeat of the same signal counts as the same delivery
REPEAT_WINDOW = 2.0

#: the signal that aborts a stopping run at once (1 is the first)
ABORT_AT = 3


class Interrupted(KeyboardInterrupt):
    """A third stop signal arrived while the run was stopping: give up at once."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name}: signalled {ABORT_AT} times, aborted without saving")
        self.signum = signum


class RunStopped(Exception):
    """A run stopped on a signal after saving its checkpoint; the message says what was
    saved and how to resume. `exit_code` is the process's status, `rank` the raiser's."""

    def __init__(self, signum: int, message: str, rank: int = 0) -> None:
        super().__init__(message)
        self.signum, self.rank = signum, rank
        self.exit_code = exit_code(signum)


class StopSignals:
    """`with StopSignals() as stop:` SIGTERM, SIGINT and SIGUSR1 set `stop.signum` (the first
    one wins) instead of killing the process; `stop.requested` says whether one came. The
    previous handlers come back on exit. `request(signum)` does what a signal does."""

    def __init__(self, announce: bool = False) -> None:
        self.signum: int | None = None
        self.count = 0
        self.announce = announce  # say on stderr what each signal does (the Trainer's rank 0)
        self._last: tuple[int, float] | None = None  # the last counted signal and its time
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def request(self, signum: int) -> None:
        now = time.monotonic()
        last = self._last
        if last is not None and last[0] == signum and now - last[1] < REPEAT_WINDOW:
            return  # the same delivery again, along another path
        self._last = (signum, now)
        self.count += 1
        name = signal.Signals(signum).name
        if self.count >= ABORT_AT:
            raise Interrupted(signum)
        if self.signum is None:
            self.signum = signum
            self._say(f"{name}: stopping after the step in progress, with a checkpoint")
        else:
            self._say(f"{name}: already stopping; a third signal aborts without saving")

    def _say(self, line: str) -> None:
        if self.announce:
            print(f"reformer train: {line}", file=sys.stderr, flush=True)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

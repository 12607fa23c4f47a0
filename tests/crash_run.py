"""`python tests/crash_run.py STEP reformer-args...`: the `reformer` command with a trainer
callback that kills rank 1 (rank 0 when alone) once it has finished STEP optimiser steps, on
torchrun's first attempt only, to exercise elastic restarts deterministically.

CRASH_SIGNAL in the environment chooses how:
- unset: the process exits with status 1;
- KILL: it sends itself SIGKILL (kill -9: no exit handlers, no flushing);
- TERM, INT or USR1: it sends itself that signal and carries on, as a process does that a
  cluster or a user signals; the run then stops after its next step. With SAVE_SIGNALS=N,
  N more of the same signal arrive while that stop's checkpoint is being written (between
  its files), each REPEAT_WINDOW seconds after the one before."""

import os
import signal
import sys
import time

import reformer.checkpoint as checkpoint
from reformer.cli import main
from reformer.distributed import restart_count
from reformer.training import register_callback
from reformer.training.interrupt import REPEAT_WINDOW

AT = int(sys.argv[1])
HOW = os.environ.get("CRASH_SIGNAL")


@register_callback
def crash(event: str, info: dict) -> None:
    victim = min(1, info["world_size"] - 1)
    first_attempt = event == "step_start" and restart_count() == 0
    if not (first_attempt and info["step"] == AT and info["rank"] == victim):
        return
    if HOW in ("TERM", "INT", "USR1"):
        print(f"crash callback: rank {info['rank']} gets SIG{HOW} at step {AT}", flush=True)
        _signal_the_stop_save(int(os.environ.get("SAVE_SIGNALS", "0")))
        os.kill(os.getpid(), getattr(signal, f"SIG{HOW}"))
        return
    print(f"crash callback: rank {info['rank']} exits at step {AT}", flush=True)
    if HOW == "KILL":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _signal_the_stop_save(count: int) -> None:
    """Send `count` more signals after the first file of the next checkpoint is written."""
    if count == 0:
        return
    write = checkpoint._write_tensors

    def write_then_signal(path, tensors):
        entry = write(path, tensors)
        checkpoint._write_tensors = write
        for _ in range(count):
            # apart, or they would count as one delivery (interrupt.REPEAT_WINDOW)
            time.sleep(REPEAT_WINDOW + 0.1)
            os.kill(os.getpid(), getattr(signal, f"SIG{HOW}"))
        return entry

    checkpoint._write_tensors = write_then_signal


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))

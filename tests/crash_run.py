"""`python tests/crash_run.py STEP reformer-args...`: the `reformer` command with a trainer
callback that kills rank 1 (rank 0 when alone) once it has finished STEP optimiser steps, on
torchrun's first attempt only, to exercise elastic restarts deterministically. With
CRASH_SIGNAL=KILL in the environment the process sends itself SIGKILL (kill -9: no exit
handlers, no flushing) instead of exiting with status 1."""

import os
import signal
import sys

from reformer.cli import main
from reformer.distributed import restart_count
from reformer.training import register_callback

AT = int(sys.argv[1])


@register_callback
def crash(event: str, info: dict) -> None:
    victim = min(1, info["world_size"] - 1)
    first_attempt = event == "step_start" and restart_count() == 0
    if first_attempt and info["step"] == AT and info["rank"] == victim:
        print(f"crash callback: rank {info['rank']} exits at step {AT}", flush=True)
        if os.environ.get("CRASH_SIGNAL") == "KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))

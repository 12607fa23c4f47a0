"""`python tests/crash_run.py STEP reformer-args...`: the `reformer` command with a trainer
callback that kills rank 1 (rank 0 when alone) once it has finished STEP optimiser steps, on
torchrun's first attempt only, to exercise elastic restarts deterministically."""

import os
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
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))

"""A run's progress on rank 0: a tqdm bar on a terminal; plain lines at the log interval when
stderr is a file or a pipe (CI, nohup, SLURM), where a bar's carriage-return updates would
pile up in the log as one endless line."""

from __future__ import annotations

import sys
from typing import Any, TextIO


class Progress:
    """`update()` after each step, `logged(record)` when a metrics record is written,
    `write(line)` for other messages, `close()` at the end. `enabled=False` prints only
    what goes through `write`."""

    def __init__(self, total: int, initial: int, enabled: bool, stream: TextIO | None = None):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.lines = enabled and not _is_terminal(self.stream)
        self.bar = None
        if enabled and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=self.stream,
            )

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, record: dict[str, Any]) -> None:
        """A training record ({"step", "loss", "tokens_per_s", ...}) was written."""
        loss, tps = record["loss"], record["tokens_per_s"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
        elif self.lines:
            print(
                f"step {record['step']}/{self.total}: loss {loss:.4f}, lr {record['lr']:.3g}, "
                f"{tps:,.0f} tok/s, {record['elapsed_s']:.0f} s",
                file=self.stream,
                flush=True,
            )

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

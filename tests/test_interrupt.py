"""Runs that survive what clusters and users do to them, with real processes and real signals:
SIGTERM, SIGINT and SIGUSR1 stop a run after the step in progress with a checkpoint of that
step, and --resume continues with the losses of an uninterrupted run; a second signal during
that save changes nothing, a third aborts it and leaves the earlier checkpoints; a second
writer is refused while a run is live; progress in a log file is plain lines."""

import errno
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import reformer.training.interrupt as interrupt
from helpers import logged_losses
from reformer.checkpoint import latest_checkpoint, load_checkpoint
from reformer.files import LOCK_FILE, RunDirectoryBusy, run_lock
from reformer.training.interrupt import ABORT_AT, Interrupted, StopSignals

CRASH_RUN = str(Path(__file__).with_name("crash_run.py"))
STEPS = 12


def train_args(steps: int = STEPS, every: int = 5, progress: bool = False) -> list[str]:
    return [
        "train", "--preset", "duplication-small", "--seq-len", "16", "--model.max-seq-len",
        "16", "--model.n-hashes", "2", "--model.n-layers", "1", "--model.d-model", "16",
        "--model.d-ff", "16", "--model.n-heads", "2", "--model.chunk-len", "8",
        "--model.dropout", "0.1", "--batch-size", "4", "--steps", str(steps),
        "--checkpoint-every", str(every), "--log-every", "1", "--eval-every", "0",
        "--eval-hashes", "2", "--eval-batches", "1",
        "--progress" if progress else "--no-progress",
    ]  # fmt: skip


RUN = train_args()
AT = 6  # the signal arrives as step 7 starts; the run stops after it (not a checkpoint step)


def reformer(*args: str, env: dict | None = None, script: list[str] | None = None, **kw):
    cmd = [sys.executable, *(script or ["-m", "reformer"]), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=os.environ | (env or {}), **kw
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = reformer(*RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return logged_losses(out)


def checkpoint_steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize(("name", "status"), [("TERM", 143), ("INT", 130), ("USR1", 138)])
def test_signal_saves_the_step_and_resume_is_bit_exact(name, status, reference, tmp_path):
    run = tmp_path / "run"
    proc = reformer(
        *RUN, "--out", str(run), env={"CRASH_SIGNAL": name}, script=[CRASH_RUN, str(AT)]
    )
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    saved = run / "checkpoints" / f"step-{AT + 1:08d}"
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (
        f"reformer train: stopped by SIG{name} after step {AT + 1}: saved {saved}; resume "
        f"with: reformer train --config {run / 'config.yaml'} --resume"
    )
    assert latest_checkpoint(run) == saved
    assert checkpoint_steps(run) == ["step-00000005", "step-00000007"]
    assert sorted(logged_losses(run)) == list(range(1, AT + 2))  # flushed up to the saved step
    resumed = reformer("train", "--config", str(run / "config.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {AT + 1}" in resumed.stdout
    assert logged_losses(run) == reference  # every step, bit for bit


@pytest.mark.parametrize("extra", [ABORT_AT - 2, ABORT_AT - 1], ids=["second", "third"])
def test_more_signals_during_the_save(extra, reference, tmp_path):
    """A second SIGTERM while the stop's checkpoint is written changes nothing; a third
    aborts the save, which leaves no partial directory and the earlier checkpoint whole."""
    run = tmp_path / "run"
    env = {"CRASH_SIGNAL": "TERM", "SAVE_SIGNALS": str(extra)}
    proc = reformer(*RUN, "--out", str(run), env=env, script=[CRASH_RUN, str(AT)])
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr
    said = [x for x in proc.stderr.splitlines() if "SIGTERM: " in x]
    assert (
        said[0] == "reformer train: SIGTERM: stopping after the step in progress, with a checkpoint"
    )
    assert (
        said[1] == "reformer train: SIGTERM: already stopping; a third signal aborts without saving"
    )
    if extra == ABORT_AT - 2:
        assert len(said) == 2
        assert checkpoint_steps(run) == ["step-00000005", "step-00000007"]
    else:
        assert proc.stderr.strip().endswith("interrupted")
        assert checkpoint_steps(run) == ["step-00000005"]  # no .tmp-* left behind
    load_checkpoint(latest_checkpoint(run), _model(run))  # checksums verified
    resumed = reformer("train", "--config", str(run / "config.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert logged_losses(run) == reference


def _model(run: Path):
    from reformer.model import ReformerLM
    from reformer.training.runs import saved_run_config

    return ReformerLM(saved_run_config(latest_checkpoint(run)).model)


def test_sigterm_from_outside_and_a_second_writer(reference, tmp_path):
    """A live run refuses a second `train` into its directory (naming its process) while
    `eval` still reads it; SIGTERM from another process stops it with a checkpoint of its
    last step; after a kill -9 the directory is free again."""
    run = tmp_path / "run"
    slow = train_args(steps=100_000, every=3)
    live = subprocess.Popen(
        [sys.executable, "-m", "reformer", *slow, "--out", str(run), "--keep-checkpoints", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: latest_checkpoint(run) is not None)
    second = reformer(*slow, "--out", str(run), "--resume")
    assert second.returncode == 2
    assert f"{run} is in use: pid {live.pid} on " in second.stderr
    assert reformer("eval", "--checkpoint", str(run), "--batches", "1").returncode == 0
    live.send_signal(signal.SIGTERM)
    _, err = live.communicate(timeout=120)
    assert live.returncode == 143, err
    step = max(logged_losses(run))
    assert latest_checkpoint(run).name == f"step-{step:08d}"
    assert f"stopped by SIGTERM after step {step}" in err
    # kill -9 leaves no stale lock: the OS released it with the process
    again = subprocess.Popen(
        [sys.executable, "-m", "reformer", *slow, "--out", str(run), "--resume"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(lambda: max(logged_losses(run)) > step + 1)
    os.kill(again.pid, signal.SIGKILL)
    again.wait()
    last_saved = int(latest_checkpoint(run).name.removeprefix("step-"))
    final = reformer(*train_args(steps=last_saved + 1, every=3), "--out", str(run), "--resume")
    assert final.returncode == 0, final.stderr
    assert f"from step {last_saved}" in final.stdout


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal(tmp_path):
    args = [*train_args(steps=4, progress=True), "--log-every", "2"]
    piped = subprocess.run(
        [sys.executable, "-m", "reformer", *args, "--out", str(tmp_path / "a")],
        capture_output=True,
        timeout=300,
    )
    assert piped.returncode == 0
    assert b"\r" not in piped.stderr  # bytes: text mode would turn \r into \n
    lines = [x for x in piped.stderr.decode().splitlines() if x.startswith("step ")]
    assert [x.split(":")[0] for x in lines] == ["step 2/4", "step 4/4"]
    main_fd, term = pty.openpty()
    fcntl.ioctl(term, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    with open(main_fd, "rb", buffering=0) as reader:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reformer", *args, "--out", str(tmp_path / "b")],
            stdout=subprocess.DEVNULL,
            stderr=term,
        )
        os.close(term)
        out, deadline = b"", time.time() + 300
        while time.time() < deadline:
            if not select.select([reader], [], [], 1.0)[0]:
                continue
            try:
                chunk = reader.read(4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            out += chunk
    assert proc.wait(timeout=60) == 0
    assert b"\r" in out and b"train:" in out and b"step 2/4:" not in out


def test_stop_signals_count_and_restore_handlers(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the second is noted, not acted on
        os.kill(os.getpid(), signal.SIGTERM)  # within REPEAT_WINDOW: the same delivery
        assert stop.signum == signal.SIGUSR1 and stop.name == "SIGUSR1"
        assert stop.count == 2
        monkeypatch.setattr(interrupt, "REPEAT_WINDOW", 0.0)
        with pytest.raises(Interrupted, match="SIGTERM: signalled 3 times"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_lock_refuses_a_second_holder_and_cleans_up_after_the_first(tmp_path, monkeypatch):
    run = tmp_path / "new"
    with run_lock(run):
        with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()} on "), run_lock(run):
            pass
        assert (run / LOCK_FILE).exists()  # the refused writer removed nothing
    assert not run.exists()  # the holder made it and nothing else was written into it
    (tmp_path / "file").write_text("")
    with (
        pytest.raises(ValueError, match="is a file, not a run directory"),
        run_lock(tmp_path / "file"),
    ):
        pass

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="cannot lock files"), run_lock(tmp_path / "nfs"):
        (tmp_path / "nfs" / "config.yaml").write_text("")
    assert (tmp_path / "nfs" / "config.yaml").exists()


def test_ctrl_c_in_other_verbs_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    from reformer import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.VERBS, "eval", interrupted)
    assert cli.main(["eval", "--checkpoint", "x"]) == 130
    assert capsys.readouterr().err == "reformer eval: interrupted\n"

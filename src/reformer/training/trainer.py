"""The training loop every task runs: set-up (run directory, resume, model, optimiser,
DDP/FSDP), then for each step: train, log, evaluate, save; then stop. A task brings a
`Recipe` (recipe.py).

Exact resume: batches are pure functions of (seed, step), evaluation runs on a forked RNG,
and checkpoints carry the optimiser, scheduler and RNG states; so a run resumed after a
kill continues with bit-identical losses on the CPU.

Stopping: SIGTERM, SIGINT and SIGUSR1 (interrupt.py) end the run at the next step boundary
with a checkpoint of that step and exit status 128 + the signal's number; --max-minutes ends
it the same way with status 0. One writer per run directory: rank 0 holds its lock
(`files.run_lock`). A write that fails (full disk, quota, permissions) stops the run with
one line naming the file and the fix; the checkpoints written before stay loadable.

Multi-process: under torchrun the CLI initialises torch.distributed and calls
`train(cfg, rank, world_size)`; the model is wrapped in DDP (or sharded with FSDP2), each rank
trains on its own rows of the same global batch, and only rank 0 writes files
(docs/distributed.md). The ranks agree on every stop (NaN, time, signal) through the one
small all-reduce each step already makes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .. import cpu_cache
from ..checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from ..distributed import (
    StateView,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state_dict,
    is_distributed,
    load_full_optimizer_state,
    local_device,
    no_grad_sync,
    restart_count,
    wrap_model,
)
from ..files import atomic_write, is_write_error, run_lock, write_error_message
from ..run_config import TrainConfig, config_to_dict
from .common import (
    MetricsLog,
    RunWriteFailed,
    TrainingDiverged,
    autocast_for,
    build_optimizer,
    lr_factor,
    out_of_time,
    resolve_device,
)
from .interrupt import RunStopped, StopSignals
from .precision import resolve_precision
from .progress import Progress
from .recipe import Recipe
from .resume import check_resume_state, newest_checkpoint, pick_checkpoint
from .sequence import sequence_layout, sum_gradients, unsharded

Callback = Callable[[str, dict[str, Any]], None]
_CALLBACKS: list[Callback] = []


def register_callback(fn: Callback) -> Callback:
    """Call `fn(event, info)` at the trainer's events in every run of this process:
    "step_start" with {"step", "rank", "world_size"} before each optimiser step. Tests use it
    to kill or signal a rank at a chosen step; returns fn, so it works as a decorator."""
    _CALLBACKS.append(fn)
    return fn


class _LossModule(nn.Module):
    """The recipe's loss as a module's forward: DDP and FSDP hook `__call__`, so training
    calls this module rather than the model's loss method."""

    def __init__(self, model: nn.Module, recipe: Recipe) -> None:
        super().__init__()
        self.model = model
        self._recipe = recipe

    def forward(self, *inputs: Tensor) -> Any:
        return self._recipe.loss(self.model, *inputs)


def _is_launched(rank: int, world_size: int) -> bool:
    """Whether this call is one rank of a multi-process run (a process group exists)."""
    if is_distributed():
        import torch.distributed as dist

        if (rank, world_size) != (dist.get_rank(), dist.get_world_size()):
            raise ValueError(
                f"train(rank={rank}, world_size={world_size}) does not match the initialised "
                f"process group (rank {dist.get_rank()} of {dist.get_world_size()})"
            )
        return True
    if (rank, world_size) != (0, 1):
        raise ValueError(
            f"train(rank={rank}, world_size={world_size}) needs an initialised "
            "torch.distributed process group: launch with `torchrun --nproc-per-node N -m "
            "reformer train ...` (or call torch.distributed.init_process_group first)"
        )
    return False


@dataclass
class _Loop:
    """What the phases of one run share: the run's objects, the step, and its clocks."""

    out: Path
    resolved: dict[str, Any]
    metrics: MetricsLog
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    wrapped: nn.Module | None  # the DDP/FSDP-wrapped loss module when launched
    step: int
    progress: Progress
    t_start: float = field(default_factory=time.perf_counter)
    t_log: float = field(default_factory=time.perf_counter)
    tokens_since: int = 0
    last_eval: dict[str, Any] = field(default_factory=dict)
    stop: str | None = None  # why the loop ends before cfg.steps: "time" or "signal"
    signum: int = 0  # the signal that stopped it (agreed by all ranks)
    saved: Path | None = None  # the newest checkpoint of this run (written or resumed from)
    record: dict[str, Any] = field(default_factory=dict)  # the last step's figures
    evaluated: bool = False  # rank 0 evaluated at this step (the others wait for it)


class Trainer:
    """One run of `cfg` with `recipe_cls` on this rank: `Trainer(...).run()` -> the last
    evaluation's metrics (rank 0; other ranks get {}). Raises RunStopped after a signal
    (with the checkpoint saved), RunWriteFailed when a file cannot be written."""

    def __init__(
        self, cfg: TrainConfig, recipe_cls: type[Recipe], rank: int = 0, world_size: int = 1
    ) -> None:
        self.launched = _is_launched(rank, world_size)
        if self.launched and cfg.parallel == "fsdp" and cfg.optim.name == "adafactor":
            # torch 2.13: Adafactor's in-place pow_ on a norm of sharded (DTensor) gradients
            # has no sharding strategy, so the first optimiser step would fail.
            raise ValueError(
                "--parallel fsdp does not work with --optim.name adafactor (torch.optim."
                "Adafactor cannot step sharded DTensor parameters); use --optim.name adamw "
                "or --parallel ddp"
            )
        device = resolve_device(cfg.device)
        self.device = local_device(device) if self.launched else device
        wants_cache = self.device.type == "cpu" and cfg.cpu_cache_gib > 0
        if wants_cache and cpu_cache.enable(cfg.cpu_cache_gib) and rank == 0:  # else it warned
            print(f"cpu cache: on, up to {cfg.cpu_cache_gib:g} GiB of freed blocks", flush=True)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.recipe = recipe_cls(cfg, rank, world_size, self.device)
        self.layout = None  # --parallel sequence: this rank's sequence group
        if self.launched and cfg.parallel == "sequence":
            self.layout = sequence_layout(cfg.sequence_ranks, rank, world_size)
            self.recipe.data_rank, self.recipe.data_world = (
                self.layout.data_rank,
                self.layout.data_world,
            )
        self.signals = StopSignals(announce=rank == 0)

    def run(self) -> dict[str, Any]:
        """Set up, then train, log, evaluate and save step by step until cfg.steps, the time
        limit or a signal; then stop."""
        with self.signals, self._holding_run_dir():
            loop = self._setup()
            try:
                with self._naming_write_errors(loop):
                    while loop.step < self.cfg.steps and loop.stop is None:
                        self._train_step(loop)
                        self._log(loop)
                        self._evaluate(loop)
                        self._save(loop)
            finally:
                loop.progress.close()
                loop.metrics.close()
            self._stop(loop)
        return loop.last_eval

    # --- set-up --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _holding_run_dir(self) -> Iterator[None]:
        """Rank 0 holds the run directory's lock for the whole run; a refusal or an error
        taking it reaches every rank (no rank waits for a rank 0 that gave up)."""
        with contextlib.ExitStack() as stack:
            refused = None
            if self.rank == 0:
                try:
                    stack.enter_context(run_lock(self.cfg.out))
                except Exception as e:  # every rank raises it
                    refused = e
            if self.launched:
                refused = broadcast_object(refused)
            if refused is not None:
                raise refused
            yield

    def _setup(self) -> _Loop:
        cfg, rank = self.cfg, self.rank
        out = Path(cfg.out)
        metrics = MetricsLog(
            out / "metrics.jsonl", out / "tensorboard" if cfg.tensorboard else None
        )
        newest = newest_checkpoint(out, rank)
        self._settle_precision(newest)
        resolved = config_to_dict(cfg)
        ckpt = pick_checkpoint(newest, out, cfg.resume, resolved, self.recipe)
        self.recipe.prepare(out)
        check_resume_state(ckpt, self.recipe)
        torch.manual_seed(cfg.seed)
        model = self.recipe.build_model()
        opt, sched = self._optimizer(model)
        start = 0
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, opt, sched).step
            if rank == 0:
                metrics.truncate_after(start)
                print(f"resuming {out} from step {start} ({ckpt.name})", flush=True)
        elif self.launched and restart_count() > 0 and rank == 0:
            metrics.truncate_after(0)  # restarted before the first checkpoint: start over
        if start == 0 and cfg.init_from is not None:
            # Fine-tuning: the weights of another run (or of a converted checkpoint), a fresh
            # optimiser and schedule; a shape that differs is refused by name.
            loaded = self.recipe.init_from(Path(cfg.init_from), model)
            if rank == 0:
                print(f"initialised from {cfg.init_from} (step {loaded.step})", flush=True)
        if rank == 0:
            atomic_write(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
            line = self.recipe.describe(model)
            if line:
                print(line, flush=True)
        if self.layout is not None:
            task = getattr(self.recipe, "task", None)  # images: its own length
            model.shard_sequence(self.layout.shard(getattr(task, "seq_len", cfg.seq_len)))
        wrapped, opt, sched = self._wrap(model, opt, sched, start)
        model.train()  # whatever mode build_model or init_from left it in
        progress = Progress(cfg.steps, start, rank == 0 and cfg.progress)
        return _Loop(
            out, resolved, metrics, model, opt, sched, wrapped, start, progress, saved=ckpt
        )

    def _settle_precision(self, newest: Path | None) -> None:
        """--precision auto becomes fp32 or bf16 before the config is saved: a resumed run
        keeps its own, a fresh one takes bf16 where the device multiplies bf16 natively. An
        explicit precision other than the resumed run's is refused."""
        cfg, out = self.cfg, Path(self.cfg.out)
        resumed = cfg.resume and newest is not None
        saved = read_checkpoint_config(newest).get("precision") if resumed else None
        if cfg.precision == "auto":
            if saved is not None:
                cfg.precision, why = saved, "the precision the run was trained in"
            else:
                cfg.precision, why = resolve_precision("auto", self.device)
            if self.rank == 0:
                print(f"precision auto: {cfg.precision} ({why})", flush=True)
        elif saved is not None and saved != cfg.precision:
            raise ValueError(
                f"--resume: {out} was trained with --precision {saved}, not {cfg.precision}; "
                f"resume with --precision {saved} (or auto, which follows the run), or start "
                "a new --out"
            )

    def _optimizer(self, model: nn.Module) -> tuple[Any, Any]:
        cfg = self.cfg
        opt = build_optimizer(model, cfg.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.optim, cfg.steps, s))
        return opt, sched

    def _wrap(self, model: nn.Module, opt: Any, sched: Any, start: int) -> tuple[Any, Any, Any]:
        """Launched: the loss module wrapped in DDP or FSDP2 (FSDP also rebuilds the optimiser
        and schedule over the sharded parameters, carrying over the loaded state)."""
        if not self.launched or self.layout is not None:
            return None, opt, sched
        cfg = self.cfg
        wrapped = wrap_model(_LossModule(model, self.recipe), cfg.parallel, self.device)
        if cfg.parallel == "fsdp":
            loaded_opt, loaded_sched = opt.state_dict(), sched.state_dict()
            opt, sched = self._optimizer(model)
            if start > 0:
                load_full_optimizer_state(wrapped, model, opt, loaded_opt)
                sched.load_state_dict(loaded_sched)
        return wrapped, opt, sched

    # --- one step ----------------------------------------------------------------------------
    def _train_step(self, loop: _Loop) -> None:
        """Forward and backward over the step's micro-batches, the agreed stop decisions
        (NaN, time, signal), clipping and the optimiser step."""
        cfg, recipe = self.cfg, self.recipe
        for fn in _CALLBACKS:
            fn("step_start", {"step": loop.step, "rank": self.rank, "world_size": self.world_size})
        micros = recipe.micro_batches(loop.step)
        loss_value = 0.0
        for i, inputs in enumerate(micros):
            # Gradients of all but the last micro-batch stay local: one all-reduce a step.
            local = loop.wrapped is not None and i < len(micros) - 1
            with no_grad_sync(loop.wrapped) if local else contextlib.nullcontext():
                with autocast_for(self.device, cfg.precision):
                    out = (
                        loop.wrapped(*inputs) if loop.wrapped else recipe.loss(loop.model, *inputs)
                    )
                    loss = recipe.micro_loss(out, micros)
                loss.backward()
            loss_value += float(loss.detach())
        if self.layout is not None:
            sum_gradients(loop.model, self.layout.data_world)
        loss_value = self._agree_on_stop(loop, loss_value)
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss is {loss_value} at step {loop.step + 1}; stopped. The last good "
                f"checkpoint in {loop.out / 'checkpoints'} is kept: lower --optim.lr, raise "
                "--optim.warmup-steps or use --precision fp32, then --resume"
            )
        grad_norm = self._clip(loop)
        lr = loop.opt.param_groups[0]["lr"]
        loop.opt.step()
        loop.sched.step()
        loop.opt.zero_grad(set_to_none=True)
        loop.step += 1
        loop.tokens_since += recipe.tokens(micros)
        window_loss = recipe.logged_loss(loss_value, micros)
        loop.record = {"loss": loss_value if window_loss is None else window_loss, "lr": lr}
        if grad_norm is not None:
            loop.record["grad_norm"] = grad_norm
        loop.progress.update()
        if loop.stop == "signal" and loop.step == cfg.steps:
            loop.stop = None  # the run is complete anyway: finish it as usual

    def _agree_on_stop(self, loop: _Loop, loss_value: float) -> float:
        """The step's loss (the mean over ranks when launched) and `loop.stop`: every rank
        reaches the same decisions at the same step, on rank 0's clock for --max-minutes
        and on a signal any rank received."""
        signum = self.signals.signum or 0
        if self.launched:
            late = float(self.rank == 0 and out_of_time(self.cfg, loop.t_start))
            loss_sum, late, signalled = all_reduce_sum(
                [loss_value, late, float(signum > 0)], self.device
            )
            loss_value = loss_sum / self.recipe.data_world  # a sequence group's ranks add
            if signalled:  # rare: one more collective to agree on which signal
                signum = int(all_reduce_max(signum, self.device))
            late = late > 0
        else:
            late = out_of_time(self.cfg, loop.t_start)
        if signum:
            loop.stop, loop.signum = "signal", signum
        elif late:
            loop.stop = "time"
        return loss_value

    def _clip(self, loop: _Loop) -> float | None:
        if self.cfg.optim.clip <= 0:
            return None
        norm = torch.nn.utils.clip_grad_norm_(loop.model.parameters(), self.cfg.optim.clip)
        if self.launched and self.cfg.parallel == "fsdp":
            from torch.distributed.tensor import DTensor

            if isinstance(norm, DTensor):  # sharded gradients: a collective
                norm = norm.full_tensor()
        return float(norm)

    # --- after the step ------------------------------------------------------------------
    def _boundary(self, loop: _Loop, every: int, on_signal: bool = True) -> bool:
        """Whether this step is an `every` step, the last one, or one the loop stops after
        (after a signal only `on_signal`)."""
        stops = loop.stop is not None and (on_signal or loop.stop != "signal")
        return (bool(every) and loop.step % every == 0) or loop.step == self.cfg.steps or stops

    def _log(self, loop: _Loop) -> None:
        if self.rank != 0 or not self.cfg.log_every or not self._boundary(loop, self.cfg.log_every):
            return
        now = time.perf_counter()
        tps = loop.tokens_since / max(now - loop.t_log, 1e-9)
        loop.t_log, loop.tokens_since = now, 0
        self.recipe.reset_logged_loss()
        rec = {"step": loop.step, "loss": loop.record["loss"], "lr": loop.record["lr"]}
        rec["tokens_per_s"] = tps
        if "grad_norm" in loop.record:
            rec["grad_norm"] = loop.record["grad_norm"]
        rec["elapsed_s"] = now - loop.t_start
        loop.metrics.write(rec)
        loop.progress.logged(rec)

    def _evaluate(self, loop: _Loop) -> None:
        """Rank 0 evaluates alone (the others wait at the save's barrier); under FSDP every
        rank first takes part in gathering the full weights. A signal adds no evaluation of
        its own (the cluster's grace period is for the checkpoint), so the resumed run's
        evaluations fall on the steps of an uninterrupted run's."""
        if not self.cfg.eval_every or not self._boundary(loop, self.cfg.eval_every, False):
            return
        fsdp = self.launched and self.cfg.parallel == "fsdp"
        if fsdp:
            loop.wrapped.unshard()  # type: ignore[union-attr, operator]
        if self.rank == 0:
            t_eval = time.perf_counter()
            with unsharded(loop.model):  # whole sequences on rank 0 alone
                loop.last_eval = self.recipe.evaluate(loop.model)
            loop.metrics.write(
                {"step": loop.step}
                | {f"eval_{k}": v for k, v in loop.last_eval.items()}
                | {"eval_s": time.perf_counter() - t_eval}
            )
            items = ", ".join(f"{k} {v:.4f}" for k, v in loop.last_eval.items())
            loop.progress.write(f"step {loop.step}: {items}")
        if fsdp:
            loop.wrapped.reshard()  # type: ignore[union-attr, operator]
        loop.evaluated = True

    def _save(self, loop: _Loop) -> None:
        """A checkpoint at every checkpoint_every steps, the last step and a stop. Then,
        after an evaluation or a save, a barrier: nobody runs ahead while rank 0 evaluates
        or writes, so a checkpoint is complete on disk before any rank can take another
        step (and crash)."""
        save = self._boundary(loop, self.cfg.checkpoint_every)
        if save:
            self._write_checkpoint(loop)
        if self.launched and (save or loop.evaluated):
            barrier()
        loop.evaluated = False

    def _write_checkpoint(self, loop: _Loop) -> None:
        model: Any = loop.model
        opt: Any = loop.opt
        if self.launched and self.cfg.parallel == "fsdp":
            # gather the shards (collectives on every rank); rank 0 keeps them
            model = StateView.named_like(model, full_state_dict(model, self.rank == 0))
            opt = StateView.named_like(opt, full_state_dict(opt, self.rank == 0))
        if self.rank == 0:
            loop.saved = save_checkpoint(
                loop.out,
                loop.step,
                model,
                opt,
                loop.sched,
                state=self.recipe.state(loop.step),
                config=loop.resolved,
                keep=self.cfg.keep_checkpoints,
            )

    # --- the end -----------------------------------------------------------------------------
    def _stop(self, loop: _Loop) -> None:
        """Say why the loop ended early; after a signal raise RunStopped (its exit status)."""
        if loop.stop == "time" and self.rank == 0:
            print(f"--max-minutes {self.cfg.max_minutes} reached at step {loop.step}; saved")
        if loop.stop != "signal":
            return
        raise RunStopped(
            loop.signum,
            f"stopped by {signal.Signals(loop.signum).name} after step {loop.step}: saved "
            f"{loop.saved}; resume with: {self._resume_command(loop)}",
            rank=self.rank,
        )

    def _resume_command(self, loop: _Loop) -> str:
        cmd = f"reformer train --config {loop.out / 'config.yaml'} --resume"
        if self.launched:
            cmd = f"torchrun --nproc-per-node {self.world_size} -m {cmd}"
        return cmd

    @contextlib.contextmanager
    def _naming_write_errors(self, loop: _Loop) -> Iterator[None]:
        """A write that fails mid-run -> RunWriteFailed: the file, the cause, the fix and
        the checkpoint to resume from once it is fixed."""
        try:
            yield
        except OSError as e:
            if not is_write_error(e):
                raise
            kept = latest_checkpoint(loop.out) if loop.out.exists() else None
            after = (
                f"the newest checkpoint ({kept}) is intact: resume with "
                f"`{self._resume_command(loop)}` after the fix"
                if kept is not None
                else "no checkpoint was written yet: start the run again after the fix"
            )
            raise RunWriteFailed(f"{write_error_message(e)}; {after}") from e

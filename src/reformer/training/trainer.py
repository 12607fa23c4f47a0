"""The training loop every task runs: resume, micro-batches, DDP/FSDP, NaN stop, clipping,
evaluation, checkpoints, the time limit, metrics. A task brings a `Recipe`.

Exact resume: batches are pure functions of (seed, step), evaluation runs on a forked RNG,
and checkpoints carry the optimiser, scheduler and RNG states; so a run resumed after a
kill continues with bit-identical losses on the CPU.

Multi-process: under torchrun the CLI initialises torch.distributed and calls
`train(cfg, rank, world_size)`; the model is wrapped in DDP (or sharded with FSDP2), each rank
trains on its own rows of the same global batch, and only rank 0 writes files
(docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ..checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    read_checkpoint_state,
    save_checkpoint,
)
from ..distributed import (
    StateView,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state_dict,
    is_distributed,
    load_full_optimizer_state,
    local_device,
    no_grad_sync,
    restart_count,
    torchrun_env,
    wrap_model,
)
from ..run_config import TrainConfig, config_from_dict, config_to_dict, unused_fields
from .common import (
    MetricsLog,
    TrainingDiverged,
    atomic_write_text,
    autocast_for,
    build_optimizer,
    lr_factor,
    out_of_time,
    resolve_device,
)

Callback = Callable[[str, dict[str, Any]], None]
_CALLBACKS: list[Callback] = []


def register_callback(fn: Callback) -> Callback:
    """Call `fn(event, info)` at the trainer's events in every run of this process:
    "step_start" with {"step", "rank", "world_size"} before each optimiser step. Tests use it
    to kill a rank at a chosen step; returns fn, so it works as a decorator."""
    _CALLBACKS.append(fn)
    return fn


class Recipe:
    """What a task brings to the Trainer. Subclasses implement the methods that raise.

    The loss of a step is the sum over its micro-batches of `micro_loss(output)`, averaged
    over ranks: a recipe scales each micro-batch's loss so that this is the loss of the
    whole global batch (DDP averages the gradients over ranks the same way).
    """

    #: config sections a resumed run must share with its checkpoint
    resume_sections: tuple[str, ...] = ("model",)
    #: keys of `state()` (what `prepare` derived from the data: a classifier's label
    #: names, its tokenizer) a resumed run must share with its checkpoint's saved state
    resume_state: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device

    def prepare(self, out: Path) -> None:
        """Data and tokenizers, on every rank, before the model is built. Files it writes
        (rank 0, in `out`) come after the run-directory checks have passed."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, *inputs: Tensor) -> Any:
        """The wrapped module's forward (what DDP and FSDP see): model -> loss output."""
        raise NotImplementedError

    def micro_batches(self, step: int) -> list[tuple[Tensor, ...]]:
        """This rank's inputs of each micro-batch of optimiser step `step`, on the device."""
        raise NotImplementedError

    def micro_loss(self, output: Any, micros: list[tuple[Tensor, ...]]) -> Tensor:
        """The tensor to back-propagate for one micro-batch's `loss` output."""
        raise NotImplementedError

    def tokens(self, micros: list[tuple[Tensor, ...]]) -> int:
        """Tokens this step processes on all ranks (for tokens_per_s)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (rank 0 alone, unwrapped model)."""
        raise NotImplementedError

    def eval_settings(self) -> dict[str, Any]:
        """The evaluation's batch size, batch count, device, precision and seed: rank 0
        evaluates alone, on as many rows per batch as one process with the global batch."""
        cfg = self.cfg
        return dict(
            batch_size=cfg.eval_batch_size or cfg.batch_size * self.world_size,
            max_batches=cfg.eval_batches or None,
            device=self.device,
            precision=cfg.precision,
            seed=cfg.seed,
        )

    def logged_loss(self, step_loss: float, micros: list[tuple[Tensor, ...]]) -> float | None:
        """Called after every step with its loss; returns the loss to log at this step, or
        None for the last step's own. Translation returns the token-weighted mean since
        its previous log line (`reset_logged_loss`)."""
        return None

    def reset_logged_loss(self) -> None:
        """A log line was written."""

    def state(self, step: int) -> dict[str, Any]:
        """The JSON training state saved with each checkpoint."""
        return {"step": step}

    def describe(self, model: nn.Module) -> str | None:
        """A line printed (rank 0) once the model is built, or None."""
        return None

    def init_from(self, path: Path, model: nn.Module) -> Any:
        """Fine-tuning (--init-from): load another run's weights into the fresh model (a
        `LoadedCheckpoint`). A recipe whose head differs from the source's loads the rest."""
        return load_checkpoint(path, model, restore_rng=False)


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


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config with the fields added since it was written at their defaults (a
    newer library compares like with like on --resume); as saved if it no longer parses."""
    import warnings

    try:
        with unused_fields("reset"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config_to_dict(config_from_dict(saved))
    except (TypeError, ValueError):
        return saved


def _elastic_restart_resumes(ckpt: Path | None, resolved: dict[str, Any]) -> bool:
    """A worker group restarted by torchrun (--max-restarts) continues from the newest
    checkpoint without --resume, but only from one written with this very config, so that a
    restart never continues some other run that was in --out."""
    if ckpt is None or torchrun_env() is None or restart_count() == 0:
        return False
    saved = read_checkpoint_config(ckpt)
    return {k: v for k, v in saved.items() if k != "resume"} == {
        k: v for k, v in resolved.items() if k != "resume"
    }


class Trainer:
    """One run of `cfg` with `recipe_cls` on this rank: `Trainer(...).run()` -> the last
    evaluation's metrics (rank 0; other ranks get {})."""

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
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.recipe = recipe_cls(cfg, rank, world_size, self.device)

    # --- set-up --------------------------------------------------------------------------
    def _pick_checkpoint(self, out: Path, resolved: dict[str, Any]) -> Path | None:
        """The checkpoint to resume from (None: a fresh run), refusing to overwrite a run."""
        ckpt = latest_checkpoint(out) if self.rank == 0 and out.exists() else None
        # Rank 0 picks the checkpoint and every rank loads that one (the run directory must
        # be on a filesystem all ranks see); deciding once keeps the ranks from disagreeing.
        ckpt = broadcast_object(ckpt)
        if ckpt is None:
            return None
        if not (self.cfg.resume or _elastic_restart_resumes(ckpt, resolved)):
            raise ValueError(
                f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to "
                "continue it or choose another --out"
            )
        saved = _with_defaults(read_checkpoint_config(ckpt))
        for section in self.recipe.resume_sections:
            if saved.get(section) != resolved[section]:
                diff = sorted(
                    k
                    for k in resolved[section]
                    if saved.get(section, {}).get(k) != resolved[section][k]
                )
                raise ValueError(
                    f"--resume: {ckpt} was trained with a different {section} config (fields "
                    f"{diff}); resume with the run's own config (DIR/config.yaml) or start "
                    "a new --out"
                )
        return ckpt

    def run(self) -> dict[str, Any]:
        cfg, rank, world_size, device = self.cfg, self.rank, self.world_size, self.device
        recipe, launched = self.recipe, self.launched
        out = Path(cfg.out)
        metrics = MetricsLog(
            out / "metrics.jsonl", out / "tensorboard" if cfg.tensorboard else None
        )
        resolved = config_to_dict(cfg)
        ckpt = self._pick_checkpoint(out, resolved)
        recipe.prepare(out)
        if ckpt is not None and recipe.resume_state:
            saved, now = read_checkpoint_state(ckpt), recipe.state(0)
            for key in recipe.resume_state:
                if key in saved and saved[key] != now[key]:
                    raise ValueError(
                        f"--resume: {ckpt} was trained with the {key} {saved[key]}, but this "
                        f"run has {now[key]}; resume with the run's own data and settings, "
                        "or start a new --out"
                    )
        torch.manual_seed(cfg.seed)
        model = recipe.build_model()
        opt = build_optimizer(model, cfg.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.optim, cfg.steps, s))
        start = 0
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, opt, sched).step
            if rank == 0:
                metrics.truncate_after(start)
                print(f"resuming {out} from step {start} ({ckpt.name})", flush=True)
        elif launched and restart_count() > 0 and rank == 0:
            metrics.truncate_after(0)  # restarted before the first checkpoint: start over
        if start == 0 and cfg.init_from is not None:
            # Fine-tuning: the weights of another run (or of a converted checkpoint), a fresh
            # optimiser and schedule; a shape that differs is refused by name.
            loaded = recipe.init_from(Path(cfg.init_from), model)
            if rank == 0:
                print(f"initialised from {cfg.init_from} (step {loaded.step})", flush=True)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
            line = recipe.describe(model)
            if line:
                print(line, flush=True)

        # What the loop calls for a micro-batch's loss: the recipe's loss on the model in one
        # process, through the DDP/FSDP wrapper when launched.
        wrapped: nn.Module | None = None
        fsdp = launched and cfg.parallel == "fsdp"
        if launched:
            wrapped = wrap_model(_LossModule(model, recipe), cfg.parallel, device)
            if fsdp:
                # fully_shard replaced the parameters by sharded DTensors: rebuild the
                # optimiser and schedule over those, carrying over the state loaded above.
                loaded_opt, loaded_sched = opt.state_dict(), sched.state_dict()
                opt = build_optimizer(model, cfg.optim)
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: lr_factor(cfg.optim, cfg.steps, s)
                )
                if start > 0:
                    load_full_optimizer_state(wrapped, model, opt, loaded_opt)
                    sched.load_state_dict(loaded_sched)
                del loaded_opt

        def loss_fn(*inputs: Tensor) -> Any:
            return wrapped(*inputs) if wrapped is not None else recipe.loss(model, *inputs)

        bar = None
        if rank == 0 and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True
            )
        t_start = time.perf_counter()
        t_log, tokens_since = time.perf_counter(), 0
        last_eval: dict[str, Any] = {}
        step = start
        model.train()
        while step < cfg.steps:
            for fn in _CALLBACKS:
                fn("step_start", {"step": step, "rank": rank, "world_size": world_size})
            micros = recipe.micro_batches(step)
            loss_value = 0.0
            for i, inputs in enumerate(micros):
                # Gradients of all but the last micro-batch stay local: one all-reduce a step.
                local = wrapped is not None and i < len(micros) - 1
                with no_grad_sync(wrapped) if local else contextlib.nullcontext():
                    with autocast_for(device, cfg.precision):
                        loss = recipe.micro_loss(loss_fn(*inputs), micros)
                    loss.backward()
                loss_value += float(loss.detach())
            ranks_out_of_time = False
            if launched:
                # The logged loss is the mean over ranks (the loss of the whole global batch,
                # as one process computes it); every rank sees the same value, so all of
                # them stop together on a NaN, and on rank 0's clock for --max-minutes.
                late = float(rank == 0 and out_of_time(cfg, t_start))
                loss_sum, late = all_reduce_sum([loss_value, late], device)
                loss_value, ranks_out_of_time = loss_sum / world_size, late > 0
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss is {loss_value} at step {step + 1}; stopped. The last good "
                    f"checkpoint in {out / 'checkpoints'} is kept: lower --optim.lr, raise "
                    "--optim.warmup-steps or use --precision fp32, then --resume"
                )
            grad_norm = None
            if cfg.optim.clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
                if fsdp:
                    from torch.distributed.tensor import DTensor

                    if isinstance(norm, DTensor):  # sharded gradients: a collective
                        norm = norm.full_tensor()
                grad_norm = float(norm)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_since += recipe.tokens(micros)
            window_loss = recipe.logged_loss(loss_value, micros)
            if bar is not None:
                bar.update(1)
            last = step == cfg.steps
            late = ranks_out_of_time if launched else out_of_time(cfg, t_start)
            if rank == 0 and cfg.log_every and (step % cfg.log_every == 0 or last or late):
                now = time.perf_counter()
                tps = tokens_since / max(now - t_log, 1e-9)
                t_log, tokens_since = now, 0
                logged = loss_value if window_loss is None else window_loss
                recipe.reset_logged_loss()
                rec = {"step": step, "loss": logged, "lr": lr, "tokens_per_s": tps}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                rec["elapsed_s"] = now - t_start
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{logged:.4f}", tok_s=f"{tps:,.0f}")
            do_eval = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or last or late)
            if do_eval:
                # Rank 0 evaluates alone (the others wait at the barrier below). Under FSDP
                # every rank first takes part in gathering the full weights.
                if fsdp:
                    wrapped.unshard()  # type: ignore[union-attr, operator]
                if rank == 0:
                    t_eval = time.perf_counter()
                    last_eval = recipe.evaluate(model)
                    metrics.write(
                        {"step": step}
                        | {f"eval_{k}": v for k, v in last_eval.items()}
                        | {"eval_s": time.perf_counter() - t_eval}
                    )
                    msg = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                    bar.write(msg) if bar is not None else print(msg, flush=True)
                if fsdp:
                    wrapped.reshard()  # type: ignore[union-attr, operator]
            do_save = step % cfg.checkpoint_every == 0 or last or late
            if do_save:
                saved_model: Any = model
                saved_opt: Any = opt
                if fsdp:  # gather the shards (collectives on every rank); rank 0 keeps them
                    saved_model = StateView.named_like(model, full_state_dict(model, rank == 0))
                    saved_opt = StateView.named_like(opt, full_state_dict(opt, rank == 0))
                if rank == 0:
                    save_checkpoint(
                        out,
                        step,
                        saved_model,
                        saved_opt,
                        sched,
                        state=recipe.state(step),
                        config=resolved,
                        keep=cfg.keep_checkpoints,
                    )
            if launched and (do_eval or do_save):
                # Nobody runs ahead while rank 0 evaluates or writes: a checkpoint is
                # complete on disk before any rank can take another step (and crash).
                barrier()
            if late:
                if bar is not None:
                    bar.write(f"--max-minutes {cfg.max_minutes} reached at step {step}; saved")
                break
        if bar is not None:
            bar.close()
        metrics.close()
        return last_eval

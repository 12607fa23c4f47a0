"""Training and evaluation: the loop, checkpoints, metrics (configs: `run_config.py`).

The resolved config is saved as DIR/config.yaml and inside every checkpoint.

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
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
    save_checkpoint,
)
from .data.tasks import Task, accuracy_counts, build_task
from .distributed import (
    StateView,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state_dict,
    is_distributed,
    load_full_optimizer_state,
    local_device,
    maybe_crash_for_tests,
    no_grad_sync,
    restart_count,
    torchrun_env,
    wrap_model,
)
from .feedforward import chunked_cross_entropy
from .model import ReformerLM
from .run_config import (  # noqa: F401  (re-exported: the loop's public names)
    PRESETS,
    OptimConfig,
    TrainConfig,
    _merge,
    config_from_dict,
    config_to_dict,
    load_config_file,
    preset_dict,
)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- pieces of the loop ------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use cpu")
    return device


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )


def lr_factor(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based)."""
    s = step + 1
    warm = max(1, cfg.warmup_steps)
    if cfg.schedule == "constant":
        return min(1.0, s / warm)
    if s <= warm:
        return s / warm
    if cfg.schedule == "rsqrt":
        return math.sqrt(warm / s)
    progress = min(1.0, (s - warm) / max(1, total_steps - warm))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@torch.no_grad()
def evaluate(
    model: ReformerLM,
    task: Task,
    *,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = 4,
    n_hashes: int | None = None,
    attention: str | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> dict[str, float]:
    """Loss (nats), bits per token and, for duplication, accuracy on `split`.

    `attention` ("lsh" or "full") evaluates the shared-QK layers with that kind instead of
    the trained one (`ReformerLM.set_attention`); `n_hashes` overrides the hash rounds.

    Runs on a forked RNG seeded with `seed`: hash rotations are reproducible and the
    training RNG stream is untouched (exact resume does not depend on when evals ran).
    """
    device = device or next(model.parameters()).device
    was_training, old_hashes = model.training, model.config.n_hashes
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        model.eval()
        if n_hashes is not None:
            model.set_n_hashes(n_hashes)
        model.set_attention(attention)
        total, count, correct = 0.0, 0, 0
        try:
            for ids, targets in task.eval_batches(split, batch_size, max_batches, seed=seed):
                ids, targets = ids.to(device), targets.to(device)
                with autocast_for(device, precision):
                    hidden = model.hidden_states(ids)
                    if task.unit == "accuracy":
                        logits = model.logits_from_hidden(hidden)
                        c, _ = accuracy_counts(logits, targets)
                        correct += c
                    loss_sum, n = chunked_cross_entropy(
                        hidden,
                        targets,
                        model.logits_from_hidden,
                        chunk_len=model.config.loss_chunk_len,
                    )
                total += float(loss_sum)
                count += int(n)
        finally:
            model.set_n_hashes(old_hashes)
            model.set_attention(None)
            model.train(was_training)
    if count == 0:
        raise ValueError(f"no scored tokens in the {split!r} split (too short for seq_len?)")
    loss = total / count
    out = {"loss": loss, task.unit if task.unit != "accuracy" else "bits": loss / math.log(2)}
    if task.unit == "accuracy":
        out["accuracy"] = correct / count
    return out


class MetricsLog:
    """DIR/metrics.jsonl: one JSON object per line, appended and flushed as it goes; with
    `tensorboard` set, every numeric field of each record also goes to TensorBoard event
    files in that directory (torch.utils.tensorboard; needs the tensorboard package)."""

    def __init__(self, path: Path, tensorboard: Path | None = None) -> None:
        self.path = path
        self._tb_dir = tensorboard
        self._tb = None
        if tensorboard is not None:
            check_tensorboard()

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self._tb_dir))
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (and any torn last line) when resuming."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb_dir is not None and "step" in record:
            tb = self._writer()
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    tb.add_scalar(key.replace("eval_", "eval/"), value, record["step"])
            tb.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


def task_of(cfg: TrainConfig, data: str | None = None) -> Task:
    """The run's task (data: another path than the run's)."""
    return build_task(
        cfg.task,
        data or cfg.data,
        cfg.seq_len,
        cfg.image_side,
        byte_offset=cfg.byte_offset,
        tokenizer=resolve_tokenizer(cfg),
    )


def resolve_tokenizer(cfg: TrainConfig) -> str | None:
    """cfg.tokenizer as a path: a relative one is looked up in the run directory first."""
    if cfg.tokenizer is None:
        return None
    in_run = Path(cfg.out) / cfg.tokenizer
    return (
        str(in_run) if not Path(cfg.tokenizer).is_absolute() and in_run.exists() else cfg.tokenizer
    )


def check_tensorboard() -> None:
    """Fail early, before any file is written, when TensorBoard logging cannot work."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "--tensorboard needs the tensorboard package: pip install -c constraints.txt "
            "'.[tensorboard]' (or run without --tensorboard)"
        ) from e


def check_compatible(cfg: TrainConfig, task: Task) -> None:
    if cfg.model.vocab_size < task.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {task.name} task's "
            f"vocabulary ({task.vocab_size}); set --model.vocab-size {task.vocab_size}"
        )
    if cfg.model.max_seq_len < task.seq_len:
        raise ValueError(
            f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the task's sequences "
            f"({task.seq_len}); set --model.max-seq-len {task.seq_len} or a shorter --seq-len"
        )


def build_model(cfg: TrainConfig, device: torch.device) -> ReformerLM:
    return ReformerLM(copy.deepcopy(cfg.model)).to(device)


# --- the loop ----------------------------------------------------------------------------------
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


def _out_of_time(cfg: TrainConfig, t_start: float) -> bool:
    return cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes


def train(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the final eval metrics.

    With world_size > 1 this is one rank of a data-parallel run and torch.distributed must
    be initialised (the CLI does it under torchrun); every rank calls train() with its rank.
    Ranks other than 0 return an empty dict.
    """
    if cfg.task == "translation":
        from .translation.train import train_translation

        return train_translation(cfg, rank, world_size)
    out = Path(cfg.out)
    launched = _is_launched(rank, world_size)
    if launched and cfg.parallel == "fsdp" and cfg.optim.name == "adafactor":
        # torch 2.13: Adafactor's in-place pow_ on a norm of sharded (DTensor) gradients has
        # no sharding strategy ("aten.pow_.Scalar: in-place operations that require
        # placement changes are not supported"), so the first optimiser step would fail.
        raise ValueError(
            "--parallel fsdp does not work with --optim.name adafactor (torch.optim.Adafactor "
            "cannot step sharded DTensor parameters); use --optim.name adamw or --parallel ddp"
        )
    device = resolve_device(cfg.device)
    if launched:
        device = local_device(device)
    task = task_of(cfg)
    check_compatible(cfg, task)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.optim, cfg.steps, s))
    metrics = MetricsLog(out / "metrics.jsonl", out / "tensorboard" if cfg.tensorboard else None)
    resolved = config_to_dict(cfg)
    start = 0
    ckpt = latest_checkpoint(out) if rank == 0 and out.exists() else None
    # Rank 0 picks the checkpoint and every rank loads that one (the run directory must be
    # on a filesystem all ranks see); deciding once keeps the ranks from disagreeing.
    ckpt = broadcast_object(ckpt)
    restarted = launched and restart_count() > 0
    if (cfg.resume or _elastic_restart_resumes(ckpt, resolved)) and ckpt is not None:
        saved = read_checkpoint_config(ckpt)
        if saved.get("model") != resolved["model"]:
            diff = sorted(
                k
                for k in resolved["model"]
                if saved.get("model", {}).get(k) != resolved["model"][k]
            )
            raise ValueError(
                f"--resume: {ckpt} was trained with a different model config (fields {diff}); "
                "resume with the run's own config (DIR/config.yaml) or start a new --out"
            )
        start = load_checkpoint(ckpt, model, opt, sched).step
        if rank == 0:
            metrics.truncate_after(start)
            print(f"resuming {out} from step {start} ({ckpt.name})", flush=True)
    elif ckpt is not None:
        raise ValueError(
            f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to continue it "
            "or choose another --out"
        )
    elif restarted and rank == 0:
        metrics.truncate_after(0)  # restarted before the first checkpoint: start over
    if start == 0 and cfg.init_from is not None:
        # Fine-tuning: the weights of another run (or of a converted checkpoint), a fresh
        # optimiser and schedule; a shape that differs is refused by name.
        loaded = load_checkpoint(Path(cfg.init_from), model, restore_rng=False)
        if rank == 0:
            print(f"initialised from {cfg.init_from} (step {loaded.step})", flush=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    # What the loop calls for a micro-batch's loss: the model itself in one process, the
    # DDP/FSDP wrapper (whose forward is model.loss) when launched.
    wrapped: torch.nn.Module | None = None
    fsdp = launched and cfg.parallel == "fsdp"
    if launched:
        wrapped = wrap_model(model, cfg.parallel, device)
        if fsdp:
            # fully_shard replaced the parameters by sharded DTensors: rebuild the optimiser
            # and schedule over those, carrying over the state loaded above (if any).
            loaded_opt, loaded_sched = opt.state_dict(), sched.state_dict()
            opt = build_optimizer(model, cfg.optim)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(cfg.optim, cfg.steps, s)
            )
            if start > 0:
                load_full_optimizer_state(wrapped, model, opt, loaded_opt)
                sched.load_state_dict(loaded_sched)
            del loaded_opt
    loss_fn = wrapped if wrapped is not None else model.loss

    # Rank 0 evaluates alone, on as many rows as one process with the global batch would.
    eval_bs = cfg.eval_batch_size or cfg.batch_size * world_size
    acc = cfg.optim.accumulate
    tokens_per_step = cfg.batch_size * task.seq_len * acc * world_size
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_log, tokens_since = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    step = start
    model.train()
    while step < cfg.steps:
        maybe_crash_for_tests(step, rank, world_size)
        loss_value = 0.0
        for micro in range(acc):
            ids, targets = task.train_batch(
                step * acc + micro, cfg.batch_size, cfg.seed, rank, world_size
            )
            ids, targets = ids.to(device), targets.to(device)
            # Gradients of all but the last micro-batch stay local: one all-reduce per step.
            local = wrapped is not None and micro < acc - 1
            with no_grad_sync(wrapped) if local else contextlib.nullcontext():
                with autocast_for(device, cfg.precision):
                    loss = loss_fn(ids, targets) / acc
                loss.backward()
            loss_value += float(loss.detach())
        ranks_out_of_time = False
        if launched:
            # The logged loss is the mean over ranks (the loss of the whole global batch, as
            # one process computes it); every rank sees the same value, so all of them stop
            # together on a NaN, and on rank 0's clock for --max-minutes.
            late = float(rank == 0 and _out_of_time(cfg, t_start))
            loss_sum, late = all_reduce_sum([loss_value, late], device)
            loss_value, ranks_out_of_time = loss_sum / world_size, late > 0
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss is {loss_value} at step {step + 1}; stopped. The last good checkpoint "
                f"in {out / 'checkpoints'} is kept: lower --optim.lr, raise "
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
        tokens_since += tokens_per_step
        if bar is not None:
            bar.update(1)
        last = step == cfg.steps
        out_of_time = ranks_out_of_time if launched else _out_of_time(cfg, t_start)
        if rank == 0 and cfg.log_every and (step % cfg.log_every == 0 or last or out_of_time):
            now = time.perf_counter()
            tps = tokens_since / max(now - t_log, 1e-9)
            t_log, tokens_since = now, 0
            rec = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tps}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            rec["elapsed_s"] = now - t_start
            metrics.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}")
        do_eval = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or last or out_of_time)
        if do_eval:
            # Rank 0 evaluates alone (the others wait at the barrier below). Under FSDP every
            # rank first takes part in gathering the full weights, which rank 0 then uses.
            if fsdp:
                wrapped.unshard()  # type: ignore[union-attr, operator]
            if rank == 0:
                last_eval = evaluate(
                    model,
                    task,
                    batch_size=eval_bs,
                    max_batches=cfg.eval_batches or None,
                    device=device,
                    precision=cfg.precision,
                    seed=cfg.seed,
                )
                metrics.write({"step": step} | {f"eval_{k}": v for k, v in last_eval.items()})
                if bar is not None:
                    bar.write(
                        f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                    )
            if fsdp:
                wrapped.reshard()  # type: ignore[union-attr, operator]
        do_save = step % cfg.checkpoint_every == 0 or last or out_of_time
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
                    state={"step": step, "tokens": step * tokens_per_step},
                    config=resolved,
                    keep=cfg.keep_checkpoints,
                )
        if launched and (do_eval or do_save):
            # Nobody runs ahead while rank 0 evaluates or writes: a checkpoint is complete
            # on disk before any rank can take another step (and crash, and be restarted).
            barrier()
        if out_of_time:
            if bar is not None:
                bar.write(f"--max-minutes {cfg.max_minutes} reached at step {step}; saved")
            break
    if bar is not None:
        bar.close()
    return last_eval


def load_run(path: Path, device: torch.device) -> tuple[ReformerLM, TrainConfig, Path, int]:
    """A run or checkpoint directory -> (model in eval mode, its run config, the checkpoint
    directory used, its step). Raises CheckpointError when there is nothing to load."""
    from .checkpoint import CheckpointError

    ckpt = resolve_checkpoint(path)
    try:
        cfg = config_from_dict(read_checkpoint_config(ckpt), where=f"{ckpt}/config.json")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: its saved config is not a reformer run config ({e})") from e
    if ckpt.parent.name == "checkpoints":  # the run directory, wherever it is now
        cfg.out = str(ckpt.parent.parent)
    model = ReformerLM(cfg.model).to(device)
    step = load_checkpoint(ckpt, model, restore_rng=False).step
    return model.eval(), cfg, ckpt, step


def hash_table(
    model: ReformerLM,
    task: Task,
    counts: tuple[int | str | None, ...],
    *,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = 4,
    device: torch.device | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> list[dict[str, float]]:
    """Evaluate the same weights with each number of hash rounds; "full" in `counts`
    evaluates the shared-QK layers with full attention instead, and a number evaluates
    them with LSH even when the model was trained with full shared-QK attention; None
    evaluates the model as trained (row label "trained")."""
    rows = []
    for n in counts:
        if n not in (None, "full") and (isinstance(n, bool) or not isinstance(n, int)):
            raise ValueError(f"evaluation hash rounds must be ints or 'full'; got {n!r}")
        as_int = isinstance(n, int)
        res = evaluate(
            model,
            task,
            split=split,
            batch_size=batch_size,
            max_batches=max_batches,
            n_hashes=n if as_int else None,
            attention="lsh" if as_int else n,
            device=device,
            precision=precision,
            seed=seed,
        )
        rows.append({"n_hashes": "trained" if n is None else n} | res)
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    keys = [k for k in rows[0] if k != "n_hashes"]
    head = "n_hashes  " + "  ".join(f"{k:>10}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['n_hashes']:>8}  " + "  ".join(f"{r[k]:>10.4f}" for k in keys))
    return "\n".join(lines)

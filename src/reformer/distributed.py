"""Multi-process training through torch.distributed: launch detection, wrappers, helpers.

`torchrun --nproc-per-node N -m reformer train ...` starts N copies of the command line tool
with RANK, WORLD_SIZE, LOCAL_RANK (and TORCHELASTIC_RESTART_COUNT) in their environment.
`process_group` turns that environment into an initialised default process group (gloo on
the CPU, NCCL on CUDA with one device per local rank) and destroys it afterwards; `train()`
then wraps the model with `wrap_model` (DDP or FSDP2) and uses the small collectives below.
See docs/distributed.md for how to launch and what each rank does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "LaunchEnv",
    "StateView",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "full_state_dict",
    "is_distributed",
    "load_full_optimizer_state",
    "local_device",
    "no_grad_sync",
    "process_group",
    "restart_count",
    "torchrun_env",
    "wrap_model",
]

Parallel = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    restart_count: int


def restart_count() -> int:
    """How many times torchrun has restarted the worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def torchrun_env() -> LaunchEnv | None:
    """The launch described by torchrun's environment variables, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    return LaunchEnv(rank, world_size, local_rank, restart_count())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def local_device(device: torch.device) -> torch.device:
    """`cuda` without an index means this process's own GPU: cuda:LOCAL_RANK under torchrun
    (spawned processes without LOCAL_RANK use rank % device count). Other devices as given."""
    if device.type != "cuda" or device.index is not None:
        return device
    env = torchrun_env()
    if env is not None:
        return torch.device("cuda", env.local_rank)
    if is_distributed():
        return torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Yield (rank, world_size); under torchrun, with the default process group initialised.

    Outside torchrun (or when the caller already initialised a group) nothing is set up or
    torn down. The backend follows the training device: NCCL for CUDA, gloo otherwise.
    """
    env = torchrun_env()
    if is_distributed():
        yield dist.get_rank(), dist.get_world_size()
        return
    if env is None:
        yield 0, 1
        return
    if not dist.is_available():
        raise ValueError("launched by torchrun, but this torch build has no torch.distributed")
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds the NCCL communicator to this rank's GPU
        backend = "nccl"
    else:
        backend = "gloo"
    store = _attempt_store(env)
    if store is not None:
        kwargs["store"] = store
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, **kwargs)
    try:
        yield env.rank, env.world_size
    finally:
        dist.destroy_process_group()


def _attempt_store(env: LaunchEnv) -> dist.Store | None:
    """The torchrun agent's key-value store, namespaced by restart attempt; None: use env://.

    Workers started by torchrun share the agent's TCPStore, which outlives a restart of the
    worker group, and env:// initialisation does not namespace it per attempt (a static
    rendezvous reuses one store for every attempt). After a restart, a new rank could then
    read the previous attempt's addresses (gloo: "connectFullMesh failed ... Connection
    refused"; NCCL: a stale unique id) and fail or hang. The restart count is only known to
    be the same on every rank when one agent started them all (a single node), so only then
    is the prefix added; multi-node launches keep torch's own env:// behaviour.
    """
    from datetime import timedelta

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", "-1")) != env.world_size:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=False,
        timeout=timedelta(minutes=30),
    )
    return dist.PrefixStore(f"reformer/attempt-{env.restart_count}", store)


# --- collectives (no-ops in a single process) -------------------------------------------------
def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum Python floats over ranks in one collective (float64, so the sum of identical
    per-rank values divided by the world size gives back exactly the value)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of the ranks' integers (the value itself in one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects: paths, small dicts)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --- model wrappers -----------------------------------------------------------------------------
def wrap_model(loss_module: nn.Module, parallel: Parallel, device: torch.device) -> nn.Module:
    """Wrap `loss_module` (already on `device`, weights final; its forward is the training
    loss, so that DDP's and FSDP's hooks on `__call__` run: the trainer's `_LossModule`) for
    data-parallel training.

    ddp: `DistributedDataParallel(loss_module)`. The reversible stack's custom
    backward returns parameter gradients as ordinary outputs, so they reach each parameter's
    AccumulateGrad node and DDP's hooks fire as usual; they all arrive at the end of the
    backward pass, so bucketed all-reduces overlap little with computation.

    fsdp: `fully_shard(loss_module)`, one FSDP unit over the whole model. Parameters,
    gradients and optimiser state are sharded at rest; the forward all-gathers every
    parameter at once because the reversible function calls the blocks' branches directly,
    not through their `forward`, so per-block units would never be gathered.
    """
    wrapper = loss_module
    world = dist.get_world_size()
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(wrapper, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        fully_shard(wrapper, mesh=mesh)
        return wrapper
    raise ValueError(f"parallel must be 'ddp' or 'fsdp'; got {parallel!r}")


def no_grad_sync(wrapped: nn.Module) -> contextlib.AbstractContextManager:
    """Accumulate gradients locally (no all-reduce / reduce-scatter) inside the block."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync() -> Iterator[None]:
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def _full(t: Any) -> Any:
    """A DTensor's full value (a collective: every rank must call it); other values as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(obj: Any, keep: bool) -> dict[str, Any]:
    """`obj.state_dict()` (a module or optimiser) with every sharded DTensor gathered.

    All ranks must call this together (each DTensor costs an all-gather); the gathered
    tensors are moved to the CPU on the rank with `keep` and dropped elsewhere, so at most
    one full tensor at a time sits on a device. The result has the ordinary single-process
    layout (the optimiser's state keyed by parameter index), so checkpoints written under
    FSDP load into a single process and vice versa.
    """

    def gather(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: gather(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(gather(v) for v in x)
        if isinstance(x, Tensor):
            full = _full(x)
            return full.detach().cpu() if keep else None
        return x

    return gather(obj.state_dict())


class StateView:
    """Stands in for a module or optimiser when saving: `state_dict()` returns a given dict.

    `save_checkpoint` records `type(x).__qualname__` in meta.json and `load_checkpoint`
    checks the optimiser's, so `named_like` gives the view the real object's class name.
    """

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state

    @staticmethod
    def named_like(obj: Any, state: dict[str, Any]) -> StateView:
        cls = type(type(obj).__name__, (StateView,), {})
        cls.__qualname__ = type(obj).__qualname__
        return cls(state)


def load_full_optimizer_state(
    wrapped: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an ordinary (index-keyed, full-tensor) optimiser state dict into `opt`, an
    optimiser over FSDP-sharded parameters: each rank keeps its own shard of every tensor.

    torch.distributed.checkpoint's `set_optimizer_state_dict` does the sharding; it wants the
    state keyed by parameter name, so the indices are mapped to `model`'s names first.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    prefix = "model."  # LossModule's attribute: names as wrapped.named_parameters() has them
    names = {id(p): prefix + n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    by_name = {
        "state": {order[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(wrapped, opt, by_name, options=StateDictOptions(full_state_dict=True))

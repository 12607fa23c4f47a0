"""Predicted peak memory of one training step, by component, and the longest length that fits.

The model follows what the step holds at its peaks (the reversible backward pass as
`reversible.py` and `ReformerBlock.attn_branch_vjp` order it; bench.memory_breakdown lists
the live tensors):

- resident before the step: the parameters;
- kept across the step: their gradients (fp32) and the optimiser state;
- the backward pass through the attention step of one layer, the step's peak for LSH and
  local attention: the four reversible streams (the two halves and their gradients, fp32)
  and the recomputed layer: the core's inputs (query-keys, keys, values), its output, the
  output's gradient and the inputs' gradients, plus the attention working set (LSH: the
  int8 pair codes, sort orders and slot statistics of every round; local: the look-back
  copies of keys and values; full: the L x L bias, scores and probabilities);
- the feed-forward step: the streams, G(x) and x's gradient, one chunk's d_ff intermediates;
- the head: the (B, L, 2 d) hidden state, its gradient, one chunk of logits and its gradient.

The step peaks at the largest of the three (plus what the optimiser step allocates for its
update), on top of the gradients, the optimiser state and a constant for the runtime's
one-off buffers. The figures are live memory: on CUDA what `torch.cuda.max_memory_allocated`
would show (the caching allocator's rounding aside); on the CPU what peak RSS above the RSS
before the step shows when RSS tracks live tensors, i.e. with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_=65536). With glibc's default threshold, freed blocks stay resident
in the heap within a layer's backward pass: RSS is then 1.4-1.6x the plan at 8K-64K tokens
(d_model 256; README, "reformer plan").
`tests/test_plan.py` checks the prediction against measured steps; the README gives the error.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from .attention.common import padded_length
from .config import ReformerConfig

# (B, L, d) tensors alive while one attention step runs its backward pass (attn_branch_vjp):
# q (or the shared qk), keys, v, the core output, its gradient, and the gradients of q, k, v
# with the one that the key normalisation's backward adds; the rest are the streams.
ATTENTION_TENSORS = 9
STREAMS = 4  # y1, y2 and their gradients, fp32
# What a process's first training step allocates once and keeps (autograd's and the thread
# pools' buffers, kernel workspaces): measured on CPU as the constant part of the gap
# between the live tensors and the step's peak RSS at 8K to 64K tokens (tests/test_plan.py).
RUNTIME_BYTES = 96 * 2**20

GiB = 2**30
MiB = 2**20
RUNTIME = "runtime (first step's one-off buffers)"
MAX_PLANNED = 2**34  # tokens per sequence: where longest_fitting stops searching


@dataclass
class MemoryPlan:
    """Bytes by component; `peak` is the predicted step peak above the pre-step memory."""

    config: ReformerConfig
    length: int
    batch: int
    precision: str
    optimizer: str
    parameters: int
    components: dict[str, int] = field(default_factory=dict)
    ranks: int = 1  # --parallel sequence: the figures are one rank's of this many
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def peak(self) -> int:
        """Peak bytes of the step above what is resident before it (the parameters)."""
        kept = self.components["gradients"] + self.components["optimizer state"]
        return kept + self.components[RUNTIME] + max(self.phases.values())

    @property
    def total(self) -> int:
        """The parameters plus the step's peak: the memory the model and its training step
        need (the framework's own few hundred MiB not counted)."""
        return self.parameters * 4 + self.peak

    def table(self) -> str:
        """A plain-text breakdown, one component per line, the phases and the totals."""
        split = f", per rank of {self.ranks} sharing each sequence" if self.ranks > 1 else ""
        lines = [
            f"training step of {describe(self.config)}: L {self.length:,}, batch {self.batch}, "
            f"{self.precision}, {self.optimizer}{split}",
            f"{'component':<46}{'MiB':>12}",
            f"{'parameters (resident before the step)':<46}{self.parameters * 4 / MiB:>12,.1f}",
        ]
        lines += [f"{name:<46}{b / MiB:>12,.1f}" for name, b in self.components.items()]
        lines.append("phases of the step (each on top of gradients, optimiser state and runtime):")
        for name, b in self.phases.items():
            mark = "  <- peak" if name == self.peak_phase else ""
            lines.append(f"  {name:<44}{b / MiB:>12,.1f}{mark}")
        lines.append(f"{'predicted step peak above the model':<46}{self.peak / MiB:>12,.1f}")
        lines.append(f"{'model + step (parameters + peak)':<46}{self.total / MiB:>12,.1f}")
        return "\n".join(lines)


def describe(cfg: ReformerConfig) -> str:
    kinds = ",".join(dict.fromkeys(cfg.layer_kinds))
    extra = f" LSH-{cfg.n_hashes}" if "lsh" in cfg.layer_kinds else ""
    return f"{cfg.n_layers} x d_model {cfg.d_model}, {kinds}{extra}"


def _param_shapes(cfg: ReformerConfig) -> list[tuple[torch.Size, bool]]:
    from .model import ReformerLM

    with torch.device("meta"):
        model = ReformerLM(cfg)
    return [(p.shape, p.requires_grad) for p in model.parameters()]


def _optimizer_bytes(shapes: list[tuple[torch.Size, bool]], optimizer: str) -> int:
    trainable = [s for s, g in shapes if g]
    if optimizer == "adamw":  # exp_avg and exp_avg_sq, fp32
        return sum(2 * 4 * math.prod(s) for s in trainable)
    if optimizer == "adafactor":  # factored second moments: row and column means per matrix
        return sum(
            4 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1] if len(s) >= 2 else math.prod(s))
            for s in trainable
        )
    if optimizer == "sgd":
        return 0
    raise ValueError(f"optimizer {optimizer!r}: choose adamw, adafactor or sgd")


def plan_memory(
    config: ReformerConfig,
    length: int,
    batch: int = 1,
    precision: str = "fp32",
    optimizer: str = "adamw",
    ranks: int = 1,
) -> MemoryPlan:
    """The predicted peak memory of one training step of a ReformerLM (`MemoryPlan`).

    length: tokens per sequence (the model's max_seq_len is raised to it if shorter);
    precision: "fp32" or "bf16" (autocast: fp32 parameters and streams, bf16 activations);
    optimizer: "adamw", "adafactor" or "sgd"; ranks: --parallel sequence over this many
    ranks, the figures one rank's (its slice of the positions, LSH's routed working set).
    """
    if length < 1 or batch < 1:
        raise ValueError(f"length and batch must be >= 1 (got {length}, {batch})")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: choose fp32 or bf16")
    cfg = copy.deepcopy(config)
    if cfg.max_seq_len < length:
        cfg.max_seq_len = length
    shapes = _param_shapes(cfg)
    act = 2 if precision == "bf16" else 4
    components, phases = _step_memory(cfg, length, batch, act, shapes, optimizer, ranks)
    return MemoryPlan(
        ranks=ranks,
        config=cfg,
        length=length,
        batch=batch,
        precision=precision,
        optimizer=optimizer,
        parameters=sum(math.prod(s) for s, _ in shapes),
        components=components,
        phases=phases,
    )


def _attention_step(
    cfg: ReformerConfig, kind: str, length: int, B: int, act: int, ranks: int = 1
) -> tuple[int, int]:
    """(core tensors, working set) of one attention step's backward pass, bytes; act is the
    bytes of one activation element (2 bf16, 4 fp32); length: this rank's positions."""
    inner = cfg.n_heads * cfg.head_dim
    H, R = cfg.n_heads, cfg.n_hashes
    C = cfg.chunk_len_for(kind) if kind != "full" else 1
    n = sum(cfg.resolved_chunks) + 1  # chunks per window: 2 causal, 3 for encoders
    if ranks > 1 and kind == "local":
        length += n * C  # the halo borrowed from the neighbours
    Lp = padded_length(length, C)
    core = ATTENTION_TENSORS * B * Lp * inner * act
    if ranks > 1 and kind == "lsh":
        work = _routed_work(cfg, length, B, act)
    elif kind == "lsh":
        # per (batch, head, round, position): n C pair codes (int8), the sorted slot's
        # source row (int64), its row maximum and weight (fp32), and its hash bucket
        work = B * H * R * Lp * (n * C + 8 + 4 + 4 + 8)
    elif kind == "local":
        # keys and values with their neighbouring chunks (n L each), and their
        # gradients; int8 codes of C x n C per chunk
        work = 4 * n * B * Lp * inner * act + B * H * Lp * n * C
    else:  # the (B, 1, L, L) bias and the (B, H, L, L) scores, probabilities, gradient
        work = B * length * length * 4 + 3 * B * H * length * length * 4
    return core, work


def _routed_work(cfg: ReformerConfig, length: int, B: int, act: int) -> int:
    """LSH's working set on one rank of a sequence group (`attention/routed.py`): one head
    group's routed rows (sent, received, laid out, and their gradients), metadata and
    returned results, one slice of scores, and every head's buckets and slots."""
    from .attention.routed import GROUP_ENTRIES, SLICE_SCORES

    H, R, D = cfg.n_heads, cfg.n_hashes, cfg.head_dim
    heads = min(H, max(1, GROUP_ENTRIES // (B * R * (length + 1) * D * 2)))
    E = B * heads * R * length  # routed entries of one head group
    rows = 6 * E * 2 * D * act
    meta = 3 * E * (7 + 2 * R) * 8 + 4 * E * 8  # Plan.meta's columns, and index tensors
    results = 4 * E * (D + 1) * 4
    slots = 3 * B * H * R * length * 8
    return rows + meta + results + SLICE_SCORES * 24 + slots


def _step_memory(
    cfg: ReformerConfig,
    length: int,
    B: int,
    act: int,
    shapes: list[tuple[torch.Size, bool]],
    optimizer: str,
    ranks: int = 1,
) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes by component, bytes by phase of the step) for `MemoryPlan`; the attention
    figures are those of the layer kind with the largest step."""
    d, V = cfg.d_model, cfg.vocab_size
    n_grad = sum(math.prod(s) for s, g in shapes if g)
    length = -(-length // ranks)  # this rank's positions
    tokens = B * length
    stream = tokens * d * 4
    kinds = list(dict.fromkeys(cfg.layer_kinds))
    attn = {k: _attention_step(cfg, k, length, B, act, ranks) for k in kinds}
    worst = max(kinds, key=lambda k: sum(attn[k]))
    core, work = attn[worst]
    ff_chunk = min(cfg.ff_chunk_len or length, length)
    loss_chunk = min(cfg.loss_chunk_len or length, length)
    ff_work = 4 * B * ff_chunk * cfg.d_ff * act  # pre-activation, activation, their grads
    logits = 3 * B * loss_chunk * V * 4  # logits (fp32), their log-softmax and gradient
    width = 2 * d if cfg.reversible else d
    head = 3 * tokens * width * 4 + logits  # hidden, its gradient and one being summed
    opt_state = _optimizer_bytes(shapes, optimizer)
    components = {
        "gradients": n_grad * 4,
        "optimizer state": opt_state,
        "reversible streams (2 halves + gradients)": STREAMS * stream,
        f"recomputed attention layer ({worst}: {ATTENTION_TENSORS} x (B, L, d))": core,
        f"attention working set ({worst})": work,
        "feed-forward chunk (d_ff intermediates)": ff_work,
        "logits and loss chunk": logits,
        "head (hidden state and its gradient)": head,
        RUNTIME: RUNTIME_BYTES,
    }
    phases = {
        "attention backward": STREAMS * stream + core + work,
        "feed-forward backward": (STREAMS + 2) * stream + ff_work,
        "head and loss": head,
        # the update's temporaries (AdamW: one per parameter, on top of the state)
        "optimizer step": n_grad * 4 if optimizer == "adamw" else 0,
    }
    return components, phases


def longest_fitting(
    config: ReformerConfig,
    budget_bytes: float,
    batch: int = 1,
    precision: str = "fp32",
    optimizer: str = "adamw",
    multiple: int | None = None,
    ranks: int = 1,
) -> tuple[int, MemoryPlan] | None:
    """The longest length (a multiple of `multiple`, default the LSH chunk length) whose
    model + step (`MemoryPlan.total`) fits `budget_bytes`, with its plan; None if none does.
    ranks: the budget is each rank's of a sequence group of this many."""
    step = (multiple or config.chunk_len_for("lsh")) * ranks

    def plan(n: int) -> MemoryPlan:
        return plan_memory(config, n * step, batch, precision, optimizer, ranks)

    def fits(n: int) -> bool:
        return plan(n).total <= budget_bytes

    if not fits(1):
        return None
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi * step > MAX_PLANNED:
            raise ValueError(
                f"more than {MAX_PLANNED:,} tokens fit the budget of {budget_bytes / GiB:g} GiB; "
                "that is beyond what the plan searches"
            )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step, plan(lo)


def parse_size(text: str) -> float:
    """'20GiB', '512 MiB', '1.5GB', '800M', '4096' -> bytes (binary units; GB, MB read as
    GiB, MiB)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(i?B)?\s*", text)
    value = float(m.group(1)) if m else math.nan
    if not (m and math.isfinite(value) and value > 0):
        raise ValueError(f"{text!r} is not a positive size; write e.g. 20GiB, 512MiB or 800M")
    return value * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]


# --- measuring a real step (the check on the prediction) ---------------------------------------
def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS (Linux >= 4.0)


def measure_step(
    config: ReformerConfig,
    length: int,
    batch: int = 1,
    precision: str = "fp32",
    optimizer: str = "adamw",
    device: str = "cpu",
    steps: int = 2,
) -> int:
    """Peak bytes of `steps` real training steps above the memory before the first (CPU:
    peak RSS, Linux; CUDA: max_memory_allocated), in this process. From the second step on
    the optimiser state exists, as in training; the plan predicts that steady state."""
    from .model import ReformerLM

    dev = torch.device(device)
    cfg = copy.deepcopy(config)
    cfg.max_seq_len = max(cfg.max_seq_len, length)
    torch.manual_seed(0)
    model = ReformerLM(cfg).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-4),
        "adafactor": lambda: torch.optim.Adafactor(params, lr=1e-4),
        "sgd": lambda: torch.optim.SGD(params, lr=1e-4),
    }[optimizer]()
    ids = torch.randint(0, cfg.vocab_size, (batch, length + 1), device=dev)
    if "lsh" in cfg.layer_kinds:
        from .attention import tiles

        tiles.warm_up(cfg.chunk_len_for("lsh"), torch.float32, dev)  # one-off, not the step
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        _reset_rss_peak()
        base = _rss_peak_bytes()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    return _rss_peak_bytes() - base


def measure_step_fresh(
    config: ReformerConfig,
    length: int,
    batch: int = 1,
    precision: str = "fp32",
    optimizer: str = "adamw",
    device: str = "cpu",
    threads: int | None = None,
    timeout: float = 3600,
    fixed_mmap_threshold: bool = True,
    steps: int = 2,
) -> int:
    """`measure_step` in a fresh Python process (so nothing this process holds or has
    fragmented counts), with this environment. fixed_mmap_threshold: with glibc's
    MALLOC_MMAP_THRESHOLD_=65536, so that RSS tracks the live tensors the plan predicts
    (False: glibc's default, dynamic threshold, as a user's process has it)."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys

    job = dict(
        config=dataclasses.asdict(config),
        length=length,
        batch=batch,
        precision=precision,
        optimizer=optimizer,
        device=device,
        threads=threads,
        steps=steps,
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(
        [sys.executable, "-m", "reformer.plan", json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(f"measuring the step failed: {tail}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def _worker(job: dict) -> dict:
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    cfg = ReformerConfig.from_dict(job.pop("config"))
    job.pop("threads", None)
    return {"peak_bytes": measure_step(cfg, **job)}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(_worker(json.loads(sys.argv[1]))))

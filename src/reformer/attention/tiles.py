"""The elementwise work on one slice of LSH score tiles, in two interchangeable kernels.

A slice is m rows of (C queries x W keys) scores `s` and their int8 pair codes (0: not a
candidate, else N_ij, the number of rounds whose candidate set holds the pair; see lsh.py).
`self_at` is the key slot of query 0 itself (query c's is c + self_at): C for the causal
layout of 2C keys, before * C in general.

  forward:  probabilities p = exp(s' - top) / N_ij / total over the row's candidates, with
            s' = s, plus MASK_SCORE off the candidates and SELF_SCORE on the diagonal
            (key slot c + self_at is query c itself), top the row maximum of s', total the row sum;
  backward: p again from the forward's `top` and the row's `scale`, and dS = p * (dP - dot).
Both write their results over their inputs (p over s, dS over dP) and into the caller's
row buffers: on CPUs fresh tensors of this size cost a page fault per 4 KiB each time.

`eager` runs them as a dozen PyTorch passes over each tile (the reference). `compiled` is
the same arithmetic through torch.compile, which fuses them into a couple of loops; on two
CPU cores that makes the whole LSH core about 1.3x faster. The tests compare the two.
`compiled_band` does the same for window mode's pair codes (`lsh_layout._window_codes` is
its eager form), under the same choice and fallback.

Kernel choice (`resolve_kernel`): "eager", "compiled", or "auto", which compiles when the
call is large enough for the one-off compilation (about 20 s on a fresh machine, cached on
disk after that) to pay, and a compiler is there (a C++ compiler on CPU, Triton on CUDA).
If compilation fails under "auto", a warning says so and LSH falls back to eager for the
rest of the process. The environment variable REFORMER_LSH_KERNEL overrides "auto".
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import torch
from torch import Tensor

from ..config import LSH_KERNELS as KERNELS
from .common import MASK_SCORE, SELF_SCORE

# "auto" compiles from this many sorted slots (B * H * R * Lp) per call: 4 heads, 4 hashes
# and 16K tokens. Below it a step takes well under a second and the compilation would not
# pay for itself in a short run.
AUTO_COMPILE_SLOTS = 1 << 18

# exp() of scores this far below the row's maximum is set to exp(EXP_FLOOR) before the
# candidate weight (0 for non-candidates) multiplies it: no denormal or underflowing exp,
# which run several times slower on CPUs. exp(-80) is 1.8e-35 in float32: far below any
# probability that matters, and exactly 0 after the weight where j is not a candidate.
EXP_FLOOR = -80.0

_compile_failed: str | None = None  # why "auto" stopped compiling in this process


# ---- eager (the reference): in place on s, PyTorch passes ---------------------------------


def _eager_scores(s: Tensor, code: Tensor, self_at: int) -> tuple[Tensor, Tensor]:
    """s in place -> (s', weight 1 / N_ij on candidates, 0 elsewhere)."""
    f = code.to(s.dtype)
    weight = f.clamp(min=1).reciprocal_()
    f.clamp_(max=1)  # 1 for candidates, 0 elsewhere
    weight.mul_(f)
    s.add_(f.sub_(1), alpha=-MASK_SCORE)  # non-candidates down by |MASK_SCORE|: off the max
    # The self score (added to q.k_i: exp(SELF_SCORE) underflows as an override would).
    s.diagonal(offset=self_at, dim1=1, dim2=2).add_(SELF_SCORE)
    return s, weight


def eager_forward(s: Tensor, code: Tensor, self_at: int, top: Tensor, total: Tensor) -> Tensor:
    """Scores s (m, C, W) -> p, written over s; the row maximum and sum go to `top` and
    `total` (m, C)."""
    s, weight = _eager_scores(s, code, self_at)
    torch.amax(s, dim=-1, out=top)
    p = s.sub_(top[..., None]).clamp_(min=EXP_FLOOR).exp_().mul_(weight)
    # A row without candidates (a padded query) gets p = 0 and a finite normaliser.
    torch.sum(p, dim=-1, out=total).clamp_(min=torch.finfo(s.dtype).tiny)
    return p.div_(total[..., None])


def eager_backward(
    s: Tensor, code: Tensor, self_at: int, top: Tensor, scale: Tensor, dp: Tensor, dot: Tensor
) -> tuple[Tensor, Tensor]:
    """Scores s and dP (m, C, W); top, scale, dot (m, C) -> (dS written over dp, p written
    over s) with p = exp(s' - top) / N_ij * scale."""
    s, weight = _eager_scores(s, code, self_at)
    weight.mul_(scale[..., None])
    p = s.sub_(top[..., None]).clamp_(min=EXP_FLOOR).exp_().mul_(weight)
    return dp.sub_(dot[..., None]).mul_(p), p


# ---- compiled: the same arithmetic, functional, for torch.compile to fuse ------------------


def _fused_scores(s: Tensor, code: Tensor, self_at: int) -> tuple[Tensor, Tensor]:
    s = s.to(torch.promote_types(s.dtype, torch.float32))  # half tiles: fp32 arithmetic
    n = code.to(s.dtype)  # (comparing the int8 codes directly defeats vectorisation)
    cand = n > 0
    weight = torch.where(cand, 1.0 / n, 0.0)
    s = s + torch.where(cand, 0.0, MASK_SCORE)
    rows = torch.arange(s.shape[1], device=s.device)[:, None]
    cols = torch.arange(s.shape[2], device=s.device)
    return torch.where(cols - rows == self_at, s + SELF_SCORE, s), weight


def _fused_forward(
    s: Tensor, code: Tensor, self_at: int, top_out: Tensor, total_out: Tensor
) -> None:
    s_, weight = _fused_scores(s, code, self_at)
    top = s_.amax(dim=-1)
    p = torch.exp((s_ - top[..., None]).clamp(min=EXP_FLOOR)) * weight
    total = p.sum(dim=-1).clamp(min=torch.finfo(s_.dtype).tiny)
    s.copy_(p / total[..., None])
    top_out.copy_(top)
    total_out.copy_(total)


def _fused_backward(
    s: Tensor, code: Tensor, self_at: int, top: Tensor, scale: Tensor, dp: Tensor, dot: Tensor
) -> None:
    s_, weight = _fused_scores(s, code, self_at)
    p = torch.exp((s_ - top[..., None]).clamp(min=EXP_FLOOR)) * (weight * scale[..., None])
    dp.copy_((dp - dot[..., None]) * p)
    s.copy_(p)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True)


def _call_compiled(fn, *args) -> None:
    # One kernel for every number of rows m (the last slice of a group has fewer): dim 0 is
    # symbolic, C stays a constant (a symbolic C makes the kernels about 1.5x slower).
    for x in args:
        if isinstance(x, Tensor) and x.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(x, 0)
    _compiled(fn)(*args)


def compiled_forward(s: Tensor, code: Tensor, self_at: int, top: Tensor, total: Tensor) -> Tensor:
    """`eager_forward` through torch.compile."""
    _call_compiled(_fused_forward, s, code, self_at, top, total)
    return s


def compiled_backward(
    s: Tensor, code: Tensor, self_at: int, top: Tensor, scale: Tensor, dp: Tensor, dot: Tensor
) -> tuple[Tensor, Tensor]:
    """`eager_backward` through torch.compile."""
    _call_compiled(_fused_backward, s, code, self_at, top, scale, dp, dot)
    return dp, s


def _band(
    q_id: Tensor, k_id: Tensor, e_q: Tensor, e_k: Tensor, T: int, C: int, count_rounds: bool
) -> Tensor:
    j = torch.arange(q_id.shape[0], device=q_id.device)[:, None] + torch.arange(
        C + 1, device=q_id.device
    )
    ok = q_id[:, None] == k_id[j]
    count = ((e_q[:, :, None] - e_k[:, j]).abs() <= T).sum(0) * ok if count_rounds else ok
    return count.to(torch.int8)


def compiled_band(
    q_id: Tensor, k_id: Tensor, e_q: Tensor, e_k: Tensor, T: int, C: int, count_rounds: bool
) -> Tensor:
    """Window mode's pair codes of n sorted query slots in one compiled loop (the eager form
    is `lsh_layout._window_codes`, a dozen passes): (n, C + 1) int8, query i against key
    slot i + t of the band, the count of rounds holding the pair where its buckets agree
    in the row's round, else 0. q_id (n,), k_id (n + C,), e_q (R, n), e_k (R, n + C)."""
    for x in (q_id, k_id):
        torch._dynamo.maybe_mark_dynamic(x, 0)
    for x in (e_q, e_k):
        torch._dynamo.maybe_mark_dynamic(x, 1)
    return _compiled(_band)(q_id, k_id, e_q, e_k, T, C, count_rounds)


def fused_or_eager(fused: bool, auto: bool, fn, x: Tensor, *args):
    """fn(x, *args) through torch.compile when the call chose the compiled kernels (one loop,
    none of the eager form's whole-tensor temporaries: at 16K each costs a page fault per
    4 KiB on first touch), else eager; dim 2 of x (the length) is symbolic. For the
    elementwise passes around the LSH core: the unit keys, the backward's dO . O."""
    if compiling(fused):
        try:
            for t in (x, *args):
                if isinstance(t, Tensor):
                    torch._dynamo.maybe_mark_dynamic(t, 2)
            return _compiled(fn)(x, *args)
        except Exception as exc:  # torch.compile raises many types; all mean "not here"
            compile_failed(exc, auto)
    return fn(x, *args)


# ---- choice -------------------------------------------------------------------------------


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here: Triton for CUDA, a C++ compiler on CPU."""
    return _compiler_available(device.type)


@functools.cache  # asked on every long LSH call; searching PATH once per process is enough
def _compiler_available(device_type: str) -> bool:
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    if device_type != "cpu":
        return False
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def resolve_kernel(kernel: str, slots: int, device: torch.device) -> bool:
    """Whether a call with `slots` sorted slots uses the compiled kernels."""
    kernel = os.environ.get("REFORMER_LSH_KERNEL", kernel) if kernel == "auto" else kernel
    if kernel not in KERNELS:
        raise ValueError(
            f"LSH kernel {kernel!r} is not one of {KERNELS} (check the lsh_kernel setting "
            "or the REFORMER_LSH_KERNEL environment variable)"
        )
    if kernel == "eager":
        return False
    if kernel == "compiled":
        if not compiler_available(device):
            raise RuntimeError(
                f"lsh_kernel='compiled' needs torch.compile to build kernels for {device.type}"
                ": install a C++ compiler (CPU) or Triton (CUDA), or use 'eager' or 'auto'"
            )
        return True
    return _compile_failed is None and slots >= AUTO_COMPILE_SLOTS and compiler_available(device)


def _eager_on_half(name: str, s: Tensor, code: Tensor, self_at: int, *rows: Tensor):
    """The eager kernels on half-precision tiles (bf16, fp16): the arithmetic in float32, as
    the compiled kernels do it, and the results rounded back into the caller's tiles."""
    if name == "forward":
        s.copy_(eager_forward(s.float(), code, self_at, *rows))
        return s
    top, scale, dp, dot = rows
    ds, p = eager_backward(s.float(), code, self_at, top, scale, dp.float(), dot)
    return dp.copy_(ds), s.copy_(p)


def run(fused: bool, auto: bool, name: str, *args):
    """Calls the `name` ("forward" or "backward") kernel. A compilation failure under "auto"
    warns once and switches this process to eager; under "compiled" it propagates.

    The score tiles may be float32, float64 or half precision (bf16, fp16: the bmm that made
    them computes in that dtype); the row statistics are float32 at least, and the
    arithmetic of every kernel is in float32 or wider."""
    if fused:
        try:
            return (compiled_forward if name == "forward" else compiled_backward)(*args)
        except Exception as exc:  # torch.compile raises many types; all mean "not here"
            compile_failed(exc, auto)
    if args[0].dtype in (torch.float16, torch.bfloat16):
        return _eager_on_half(name, *args)
    return (eager_forward if name == "forward" else eager_backward)(*args)


def compile_failed(exc: Exception, auto: bool) -> None:
    """A compiled kernel failed: under "auto" warn once and use eager for the rest of the
    process (`resolve_kernel` says no from now on); under "compiled" re-raise."""
    global _compile_failed
    if not auto:
        raise exc
    _compile_failed = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "LSH attention could not compile its fused kernels and falls back to eager "
        f"for this process ({_compile_failed.splitlines()[0]})",
        RuntimeWarning,
        stacklevel=3,
    )


def compiling(fused: bool) -> bool:
    """Whether a call that chose the compiled kernels (`resolve_kernel`) still may."""
    return fused and _compile_failed is None


def warm_up(chunk_len: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Compile the kernels now for this chunk length and dtype (every number of rows shares
    them), so that the first long call does not pay for it; a no-op where "auto" would not
    compile. Returns whether compiled kernels are ready."""
    device = torch.device(device)
    if not resolve_kernel("auto", AUTO_COMPILE_SLOTS, device):
        return False
    C = chunk_len
    s = torch.zeros(2, C, 2 * C, dtype=dtype, device=device)  # the tiles: the inputs' dtype
    code = torch.ones(2, C, 2 * C, dtype=torch.int8, device=device)
    row = torch.ones(2, C, dtype=torch.promote_types(dtype, torch.float32), device=device)
    run(True, True, "forward", s, code, C, row.clone(), row.clone())
    run(True, True, "backward", s, code, C, row, row, s.clone(), row)
    return _compile_failed is None

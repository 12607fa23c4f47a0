"""Reversible residual layers (RevNet; the paper's section 3) over a whole stack of blocks.

    Y1 = X1 + F(X2)        F: pre-normalised attention (+ dropout)
    Y2 = X2 + G(Y1)        G: pre-normalised chunked feed-forward (+ dropout)

One engine, `reversible_chain`: a chain of half-residual steps (x1 += f0(x2), x2 += f1(x1),
...) in one autograd function that runs them forward without storing activations and, in
the backward pass, rebuilds each step's input from its output (X2 = Y2 - G(Y1),
X1 = Y1 - F(X2)) while back-propagating through it, so activation memory does not grow with
depth. The language model's stack (`reversible_forward`: attention, feed-forward per block)
and the encoder-decoder's (self-attention, cross-attention, feed-forward) are both chains.
Randomness replays exactly: each step draws everything random (hash rotations, dropout
masks) from a generator seeded by a per-call seed saved in the autograd context, never from
re-seeding the global RNG. Parameter gradients are returned from `backward` as ordinary
outputs, so gradient hooks (DDP) see them as usual.

LM blocks provide: `attn_branch(x, attention_mask, seed)`, `ff_branch(x, seed)`,
`attn_branch_vjp(x, grad, seed, attention_mask)` and
`ff_branch_vjp(x, grad, seed) -> (G(x), x_grad, param_grads)`, `attn_params()`,
`ff_params()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .memory import release_free_memory

Seeds = Sequence[tuple[int, int]]


def _trainable(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def reversible_forward(
    blocks: Sequence[nn.Module],
    x1: Tensor,
    x2: Tensor,
    attention_mask: Tensor | None,
    seeds: Seeds,
    custom_backward: bool = True,
    caches: Sequence | None = None,
    pos: int = 0,
) -> tuple[Tensor, Tensor]:
    """The LM's reversible stack: (B, L, d) x2 -> (B, L, d) x2, each block two steps of
    `reversible_chain` (attention, then the chunked feed-forward with its own chunked vjp).

    custom_backward=False computes the same forward under plain autograd (storing every
    activation): the reference the tests compare the custom backward against. caches, pos:
    decoding (no gradients): each block's attention goes through its cache.
    """
    caches = [None] * len(blocks) if caches is None else caches
    branches: list[Branch] = []
    for block, lc in zip(blocks, caches):
        vjp = None
        if lc is None:  # training: the attention step's own ordered vjp
            vjp = lambda x, g, seed, b=block: b.attn_branch_vjp(x, g, seed, attention_mask)  # noqa: E731
        branches.append(
            Branch(lambda x, _, seed, b=block, c=lc: b.attn_branch(x, attention_mask, seed, c, pos),
                   block.attn_params(), vjp=vjp)
        )  # fmt: skip
        branches.append(
            Branch(lambda x, _, seed, b=block: b.ff_branch(x, seed), block.ff_params(),
                   vjp=block.ff_branch_vjp)
        )  # fmt: skip
    flat_seeds = [seed for pair in seeds for seed in pair]
    return reversible_chain(branches, x1, x2, None, flat_seeds, custom_backward=custom_backward)


# --- a general chain of half-residual steps (encoder-decoder stacks) ---------------------------
class Branch:
    """One half-residual step of `reversible_chain`: `fn(x, context, seed) -> (B, L, d)` and
    the trainable parameters it uses. `context` is the chain's extra input (the encoder output
    for a decoder's cross-attention; None for an encoder) and `seed` seeds every random draw
    (hash rotations, dropout), so the backward pass replays it exactly.

    vjp: optional `vjp(x, grad, seed) -> (fn(x), x's gradient, the params' gradients)` that
    the backward pass uses instead of autograd through `fn` (the chunked feed-forward's: one
    chunk's d_ff intermediate alive at a time, no recomputation inside checkpoints); only
    for a branch that does not read the context."""

    __slots__ = ("fn", "params", "vjp")

    def __init__(self, fn, params: list[nn.Parameter], vjp=None) -> None:
        self.fn = fn
        self.params = _trainable(params)
        self.vjp = vjp


def reversible_chain(
    branches: Sequence[Branch],
    x1: Tensor,
    x2: Tensor,
    context: Tensor | None,
    seeds: Sequence[int],
    custom_backward: bool = True,
) -> tuple[Tensor, Tensor]:
    """Reversible half-residual steps that alternate between the halves:

        step 0: x1 += f0(x2),  step 1: x2 += f1(x1),  step 2: x1 += f2(x2), ...

    (the authors' decoder layer: self-attention, cross-attention and feed-forward, each a
    half-residual followed by a swap). Activations are not stored: the backward pass rebuilds
    each step's input from its output. `context` (e.g. the encoder output) is an input of
    every step that receives its summed gradient. custom_backward=False runs the same chain
    under plain autograd: the reference the tests compare against.
    """
    if len(seeds) != len(branches):
        raise ValueError(f"reversible_chain: {len(branches)} branches but {len(seeds)} seeds")
    params = [p for b in branches for p in b.params]
    grad_inputs = x1.requires_grad or x2.requires_grad
    grad_inputs = grad_inputs or (context is not None and context.requires_grad)
    if custom_backward and torch.is_grad_enabled() and (grad_inputs or params):
        dummy = context if context is not None else x1.new_zeros(())
        return _ChainFunction.apply(
            x1, x2, dummy, context is not None, branches, tuple(seeds), *params
        )
    for i, (branch, seed) in enumerate(zip(branches, seeds)):
        if i % 2 == 0:
            x1 = x1 + branch.fn(x2, context, seed)
        else:
            x2 = x2 + branch.fn(x1, context, seed)
    return x1, x2


class _ChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, context, has_context, branches, seeds, *params):
        ctx_in = context if has_context else None
        with torch.no_grad():
            for i, (branch, seed) in enumerate(zip(branches, seeds)):
                if i % 2 == 0:
                    x1 = x1 + branch.fn(x2, ctx_in, seed)
                else:
                    x2 = x2 + branch.fn(x1, ctx_in, seed)
        device_type = x1.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.branches, ctx.seeds, ctx.has_context = branches, seeds, has_context
        # The outputs are kept as plain (detached) attributes, not saved tensors, so that the
        # backward pass can drop them as soon as it has rebuilt the halves before them (saved
        # tensors would stay alive until backward returns: two (B, L, d) tensors at the peak).
        # Detached, they hold no reference back to this node (no cycle).
        ctx.outputs = [x1.detach(), x2.detach()]
        ctx.versions = (x1._version, x2._version)  # shared with the detached views
        ctx.save_for_backward(context.detach())
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        (context,) = ctx.saved_tensors
        if ctx.outputs is None:
            raise RuntimeError(
                "reversible_chain: backward ran twice through the same graph (or a failed one is "
                "being retried); the reversible "
                "stack frees its outputs in the first (retain_graph is not supported)"
            )
        y1, y2 = ctx.outputs
        ctx.outputs = None
        if (y1._version, y2._version) != ctx.versions:
            raise RuntimeError(
                "reversible_chain: an output of the reversible stack was modified in place "
                "after the forward pass; the backward pass rebuilds the activations from the "
                "outputs, so clone them before changing them"
            )
        has_context = ctx.has_context
        need_context = has_context and ctx.needs_input_grad[2]
        d_context = torch.zeros_like(context) if need_context else None
        device_type, autocast_on, autocast_dtype = ctx.autocast
        grads_per_branch: list[list[Tensor | None]] = []
        steps = list(enumerate(zip(ctx.branches, ctx.seeds)))
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            for i, (branch, seed) in reversed(steps):
                # Step i updated `a` from `b`: a_out = a_in + f(b). Rebuild a_in = a_out - f(b);
                # dL/da_in = dL/da_out, dL/db += (df/db)^T dL/da_out.
                b, da = (y2, dy1) if i % 2 == 0 else (y1, dy2)
                if branch.vjp is not None:
                    f, db, grads = branch.vjp(b, da, seed)
                else:
                    with torch.enable_grad():
                        b_ = b.detach().requires_grad_(True)
                        c_ = context.detach().requires_grad_(need_context) if has_context else None
                        f = branch.fn(b_, c_, seed)
                        inputs = [b_, *([c_] if need_context else []), *branch.params]
                        grads = list(torch.autograd.grad(f, inputs, da, allow_unused=True))
                    del b_
                    db = grads.pop(0)
                    if need_context:
                        dc = grads.pop(0)
                        if dc is not None:
                            d_context = d_context + dc
                if i % 2 == 0:
                    y1 = y1 - f.detach()
                    dy2 = dy2 + db
                else:
                    y2 = y2 - f.detach()
                    dy1 = dy1 + db
                grads_per_branch.append(grads)
                # Freed before the next step is recomputed, where the pass peaks: the step's
                # output, its input gradient and the old half are (B, L, d) tensors that
                # would otherwise stay alive there.
                del f, db, b, da
                if i % 2 == 0:  # once per LM layer, after its attention step (memory.py)
                    release_free_memory(y1)
        param_grads = [g for grads in reversed(grads_per_branch) for g in grads]
        return (dy1, dy2, d_context, None, None, None, *param_grads)

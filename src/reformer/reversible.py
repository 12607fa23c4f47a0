"""Reversible residual layers (RevNet; the paper's section 3) over a whole stack of blocks.

    Y1 = X1 + F(X2)        F: pre-normalised attention (+ dropout)
    Y2 = X2 + G(Y1)        G: pre-normalised chunked feed-forward (+ dropout)

`ReversibleFunction` runs every block forward without storing activations and, in the
backward pass, rebuilds each block's inputs from its outputs (X2 = Y2 - G(Y1),
X1 = Y1 - F(X2)) while back-propagating through it, so activation memory does not grow with
depth. Randomness replays exactly: each block's F and G draw everything random (hash
rotations, dropout masks) from a generator seeded by a per-call seed saved in the autograd
context, never from re-seeding the global RNG. Parameter gradients are returned from
`backward` as ordinary outputs, so gradient hooks (DDP) see them as usual.

Blocks must provide: `attn_branch(x, attention_mask, seed)`, `ff_branch(x, seed)`,
`ff_branch_vjp(x, grad, seed) -> (G(x), x_grad, param_grads)`, `attn_params()`,
`ff_params()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

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
) -> tuple[Tensor, Tensor]:
    """Run the reversible stack: (B, L, d) x2 -> (B, L, d) x2.

    custom_backward=False computes the same forward under plain autograd (storing every
    activation): the reference the tests compare the custom backward against.
    """
    params = [p for b in blocks for p in _trainable(b.attn_params() + b.ff_params())]
    needs_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or params)
    if custom_backward and needs_grad:
        return ReversibleFunction.apply(x1, x2, attention_mask, blocks, seeds, *params)
    for block, (seed_f, seed_g) in zip(blocks, seeds):
        x1 = x1 + block.attn_branch(x2, attention_mask, seed_f)
        x2 = x2 + block.ff_branch(x1, seed_g)
    return x1, x2


class ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, attention_mask, blocks, seeds, *params):
        with torch.no_grad():
            for block, (seed_f, seed_g) in zip(blocks, seeds):
                x1 = x1 + block.attn_branch(x2, attention_mask, seed_f)
                x2 = x2 + block.ff_branch(x1, seed_g)
        device_type = x1.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.blocks, ctx.seeds, ctx.attention_mask = blocks, seeds, attention_mask
        ctx.save_for_backward(x1.detach(), x2.detach())
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        device_type, autocast_on, autocast_dtype = ctx.autocast
        grads_per_block = []
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            for block, (seed_f, seed_g) in zip(reversed(ctx.blocks), reversed(ctx.seeds)):
                # G: X2 = Y2 - G(Y1); dL/dY1 += (dG/dY1)^T dL/dY2.
                g, dy1_g, grads_g = block.ff_branch_vjp(y1, dy2, seed_g)
                x2 = y2 - g
                dy1 = dy1 + dy1_g
                # F: X1 = Y1 - F(X2); dL/dX2 = dL/dY2 + (dF/dX2)^T dL/dY1.
                params_f = _trainable(block.attn_params())
                with torch.enable_grad():
                    x2_ = x2.detach().requires_grad_(True)
                    f = block.attn_branch(x2_, ctx.attention_mask, seed_f)
                    dx2_f, *grads_f = torch.autograd.grad(
                        f, [x2_, *params_f], dy1, allow_unused=True
                    )
                x1 = y1 - f.detach()
                dy2 = dy2 + dx2_f
                y1, y2 = x1, x2
                grads_per_block.append(list(grads_f) + list(grads_g))
                del f, g, x2_
        param_grads = [g for grads in reversed(grads_per_block) for g in grads]
        return (dy1, dy2, None, None, None, *param_grads)

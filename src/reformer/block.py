"""One Reformer layer: F = attention and G = chunked feed-forward, each pre-normalised, and
their vector-Jacobian products that replay the forward's random draws (what the reversible
backward pass in `reversible.py` calls).

Legend: B batch, H heads, L length, D head dim, d d_model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention
from .attention.cache import LayerCache
from .config import ReformerConfig
from .feedforward import FeedForward, apply_chunked, chunk_slices
from .seeding import dropout_mask, rank_generator
from .seeding import seeded_generator as make_generator


def _add_grads(acc: list[Tensor | None], new: list[Tensor | None]) -> list[Tensor | None]:
    """Per-parameter sums of chunk gradients, None where a chunk did not reach a parameter."""
    return [a if b is None else (b if a is None else a + b) for a, b in zip(acc, new)]


def _projection_grads(
    projections: list[nn.Linear], grads: list[Tensor], n: Tensor, acc: dict[int, Tensor]
) -> Tensor:
    """For outputs y_i = n W_i^T + b_i with gradients grads[i] (B, l, out_i): adds each
    weight's and bias's gradient into acc (by id, in the parameter's dtype) and returns n's
    gradient (B, l, d), sum_i grads[i] W_i. Matmuls run in the autocast dtype when autocast
    is on, as the forward's did."""
    d_n = None
    flat_n = n.reshape(-1, n.shape[-1])
    for lin, g in zip(projections, grads):
        w, b = lin.weight, lin.bias
        term = torch.matmul(g, w)
        d_n = term if d_n is None else d_n + term
        flat_g = g.reshape(-1, g.shape[-1])
        if w.requires_grad:
            _accumulate(acc, w, torch.matmul(flat_g.t(), flat_n))
        if b is not None and b.requires_grad:
            _accumulate(acc, b, flat_g.sum(0))
    return d_n


def _accumulate(acc: dict[int, Tensor], p: nn.Parameter, grad: Tensor) -> None:
    grad = grad.to(p.dtype)
    acc[id(p)] = grad if id(p) not in acc else acc[id(p)] + grad


class ReformerBlock(nn.Module):
    """One layer: F = attention, G = chunked feed-forward, each pre-normalised."""

    def __init__(self, config: ReformerConfig, kind: str) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = Attention(config, kind)
        self.ff_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ff = FeedForward(config.d_model, config.d_ff, config.compat.ff_activation)
        self.dropout = config.dropout
        self.ff_chunk_len = config.ff_chunk_len
        self.shard_rank: int | None = None  # under sequence parallelism (`ReformerLM.shard`)

    def attn_params(self) -> list[nn.Parameter]:
        return list(self.attn_norm.parameters()) + list(self.attn.parameters())

    def ff_params(self) -> list[nn.Parameter]:
        return list(self.ff_norm.parameters()) + list(self.ff.parameters())

    def _mask(self, x: Tensor, gen: torch.Generator, dtype=None) -> Tensor | None:
        """The dropout multiplier for x's shape (x's dtype unless given); None if no dropout."""
        if not (self.training and self.dropout > 0):
            return None
        if self.shard_rank is not None:
            gen = rank_generator(gen, self.shard_rank, x.device)
        return dropout_mask(x.shape, self.dropout, gen, x.device, dtype or x.dtype)

    def attn_branch(
        self,
        x: Tensor,
        attention_mask: Tensor | None,
        seed: int,
        cache: LayerCache | None = None,
        pos: int = 0,
    ) -> Tensor:
        """F(x) = dropout(attention(norm(x))): (B, L, d) -> (B, L, d). Random draws (hash
        rotations first, then the dropout mask) come from a generator seeded with `seed`.
        cache, pos: decoding (`Attention.forward`)."""
        gen = make_generator(seed, x.device)
        out = self.attn(self.attn_norm(x), attention_mask, gen, cache=cache, pos=pos)
        mask = self._mask(out, gen)
        return out if mask is None else out * mask

    def attn_branch_vjp(
        self, x: Tensor, grad: Tensor, seed: int, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """F(x), x's gradient and the parameters' gradients for upstream `grad`, the random
        draws replayed from `seed` as `attn_branch` makes them.

        Ordered so that few (B, L, d) tensors are alive at once (the backward pass's peak):
        the attention core's inputs and output and their gradients exist while the core runs
        its backward (`_attn_core_vjp`); the output projection's input gradient is formed
        before it, F(x) only after it; the norm and input projections are recomputed a chunk
        of positions at a time (`_attn_input_vjp`, as the feed-forward's vjp), so neither the
        normalised input nor its gradient exists whole."""
        gen = make_generator(seed, x.device)
        params = [p for p in self.attn_params() if p.requires_grad]
        d_heads, o, mask, own = self._attn_core_vjp(x, grad, gen, attention_mask)
        with torch.no_grad():
            f = self.attn.out(o)
            if mask is not None:
                f = f * mask
        del o
        x_grad, input_grads = self._attn_input_vjp(x, d_heads)
        own |= input_grads
        return f, x_grad, [own.get(id(p)) for p in params]

    def _attn_core_vjp(
        self, x: Tensor, grad: Tensor, gen: torch.Generator, attention_mask: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor | None, dict[int, Tensor]]:
        """Recompute the core from x (B, L, d) with its rotations and dropout mask drawn from
        `gen`, and backpropagate `grad` (B, L, d) through the output projection and the core.
        Returns the gradients of the core's inputs (each (B, H, L, D)), the core's output o
        (B, L, H * D), the dropout mask and the output projection's gradients by id."""
        attn = self.attn
        B, L, d = x.shape
        with torch.no_grad():
            heads = attn.project(self.attn_norm(x))
        rotations = None
        if attn.kind == "lsh":
            rotations = attn.draw_rotations(L, gen, x.device, heads[0].dtype)
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in heads]
        del heads
        with torch.enable_grad():
            out = attn.core(*leaves, attention_mask, rotations)  # (B, H, L, D)
        # attn_branch's dropout mask: drawn after the rotations, in the dtype its output has
        # (the output projection's under autocast, which leaves float64 alone).
        with torch.no_grad():
            f_dtype = attn.out(out[:, :, :1].detach().transpose(1, 2).reshape(B, 1, -1)).dtype
        mask = self._mask(x, gen, f_dtype)
        g = grad if mask is None else grad * mask
        w_out = attn.out.weight
        d_out = torch.matmul(g, w_out)  # (under autocast, in its dtype, as the forward)
        d_out = d_out.view(B, L, attn.n_heads, attn.head_dim).transpose(1, 2)
        used = [t for t in leaves if t is not None]
        d_heads = list(torch.autograd.grad(out, used, d_out))
        del d_out, used, leaves
        o = out.detach().transpose(1, 2).reshape(B, L, -1)  # (B, L, H * D)
        del out
        own: dict[int, Tensor] = {}
        if w_out.requires_grad:
            own[id(w_out)] = (g.reshape(-1, d).t() @ o.reshape(B * L, -1)).to(w_out.dtype)
        bias = attn.out.bias
        if bias is not None and bias.requires_grad:
            own[id(bias)] = g.sum((0, 1)).to(bias.dtype)
        return d_heads, o, mask, own

    def _attn_input_vjp(self, x: Tensor, d_heads: list[Tensor]) -> tuple[Tensor, dict[int, Tensor]]:
        """x's gradient (B, L, d) and the norm's and input projections' gradients by id, for
        the core inputs' gradients d_heads (each (B, H, L, D)), a chunk of positions at a
        time: the norm is recomputed under autograd, the projections' products are formed
        directly (their outputs are not needed, so they are not recomputed)."""
        norm, projections = self.attn_norm, self.attn.projections()
        norm_params = [p for p in norm.parameters() if p.requires_grad]
        x_grad = torch.empty_like(x)
        sums: list[Tensor | None] = [None] * len(norm_params)
        own: dict[int, Tensor] = {}
        for sl in chunk_slices(x.shape[1], self.ff_chunk_len):
            with torch.enable_grad():
                xc = x[:, sl].detach().requires_grad_(True)
                n = norm(xc)
            grads = [dh[:, :, sl].transpose(1, 2).flatten(2) for dh in d_heads]  # (B, l, H D)
            d_n = _projection_grads(projections, grads, n.detach(), own)
            dxc, *dps = torch.autograd.grad(n, [xc, *norm_params], d_n, allow_unused=True)
            x_grad[:, sl] = dxc
            sums = _add_grads(sums, dps)
        own |= {id(p): gp for p, gp in zip(norm_params, sums) if gp is not None}
        return x_grad, own

    def _ff(self, x: Tensor, mask: Tensor | None) -> Tensor:
        out = self.ff(self.ff_norm(x))
        return out if mask is None else out * mask

    def ff_branch(self, x: Tensor, seed: int) -> Tensor:
        """G(x) = dropout(ff(norm(x))), a chunk of positions at a time: (B, L, d) -> (B, L, d)."""
        mask = self._mask(x, make_generator(seed, x.device))
        return apply_chunked(self._ff, x, mask, chunk_len=self.ff_chunk_len)

    def ff_branch_vjp(
        self, x: Tensor, grad: Tensor, seed: int
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """G(x), x's gradient and the parameters' gradients for upstream `grad`, a chunk of
        positions at a time (only one chunk's d_ff intermediate alive at once)."""
        mask = self._mask(x, make_generator(seed, x.device))
        params = [p for p in self.ff_params() if p.requires_grad]
        out, x_grad = torch.empty_like(x), torch.empty_like(x)
        param_grads: list[Tensor | None] = [None] * len(params)
        for sl in chunk_slices(x.shape[1], self.ff_chunk_len):
            with torch.enable_grad():
                xc = x[:, sl].detach().requires_grad_(True)
                gc = self._ff(xc, None if mask is None else mask[:, sl])
                dxc, *dps = torch.autograd.grad(gc, [xc, *params], grad[:, sl], allow_unused=True)
            out[:, sl] = gc.detach()
            x_grad[:, sl] = dxc
            param_grads = _add_grads(param_grads, dps)
        return out, x_grad, param_grads

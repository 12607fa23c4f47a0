"""Cached incremental decoding whose logits equal the full forward's, and sampling.

Legend: B batch, H heads, D head dim, R hash rounds, K buckets, C chunk length, T new tokens.

Strictly causal attention makes this exact: in `window` mode the candidates of token t are
t itself and its C most recent earlier bucket-mates in each round, which depend on tokens
<= t only. With N_tj duplicate counts, the full forward's combination of rounds equals one
softmax over the union of the rounds' candidate sets; the decoder computes that softmax
directly. So `decode` reproduces the full forward of a sequence of `total_len` tokens hashed
with the same rotations: they are drawn, like the full forward's, from per-layer seeds taken
from torch's global RNG when the cache is created.

The cache per layer: keys and values of the positions decoded so far, and for LSH, per
round and bucket the positions of its last C members (all a token can still reach). Per
token, LSH and local attention touch at most R * C + 1 and 2C keys: the cost stays flat as
the prefix grows; full attention touches all earlier keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import Attention, hash_vectors
from .attention.common import SELF_SCORE
from .seeding import seeded_generator as make_generator

if TYPE_CHECKING:
    from .model import ReformerLM


@dataclass
class LayerCache:
    keys: Tensor  # (B, H, total_len, D): unit keys (shared QK) or keys
    values: Tensor  # (B, H, total_len, D)
    rotations: tuple[Tensor, ...] | None = None  # LSH only
    mates: Tensor | None = None  # (B, H, R, K, C) positions of each bucket's last C, -1 empty


@dataclass
class DecodeCache:
    """State of an incremental decode; create it by calling `decode` with cache=None."""

    total_len: int
    length: int = 0
    seeds: list[tuple[int, int]] = field(default_factory=list)
    layers: list[LayerCache] = field(default_factory=list)


def not_decodable(model: ReformerLM) -> str | None:
    """Why `decode` cannot reproduce this model's full forward, or None."""
    cfg = model.config
    if not cfg.causal:
        return "decode needs a causal model (config.causal=True)"
    if "lsh" in cfg.layer_kinds and cfg.resolved_lsh_mode != "window":
        return (
            "decode needs lsh_mode='window': in 'chunk' mode future tokens move earlier "
            "tokens' chunks, so no cache can reproduce the full forward"
        )
    if "lsh" in cfg.layer_kinds and not cfg.lsh_dedup:
        return (
            "decode needs lsh_dedup=True: the cache attends to the union of the rounds' "
            "candidates, which is the full forward only with the duplicate correction"
        )
    return None


def _check_decodable(model: ReformerLM) -> None:
    reason = not_decodable(model)
    if reason is not None:
        raise ValueError(reason)


def _new_layer_cache(
    attn: Attention, B: int, total_len: int, gen: torch.Generator, like: Tensor
) -> LayerCache:
    H, D = attn.n_heads, attn.head_dim
    keys = like.new_zeros(B, H, total_len, D)
    values = like.new_zeros(B, H, total_len, D)
    if attn.kind != "lsh":
        return LayerCache(keys, values)
    rotations = attn.draw_rotations(total_len, gen, like.device, like.dtype)
    K = attn.buckets_for(total_len)
    mates = torch.full(
        (B, H, attn.n_hashes, K, attn.chunk_len), -1, dtype=torch.long, device=like.device
    )
    return LayerCache(keys, values, rotations, mates)


def _project(attn: Attention, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T, d) -> queries, stored keys, values, each (B, H, T, D)."""
    v = attn._heads(attn.v(h))
    if attn.shared_qk:
        q = attn._heads(attn.qk(h))
        return q, attn.keys_of(q), v
    return attn._heads(attn.q(h)), attn._heads(attn.k(h)), v


def _insert_mates(mates: Tensor, buckets: Tensor, pos: int) -> None:
    """Append position `pos` to its bucket's row in each round. buckets: (B, H, R)."""
    C = mates.shape[-1]
    idx = buckets[..., None, None].expand(*buckets.shape, 1, C)  # (B, H, R, 1, C)
    row = mates.gather(3, idx)
    row = torch.cat([row[..., 1:], torch.full_like(row[..., :1], pos)], dim=-1)
    mates.scatter_(3, idx, row)


def _fill_mates(mates: Tensor, buckets: Tensor) -> None:
    """Prefill: each bucket's last C positions among buckets (B, H, R, P), oldest first."""
    B, H, R, P = buckets.shape
    K, C = mates.shape[3], mates.shape[4]
    pos = torch.arange(P, device=buckets.device)
    sorted_key, order = (buckets * P + pos).sort(dim=-1)  # by (bucket, position)
    sorted_b = sorted_key // P
    last = torch.searchsorted(sorted_b.contiguous(), sorted_b.contiguous(), right=True) - 1
    back = last - torch.arange(P, device=buckets.device)  # 0 for a bucket's newest member
    keep = back < C
    slot = torch.where(keep, sorted_b * C + (C - 1 - back), K * C)  # K * C: a discard slot
    flat = torch.full((B, H, R, K * C + 1), -1, dtype=torch.long, device=buckets.device)
    flat.scatter_(-1, slot, order)
    mates.copy_(flat[..., : K * C].view(B, H, R, K, C))


def _attend_one(attn: Attention, lc: LayerCache, h: Tensor, t: int) -> Tensor:
    """Attention output of the token at position t: h (B, 1, d) -> (B, 1, d)."""
    B = h.shape[0]
    q, k, v = _project(attn, h)
    lc.keys[:, :, t] = k[:, :, 0]
    lc.values[:, :, t] = v[:, :, 0]
    q = q[:, :, 0]  # (B, H, D)
    scale = 1.0 if attn.shared_qk else 1.0 / math.sqrt(attn.head_dim)
    if attn.kind == "lsh":
        assert lc.rotations is not None and lc.mates is not None
        buckets = hash_vectors(q[:, :, None], lc.rotations)[..., 0]  # (B, H, R)
        C = attn.chunk_len
        idx = buckets[..., None, None].expand(*buckets.shape, 1, C)
        cand = lc.mates.gather(3, idx).flatten(2)  # (B, H, R * C) earlier bucket-mates
        cand, _ = cand.sort(dim=-1)
        dup = torch.zeros_like(cand, dtype=torch.bool)
        dup[..., 1:] = cand[..., 1:] == cand[..., :-1]  # union: each position once
        valid = (cand >= 0) & ~dup
        cand = cand.clamp_min(0)
        _insert_mates(lc.mates, buckets, t)
    else:
        start = max(0, (t // attn.chunk_len - 1) * attn.chunk_len) if attn.kind == "local" else 0
        cand = torch.arange(start, t, device=h.device).expand(B, attn.n_heads, -1)
        valid = torch.ones_like(cand, dtype=torch.bool)
    keys = lc.keys.gather(2, cand[..., None].expand(-1, -1, -1, attn.head_dim))  # (B, H, n, D)
    vals = lc.values.gather(2, cand[..., None].expand(-1, -1, -1, attn.head_dim))
    scores = (keys @ q[..., None])[..., 0] * scale  # (B, H, n)
    scores = scores.masked_fill(~valid, float("-inf"))
    if attn.shared_qk:
        self_score = torch.full_like(scores[..., :1], SELF_SCORE)
    else:
        self_score = (k[:, :, 0] * q).sum(-1, keepdim=True) * scale
    scores = torch.cat([scores, self_score], dim=-1)
    vals = torch.cat([vals, v], dim=2)  # (B, H, n + 1, D)
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    out = (probs.to(vals.dtype)[..., None, :] @ vals)[..., 0, :]  # (B, H, D)
    return attn.out(out.reshape(B, 1, -1))


def _prefill(model: ReformerLM, ids: Tensor, cache: DecodeCache) -> Tensor:
    """The full forward of the prompt (hashing as for total_len), filling the cache."""
    P = ids.shape[1]
    x = model.embed(ids)
    x1 = x2 = x
    for block, (seed_f, seed_g), lc in zip(model.blocks, cache.seeds, cache.layers):
        inp = x2 if model.config.reversible else x1
        h = block.attn_norm(inp)
        gen = make_generator(seed_f, x.device)
        a = block.attn(h, None, gen, hash_len=cache.total_len)
        q, k, v = _project(block.attn, h)
        lc.keys[:, :, :P], lc.values[:, :, :P] = k, v
        if lc.mates is not None:
            _fill_mates(lc.mates, hash_vectors(q, lc.rotations))
        if model.config.reversible:
            x1 = x1 + a
            x2 = x2 + block.ff_branch(x1, seed_g)
        else:
            x1 = x1 + a
            x1 = x1 + block.ff_branch(x1, seed_g)
    hidden = torch.cat([x1, x2], dim=-1) if model.config.reversible else x1
    return model.logits_from_hidden(hidden)


def _step(model: ReformerLM, ids: Tensor, cache: DecodeCache) -> Tensor:
    """One new token per sequence: ids (B, 1) -> logits (B, 1, V)."""
    t = cache.length
    x = model.embed(ids, offset=t)
    x1 = x2 = x
    for block, (_, seed_g), lc in zip(model.blocks, cache.seeds, cache.layers):
        inp = x2 if model.config.reversible else x1
        a = _attend_one(block.attn, lc, block.attn_norm(inp), t)
        x1 = x1 + a
        if model.config.reversible:
            x2 = x2 + block.ff_branch(x1, seed_g)
        else:
            x1 = x1 + block.ff_branch(x1, seed_g)
    cache.length += 1
    hidden = torch.cat([x1, x2], dim=-1) if model.config.reversible else x1
    return model.logits_from_hidden(hidden)


@torch.no_grad()
def decode(
    model: ReformerLM,
    input_ids: Tensor,
    cache: DecodeCache | None = None,
    total_len: int | None = None,
) -> tuple[Tensor, DecodeCache]:
    """Logits of the new tokens `input_ids` (B, T) given the cache, and the updated cache.

    With cache=None a cache is created for sequences of `total_len` tokens (default:
    max_seq_len): hash rotations are drawn then, from the same global-RNG seeds the full
    forward draws, so `torch.manual_seed(s)` before both makes them hash alike, and the
    logits equal those of `model(full_ids)` for full_ids of length total_len. The first call
    runs the full forward over its tokens (prefill); later calls decode one token at a time.
    Models must be causal, with lsh_mode='window'; call in eval mode (no dropout).
    """
    _check_decodable(model)
    model._check_ids(input_ids)
    B, T = input_ids.shape
    if cache is None:
        total = total_len or model.config.max_seq_len
        if not 1 <= total <= model.config.max_seq_len:
            raise ValueError(
                f"total_len={total} must be in 1..max_seq_len={model.config.max_seq_len}"
            )
        seeds = model.layer_seeds()
        torch.randint(0, 2**62, ())  # the embedding-dropout seed of the full forward
        like = model.token_emb.weight
        cache = DecodeCache(total_len=total, seeds=seeds)
        for block, (seed_f, _) in zip(model.blocks, seeds):
            gen = make_generator(seed_f, like.device)
            cache.layers.append(_new_layer_cache(block.attn, B, total, gen, like))
    if cache.length + T > cache.total_len:
        raise ValueError(
            f"decoding {T} more tokens would exceed the cache's total_len={cache.total_len} "
            f"(at {cache.length}); create the cache with a larger total_len"
        )
    if cache.layers[0].keys.shape[0] != B:
        raise ValueError(f"batch size {B} differs from the cache's {cache.layers[0].keys.shape[0]}")
    if cache.length == 0:
        logits = _prefill(model, input_ids, cache)
        cache.length = T
        return logits, cache
    outs = [_step(model, input_ids[:, i : i + 1], cache) for i in range(T)]
    return torch.cat(outs, dim=1), cache


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ids (B,) from logits (B, V): greedy when temperature == 0."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: ReformerLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    total_len: int | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Sample `max_new_tokens` after `prompt` (B, P) with the cache: returns (B, P + N).

    Seeded: the same seed gives the same tokens. `on_token(ids (B,))` is called as each
    token is chosen (streaming). A causal model that no cache can reproduce (lsh_mode
    'chunk', as imported checkpoints are) runs its full forward over the whole sequence for
    every token instead: exact, and O(length) per token.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    total = total_len or min(model.config.max_seq_len, prompt.shape[1] + max_new_tokens)
    if prompt.shape[1] + max_new_tokens > total:
        raise ValueError(
            f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={model.config.max_seq_len}"
        )
    model.eval()
    sample = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    with torch.random.fork_rng(devices=[prompt.device] if prompt.device.type == "cuda" else []):
        torch.manual_seed(seed)
        if model.config.causal and not_decodable(model) is not None:
            return _generate_uncached(model, prompt, max_new_tokens, gen, on_token, sample)
        logits, cache = decode(model, prompt, None, total_len=total)
        out = [prompt]
        for _ in range(max_new_tokens):
            nxt = sample_next(
                logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen
            )
            if on_token is not None:
                on_token(nxt)
            out.append(nxt[:, None])
            if cache.length < total:
                logits, cache = decode(model, nxt[:, None], cache)
    return torch.cat(out, dim=1)


def _generate_uncached(
    model: ReformerLM,
    prompt: Tensor,
    max_new_tokens: int,
    gen: torch.Generator,
    on_token: Callable[[Tensor], None] | None,
    sample: dict,
) -> Tensor:
    """`generate` by a full forward over the sequence so far for every token."""
    ids = prompt
    for _ in range(max_new_tokens):
        nxt = sample_next(model(ids)[:, -1], generator=gen, **sample)
        if on_token is not None:
            on_token(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids

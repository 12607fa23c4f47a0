"""Sampling: `generate` draws tokens after a prompt through the model's cached decoding
(`ReformerLM.decode`: the same forward as training, through per-layer caches, so its logits
equal the full forward's), or through the full forward for models no cache can reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import not_decodable

if TYPE_CHECKING:
    from .model import ReformerLM

__all__ = ["generate", "not_decodable", "sample_next"]


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
        if model.config.causal and not_decodable(model.config) is not None:
            return _generate_uncached(model, prompt, max_new_tokens, gen, on_token, sample)
        logits, cache = model.decode(prompt, None, total_len=total)
        out = [prompt]
        for _ in range(max_new_tokens):
            nxt = sample_next(
                logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen
            )
            if on_token is not None:
                on_token(nxt)
            out.append(nxt[:, None])
            if cache.length < total:
                logits, cache = model.decode(nxt[:, None], cache)
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

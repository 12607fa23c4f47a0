"""Greedy and beam-search decoding with the cached decoder (`ReformerEncDec.step`).

Beam search keeps `beam` hypotheses per sentence, ranks finished ones by log-probability
divided by the GNMT length penalty ((5 + n) / 6) ** alpha, and stops when every sentence's
best finished hypothesis can no longer be beaten or at `max_len`. With beam=1 it picks the
argmax at every step, i.e. it equals `greedy` exactly (the tests check it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import ReformerEncDec


def _max_len(model: ReformerEncDec, src_mask: Tensor, max_len: int | None) -> int:
    limit = model.config.max_tgt_len
    if max_len is None:
        max_len = int(src_mask.sum(1).max()) * 2 + 10
    return max(1, min(max_len, limit))


def _strip(seq: list[int], eos: int) -> list[int]:
    return seq[: seq.index(eos)] if eos in seq else seq


@torch.no_grad()
def greedy(
    model: ReformerEncDec, src: Tensor, src_mask: Tensor | None = None, max_len: int | None = None
) -> list[list[int]]:
    """Most likely next token at each step, until eos; returns ids without bos/eos."""
    cfg = model.config
    was_training = model.training
    model.eval()
    try:
        state = model.start(src, src_mask)
        limit = _max_len(model, state.src_mask, max_len)
        B = src.shape[0]
        tokens = torch.full((B,), cfg.bos_id, dtype=torch.long, device=src.device)
        out = torch.empty(B, 0, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(limit):
            tokens = model.step(tokens, state).argmax(-1)
            out = torch.cat([out, tokens[:, None]], dim=1)
            done |= tokens == cfg.eos_id
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    return [_strip(row, cfg.eos_id) for row in out.tolist()]


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    model: ReformerEncDec,
    src: Tensor,
    src_mask: Tensor | None = None,
    *,
    beam: int = 4,
    alpha: float = 0.6,
    max_len: int | None = None,
) -> list[list[int]]:
    """Beam search with the GNMT length penalty; returns the best ids per sentence."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1; got {beam}")
    if alpha < 0:
        raise ValueError(f"length penalty alpha must be >= 0; got {alpha}")
    cfg = model.config
    was_training = model.training
    model.eval()
    try:
        B, device = src.shape[0], src.device
        if src_mask is None:
            src_mask = src != cfg.pad_id
        rows = torch.arange(B, device=device).repeat_interleave(beam)
        state = model.start(src.index_select(0, rows), src_mask.index_select(0, rows))
        limit = _max_len(model, src_mask, max_len)
        # Only the first beam of each sentence is alive at the start (the others are copies).
        scores = torch.full((B, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0
        tokens = torch.full((B * beam,), cfg.bos_id, dtype=torch.long, device=device)
        history = torch.empty(B, beam, 0, dtype=torch.long, device=device)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        for t in range(limit):
            logp = torch.log_softmax(model.step(tokens, state).float(), dim=-1)  # (B*beam, V)
            V = logp.shape[-1]
            cand = (scores[:, :, None] + logp.view(B, beam, V)).view(B, beam * V)
            top, idx = cand.topk(beam, dim=1)  # (B, beam)
            parent, token = idx // V, idx % V
            history = torch.cat(
                [history.gather(1, parent[:, :, None].expand(-1, -1, t)), token[:, :, None]], dim=2
            )
            is_eos = token == cfg.eos_id
            last = t == limit - 1
            for b in range(B):
                for k in range(beam):
                    if top[b, k] == float("-inf"):
                        continue
                    if bool(is_eos[b, k]) or last:
                        n = t if bool(is_eos[b, k]) else t + 1
                        seq = history[b, k, :n].tolist()
                        finished[b].append((float(top[b, k]) / length_penalty(n + 1, alpha), seq))
            # Finished hypotheses leave the beam: their slots score -inf from now on.
            scores = top.masked_fill(is_eos, float("-inf"))
            if last or _all_done(finished, scores, limit, alpha):
                break
            flat = (parent + torch.arange(B, device=device)[:, None] * beam).view(-1)
            state.reorder(flat)
            tokens = token.view(-1)
    finally:
        model.train(was_training)
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


def _all_done(finished, scores: Tensor, limit: int, alpha: float) -> bool:
    """True when no live hypothesis can beat a sentence's best finished one: log-probs only
    fall, so a live score s can at best reach s / length_penalty(limit) (alpha >= 0)."""
    best_possible = scores.max(dim=1).values  # (B,)
    for b, f in enumerate(finished):
        if float(best_possible[b]) == float("-inf"):
            continue
        if not f:
            return False
        if float(best_possible[b]) / length_penalty(limit, alpha) > max(s for s, _ in f):
            return False
    return True

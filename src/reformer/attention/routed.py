"""LSH attention over a sequence split across ranks, routed by the sort itself.

Legend: B batch, H heads, l this rank's positions, D head dim, R rounds, C chunk length,
N ranks, E routed entries (one per real token, head and round).

One process sorts each round's tokens by (bucket, position) and attends within chunks of C
sorted slots (`attention/lsh.py`). Here no rank holds the whole sort, but each token can learn
its global slot: bucket histograms of every rank (one small all-gather) say how many real
tokens of the sequence sort before it. The sorted order of every round is then cut into
chunk-aligned segments, one per rank and equal to a chunk whatever the buckets; every token
travels to the owner of its slot, and to the owners whose queries need it as a key (the
`before` chunks after a segment's start, the `after` chunks before it), in one all-to-all
with every round at once. Each owner attends over its segment as one process would, and sends
every query's output and log-sum-exp back to the token's rank, where the rounds combine as in
one process. Autograd reverses the exchanges in the backward pass. (Local attention needs
only a halo of positions from its neighbours: `halo.py`.)

Padded tokens are never routed: in one process they sort after every real token (a bucket of
their own), so they move no real token's slot and are never a candidate; their outputs are 0.
The candidate sets, the self rule and the duplicate count N_ij (from every round's bucket and
slot of both tokens, which travel with them) are those of `reference.lsh_candidate_sets`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..memory import release_free_memory
from ..sequence.shard import SequenceShard
from .common import MASK_SCORE, SELF_SCORE, unit_keys, upcast

# Scores (heads x rounds x queries x keys) an owner computes at once: each slice of query
# chunks is recomputed in the backward pass, so this bounds the attention's working set.
SLICE_SCORES = 1 << 21
# Values (batch x heads x rounds x slice length x row width) routed at once: see below.
GROUP_ENTRIES = 1 << 22


@dataclass(frozen=True)
class Route:
    """What a routed LSH layer computes (`lsh_attention`'s layout arguments)."""

    chunk_len: int
    mode: str
    causal: bool
    before: int = 1
    after: int = 0
    dedup: bool = True
    key_norm: str = "l2"


def routed_attention(
    qk: Tensor, v: Tensor, buckets: Tensor, valid: Tensor, shard: SequenceShard, route: Route
) -> Tensor:
    """Shared-QK LSH attention of this rank's queries over the whole sequence.

    Args:
        qk, v: (B, H, l, D) this rank's slice.
        buckets: (B, H, R, l) LSH buckets of this rank's tokens (`hash_vectors`).
        valid: (B, l) bool, True at real tokens.
    Returns:
        (B, H, l, D); 0 at padded positions.

    Heads go in groups of about GROUP_ENTRIES routed values, each group under activation
    checkpointing: only one group's exchange buffers exist at once, forward or backward (the
    backward pass repeats the group's exchanges, on every rank in the same order).
    """
    B, H, _, D = qk.shape
    R = buckets.shape[2]
    # heads per group, from the global length so that every rank makes the same groups
    per_head = B * R * (shard.length // shard.size + 1) * D * 2
    step = max(1, GROUP_ENTRIES // per_head)
    outs = []
    for h in range(0, H, step):
        part = [t[:, h : h + step] for t in (qk, v, buckets)]
        if torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad):
            outs.append(checkpoint(_routed_heads, *part, valid, shard, route, use_reentrant=False))
        else:
            outs.append(_routed_heads(*part, valid, shard, route))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _routed_heads(
    qk: Tensor, v: Tensor, buckets: Tensor, valid: Tensor, shard: SequenceShard, route: Route
) -> Tensor:
    """`routed_attention` of a group of heads: one exchange out, one back. Free heap pages
    of the previous group go back to the OS first (`memory.py`): the groups' buffers differ
    in size from the layer's other blocks, and glibc would otherwise keep them resident."""
    release_free_memory(qk)
    B, H, l, D = qk.shape
    slots, n_slots = global_slots(buckets, valid, shard)  # (B, H, R, l), (B,)
    plan = Plan.build(slots, n_slots, shard, route)
    rows = torch.cat([qk, v], dim=-1)  # (B, H, l, 2 D)
    sent = rows.reshape(-1, rows.shape[-1]).index_select(0, plan.rows)
    got = shard.exchange(sent, plan.send, plan.recv)
    got_meta = shard.exchange(plan.meta(slots, buckets, shard.start), plan.send, plan.recv)
    seg = Segment(got_meta, plan.recv, n_slots, shard, route, H, slots.shape[2])
    results = seg.attend(got, D)  # (primaries received, D + 1): output and log-sum-exp
    returned = shard.exchange(results, seg.back, plan.primary_counts)
    return _combine(returned, plan, (B, H, slots.shape[2], l, D), qk.dtype)


@torch.no_grad()
def global_slots(buckets: Tensor, valid: Tensor, shard: SequenceShard) -> tuple[Tensor, Tensor]:
    """(B, H, R, l): every local token's slot in its round's global sort by (bucket,
    position) among the sequence's real tokens, -1 at padding; and (B,) how many slots each
    sequence has."""
    l = valid.shape[1]
    device = valid.device
    K = int(shard.gather_counts(buckets.amax().reshape(1).clamp(min=0)).max()) + 1
    hist = torch.zeros(*buckets.shape[:3], K, dtype=torch.long, device=device)
    hist.scatter_add_(-1, buckets, valid[:, None, None, :].expand_as(buckets).long())
    every = shard.gather_counts(hist)  # (N, B, H, R, K): each rank's real tokens per bucket
    total = every.sum(0)
    # slots of the sequence before this rank's first token of each bucket
    before = total.cumsum(-1) - total + every[: shard.rank].sum(0)
    # rank among this rank's real tokens of its bucket (positions ascend within a bucket)
    key = torch.where(valid[:, None, None, :], buckets, K) * l + torch.arange(l, device=device)
    order = key.argsort(dim=-1)
    sorted_at = torch.empty_like(order).scatter_(
        -1, order, torch.arange(l, device=device).expand_as(order)
    )
    within = sorted_at - (hist.cumsum(-1) - hist).gather(-1, buckets)
    slots = torch.where(valid[:, None, None, :], before.gather(-1, buckets) + within, -1)
    return slots, total[:, 0, 0].sum(-1)


def chunk_bounds(n_slots: Tensor, shard: SequenceShard, chunk_len: int) -> Tensor:
    """(B, N + 1): rank r owns chunks [b[r], b[r + 1]) of every round's sorted order, as even
    as the number of chunks allows, whatever the buckets."""
    n_chunks = (n_slots + chunk_len - 1) // chunk_len
    r = torch.arange(shard.size + 1, device=n_slots.device)
    return n_chunks[:, None] * r // shard.size


def owner_of(bounds: Tensor, chunk: Tensor) -> Tensor:
    """The rank owning `chunk` (E,) of sequence rows `bounds` (E, N + 1)."""
    return (bounds[:, 1:-1] <= chunk[:, None]).sum(-1)


@dataclass
class Plan:
    """Which entry (token, head, round) goes to which rank, sorted by destination."""

    entry: Tensor  # (S,) flat (b, h, r, t) index of each sent entry
    rows: Tensor  # (S,) its row of the (B * H * l) token rows
    primary: Tensor  # (S,) bool: sent to the owner of its own slot (its query's result returns)
    send: list[int]
    recv: list[int]
    primary_counts: list[int]  # primaries sent to each rank, whose results come back

    @classmethod
    @torch.no_grad()
    def build(cls, slots: Tensor, n_slots: Tensor, shard: SequenceShard, route: Route) -> Plan:
        _, H, R, l = slots.shape
        C = route.chunk_len
        entry = (slots.reshape(-1) >= 0).nonzero().squeeze(1)  # (E,) real tokens
        b = entry // (H * R * l)
        chunk = slots.reshape(-1)[entry] // C
        bounds = chunk_bounds(n_slots, shard, C)[b]  # (E, N + 1)
        n_chunks = bounds[:, -1]
        # the owners of the query chunks that need this key: chunk - after .. chunk + before
        dests = []
        for delta in range(-route.after, route.before + 1):
            qc = chunk + delta
            ok = (qc >= 0) & (qc < n_chunks)
            dests.append(torch.where(ok, owner_of(bounds, qc.clamp(min=0)), -1))
        d = torch.stack(dests, 1)  # (E, before + after + 1), ascending where >= 0
        d[:, 1:] = torch.where(d[:, 1:] == d[:, :-1], -1, d[:, 1:])  # each owner once
        keep = d >= 0
        primary = d == owner_of(bounds, chunk)[:, None]
        e_idx = entry[:, None].expand_as(d)[keep]
        dest, primary = d[keep], primary[keep]
        order = torch.sort(dest, stable=True).indices
        e_idx, dest, primary = e_idx[order], dest[order], primary[order]
        send = torch.bincount(dest, minlength=shard.size)
        recv = shard.exchange_counts(send)
        t = e_idx % l
        bh = e_idx // (R * l)
        return cls(
            entry=e_idx,
            rows=bh * l + t,
            primary=primary,
            send=send.tolist(),
            recv=recv.tolist(),
            primary_counts=torch.bincount(dest[primary], minlength=shard.size).tolist(),
        )

    @torch.no_grad()
    def meta(self, slots: Tensor, buckets: Tensor, start: int) -> Tensor:
        """(S, 7 + 2 R) int64 per sent entry: b, h, r, slot, primary, global position, bucket
        (in the entry's round), then the token's slot and bucket in every round (for the
        duplicate count)."""
        _, H, R, l = slots.shape
        e = self.entry
        t, r, h, b = e % l, (e // l) % R, (e // (R * l)) % H, e // (H * R * l)
        every_slot = slots.permute(0, 1, 3, 2)[b, h, t]  # (S, R)
        every_bucket = buckets.permute(0, 1, 3, 2)[b, h, t]
        slot = slots.reshape(-1)[e]
        bucket = every_bucket.gather(1, r[:, None]).squeeze(1)
        cols = [b, h, r, slot, self.primary.long(), t + start, bucket]
        return torch.cat([torch.stack(cols, 1), every_slot, every_bucket], 1)


def _combine(returned: Tensor, plan: Plan, shape: tuple[int, ...], dtype) -> Tensor:
    """Each query's rounds combined by their log-sum-exps: (primaries, D + 1) as they return
    (by owner, then in the order sent) -> (B, H, l, D); 0 at padded positions."""
    B, H, R, l, D = shape
    at = plan.entry[plan.primary]
    flat = returned.new_zeros(B * H * R * l, D + 1).index_put((at,), returned)
    flat = flat.view(B, H, R, l, D + 1)
    weights = torch.softmax(flat[..., D], dim=2)  # (B, H, R, l)
    return (weights.unsqueeze(-1) * flat[..., :D]).sum(2).to(dtype)


# columns of Plan.meta
_B, _H, _R, _SLOT, _PRIMARY, _POS, _BUCKET, _EVERY = range(8)


class Segment:
    """The owner's side: the entries that arrived, laid out by (head, round, slot) over this
    rank's chunks of a sequence plus the `before` chunks before them and the `after` chunks
    after them, and attended as one process attends its sorted chunks."""

    def __init__(
        self,
        meta: Tensor,
        recv: list[int],
        n_slots: Tensor,
        shard: SequenceShard,
        route: Route,
        heads: int,
        rounds: int,
    ) -> None:
        self.meta, self.route, self.H, self.R = meta, route, heads, rounds
        self.bounds = chunk_bounds(n_slots, shard, route.chunk_len)[:, shard.rank : shard.rank + 2]
        source = torch.repeat_interleave(
            torch.arange(shard.size, device=meta.device),
            torch.tensor(recv, device=meta.device),
        )
        primary = meta[:, _PRIMARY].bool()
        self.back = torch.bincount(source[primary], minlength=shard.size).tolist()

    def attend(self, got: Tensor, D: int) -> Tensor:
        """(entries, F) rows that arrived -> (primaries, D + 1): each primary query's output
        and log-sum-exp in its round, in arrival order."""
        pieces, where = [], []
        primary = self.meta[:, _PRIMARY].bool()
        arrival = torch.cumsum(primary.long(), 0) - 1  # index among the primaries
        for b in self.meta[:, _B].unique().tolist():
            sel = (self.meta[:, _B] == b).nonzero().squeeze(1)
            first, last = self.bounds[b].tolist()
            if last == first:
                continue
            m = self.meta[sel]
            out, lse = self._sequence(got[sel], m, first, last, D)
            mine = m[:, _PRIMARY].bool()
            m = m[mine]
            at = (m[:, _H] * self.R + m[:, _R]) * ((last - first) * self.route.chunk_len) + (
                m[:, _SLOT] - first * self.route.chunk_len
            )
            flat = torch.cat([out, lse.unsqueeze(-1)], -1).reshape(-1, D + 1)
            pieces.append(flat.index_select(0, at))
            where.append(arrival[sel[mine]])
        if not pieces:  # no chunk of any sequence here: still a function of `got`, so that
            # this rank runs the backward exchanges that every other rank runs
            return upcast(got[:0, : D + 1])
        order = torch.cat(where).argsort()
        return torch.cat(pieces).index_select(0, order)

    def _sequence(
        self, rows: Tensor, meta: Tensor, first: int, last: int, D: int
    ) -> tuple[Tensor, Tensor]:
        """One sequence's segment: chunks [first, last) of every (head, round) as queries,
        with keys from `before` chunks earlier to `after` chunks later. Returns outputs
        (H, R, n C, D) and log-sum-exps (H, R, n C) in the scores' dtype. The query chunks
        are attended a slice at a time under activation checkpointing (about SLICE_SCORES
        scores each), so the scores of only one slice exist at once, forward or backward."""
        route, H, R, C = self.route, self.H, self.R, self.route.chunk_len
        n, nb, na = last - first, route.before, route.after
        S = (n + nb + na) * C
        at = (meta[:, _H], meta[:, _R], meta[:, _SLOT] - (first - nb) * C)
        buf = rows.new_zeros(H, R, S, rows.shape[-1]).index_put(at, rows)
        info = meta.new_full((H, R, S, meta.shape[1]), -1).index_put(at, meta)
        W = (nb + 1 + na) * C
        step = max(1, SLICE_SCORES // (H * R * C * W))
        outs, lses = [], []
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            keys = buf[:, :, c0 * C : (c1 + nb + na) * C]  # the slice's chunks and neighbours
            k_info = info[:, :, c0 * C : (c1 + nb + na) * C]
            if keys.requires_grad:
                o, lse = checkpoint(self._slice, keys, k_info, D, use_reentrant=False)
            else:
                o, lse = self._slice(keys, k_info, D)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, 2), torch.cat(lses, 2)

    def _slice(self, buf: Tensor, info: Tensor, D: int) -> tuple[Tensor, Tensor]:
        """Query chunks nb .. m - na of buf (H, R, m C, F) against their windows:
        (H, R, n C, D) outputs and (H, R, n C) log-sum-exps, n = m - nb - na."""
        route, H, R, C = self.route, self.H, self.R, self.route.chunk_len
        nb, na = route.before, route.after
        n = buf.shape[2] // C - nb - na

        def windows(x: Tensor) -> Tensor:  # (H, R, m C, ...) -> (H, R, n, W, ...)
            x = x.reshape(H, R, n + nb + na, C, *x.shape[3:])
            return torch.cat([x[:, :, i : i + n] for i in range(nb + na + 1)], dim=3)

        queries = buf[:, :, nb * C : (nb + n) * C].reshape(H, R, n, C, -1)[..., :D]
        q_info = info[:, :, nb * C : (nb + n) * C].reshape(H, R, n, C, -1)
        keys, k_info = windows(buf), windows(info)
        scores = self._scores(upcast(queries), keys, D)
        scores = self._mask(scores, q_info.unsqueeze(4), k_info.unsqueeze(3))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        out = torch.einsum("hrncw,hrnwd->hrncd", probs, upcast(keys[..., -D:]))
        return out.reshape(H, R, n * C, D), lse.reshape(H, R, n * C)

    def _scores(self, queries: Tensor, keys: Tensor, D: int) -> Tensor:
        """(H, R, n, C, W) q . k_hat, the keys the unit-length query-keys."""
        k = unit_keys(keys[..., :D], self.route.key_norm)
        return torch.einsum("hrncd,hrnwd->hrncw", queries, upcast(k))

    def _mask(self, scores: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        """Scores of the pairs outside the candidate set to MASK_SCORE, minus log N_ij
        (dedup), the self pair to SELF_SCORE. qi (.., C, 1, M), ki (.., 1, W, M)."""
        route, R = self.route, self.R
        allowed = (qi[..., _POS] >= 0) & (ki[..., _POS] >= 0)
        if route.causal:
            allowed &= ki[..., _POS] <= qi[..., _POS]
        if route.mode == "window":  # j one of i's chunk_len nearest earlier bucket-mates, or i
            gap = qi[..., _SLOT] - ki[..., _SLOT]
            allowed &= (
                (qi[..., _BUCKET] == ki[..., _BUCKET]) & (gap >= 0) & (gap <= route.chunk_len)
            )
        if route.dedup and R > 1:
            count = sum(self._member(qi, ki, rr) for rr in range(R))
            scores = scores - torch.log(count.clamp(min=1).to(scores.dtype))
        scores = scores.masked_fill(~allowed, MASK_SCORE)
        return scores.masked_fill(allowed & (ki[..., _POS] == qi[..., _POS]), SELF_SCORE)

    def _member(self, qi: Tensor, ki: Tensor, rr: int) -> Tensor:
        """Whether j is in S_rr(i), as int, from both tokens' slots and buckets in round rr."""
        route, R = self.route, self.R
        qs, ks = qi[..., _EVERY + rr], ki[..., _EVERY + rr]
        if route.mode == "window":
            qb, kb = qi[..., _EVERY + R + rr], ki[..., _EVERY + R + rr]
            ok = (qb == kb) & (qs - ks >= 0) & (qs - ks <= route.chunk_len)
        else:
            diff = ks // route.chunk_len - qs // route.chunk_len
            ok = (diff >= -route.before) & (diff <= route.after)
        if route.causal:
            ok &= ki[..., _POS] <= qi[..., _POS]
        return ok.to(torch.int8)

"""LSH's sorted layout: each group of heads sorted by (head, round, bucket, position), and
the int8 pair codes of its chunk windows (lsh.py's core reads both).

Legend: G heads in the group, R hash rounds, K buckets, Lp padded length, C chunk length,
N = Lp / C chunks per round, S = R * Lp sorted slots per head, W keys per chunk row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from . import tiles
from .chunked import row_slices

# The pair-code keys are int32 while they stay below this (doubled, they must fit), else int64.
INT32_KEYS_BELOW = 1 << 30


def with_filler(x: Tensor, front: int, back: int = 0, value: int | float = 0) -> Tensor:
    """x (S, ...) -> (front + S + back, ...) with filler slots at both ends (the windows of
    the first and last rows reach into them)."""
    buf = x.new_empty((front + x.shape[0] + back, *x.shape[1:]))
    buf[:front] = value
    buf[front : front + x.shape[0]] = x
    buf[front + x.shape[0] :] = value
    return buf


@dataclass(frozen=True)
class Layout:
    """How the sorted chunks attend: chunk length, mode, causality, look-back wrap (only
    with more than one chunk per round), duplicate correction, neighbouring chunks."""

    chunk_len: int
    mode: str
    causal: bool
    wrap: bool
    dedup: bool
    before: int = 1
    after: int = 0

    @property
    def width(self) -> int:
        """W: keys per chunk row."""
        return (self.before + 1 + self.after) * self.chunk_len


@dataclass
class _SortedGroup:
    """A group of G heads sorted by (head, round, bucket, position); S = R * Lp slots a head."""

    shape: tuple[int, int, int]  # (G, R, Lp)
    rb: Tensor  # (G * S,) head- and round-qualified bucket id of each sorted slot
    order: Tensor  # (G * S,) the (head, round, position) index that each sorted slot holds
    src: Tensor  # (G * S,) the row of (G * Lp) that each sorted slot reads
    undo: Tensor  # (G * S,) the sorted slot of each (head, round, position)
    real: Tensor  # (G * S,) bool: the slot holds a real token, not padding
    pos: Tensor  # (G, R, Lp) position of each (head, round, position), expanded


@torch.no_grad()
def group_layout(
    buckets: Tensor, n_buckets: int, layout: Layout, codes: Tensor, kernels=(False, True)
) -> tuple[Tensor, Tensor]:
    """Sort a group of G heads and write their pair codes.

    buckets: (G, R, Lp), padding in bucket K = n_buckets. codes: (G * R * N, C, W) int8,
    written: 0 if key j of the row's window is not in S_r(i), else N_ij (1 without dedup).
    Returns src (G * S,): the row of (G * Lp) each sorted slot reads, and undo (G * R * Lp,):
    the sorted slot of each (head, round, position). Slots are ordered by (head, round,
    bucket, position). kernels: (compiled, auto) as `tiles.run` takes them; window mode's
    codes then come from one compiled loop (`tiles.compiled_band`).
    """
    G, R, Lp = buckets.shape
    group = _sort_group(buckets, n_buckets)
    keys = _round_keys(group, layout)
    count_rounds = R > 1 and layout.dedup
    rows = G * R * (Lp // layout.chunk_len)
    if layout.mode == "window":
        _window_codes(group, keys, layout, rows, count_rounds, codes, kernels)
        return group.src, group.undo
    pos_sorted = group.pos.to(torch.int32).reshape(-1)[group.order]  # (G * S,)
    _chunk_codes(group, pos_sorted, keys, layout, count_rounds, codes)
    if layout.wrap:
        _wrap_look_back(group, pos_sorted, layout, codes)
    return group.src, group.undo


def _sort_group(buckets: Tensor, K: int) -> _SortedGroup:
    """Sort the slots of buckets (G, R, Lp) by (head, round, bucket, position)."""
    G, R, Lp = buckets.shape
    device = buckets.device
    # Head- and round-qualified bucket id: equal ids mean same head, round and bucket.
    qual = (torch.arange(G, device=device)[:, None] * R + torch.arange(R, device=device)) * (K + 1)
    rb = (buckets + qual[..., None]).view(-1)  # (G * S,) in (head, round, position) order
    rb_s, order = torch.sort(rb, stable=True)  # stable: positions ascend within a bucket
    # Gathers rather than integer division by S and Lp (several times slower than a gather).
    pos = torch.arange(Lp, device=device).expand(G, R, Lp)
    src = (pos + (torch.arange(G, device=device) * Lp)[:, None, None]).reshape(-1)[order]
    undo = torch.empty_like(order)
    undo[order] = torch.arange(order.numel(), device=device)
    real_s = (buckets != K).view(-1)[order]  # (G * S,) the slot holds a real token
    return _SortedGroup((G, R, Lp), rb_s, order, src, undo, real_s, pos)


def _round_keys(group: _SortedGroup, layout: Layout) -> tuple[Tensor, Tensor, int]:
    """(e_q (R, G * S), e_k (R, P + G * S + Q), T): each round's doubled e of the token in
    every sorted slot, shifted for queries and with filler for keys, so that j is in S_r(i)
    exactly when |e_q[r, i] - e_k[r, j]| <= T."""
    G, R, Lp = group.shape
    C = layout.chunk_len
    # e(x) per round: j is in S_r(i) exactly when lo <= e_r(i) - e_r(j) <= hi.
    #   chunk:  e = chunk index in sorted order, [lo, hi] = [-after, before];
    #   window: e = sorted slot + bucket id * (C + 1), [lo, hi] = [0, C]: the slots of one
    #           bucket are consecutive, and the spacing puts different buckets more than C
    #           apart.
    slot = torch.arange(G * R * Lp, device=group.rb.device)
    if layout.mode == "chunk":
        e_slot, lo, hi = slot.div(C, rounding_mode="floor"), -layout.after, layout.before
    else:
        e_slot, lo, hi = slot + group.rb * (C + 1), 0, C
    e_tok = e_slot[group.undo].view(G, R, Lp)  # e of each (head, round, position)
    # e of every round for the token in each sorted slot, doubled so that one test suffices:
    # lo <= d <= hi  <=>  |2 d - (lo + hi)| <= T = hi - lo.
    # (R, G * S); int32 halves the memory traffic of the counting passes when e fits in it
    small = int(e_slot.max()) < INT32_KEYS_BELOW
    e_all = (2 * e_tok).transpose(0, 1).reshape(R, G * Lp)[:, group.src]
    e_all = e_all.to(torch.int32) if small else e_all
    e_q, T = e_all - (lo + hi), hi - lo
    P, Q = layout.before * C, layout.after * C
    e_k = torch.cat([e_all.new_zeros(R, P), e_all, e_all.new_zeros(R, Q)], dim=1)  # fillers
    return e_q, e_k, T


def _window_codes(
    group: _SortedGroup,
    keys: tuple[Tensor, Tensor, int],
    layout: Layout,
    rows: int,
    count_rounds: bool,
    codes: Tensor,
    kernels: tuple[bool, bool] = (False, True),
) -> None:
    """Window mode: write each row's band of candidates into codes (rows, C, 2C).

    Candidates sit in a band of the (C, 2C) layout: query c, key c + t, t = 0..C (the C
    nearest earlier slots and itself). Same-bucket keys in it are earlier positions.
    """
    C = layout.chunk_len
    e_q, e_k, T = keys
    q_id = torch.where(group.real, group.rb, -2).to(e_k.dtype)  # padded queries match nothing
    k_id = with_filler(group.rb.to(e_k.dtype), C, value=-1)
    codes.zero_()
    for sl in row_slices(rows, C * (C + 1)):
        m, a = sl.stop - sl.start, sl.start * C
        n = m * C
        if tiles.compiling(kernels[0]):
            try:
                count = tiles.compiled_band(
                    q_id[a : a + n], k_id[a : a + n + C], e_q[:, a : a + n],
                    e_k[:, a : a + n + C], T, C, count_rounds,
                )  # fmt: skip
            except Exception as exc:  # torch.compile raises many types; all mean "not here"
                tiles.compile_failed(exc, kernels[1])
        if not tiles.compiling(kernels[0]):
            # (C + G*S,) -> (m, C, C + 1): x[a + mC + c + t], the keys of the band
            band = functools.partial(strided, shape=(m, C, C + 1), strides=(C, 1, 1), at=a)
            ok = q_id[a : a + n].view(m, C, 1) == band(k_id)
            count = round_counts(e_q, e_k, a, m, C, T, band) if count_rounds else ok.to(torch.int8)
            count.mul_(ok)
        codes[sl].as_strided((m, C, C + 1), (2 * C * C, 2 * C + 1, 1)).copy_(
            count.view(m, C, C + 1)
        )


def _chunk_codes(
    group: _SortedGroup,
    pos_sorted: Tensor,
    keys: tuple[Tensor, Tensor, int],
    layout: Layout,
    count_rounds: bool,
    codes: Tensor,
) -> None:
    """Chunk mode: write the codes (G * R * N, C, W) of each row's window of neighbouring
    chunks; pos_sorted (G * S,) is the position of each sorted slot."""
    G, R, Lp = group.shape
    C, W, causal = layout.chunk_len, layout.width, layout.causal
    P, Q, N = layout.before * C, layout.after * C, Lp // C
    e_q, e_k, T = keys
    device = pos_sorted.device
    pos_s = with_filler(pos_sorted, P, Q)
    k_real = with_filler(group.real, P, Q, False)
    back_half = torch.arange(W, device=device) < C
    block = torch.arange(W, device=device).div(C, rounding_mode="floor") - layout.before
    for sl in row_slices(G * R * N, C * W):
        m, a = sl.stop - sl.start, sl.start * C

        # (P + G*S + Q,) -> (m, 1, W): x[a + mC + w], the keys of the window
        window = functools.partial(strided, shape=(m, 1, W), strides=(C, 0, 1), at=a)
        q_pos = pos_s[P + a : P + a + m * C].view(m, C, 1)
        ok = group.real[a : a + m * C].view(m, C, 1) & window(k_real)
        if layout.wrap:
            # Another round's copy of the query itself (only a look-back can hold one) is
            # dropped: transformers gives it the self score, which adds exactly nothing.
            ok = ok & ~(back_half & (window(pos_s) == q_pos))
        else:
            # No window crosses a round's ends: block b of row n (chunk n % N of its round)
            # holds chunk n % N + b, which must lie in 0..N-1.
            n_r = (torch.arange(sl.start, sl.stop, device=device) % N)[:, None] + block
            ok = ok & ((n_r >= 0) & (n_r < N))[:, None, :]
        if causal:
            ok = ok & (window(pos_s) <= q_pos)
        count = round_counts(e_q, e_k, a, m, C, T, window) if count_rounds else ok.to(torch.int8)
        codes[sl] = count.mul_(ok)


def _wrap_look_back(group: _SortedGroup, pos_sorted: Tensor, layout: Layout, codes: Tensor) -> None:
    """Rewrite the look-back half (C, C) of each head's first row: with wrap it sees the
    head's last C slots (round R-1's last chunk), not the C slots before it in the group."""
    G, R, Lp = group.shape
    C, S, N = layout.chunk_len, R * Lp, Lp // layout.chunk_len
    device = pos_sorted.device
    first_q = (torch.arange(G, device=device) * S)[:, None] + torch.arange(C, device=device)
    last_k = first_q + (S - C)  # (G, C)
    q_pos, k_pos = pos_sorted[first_q][:, :, None], pos_sorted[last_k][:, None, :]
    ok = group.real[first_q][:, :, None] & group.real[last_k][:, None, :] & (k_pos != q_pos)
    if layout.causal:
        ok = ok & (k_pos <= q_pos)
    codes[torch.arange(G, device=device) * (R * N), :, :C] = ok.to(torch.int8)


def strided(x: Tensor, *, shape: tuple[int, ...], strides: tuple[int, ...], at: int) -> Tensor:
    return x.as_strided(shape, strides, x.storage_offset() + at)


def round_counts(e_q, e_k, a, m, C, T, keys_view) -> Tensor:
    """N_ij for the rows' pairs: the number of rounds r with lo <= e_r(i) - e_r(j) <= hi,
    tested as |e_q - e_k| <= T on the shifted, doubled keys (`_round_keys`)."""
    count = None
    for r in range(e_q.shape[0]):
        d = e_q[r, a : a + m * C].view(m, C, 1) - keys_view(e_k[r])
        hit = d.abs_() <= T
        count = hit.to(torch.int8) if count is None else count.add_(hit)
    assert count is not None
    return count

"""LSH attention (Kitaev et al. 2020, sec. 2): hash, sort, attend within chunks, unsort, combine.

Legend: B batch, H heads, L length, Lp padded length (multiple of C), D head dim,
R hash rounds, K buckets, C chunk length, N = Lp / C chunks per round, S = R * Lp.

The candidate set S_r(i) of query i in round r:
  - mode "chunk" (the paper's): every j in i's sorted chunk or the previous chunk *of the
    same round* (encoders: the `before` chunks before it and the `after` chunks after it,
    1 and 1 by default; W = (before + 1 + after) C keys per chunk row);
  - mode "window" (strictly causal): j in i's bucket among its C nearest earlier
    bucket-mates. The sorted chunk + one-back layout always covers it, and it depends on
    positions <= i only, so no future token can move it.
Both keep j <= i when causal, drop padded keys, and give j == i the score SELF_SCORE.
Scores are s_ij = qk_i . qk_j / |qk_j| - log N_ij, with N_ij the number of rounds whose
candidate set holds j; combining rounds by their log-sum-exps is then exactly softmax over
the union of the candidate sets (`reference.lsh_attention_reference` builds that union).

The core (`_LSHCore`) is one autograd function. Heads are sorted in groups (bounded
memory whatever B * H is); rows of chunks are processed in slices of about 2^21 scores:
  - each slice gathers its queries, and its keys and values with the before * C slots
    before it and the after * C slots after it, into reused buffers; the key and value
    windows are overlapping strided views of them, never copies;
  - an int8 code per (query, key) pair of the window layout says 0 if j is not in S_r(i),
    else N_ij. Window mode computes codes on the band of C + 1 keys that can qualify only;
  - the backward pass keeps only the codes, the sort order, the output and two numbers per
    sorted slot (the row maximum and the row's share of the union's normaliser), and
    recomputes scores and probabilities slice by slice (as flash attention does). With P_rij
    the probability of pair (i, j) through round r within the union's softmax,
    dS_rij = P_rij (dO_i . v_j - dO_i . O_i): no per-round outputs are needed;
  - exp() never sees a denormal (tiles.EXP_FLOOR), and gradients go back to positions by
    index_add_.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import tiles
from .chunked import row_slices, slice_rows
from .common import (
    pad_to,
    padded_length,
    unit_keys,
    upcast,
    valid_positions,
)
from .hashing import (  # noqa: F401  (the hashing half of LSH, re-exported)
    FACTORISE_ABOVE,
    auto_n_buckets,
    bucket_factors,
    draw_rotations,
    hash_vectors,
)
from .lsh_layout import Layout, group_layout, strided

# Heads (B * H of them) are processed in groups of about this many sorted-slot values
# (heads x R x Lp x D): the sorted copies of q, k, v and their gradients exist for one group
# at a time, which bounds the working set whatever the batch and the number of heads.
GROUP_ENTRIES = 1 << 22


def lsh_attention(
    qk: Tensor,
    v: Tensor,
    rotations: tuple[Tensor, ...],
    *,
    chunk_len: int,
    causal: bool,
    mode: str,
    attention_mask: Tensor | None = None,
    kernel: str = "auto",
    wrap: bool = False,
    dedup: bool = True,
    key_norm: str = "l2",
    chunks_before: int = 1,
    chunks_after: int = 0,
) -> Tensor:
    """Shared-QK LSH attention.

    Args:
        qk: (B, H, L, D) shared query-key vectors.
        v: (B, H, L, D) values.
        rotations: from `draw_rotations`, one (H, D, R, K_f / 2) tensor per bucket factor.
        chunk_len: C; any L works (padded internally to a multiple of C).
        causal: keep only j <= i.
        mode: "window" (strictly causal; needs causal) or "chunk".
        attention_mask: optional (B, L) bool/int, True/1 at real tokens, False/0 at padding.
        kernel: "eager", "compiled" or "auto": how the elementwise work on the score tiles
            runs (`tiles.py`); the results agree to rounding.
        wrap: (chunk mode, dedup=False) the look-back of each round's first chunk is the
            previous round's last chunk, round 0's the last round's, as in transformers and
            trax; without it a round's first chunk has no look-back. A sequence of one chunk
            never wraps (transformers attends to it densely).
        dedup: subtract log N_ij from the scores (the union semantics); False: the rounds
            are combined by their log-sum-exps only.
        key_norm: "l2" or "rms" (`common.unit_keys`).
        chunks_before, chunks_after: (chunk mode) the neighbouring chunks of the same round a
            sorted chunk attends to, on each side; 1 and 0 for causal models (the paper's
            layout), any counts for non-causal ones.
    Returns:
        (B, H, L, D). Outputs at padded positions are finite but meaningless.
    """
    _check_layout(mode, causal, wrap, dedup, chunks_before, chunks_after)
    B, H, L, _ = qk.shape
    C = chunk_len
    R = rotations[0].shape[2]
    K = math.prod(2 * r.shape[-1] for r in rotations)
    Lp = padded_length(L, C)

    qk = pad_to(qk, Lp, dim=2)  # (B, H, Lp, D)
    v = pad_to(v, Lp, dim=2)
    valid = valid_positions(B, L, Lp, attention_mask, qk.device)  # (B, Lp)
    buckets = _bucket_ids(qk, rotations, valid, K)  # (B, H, R, Lp)
    kernels = (tiles.resolve_kernel(kernel, B * H * R * Lp, qk.device), kernel != "compiled")
    keys = tiles.fused_or_eager(*kernels, unit_keys, qk, key_norm)
    layout = Layout(C, mode, causal, wrap and Lp > C, dedup, chunks_before, chunks_after)
    out = _LSHCore.apply(qk, keys, v, buckets.reshape(B * H, R, Lp), K, layout, kernels)
    return out[:, :, :L]


def _check_layout(
    mode: str, causal: bool, wrap: bool, dedup: bool, chunks_before: int, chunks_after: int
) -> None:
    """The layouts `lsh_attention` supports (the model's config refuses the others first)."""
    assert mode in ("window", "chunk"), mode
    assert causal or mode == "chunk", "window mode is strictly causal: it needs causal=True"
    assert not wrap or (mode == "chunk" and not dedup), "wrap needs chunk mode without dedup"
    around = (chunks_before, chunks_after)
    assert around == (1, 0) or (mode == "chunk" and not wrap), "wider windows: chunk mode, no wrap"
    assert not causal or chunks_after == 0, "a causal model attends to no later chunk"


@torch.no_grad()
def _bucket_ids(qk: Tensor, rotations: tuple[Tensor, ...], valid: Tensor, K: int) -> Tensor:
    """Buckets (B, H, R, Lp) of the padded qk (B, H, Lp, D); valid (B, Lp). Padded positions
    get bucket K of their own, so they sort after every real token and never change the
    chunks real tokens fall in."""
    return hash_vectors(qk, rotations).masked_fill(~valid[:, None, None, :], K)


def _rows(x: Tensor) -> Tensor:
    """(B, H, Lp, D) -> (B * Lp * H, D), rows in (batch, position, head) order: a view when x
    is the head split of a (B, Lp, H * D) tensor, as the projections make it."""
    return x.transpose(1, 2).reshape(-1, x.shape[-1])


def _head_rows(heads: slice, Lp: int, H: int, device: torch.device) -> Tensor:
    """Row (of `_rows`) of each (head, position) of a group of (batch * head) indices: (G * Lp,)."""
    hr = torch.arange(heads.start, heads.stop, device=device)[:, None]
    pos = torch.arange(Lp, device=device)
    return (((hr // H) * Lp + pos) * H + hr % H).view(-1)


def _windows(buf: Tensor, rows: int, chunk_len: int, width: int) -> Tensor:
    """(rows, W, D) overlapping view of a buffer of sorted slots that starts with the
    before * C slots before its first chunk: window m is buffer slots [mC, mC + W)."""
    D = buf.shape[-1]
    return strided(buf, shape=(rows, width, D), strides=(chunk_len * D, D, 1), at=0)


def _row_slices(G: int, rows_per_head: int, per_row: int, wrap: bool) -> list[slice]:
    """Slices of a group's G * rows_per_head chunk rows. With the wrap no slice crosses a
    head: a head's first row looks back at the head's own last chunk, not the slots before."""
    if not wrap:
        return row_slices(G * rows_per_head, per_row)
    within = row_slices(rows_per_head, per_row)
    return [
        slice(h * rows_per_head + sl.start, h * rows_per_head + sl.stop)
        for h in range(G)
        for sl in within
    ]


def _wrapped(src: Tensor, sl: slice, rows_per_head: int, S: int, C: int, wrap: bool):
    """With the wrap, the sorted slots (C,) a head's first row looks back at (the head's
    last C slots) when the slice starts a head; else None (the slots before the slice)."""
    if wrap and sl.start % rows_per_head == 0:
        a = sl.start * C
        return src[a + S - C : a + S]
    return None


def _key_range(a: int, n: int, total: int, layout: Layout) -> tuple[int, int, int]:
    """The sorted slots [lo, hi) of a slice's key buffer that exist (the rest is filler)
    and the buffer index of slot lo; the buffer covers slots [a - before C, a + n + after C)."""
    start = a - layout.before * layout.chunk_len
    lo, hi = max(start, 0), min(a + n + layout.after * layout.chunk_len, total)
    return lo, hi, lo - start


class _LSHCore(torch.autograd.Function):
    """q, k (unit keys), v: (B, H, Lp, D); buckets (B * H, R, Lp) -> out (B, H, Lp, D).

    Each slice of chunk rows gathers its own queries, keys and values (the keys and values
    with the before * C slots before the slice and the after * C after it) into small reused
    buffers, so the sorted copies never exist whole; the backward pass adds each slice's
    gradients straight back to the positions (index_add_). Every per-slice and per-group
    tensor lives in a buffer allocated once per call (`_SliceBuffers`)."""

    @staticmethod
    def forward(ctx, q, k, v, buckets, n_buckets, layout, kernels):
        B, H, Lp, D = q.shape
        BH, R = B * H, buckets.shape[1]
        C, S = layout.chunk_len, R * Lp
        N = Lp // C
        stat = upcast(q[:1, :1, :1]).dtype
        W = layout.width
        codes = torch.empty(BH * R * N, C, W, dtype=torch.int8, device=q.device)
        src = torch.empty(BH * S, dtype=torch.long, device=q.device)  # slot -> row of q
        out = q.new_empty(B, Lp, H, D)  # returned as its (B, H, Lp, D) transpose
        # Per sorted slot: the row maximum and exp(lse_r - LSE) / total_r, so that the backward
        # pass recomputes P = exp(s - top) / N * scale (the share of the union's softmax)
        # with the forward's own numbers: no large normaliser enters a subtraction.
        top_all = torch.empty(BH * S, dtype=stat, device=q.device)
        scale_all = torch.empty(BH * S, dtype=stat, device=q.device)
        q_f, k_f, v_f = (_rows(x) for x in (q, k, v))
        bufs = _SliceBuffers(q_f, layout, BH * R * N)
        groups = row_slices(BH, S * D, GROUP_ENTRIES)
        G_max = groups[0].stop - groups[0].start
        o_all = q.new_empty(G_max * S, D)  # per sorted slot: its round's output
        total_all = torch.empty(G_max * S, dtype=stat, device=q.device)
        # The rounds are mixed in the statistics dtype (float32 for half-precision inputs).
        out_all = torch.empty(G_max * Lp, D, dtype=stat, device=q.device)
        o_r_all = q.new_empty(G_max * Lp, D)
        for g in groups:
            G, rows = g.stop - g.start, slice(g.start * R * N, g.stop * R * N)
            flat = slice(g.start * S, g.stop * S)
            src_g, undo = group_layout(buckets[g], n_buckets, layout, codes[rows], kernels)
            rows_g = _head_rows(g, Lp, H, q.device)  # (head, position) -> row of q_f
            src_g = rows_g[src_g]
            src[flat] = src_g
            o_s, top_s, total_s = o_all[: G * S], top_all[flat], total_all[: G * S]
            rows_f = (q_f, k_f, v_f)
            _attend_rounds(
                bufs, kernels, layout, rows_f, src_g, codes[rows], G, o_s, top_s, total_s
            )
            # Combine the rounds by their log-sum-exps.
            w_u = _round_weights(top_s, total_s, undo, G, R, Lp)  # (G, R, Lp)
            scale_all[flat] = w_u.view(-1).new_empty(G * S).index_copy_(0, undo, w_u.view(-1))
            scale_all[flat] /= total_s
            out_g, o_r = out_all[: G * Lp].view(G, Lp, D), o_r_all[: G * Lp]
            _mix_rounds(o_s, w_u, undo, out_g, o_r)
            out.view(-1, D).index_copy_(0, rows_g, out_g.view(-1, D).to(q.dtype))
        out = out.transpose(1, 2)
        ctx.save_for_backward(q, k, v, codes, src, top_all, scale_all, out)
        ctx.layout, ctx.kernels = layout, kernels
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, codes, src, top_all, scale_all, out = ctx.saved_tensors
        layout = ctx.layout
        C = layout.chunk_len
        B, H, Lp, D = q.shape
        R = codes.shape[0] // (B * H * (Lp // C))
        BH, S, N = B * H, R * Lp, Lp // C
        stat = top_all.dtype
        W = layout.width
        # dS = P * (dO . v_j - dO . O): the softmax backward over the union.
        dot = _rows(tiles.fused_or_eager(*ctx.kernels, _row_dot, d_out, out)).view(-1)
        q_f, k_f, v_f, do_f = (_rows(x) for x in (q, k, v, d_out))
        # Gradients accumulate over rounds and windows in the statistics dtype (float32 for
        # half-precision inputs); each slice's bmm results (in the inputs' dtype) add to them.
        dq, dk, dv = (torch.zeros(x.shape, dtype=stat, device=x.device) for x in (q_f, k_f, v_f))
        bufs = _SliceBuffers(q_f, layout, BH * R * N)
        around = W - C  # the key slots a buffer holds besides the slice's own
        do_t, dq_t, dk_t, dv_t = bufs.new(0), bufs.new(0), bufs.new(around), bufs.new(around)
        dot_t = dot.new_empty(bufs.max_rows * C)
        for g in row_slices(BH, S * D, GROUP_ENTRIES):
            rows = slice(g.start * R * N, g.stop * R * N)
            flat = slice(g.start * S, g.stop * S)
            src_g, top_s, scale_s, code_g = src[flat], top_all[flat], scale_all[flat], codes[rows]
            for sl in _row_slices(g.stop - g.start, R * N, C * W, layout.wrap):
                m, a = sl.stop - sl.start, sl.start * C
                n, idx = m * C, src_g[a : a + m * C]
                back = _wrapped(src_g, sl, R * N, S, C, layout.wrap)
                qt, kw, vw = bufs.gather(q_f, k_f, v_f, src_g, a, m, back)
                do = torch.index_select(do_f, 0, idx, out=do_t[:n]).view(m, C, D)
                s, dp = bufs.scores(0, qt, kw), bufs.scores(1, do, vw)
                ds, p = tiles.run(
                    *ctx.kernels,
                    "backward",
                    s,
                    code_g[sl],
                    layout.before * C,
                    top_s[a : a + n].view(m, C),
                    scale_s[a : a + n].view(m, C),
                    dp,
                    torch.index_select(dot, 0, idx, out=dot_t[:n]).view(m, C),
                )
                _add_rows(dq, idx, torch.bmm(ds, kw, out=dq_t[:n].view(m, C, D)).view(n, D))
                # Keys and values of the windows: block b of every window is buffer slots
                # [bC, bC + n) of the slice's key buffer, so one bmm per block adds them all
                # (block 0 writes slots [0, n), the others add; only the rest starts at 0).
                for grad, buf, x, y in ((dk, dk_t, ds, qt), (dv, dv_t, p, do)):
                    buf = buf[: around + n]
                    buf[n:].zero_()
                    for b in range(W // C):
                        blk = x[:, :, b * C : (b + 1) * C].transpose(1, 2)
                        at_b = buf[b * C : b * C + n].view(m, C, D)
                        torch.bmm(blk, y, out=at_b) if b == 0 else at_b.baddbmm_(blk, y)
                    if back is not None:  # the wrap: the head's last C slots
                        _add_rows(grad, back, buf[:C])
                        _add_rows(grad, idx, buf[C:])
                    else:  # the slots around the slice that exist (the rest is filler)
                        lo, hi, at = _key_range(a, n, src_g.numel(), layout)
                        _add_rows(grad, src_g[lo:hi], buf[at : at + hi - lo])
        dq, dk, dv = (x.to(q.dtype).view(B, Lp, H, D).transpose(1, 2) for x in (dq, dk, dv))
        return dq, dk, dv, None, None, None, None


def _row_dot(d_out: Tensor, out: Tensor) -> Tensor:
    """(B, H, Lp, D) twice -> (B, H, Lp, 1): dO . O per position, in float32 at least."""
    return (upcast(d_out) * upcast(out)).sum(-1, keepdim=True)


def _add_rows(grad: Tensor, index: Tensor, rows: Tensor) -> None:
    """grad[index] += rows, rows rounded up to grad's dtype (a half-precision slice's bmm
    result into a float32 accumulator)."""
    grad.index_add_(0, index, rows if rows.dtype == grad.dtype else rows.to(grad.dtype))


def _attend_rounds(
    bufs: _SliceBuffers,
    kernels: tuple[bool, bool],
    layout: Layout,
    rows_f: tuple[Tensor, Tensor, Tensor],
    src_g: Tensor,
    codes_g: Tensor,
    G: int,
    o_s: Tensor,
    top_s: Tensor,
    total_s: Tensor,
) -> None:
    """Each round's attention within the sorted chunks of a group of G heads, slice by slice.

    rows_f: q, k, v as rows (B * Lp * H, D); src_g (G * S,): the row each sorted slot reads;
    codes_g (G * R * N, C, W). Writes, per sorted slot, its round's output o_s (G * S, D),
    its row maximum top_s and its normaliser total_s (both (G * S,)).
    """
    q_f, k_f, v_f = rows_f
    C, W, D = layout.chunk_len, layout.width, q_f.shape[-1]
    RN = codes_g.shape[0] // G  # chunk rows per head: R * N
    for sl in _row_slices(G, RN, C * W, layout.wrap):
        m, a = sl.stop - sl.start, sl.start * C
        n = m * C
        back = _wrapped(src_g, sl, RN, RN * C, C, layout.wrap)
        qt, kw, vw = bufs.gather(q_f, k_f, v_f, src_g, a, m, back)
        s = bufs.scores(0, qt, kw)
        p = tiles.run(
            *kernels,
            "forward",
            s,
            codes_g[sl],
            layout.before * C,
            top_s[a : a + n].view(m, C),
            total_s[a : a + n].view(m, C),
        )
        torch.bmm(p.to(v_f.dtype), vw, out=o_s[a : a + n].view(m, C, D))


def _round_weights(top_s: Tensor, total_s: Tensor, undo: Tensor, G: int, R: int, Lp: int) -> Tensor:
    """(G, R, Lp): each position's weight of round r, the softmax over the rounds of their
    log-sum-exps; top_s, total_s (G * S,) per sorted slot, undo (G * S,) slot of each
    (head, round, position)."""
    lse_s = top_s + total_s.log()
    return torch.softmax(lse_s.index_select(0, undo).view(G, R, Lp), dim=1)


def _mix_rounds(o_s: Tensor, w: Tensor, undo: Tensor, out_g: Tensor, o_r: Tensor) -> None:
    """out_g (G, Lp, D) = sum over r of w[:, r] times round r's output at each position;
    o_s (G * S, D) per sorted slot, w (G, R, Lp), o_r a (G * Lp, D) scratch buffer."""
    G, R, Lp = w.shape
    undo = undo.view(G, R, Lp)
    for r in range(R):
        torch.index_select(o_s, 0, undo[:, r].reshape(-1), out=o_r)
        if r == 0:
            torch.mul(o_r.view(G, Lp, -1), w[:, 0, :, None], out=out_g)
        else:
            out_g.addcmul_(o_r.view(G, Lp, -1), w[:, r, :, None])


class _SliceBuffers:
    """Reused per-slice buffers: a slice's queries (m C, D), and its keys and values with the
    slots around it (W - C + m C, D), gathered in sorted order; two (m, C, W) score tiles in
    the inputs' dtype (bmm writes them; the tile kernels compute in float32 or wider)."""

    def __init__(self, like: Tensor, layout: Layout, rows: int) -> None:
        C, W = layout.chunk_len, layout.width
        self.like, self.C, self.layout = like, C, layout
        self.max_rows = min(rows, slice_rows(C * W))
        self.qt, self.kt, self.vt = self.new(0), self.new(W - C), self.new(W - C)
        self.tiles = [like.new_empty(self.max_rows, C, W) for _ in range(2)]

    def new(self, extra: int) -> Tensor:
        return self.like.new_empty(extra + self.max_rows * self.C, self.like.shape[-1])

    def scores(self, which: int, a: Tensor, b: Tensor) -> Tensor:
        """a (m, C, D) @ b (m, W, D)^T into score tile `which`."""
        return torch.bmm(a, b.transpose(1, 2), out=self.tiles[which][: a.shape[0]])

    def gather(self, q_f: Tensor, k_f: Tensor, v_f: Tensor, src: Tensor, a: int, m: int, back):
        """Slots [a, a + m C) of `src`: queries (m, C, D); key and value windows (m, W, D).
        back (`_wrapped`): the slots a head's first row looks back at, or None."""
        C, D, n, layout = self.C, q_f.shape[-1], m * self.C, self.layout
        qt = torch.index_select(q_f, 0, src[a : a + n], out=self.qt[:n]).view(m, C, D)
        lo, hi, at = _key_range(a, n, src.numel(), layout)
        size = layout.width - C + n
        windows = []
        for x, buf in ((k_f, self.kt), (v_f, self.vt)):
            if back is not None:  # the wrap (before 1, after 0): the head's last C slots
                torch.index_select(x, 0, back, out=buf[:C])
                torch.index_select(x, 0, src[a : a + n], out=buf[C : C + n])
            else:
                # Filler where the windows reach past the group's ends: zeros, whose pairs
                # are never candidates (their codes are 0).
                buf[:at].zero_()
                torch.index_select(x, 0, src[lo:hi], out=buf[at : at + hi - lo])
                buf[at + hi - lo : size].zero_()
            windows.append(_windows(buf, m, C, layout.width))
        return qt, windows[0], windows[1]

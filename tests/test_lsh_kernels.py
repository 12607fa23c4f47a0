"""The compiled tile kernels (torch.compile) against the eager ones and the union reference,
and how a kernel is chosen."""

import pytest
import torch

from reformer import ReformerConfig
from reformer.attention import chunked, tiles
from reformer.attention.lsh import draw_rotations, lsh_attention
from reformer.attention.lsh_layout import Layout, group_layout
from reformer.attention.reference import lsh_attention_reference

F64 = torch.float64
MODES = [("chunk", False), ("chunk", True), ("window", True)]

needs_compiler = pytest.mark.skipif(
    not tiles.compiler_available(torch.device("cpu")),
    reason="torch.compile needs a C++ compiler on CPU (install g++)",
)


def _inputs(dtype, B=2, H=2, L=45, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, H, L, D, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, H, L, D, dtype=dtype, generator=g).requires_grad_()
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :3] = False  # left padding in one row
    mask[0, -4:] = False  # right padding in the other
    mask[1, L // 2] = False  # and a hole
    return qk, v, mask


def _grads(out, inputs, mask, seed=1):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out.shape, dtype=out.dtype, generator=g) * mask[:, None, :, None]
    return out * mask[:, None, :, None], torch.autograd.grad(out, inputs, up)


@needs_compiler
@pytest.mark.parametrize("mode,causal", MODES)
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_compiled_equals_union_reference(mode, causal, n_hashes, monkeypatch):
    """float64, padding, batch 2, a length that is not a multiple of the chunk, and slices of
    5 rows, so that the last slice of a group has fewer rows (the kernels' dynamic size)."""
    monkeypatch.setattr(chunked, "SLICE_ENTRIES", 5 * 4 * 8)
    qk, v, mask = _inputs(F64)
    rot = draw_rotations(2, 6, n_hashes, 8, dtype=F64)
    kw = dict(chunk_len=4, causal=causal, mode=mode, attention_mask=mask)
    out, g_out = _grads(lsh_attention(qk, v, rot, kernel="compiled", **kw), (qk, v), mask)
    ref, g_ref = _grads(lsh_attention_reference(qk, v, rot, **kw), (qk, v), mask)
    assert (out - ref).abs().max() < 1e-10
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() < 1e-10


@needs_compiler
@pytest.mark.parametrize("mode,causal", MODES)
def test_compiled_equals_eager_float32(mode, causal, monkeypatch):
    """float32 at a size with several slices: the two kernels agree to float32 rounding."""
    monkeypatch.setattr(chunked, "SLICE_ENTRIES", 7 * 4 * 8)
    qk, v, mask = _inputs(torch.float32, L=203, D=16, seed=3)
    rot = draw_rotations(2, 16, 4, 16)
    kw = dict(chunk_len=4, causal=causal, mode=mode, attention_mask=mask)
    out_c, g_c = _grads(lsh_attention(qk, v, rot, kernel="compiled", **kw), (qk, v), mask)
    out_e, g_e = _grads(lsh_attention(qk, v, rot, kernel="eager", **kw), (qk, v), mask)
    assert (out_c - out_e).abs().max() < 1e-5
    for a, b in zip(g_c, g_e):
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())


@needs_compiler
def test_tile_kernels_agree():
    """The kernels themselves on random tiles, including a row without candidates (a padded
    query) and the self score on the diagonal; float64, so the agreement is exact up to the
    last few bits. Both write their results over their inputs."""
    g = torch.Generator().manual_seed(0)
    m, C = 6, 4
    s = torch.randn(m, C, 2 * C, dtype=F64, generator=g) * 3
    code = torch.randint(0, 4, (m, C, 2 * C), generator=g).to(torch.int8)
    code.diagonal(offset=C, dim1=1, dim2=2).fill_(1)
    code[2, 1] = 0  # no candidate in this row
    rows = [torch.empty(m, C, dtype=F64) for _ in range(4)]
    p_c = tiles.compiled_forward(s.clone(), code, C, rows[0], rows[1])
    p_e = tiles.eager_forward(s.clone(), code, C, rows[2], rows[3])
    for a, b in ((p_c, p_e), (rows[0], rows[2]), (rows[1], rows[3])):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-300)
    top, total = rows[2], rows[3]
    assert p_e[2, 1].abs().max() == 0 and (p_e[code == 0] == 0).all()
    assert torch.allclose(p_e.sum(-1)[code.amax(-1) > 0], torch.ones((), dtype=F64))

    scale = torch.rand(m, C, dtype=F64, generator=g)
    dp = torch.randn(m, C, 2 * C, dtype=F64, generator=g)
    dot = torch.randn(m, C, dtype=F64, generator=g)
    ds_c, pb_c = tiles.compiled_backward(s.clone(), code, C, top, scale, dp.clone(), dot)
    ds_e, pb_e = tiles.eager_backward(s.clone(), code, C, top, scale, dp.clone(), dot)
    assert torch.allclose(pb_c, pb_e, rtol=1e-13, atol=1e-300)
    assert torch.allclose(ds_c, ds_e, rtol=1e-13, atol=1e-300)
    assert torch.allclose(ds_e, (dp - dot[..., None]) * pb_e, rtol=1e-13, atol=1e-300)
    # With scale = 1 / total, the backward pass recomputes exactly the forward's p.
    _, p_again = tiles.compiled_backward(s.clone(), code, C, top, total.reciprocal(), dp, dot)
    assert torch.allclose(p_again, p_e, rtol=1e-13, atol=1e-300)


@needs_compiler
@pytest.mark.parametrize("rounds,dedup", [(1, True), (2, True), (4, True), (3, False)])
def test_compiled_window_codes_equal_eager(rounds, dedup, monkeypatch):
    """Window mode's pair codes from the compiled band loop equal the eager passes exactly:
    3 heads, padding, a length of 11 chunks and slices of 7 rows (the last one shorter)."""
    monkeypatch.setattr(chunked, "SLICE_ENTRIES", 7 * 4 * 5)
    G, C, Lp, K = 3, 4, 44, 5
    buckets = torch.randint(0, K, (G, rounds, Lp), generator=torch.Generator().manual_seed(3))
    buckets[1, :, -6:] = K  # padding sorts last, in a bucket of its own
    layout = Layout(C, "window", True, False, dedup)
    rows = G * rounds * (Lp // C)
    codes = {}
    for compiled in (False, True):
        codes[compiled] = torch.full((rows, C, 2 * C), 9, dtype=torch.int8)
        src = group_layout(buckets, K, layout, codes[compiled], (compiled, False))
    assert torch.equal(codes[True], codes[False])
    assert int(codes[False].max()) == (rounds if dedup else 1) and len(src[0]) == G * rounds * Lp


def test_kernel_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("REFORMER_LSH_KERNEL", raising=False)
    monkeypatch.setattr(tiles, "compiler_available", lambda device: True)
    assert tiles.resolve_kernel("eager", 1 << 30, cpu) is False
    assert tiles.resolve_kernel("compiled", 1, cpu) is True
    assert tiles.resolve_kernel("auto", tiles.AUTO_COMPILE_SLOTS - 1, cpu) is False
    assert tiles.resolve_kernel("auto", tiles.AUTO_COMPILE_SLOTS, cpu) is True
    monkeypatch.setenv("REFORMER_LSH_KERNEL", "eager")  # overrides "auto" only
    assert tiles.resolve_kernel("auto", 1 << 30, cpu) is False
    assert tiles.resolve_kernel("compiled", 1, cpu) is True
    monkeypatch.setenv("REFORMER_LSH_KERNEL", "fast")
    with pytest.raises(ValueError, match="REFORMER_LSH_KERNEL"):
        tiles.resolve_kernel("auto", 1, cpu)
    monkeypatch.delenv("REFORMER_LSH_KERNEL")
    monkeypatch.setattr(tiles, "compiler_available", lambda device: False)
    assert tiles.resolve_kernel("auto", 1 << 30, cpu) is False
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        tiles.resolve_kernel("compiled", 1, cpu)
    with pytest.raises(ValueError, match="lsh_kernel"):
        ReformerConfig(lsh_kernel="fused")


def test_auto_falls_back_to_eager_when_compilation_fails(monkeypatch):
    """Under "auto" a compilation failure warns once and the result is eager's; under
    "compiled" it is an error."""

    def broken(*args):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(tiles, "_compiled", broken)  # every compiled kernel fails
    monkeypatch.setattr(tiles, "compiler_available", lambda device: True)
    monkeypatch.setattr(tiles, "AUTO_COMPILE_SLOTS", 1)
    monkeypatch.setattr(tiles, "_compile_failed", None)
    monkeypatch.delenv("REFORMER_LSH_KERNEL", raising=False)
    qk, v, mask = _inputs(F64, L=21)
    rot = draw_rotations(2, 6, 2, 8, dtype=F64)
    kw = dict(chunk_len=4, causal=True, mode="window", attention_mask=mask)
    with pytest.raises(RuntimeError, match="no compiler today"):
        lsh_attention(qk, v, rot, kernel="compiled", **kw)
    with pytest.warns(RuntimeWarning, match="falls back to eager"):
        out, g_auto = _grads(lsh_attention(qk, v, rot, kernel="auto", **kw), (qk, v), mask)
    assert tiles._compile_failed is not None
    assert tiles.resolve_kernel("auto", 1 << 30, torch.device("cpu")) is False
    ref, g_eager = _grads(lsh_attention(qk, v, rot, kernel="eager", **kw), (qk, v), mask)
    assert torch.equal(out, ref)
    for a, b in zip(g_auto, g_eager):
        assert torch.equal(a, b)

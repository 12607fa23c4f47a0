"""bf16 attention against the float64 reference: LSH (both tile kernels), local and full.

The inputs are drawn in bf16 and the reference runs on the same values in float64, so the
difference is the bf16 arithmetic alone: matmuls in bf16 (fp32 accumulation inside them),
softmax statistics, round mixing and gradient accumulation in float32. The tolerance is a
relative one (the largest error over the largest reference value, at real positions):
BF16_TOL, about 8 bf16 unit roundoffs (2^-8 each); measured errors are 0.3-1.1%.
"""

import pytest
import torch

from reformer.attention import full_attention, local_attention, tiles
from reformer.attention.lsh import draw_rotations, lsh_attention
from reformer.attention.reference import dense_attention_reference, lsh_attention_reference

BF16_TOL = 3e-2
MODES = [("chunk", False), ("chunk", True), ("window", True)]
KERNELS = ["eager"] + (["compiled"] if tiles.compiler_available(torch.device("cpu")) else [])


def _case(B=2, H=2, L=203, D=16, seed=3, shared=True):
    """bf16 inputs (odd length, batch 2, padding on both sides and a hole), an upstream
    gradient that is zero at padded positions, and the mask."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, H, L, D, generator=g).bfloat16() for _ in range(2 if shared else 3)]
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :3] = False
    mask[0, -4:] = False
    mask[1, L // 2] = False
    up = torch.randn(B, H, L, D, generator=g) * mask[:, None, :, None]
    return xs, mask, up


def _run(fn, xs, up, dtype):
    """fn's output and its inputs' gradients, with xs cast to dtype."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in xs]
    out = fn(*leaves)
    assert out.dtype == dtype
    out.backward(up.to(dtype))
    return out, [x.grad for x in leaves]


def _assert_close(got, ref, mask, what):
    m = mask[:, None, :, None]
    err = ((got.double() - ref) * m).abs().max().detach()
    scale = (ref * m).abs().max().detach()
    assert err <= BF16_TOL * scale, f"{what}: relative error {float(err / scale):.4f}"


def _check(fn, ref_fn, xs, mask, up):
    out, grads = _run(fn, xs, up, torch.bfloat16)
    ref, ref_grads = _run(ref_fn, xs, up, torch.float64)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    _assert_close(out, ref, mask, "output")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        _assert_close(g, r, mask, f"gradient of input {i}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode,causal", MODES)
@pytest.mark.parametrize("n_hashes", [1, 4])
def test_lsh_bf16_tracks_float64(kernel, mode, causal, n_hashes):
    xs, mask, up = _case()
    rot = draw_rotations(2, 16, n_hashes, 16)
    kw = dict(chunk_len=4, causal=causal, mode=mode, attention_mask=mask)

    def ours(qk, v):
        return lsh_attention(qk, v, rot, kernel=kernel, **kw)

    def ref(qk, v):
        return lsh_attention_reference(qk, v, tuple(r.double() for r in rot), **kw)

    _check(ours, ref, xs, mask, up)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_local_bf16_tracks_float64(shared, causal):
    xs, mask, up = _case(shared=shared)
    kw = dict(chunk_len=4, causal=causal, attention_mask=mask)

    def split(xs):
        return (xs[0], None, xs[1]) if shared else tuple(xs)

    _check(
        lambda *x: local_attention(*split(x), **kw),
        lambda *x: dense_attention_reference(*split(x), **kw),
        xs,
        mask,
        up,
    )


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_full_bf16_tracks_float64(shared, causal):
    xs, mask, up = _case(L=61, shared=shared)
    kw = dict(causal=causal, attention_mask=mask)

    def split(xs):
        return (xs[0], None, xs[1]) if shared else tuple(xs)

    _check(
        lambda *x: full_attention(*split(x), **kw),
        lambda *x: dense_attention_reference(*split(x), **kw),
        xs,
        mask,
        up,
    )


def test_lsh_bf16_gradients_accumulate_in_float32(monkeypatch):
    """Many rounds add into each position's gradient: accumulated in bf16 they would drift
    by a unit roundoff per addition; in float32 the error stays at one rounding of inputs."""
    xs, mask, up = _case(L=96, D=8)
    rot = draw_rotations(2, 8, 8, 8)
    kw = dict(chunk_len=4, causal=True, mode="window", attention_mask=mask, kernel="eager")
    seen: set[torch.dtype] = set()  # the dtypes index_add_ accumulates into
    real_add = torch.Tensor.index_add_

    def spy(self, dim, index, source, **kwargs):
        seen.add(self.dtype)
        return real_add(self, dim, index, source, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_add_", spy)
    _, grads = _run(lambda qk, v: lsh_attention(qk, v, rot, **kw), xs, up, torch.bfloat16)
    assert seen == {torch.float32}
    assert all(g.dtype == torch.bfloat16 for g in grads)

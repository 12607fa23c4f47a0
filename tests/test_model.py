"""ReformerLM: strict causality, reversible gradients, chunking, padding, dtypes, API."""

import pytest
import torch

from helpers import rel_err
from reformer import ReformerConfig, ReformerLM
from reformer.model import cross_entropy_reference

F64 = torch.float64


def small(**kw) -> ReformerConfig:
    base = dict(
        vocab_size=37,
        d_model=24,
        n_heads=2,
        d_ff=40,
        n_layers=3,
        max_seq_len=256,
        n_hashes=2,
        chunk_len=4,
        ff_chunk_len=None,
        loss_chunk_len=None,
    )
    base.update(kw)
    return ReformerConfig(**base)


def seeded(model, *args, seed=11, **kw):
    torch.manual_seed(seed)  # the same hash rotations (and dropout) for every call
    return model(*args, **kw)


# --- 3. strict causality ----------------------------------------------------------------
def _max_change_before(model, L, j, trials=8):
    """Largest change of logits at positions < j when token j is changed."""
    worst = 0.0
    for t in range(trials):
        g = torch.Generator().manual_seed(100 + t)
        ids = torch.randint(0, 37, (2, L), generator=g)
        other = ids.clone()
        other[:, j] = (ids[:, j] + 1 + t) % 37
        with torch.no_grad():
            a, b = seeded(model, ids, seed=t), seeded(model, other, seed=t)
        worst = max(worst, float((a[:, :j] - b[:, :j]).abs().max()))
    return worst


@pytest.mark.parametrize("attention", ["lsh", "local,lsh,full"])
def test_window_mode_is_strictly_causal(attention):
    model = ReformerLM(small(attention=attention, lsh_mode="window", n_buckets=8)).double()
    model.eval()
    for j in (5, 30, 61):
        assert _max_change_before(model, 64, j) < 1e-10


def test_chunk_mode_leaks_the_future():
    """The companion: the paper's sort-then-chunk layout lets a future token move earlier
    tokens' chunk boundaries, so the same check fails in chunk mode."""
    model = ReformerLM(small(lsh_mode="chunk", n_buckets=8)).double().eval()
    assert _max_change_before(model, 64, 40) > 1e-6


# --- 4. reversible backward == plain autograd -------------------------------------------
@pytest.mark.parametrize("attention", ["lsh", "local,lsh,full"])
def test_reversible_gradients_equal_plain_autograd(attention):
    cfg = small(attention=attention, dropout=0.1, n_hashes=2, ff_chunk_len=7)
    model = ReformerLM(cfg).double().train()
    ids = torch.randint(0, 37, (2, 45))
    targets = torch.randint(0, 37, (2, 45))
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, -6:] = False
    targets[1, -6:] = -100

    def run(custom):
        model.custom_backward = custom
        model.zero_grad()
        torch.manual_seed(7)
        loss = model.loss(ids, targets, attention_mask=mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_rev, g_rev = run(True)
    loss_ref, g_ref = run(False)
    assert torch.equal(loss_rev, loss_ref)
    for name, g in g_ref.items():
        assert g.abs().max() > 0, name  # every parameter takes part
        assert rel_err(g_rev[name], g) < 1e-8, name


def test_dropout_is_active_and_replayed():
    model = ReformerLM(small(dropout=0.3)).double().train()
    ids = torch.randint(0, 37, (1, 20))
    assert not torch.equal(seeded(model, ids, seed=1), seeded(model, ids, seed=2))
    assert torch.equal(seeded(model, ids, seed=1), seeded(model, ids, seed=1))
    model.eval()
    # in eval mode an LSH model still draws fresh hash rotations per call
    assert not torch.equal(seeded(model, ids, seed=1), seeded(model, ids, seed=2))
    model = ReformerLM(small(dropout=0.3, attention="local")).double().eval()
    assert torch.equal(seeded(model, ids, seed=1), seeded(model, ids, seed=2))


# --- 5. chunked feed-forward and loss == unchunked ---------------------------------------
@pytest.mark.parametrize("reversible", [True, False])
def test_chunked_ff_and_loss_equal_unchunked(reversible):
    ids = torch.randint(0, 37, (2, 43))
    targets = torch.randint(0, 37, (2, 43))
    targets[0, :10] = -100
    results = []
    for ff_chunk, loss_chunk in [(None, None), (5, 7), (16, 1)]:
        torch.manual_seed(0)
        model = ReformerLM(
            small(reversible=reversible, ff_chunk_len=ff_chunk, loss_chunk_len=loss_chunk)
        ).double()
        torch.manual_seed(3)
        loss = model.loss(ids, targets)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.manual_seed(3)
        logits = model(ids)
        results.append((loss.detach(), grads, logits.detach()))
    (l0, g0, z0) = results[0]
    assert rel_err(l0, cross_entropy_reference(z0, targets)) < 1e-12
    for loss, grads, logits in results[1:]:
        assert rel_err(loss, l0) < 1e-12
        assert rel_err(logits, z0) < 1e-12
        for n in g0:
            assert rel_err(grads[n], g0[n]) < 1e-10, n


# --- padding, n_hashes, reproducibility, dtypes ------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(attention="lsh", causal=True),
        dict(attention="lsh", causal=False),
        dict(attention="local,full", causal=False),
    ],
)
def test_right_padding_does_not_change_real_outputs(kw):
    model = ReformerLM(small(n_buckets=8, **kw)).double().eval()
    ids = torch.randint(0, 37, (2, 30))
    padded = torch.cat([ids, torch.zeros(2, 9, dtype=torch.long)], dim=1)
    mask = torch.ones(2, 39, dtype=torch.bool)
    mask[:, 30:] = False
    a = seeded(model, ids)
    b = seeded(model, padded, attention_mask=mask)
    assert (a - b[:, :30]).abs().max() < 1e-10


def test_n_hashes_changeable_at_evaluation():
    model = ReformerLM(small(n_hashes=2)).double().eval()
    ids = torch.randint(0, 37, (1, 40))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out2 = seeded(model, ids)
    model.set_n_hashes(8)
    assert all(b.attn.n_hashes == 8 for b in model.blocks)
    out8 = seeded(model, ids)
    assert not torch.allclose(out2, out8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="n_hashes"):
        model.set_n_hashes(0)


def test_set_attention_swaps_lsh_and_full_shared_qk_with_the_same_weights():
    """Paper Table 2: one set of weights evaluated with full attention and with LSH."""
    lsh = ReformerLM(small(attention="local,lsh", shared_qk=True)).double().eval()
    full = ReformerLM(small(attention="local,full", shared_qk=True)).double().eval()
    full.load_state_dict(lsh.state_dict())  # same parameter names: one qk projection
    ids = torch.randint(0, 37, (2, 29))
    lsh.set_attention("full")
    assert [b.attn.kind for b in lsh.blocks] == ["local", "full", "local"]
    assert rel_err(seeded(lsh, ids), seeded(full, ids)) < 1e-12
    full.set_attention("lsh")
    lsh.set_attention(None)
    assert [b.attn.kind for b in lsh.blocks] == ["local", "lsh", "local"]
    assert rel_err(seeded(full, ids), seeded(lsh, ids)) < 1e-12
    assert not torch.allclose(seeded(lsh, ids), seeded(full.set_attention(None) or full, ids))
    with pytest.raises(ValueError, match="no shared-QK"):
        ReformerLM(small(attention="full", shared_qk=False)).set_attention("lsh")
    with pytest.raises(ValueError, match="kind must be"):
        lsh.set_attention("local")


def test_any_length_up_to_max_and_manual_seed_reproducibility():
    model = ReformerLM(small(max_seq_len=50)).eval()
    for L in (1, 2, 3, 17, 50):
        ids = torch.randint(0, 37, (2, L))
        out = seeded(model, ids)
        assert out.shape == (2, L, 37) and torch.isfinite(out).all()
        assert torch.equal(out, seeded(model, ids))


def test_float32_and_bfloat16_autocast_track_float64():
    model = ReformerLM(small(attention="local,lsh,full")).double().eval()
    ids = torch.randint(0, 37, (2, 33))
    ref = seeded(model, ids)
    model32 = ReformerLM(small(attention="local,lsh,full")).eval()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    out32 = seeded(model32, ids)
    assert out32.dtype == torch.float32
    assert (out32.double() - ref).abs().max() < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = seeded(model32, ids)
    assert torch.isfinite(out16).all()
    assert rel_err(out16.double(), ref) < 0.1


def test_bfloat16_autocast_reversible_gradients_track_plain_autograd():
    """Under autocast the reversible backward (its ordered attention and feed-forward vjps,
    dropout replayed in the autocast dtype) gives plain autograd's gradients to bf16
    rounding; the float32 step is the yardstick for the tolerance."""
    model = ReformerLM(small(attention="local,lsh,full", dropout=0.1, ff_chunk_len=5)).train()
    ids = torch.randint(0, 37, (2, 33))

    def grads(custom: bool, bf16: bool) -> dict[str, torch.Tensor]:
        model.custom_backward = custom
        model.zero_grad()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(ids, ids)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref32 = grads(False, False)
    rev, ref = grads(True, True), grads(False, True)
    for name, g in ref.items():
        assert g.dtype == torch.float32, name
        bf16_noise = rel_err(g, ref32[name])
        assert rel_err(rev[name], g) < max(3 * bf16_noise, 1e-3), name


def test_ordinary_residual_model_trains_like_a_transformer():
    model = ReformerLM(small(reversible=False, attention="full", shared_qk=False))
    assert model.norm.normalized_shape == (24,)
    ids = torch.randint(0, 37, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model.loss(ids, ids)  # copy task: trivially learnable
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_reversible_stack_refuses_a_second_backward_and_in_place_changes():
    """The chain drops its outputs once it has rebuilt the layers before them (memory), so a
    second backward through the same graph, or an output changed in place, fails clearly."""
    from reformer.reversible import reversible_forward

    model = ReformerLM(small()).double()
    x = torch.randn(1, 10, model.config.d_model, dtype=torch.float64, requires_grad=True)
    seeds = [(1, 2)] * len(model.blocks)
    y1, y2 = reversible_forward(model.blocks, x, x, None, seeds)
    (y1.sum() + y2.sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (y1.sum() + y2.sum()).backward()
    y1, y2 = reversible_forward(model.blocks, x, x, None, seeds)
    with torch.no_grad():
        y1.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        (y1.sum() + y2.sum()).backward()

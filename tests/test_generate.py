"""Cached decoding reproduces the full forward's logits; seeded sampling is reproducible."""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.generate import generate, sample_next


def model_for(dtype=torch.float64, **kw) -> ReformerLM:
    base = dict(vocab_size=37, d_model=24, n_heads=2, d_ff=40, n_layers=3, max_seq_len=96,
                chunk_len=4, ff_chunk_len=None, loss_chunk_len=None)  # fmt: skip
    base.update(kw)
    return ReformerLM(ReformerConfig(**base)).to(dtype).eval()


def decoded_logits(model, ids, prefix, block):
    torch.manual_seed(5)
    logits, cache = model.decode(ids[:, :prefix], total_len=ids.shape[1])
    outs = [logits]
    for i in range(prefix, ids.shape[1], block):
        logits, cache = model.decode(ids[:, i : i + block], cache)
        outs.append(logits)
    return torch.cat(outs, dim=1)


KINDS = ["lsh", "local", "full", "local,lsh,full"]
CASES = [("lsh", n) for n in (1, 2, 3, 4)] + [("local", 1), ("full", 1), ("local,lsh,full", 2)]


@pytest.mark.parametrize("attention,n_hashes", CASES)
@pytest.mark.parametrize("reversible", [True, False])
def test_decode_equals_full_forward_float64(attention, n_hashes, reversible):
    model = model_for(attention=attention, n_hashes=n_hashes, reversible=reversible)
    ids = torch.randint(0, 37, (2, 41))  # several chunks, not a multiple of chunk_len
    torch.manual_seed(5)
    full = model(ids)
    for prefix, block in ((1, 1), (9, 5)):  # token by token, and in blocks
        assert (decoded_logits(model, ids, prefix, block) - full).abs().max() < 1e-10


@pytest.mark.parametrize("attention", KINDS)
def test_decode_equals_full_forward_float32(attention):
    model = model_for(torch.float32, attention=attention, n_hashes=2)
    ids = torch.randint(0, 37, (2, 45))
    torch.manual_seed(5)
    full = model(ids)
    assert (decoded_logits(model, ids, 5, 1) - full).abs().max() < 1e-5


def test_decode_with_separate_qk_and_explicit_buckets():
    model = model_for(attention="full,lsh", shared_qk=None, n_buckets=6)
    ids = torch.randint(0, 37, (2, 33))
    torch.manual_seed(5)
    full = model(ids)
    assert (decoded_logits(model, ids, 3, 2) - full).abs().max() < 1e-10


def test_decode_rejects_what_it_cannot_reproduce():
    ids = torch.randint(0, 37, (1, 8))
    with pytest.raises(ValueError, match="window"):
        model_for(lsh_mode="chunk").decode(ids)
    with pytest.raises(ValueError, match="causal"):
        model_for(causal=False).decode(ids)
    model = model_for()
    _, cache = model.decode(ids, total_len=10)
    with pytest.raises(ValueError, match="total_len"):
        model.decode(ids[:, :3], cache)
    with pytest.raises(ValueError, match="total_len"):
        model.decode(ids, total_len=500)


def test_seeded_sampling_is_reproducible_and_streams():
    model = model_for(torch.float32)
    prompt = torch.randint(0, 37, (2, 5))
    streamed = []
    a = generate(model, prompt, 12, temperature=1.0, top_k=10, seed=3, on_token=streamed.append)
    b = generate(model, prompt, 12, temperature=1.0, top_k=10, seed=3)
    c = generate(model, prompt, 12, temperature=1.0, top_k=10, seed=4)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.stack(streamed, 1), a[:, 5:])
    greedy = generate(model, prompt, 6, temperature=0.0)
    torch.manual_seed(0)
    full = model(greedy[:, :-1])
    # greedy decoding picks the argmax of the full forward at every generated position
    assert torch.equal(full[:, 4:].argmax(-1), greedy[:, 5:])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {2, 3}
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {3}
    assert sample_next(logits, temperature=0).eq(3).all()
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=0.0)

"""ReformerEncDec: reversible gradients, the decoder cache, beam search, source padding."""

import pytest
import torch

from helpers import rel_err
from reformer.tasks.translation.model import EncDecConfig, ReformerEncDec
from reformer.tasks.translation.search import beam_search, greedy

F64 = torch.float64


def cfg(**kw) -> EncDecConfig:
    base = dict(
        vocab_size=31,
        d_model=16,
        d_ff=24,
        n_heads=2,
        n_enc_layers=2,
        n_dec_layers=2,
        max_src_len=40,
        max_tgt_len=40,
        dropout=0.0,
        chunk_len=4,
    )
    base.update(kw)
    return EncDecConfig(**base)


def batch(B=3, S=11, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 31, (B, S), generator=g)
    src[1, 7:] = 0  # padding
    tgt = torch.randint(3, 31, (B, T), generator=g)
    tgt_in = torch.cat([torch.ones(B, 1, dtype=torch.long), tgt[:, :-1]], 1)
    tgt_out = tgt.clone()
    tgt_out[2, 6:] = -100
    return src, tgt_in, tgt_out


@pytest.mark.parametrize("enc_attention", ["full", "lsh"])
@pytest.mark.parametrize("tie", [True, False])
def test_reversible_gradients_equal_plain_autograd(enc_attention, tie):
    torch.manual_seed(0)
    model = ReformerEncDec(cfg(enc_attention=enc_attention, tie_embeddings=tie, dropout=0.1))
    model = model.to(F64).train()
    src, tgt_in, tgt_out = batch()
    grads = []
    for custom in (True, False):
        model.custom_backward = custom
        model.zero_grad()
        torch.manual_seed(5)  # the same dropout masks and hash rotations both times
        loss, n = model.loss(src, tgt_in, tgt_out, label_smoothing=0.1)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert n == 3 * 9 - 3
    for k in grads[0]:
        assert rel_err(grads[0][k], grads[1][k]) < 1e-10, k


def test_ordinary_residual_variant_trains():
    torch.manual_seed(0)
    model = ReformerEncDec(cfg(reversible=False))
    src, tgt_in, tgt_out = batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, n = model.loss(src, tgt_in, tgt_out)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        first = first if first is not None else float(loss.detach() / n)
    assert float(loss.detach() / n) < 0.5 * first


@pytest.mark.parametrize("reversible", [True, False])
def test_cached_decoding_equals_full_forward(reversible):
    torch.manual_seed(1)
    model = ReformerEncDec(cfg(reversible=reversible)).to(F64).eval()
    src, tgt_in, _ = batch()
    full = model(src, tgt_in)
    state = model.start(src)
    for t in range(tgt_in.shape[1]):
        step = model.step(tgt_in[:, t], state)
        assert rel_err(step, full[:, t]) < 1e-10, t


def test_beam_one_equals_greedy_and_beams_are_no_worse():
    torch.manual_seed(2)
    model = ReformerEncDec(cfg(vocab_size=12)).eval()
    src = torch.randint(3, 12, (4, 10))
    g = greedy(model, src, max_len=12)
    assert beam_search(model, src, beam=1, max_len=12) == g
    assert all(len(x) <= 12 for x in g)
    b4 = beam_search(model, src, beam=4, alpha=0.0, max_len=12)

    def logprob(ids_list):
        out = []
        for i, ids in enumerate(ids_list):
            seq = [1, *ids, 2][:13]
            x = torch.tensor([seq])
            logp = torch.log_softmax(model(src[i : i + 1], x[:, :-1]), -1)[0]
            out.append(float(logp.gather(1, x[0, 1:, None]).sum()))
        return out

    # alpha 0: beam search maximises log-probability, so beam 4 never loses to greedy
    for a, b in zip(logprob(b4), logprob(g)):
        assert a >= b - 1e-5


def test_padding_the_source_does_not_change_the_translation():
    torch.manual_seed(3)
    model = ReformerEncDec(cfg()).eval()
    src = torch.randint(3, 31, (2, 8))
    padded = torch.cat([src, torch.zeros(2, 5, dtype=torch.long)], 1)
    assert greedy(model, src, max_len=10) == greedy(model, padded, max_len=10)
    assert beam_search(model, src, beam=3, max_len=10) == beam_search(
        model, padded, beam=3, max_len=10
    )
    a = model(src, torch.ones(2, 4, dtype=torch.long))
    b = model(padded, torch.ones(2, 4, dtype=torch.long))
    assert rel_err(a, b) < 1e-5


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="divisible"):
        cfg(d_model=15)
    with pytest.raises(ValueError, match="enc_attention"):
        cfg(enc_attention="local")
    with pytest.raises(ValueError, match="must differ"):
        cfg(bos_id=0)
    model = ReformerEncDec(cfg())
    with pytest.raises(ValueError, match="length 41"):
        model(torch.ones(1, 41, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one real"):
        model.encode(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="beam"):
        beam_search(model, torch.ones(1, 3, dtype=torch.long), beam=0)

"""Encoder models: the masked LM (ReformerLM with causal=False) and ReformerClassifier, the
masking rule, pooling, metrics, and loading an encoder with a fresh head."""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from reformer.model import cross_entropy_reference
from reformer.tasks.encoder.masking import MaskingRule
from reformer.tasks.encoder.model import ReformerClassifier, pool
from reformer.tasks.encoder.recipe import classification_metrics

F64 = torch.float64


def _config(**kw) -> ReformerConfig:
    base = dict(
        vocab_size=40, d_model=16, n_heads=2, d_ff=24, n_layers=2, max_seq_len=64,
        attention="lsh,local", n_hashes=2, chunk_len=4, n_buckets=8, causal=False,
        ff_chunk_len=5, loss_chunk_len=7, pos_emb="absolute",
    )  # fmt: skip
    return ReformerConfig(**(base | kw))


def _padded_batch(B=3, L=29, vocab=38, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, -6:] = False
    mask[2, -11:] = False
    return ids, mask


def test_encoder_defaults_look_both_ways():
    cfg = ReformerConfig(causal=False)
    assert cfg.resolved_chunks == (1, 1) and cfg.resolved_lsh_mode == "chunk"
    assert ReformerConfig().resolved_chunks == (1, 0)
    with pytest.raises(ValueError, match="chunks_after"):
        ReformerConfig(chunks_after=1)  # causal
    with pytest.raises(ValueError, match="chunks_before"):
        ReformerConfig(chunks_before=2)
    with pytest.raises(ValueError, match="chunks_before"):
        ReformerConfig(causal=False, chunks_before=-1)


@pytest.mark.parametrize("reversible", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_padding_changes_no_real_output(reversible, pooling):
    """Padded positions (any ids, any number of them) change no real position's state and no
    pooled logit: the same rows with extra padding give the same outputs."""
    torch.manual_seed(0)
    model = ReformerClassifier(_config(reversible=reversible), 5, pooling).double().eval()
    ids, mask = _padded_batch()
    torch.manual_seed(1)
    base_h = model.hidden_states(ids, mask)
    torch.manual_seed(1)
    base = model(ids, mask)
    noisy = torch.where(mask, ids, torch.randint_like(ids, 0, 38))  # other pad ids
    longer = torch.cat([noisy, torch.randint(0, 38, (3, 6))], dim=1)  # and more padding
    long_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], dim=1)
    torch.manual_seed(1)
    h = model.hidden_states(longer, long_mask)[:, :29]
    torch.manual_seed(1)
    out = model(longer, long_mask)
    real = mask[..., None]
    assert ((h - base_h) * real).abs().max() < 1e-10
    assert (out - base).abs().max() < 1e-10


def _grads(model, fn):
    model.zero_grad()
    fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["mlm", "mlm-tied", "classify-mean", "classify-first"])
def test_reversible_gradients_equal_autograd(head):
    """The reversible stack's manual backward gives plain autograd's gradients for every
    encoder head (float64, dropout on, padding, LSH and local layers)."""
    torch.manual_seed(0)
    cfg = _config(dropout=0.1, tie_embeddings=head == "mlm-tied")
    if head.startswith("classify"):
        model = ReformerClassifier(cfg, 4, head.split("-")[1]).double()
    else:
        model = ReformerLM(cfg).double()
    ids, mask = _padded_batch()
    targets = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    labels = torch.tensor([0, 3, 1])

    def loss():
        torch.manual_seed(7)  # the same rotations and dropout masks in both runs
        if head.startswith("classify"):
            return model.loss(ids, labels, mask)
        return model.loss(ids, targets, mask)

    model.custom_backward = True
    ours = _grads(model, loss)
    model.custom_backward = False
    ref = _grads(model, loss)
    assert ours.keys() == ref.keys() and len(ours) == len(list(model.parameters()))
    for name in ref:
        assert (ours[name] - ref[name]).abs().max() < 1e-9, name


def test_masked_lm_loss_scores_masked_positions_only():
    """The loss (gathering the ~15% scored positions first) equals plain cross-entropy over
    the full logits with the other positions ignored, and so does the ungathered path."""
    torch.manual_seed(0)
    model = ReformerLM(_config()).double().eval()
    ids, mask = _padded_batch()
    targets = torch.where(torch.rand(ids.shape) < 0.15, ids, -100)
    torch.manual_seed(3)
    loss = model.loss(ids, targets, mask).detach()
    torch.manual_seed(3)
    ref = cross_entropy_reference(model(ids, mask), targets).detach()
    assert abs(float(loss - ref)) < 1e-12
    # many scored positions: the ungathered path gives the same value
    dense = torch.where(torch.rand(ids.shape) < 0.9, ids, -100)
    torch.manual_seed(3)
    a = model.loss(ids, dense, mask).detach()
    torch.manual_seed(3)
    ref = cross_entropy_reference(model(ids, mask), dense).detach()
    assert abs(float(a - ref)) < 1e-12


def test_tied_output_uses_the_embedding_matrix():
    torch.manual_seed(0)
    model = ReformerLM(_config(tie_embeddings=True)).double().eval()
    h = torch.randn(2, 5, 32, dtype=F64)
    want = model.head(model.norm(h)) @ model.token_emb.weight.T + model.out_bias
    assert (model.logits_from_hidden(h) - want).abs().max() < 1e-12
    assert model.head.out_features == 16  # W = 2 d -> d, then E^T


def test_pooling_over_real_positions():
    h = torch.randn(2, 6, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mean = pool(h, mask, "mean")
    assert (mean[0] - h[0, :3].mean(0)).abs().max() < 1e-12
    assert (mean[1] - h[1].mean(0)).abs().max() < 1e-12
    assert (pool(h, mask, "first") - h[:, 0]).abs().max() == 0


def test_classifier_refuses_causal_and_bad_heads():
    with pytest.raises(ValueError, match="causal=False"):
        ReformerClassifier(ReformerConfig(vocab_size=8, max_seq_len=16), 3)
    with pytest.raises(ValueError, match="n_classes"):
        ReformerClassifier(_config(), 1)
    with pytest.raises(ValueError, match="pooling"):
        ReformerClassifier(_config(), 3, "max")
    model = ReformerClassifier(_config(), 3)
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="labels"):
        model.loss(ids, torch.tensor([0, 1, 3]), mask)


def test_masking_rule_proportions_and_determinism():
    """BERT's rule on 400 x 1000 tokens: 15% chosen (padding never), of them 80% mask token,
    10% random, 10% kept (a random draw equal to the original counts as kept: 0.1/256)."""
    rule = MaskingRule(mask_id=256, n_ordinary=256)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (400, 1000), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 900:] = False
    inputs, targets = rule.apply(ids, torch.Generator().manual_seed(1), valid)
    chosen = targets != -100
    assert not chosen[:, 900:].any()
    assert (targets[chosen] == ids[chosen]).all()
    assert (inputs[~chosen] == ids[~chosen]).all()  # unchosen inputs untouched
    rate = chosen[:, :900].float().mean().item()
    assert abs(rate - 0.15) < 0.003
    n = chosen.sum().item()
    masked = (inputs[chosen] == 256).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    assert abs(masked - 0.8) < 0.006
    assert abs(kept - (0.1 + 0.1 / 256)) < 0.005
    assert abs(1 - masked - kept - (0.1 - 0.1 / 256)) < 0.005
    assert (inputs < 257).all() and (inputs[chosen & (inputs != 256)] < 256).all()
    again = rule.apply(ids, torch.Generator().manual_seed(1), valid)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)


def test_masking_ranks_split_the_global_batch():
    """Two ranks, each with its rows of the global batch, mask exactly as one process."""
    rule = MaskingRule(mask_id=9, n_ordinary=9, rate=0.3)
    ids = torch.randint(0, 9, (6, 50))
    whole = rule.apply(ids, torch.Generator().manual_seed(4))
    for r in range(2):
        part = rule.apply(ids[r::2], torch.Generator().manual_seed(4), rank=r, world_size=2)
        assert torch.equal(part[0], whole[0][r::2]) and torch.equal(part[1], whole[1][r::2])


def test_masking_rule_refuses_bad_shares():
    with pytest.raises(ValueError, match="exceed 1"):
        MaskingRule(mask_id=1, n_ordinary=1, mask=0.8, random=0.3)
    with pytest.raises(ValueError, match="rate"):
        MaskingRule(mask_id=1, n_ordinary=1, rate=0.0)


def test_classification_metrics_by_hand():
    preds = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    m = classification_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 2 fp 1 fn 0
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_classifier_loads_an_mlm_encoder_with_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    mlm = ReformerLM(_config(tie_embeddings=True))
    save_checkpoint(tmp_path / "run", 1, mlm, config={})
    clf = ReformerClassifier(_config(tie_embeddings=True), 3)
    head = clf.head.weight.detach().clone()
    with pytest.raises(CheckpointError, match="head"):
        load_checkpoint(tmp_path / "run", clf, restore_rng=False)
    load_checkpoint(tmp_path / "run", clf, restore_rng=False, fresh=("head", "out_bias"))
    assert torch.equal(clf.head.weight, head)  # kept its own
    for name, p in mlm.state_dict().items():
        if not name.startswith(("head", "out_bias")):
            assert torch.equal(clf.state_dict()[name], p), name
    # a shape that differs outside the head is still refused by name
    other = ReformerClassifier(_config(d_ff=32), 3)
    with pytest.raises(CheckpointError, match="w_in"):
        load_checkpoint(tmp_path / "run", other, restore_rng=False, fresh=("head", "out_bias"))


def test_encoder_logits_see_later_tokens():
    """A non-causal model: changing the last token changes the first position's logits."""
    torch.manual_seed(0)
    model = ReformerLM(_config(attention="full")).double().eval()
    ids = torch.randint(0, 38, (1, 20), generator=torch.Generator().manual_seed(0))
    a = model(ids)
    ids2 = ids.clone()
    ids2[0, -1] = (ids2[0, -1] + 1) % 38
    assert (model(ids2) - a)[0, 0].abs().max() > 1e-6

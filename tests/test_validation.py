"""Each bad config field and each bad input raises an error naming the field."""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM

BAD_CONFIGS = [
    (dict(n_buckets=7), ValueError, "n_buckets"),
    (dict(n_buckets=0), ValueError, "n_buckets"),
    (dict(d_model=30, n_heads=4), ValueError, "d_model"),
    (dict(vocab_size=1), ValueError, "vocab_size"),
    (dict(vocab_size=2.5), TypeError, "vocab_size"),
    (dict(n_layers=0), ValueError, "n_layers"),
    (dict(n_heads="4"), TypeError, "n_heads"),
    (dict(d_ff=0), ValueError, "d_ff"),
    (dict(max_seq_len=0), ValueError, "max_seq_len"),
    (dict(n_hashes=0), ValueError, "n_hashes"),
    (dict(n_hashes=65), ValueError, "n_hashes"),
    (dict(chunk_len=0), ValueError, "chunk_len"),
    (dict(ff_chunk_len=0), ValueError, "ff_chunk_len"),
    (dict(loss_chunk_len=-1), ValueError, "loss_chunk_len"),
    (dict(attention="sparse"), ValueError, "attention"),
    (dict(attention="local,lsh,dense"), ValueError, "attention"),
    (dict(attention=3), TypeError, "attention"),
    (dict(shared_qk=False), ValueError, "shared_qk"),
    (dict(lsh_mode="sorted"), ValueError, "lsh_mode"),
    (dict(lsh_mode="window", causal=False), ValueError, "lsh_mode"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(reversible=1), TypeError, "reversible"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout="0.1"), TypeError, "dropout"),
    (dict(pos_emb="rotary"), ValueError, "pos_emb"),
    (dict(max_seq_len=100, axial_shape=(8, 8)), ValueError, "axial_shape"),
    (dict(d_model=64, axial_dims=(16, 16)), ValueError, "axial_dims"),
    (dict(axial_dims=(128, 64, 64)), ValueError, "axial_dims"),
    (dict(d_head=0), ValueError, "d_head"),
    (dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps"),
    (dict(ff_activation="swish"), ValueError, "ff_activation"),
    (dict(key_norm="l1"), ValueError, "key_norm"),
    (dict(lsh_chunk_len=0), ValueError, "lsh_chunk_len"),
    (dict(local_chunk_len=1.5), TypeError, "local_chunk_len"),
    (dict(bucket_factors=(4, 5)), ValueError, "bucket_factors"),
    (dict(bucket_factors=(4,), n_buckets=4), ValueError, "bucket_factors"),
    (dict(bucket_factors=4), TypeError, "bucket_factors"),
    (dict(lsh_wrap=True), ValueError, "lsh_wrap"),  # window mode
    (dict(lsh_wrap=True, lsh_mode="chunk"), ValueError, "lsh_wrap"),  # with dedup
    (dict(lsh_dedup="no"), TypeError, "lsh_dedup"),
    (dict(attn_out_bias=0), TypeError, "attn_out_bias"),
    (dict(hash_seed=-1), ValueError, "hash_seed"),
    (dict(pad_multiple=96), ValueError, "pad_multiple"),  # not a multiple of chunk_len 64
]


@pytest.mark.parametrize("kw,exc,field", BAD_CONFIGS)
def test_bad_config_field_is_named(kw, exc, field):
    with pytest.raises(exc, match=field):
        ReformerConfig(**kw)


def test_good_config_variants():
    assert ReformerConfig(causal=False).resolved_lsh_mode == "chunk"
    assert ReformerConfig().resolved_lsh_mode == "window"
    assert ReformerConfig().lsh_mode is None  # stays unresolved, so overriding causal works
    cfg = ReformerConfig(attention=["local", "local", "lsh", "local"], n_layers=6)
    assert cfg.layer_kinds == ("local", "local", "lsh", "local", "local", "local")
    assert ReformerConfig(attention="full", shared_qk=False).shared_qk_for("full") is False
    assert ReformerConfig(attention="full").shared_qk_for("full") is True
    assert ReformerConfig(attention="local").shared_qk_for("local") is False
    cfg = ReformerConfig(d_model=30, n_heads=4, d_head=8)
    assert cfg.head_dim == 8
    assert ReformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ReformerConfig field"):
        ReformerConfig.from_dict({"d_modle": 3})


@pytest.fixture(scope="module")
def model():
    return ReformerLM(
        ReformerConfig(vocab_size=10, d_model=8, n_heads=2, d_ff=8, n_layers=1, max_seq_len=16)
    )


BAD_INPUTS = [
    (lambda: torch.zeros(1, 4), TypeError, "input_ids"),
    (lambda: torch.zeros(1, 4, dtype=torch.bool), TypeError, "input_ids"),
    (lambda: [[1, 2, 3]], TypeError, "input_ids"),
    (lambda: torch.zeros(4, dtype=torch.long), ValueError, "input_ids"),
    (lambda: torch.zeros(1, 17, dtype=torch.long), ValueError, "max_seq_len"),
    (lambda: torch.zeros(1, 0, dtype=torch.long), ValueError, "max_seq_len"),
    (lambda: torch.full((1, 4), 10), ValueError, "vocab_size"),
    (lambda: torch.full((1, 4), -1), ValueError, "vocab_size"),
]


@pytest.mark.parametrize("make,exc,field", BAD_INPUTS)
def test_bad_input_is_named(model, make, exc, field):
    with pytest.raises(exc, match=field):
        model(make())


def test_bad_mask_and_targets(model):
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="targets shape"):
        model.loss(ids, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        model.loss(ids, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="vocab_size"):
        model.loss(ids, torch.full((2, 5), 12))
    with pytest.raises(ValueError, match="no scored position"):
        model.loss(ids, torch.full((2, 5), -100))
    with pytest.raises(TypeError, match="ReformerConfig"):
        ReformerLM({"d_model": 8})

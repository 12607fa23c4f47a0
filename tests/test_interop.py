"""transformers' Reformer checkpoints: import, export, and the logits of both, in float64.

Random-init transformers models (no download), biases and norms perturbed away from their
init so that a mis-mapped bias or norm shows; eval mode.
"""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import ReformerConfig as HFConfig
from transformers import ReformerForMaskedLM, ReformerModelWithLMHead
from transformers.utils import logging as hf_logging

from reformer import ReformerConfig, ReformerLM
from reformer.interop import InteropError, from_transformers, to_transformers
from reformer.interop.hf import TRANSFORMERS_SEMANTICS

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*padded.*")
F64 = torch.float64
TOL = 1e-9

# Scaled-down shapes of the two released checkpoints (the layer patterns, chunk kinds,
# activation, bucket factorisation and axial layout; d_model 32).
ENWIK8_LIKE = dict(  # google/reformer-enwik8
    attn_layers=["local", "local", "lsh", "local"],
    hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=128,
    hidden_act="relu", lsh_attn_chunk_length=16, local_attn_chunk_length=8,
    num_buckets=256,  # an int above 128: never factorised in transformers
    num_hashes=4, axial_pos_shape=[8, 16], axial_pos_embds_dim=[8, 24], layer_norm_eps=1e-12,
    vocab_size=258, max_position_embeddings=128,
)  # fmt: skip
CRIME_LIKE = dict(  # google/reformer-crime-and-punishment
    attn_layers=["local", "lsh"] * 3,
    hidden_size=32, num_attention_heads=2, attention_head_size=8,  # 2 x 8 != 32 / 2
    feed_forward_size=64, hidden_act="relu", lsh_attn_chunk_length=8,
    local_attn_chunk_length=8, num_buckets=[4, 8], num_hashes=1, axial_pos_shape=[16, 32],
    axial_pos_embds_dim=[8, 24], vocab_size=320, max_position_embeddings=512,
)  # fmt: skip
SHAPES = {"enwik8": ENWIK8_LIKE, "crime": CRIME_LIKE}


def _random_hf(cls, shape: dict, seed: int, **kw):
    """A random-init transformers model in float64 eval mode, biases and norms perturbed."""
    kw = dict(shape, hidden_dropout_prob=0.0, hash_seed=11) | kw
    torch.manual_seed(seed)
    model = cls(HFConfig(**kw)).to(F64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_model(shape: dict, **over) -> ReformerModelWithLMHead:
    return _random_hf(ReformerModelWithLMHead, shape, 1, **({"is_decoder": True} | over))


def max_diff(hf, lm, ids) -> float:
    with torch.no_grad():
        return float((hf(ids).logits - lm(ids)).abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("length", [64, 75])  # a chunk multiple and not
def test_import_matches_transformers(shape, n_hashes, length):
    hf = hf_model(SHAPES[shape], num_hashes=n_hashes)
    lm = from_transformers(hf)
    assert lm.config.lsh_wrap and not lm.config.lsh_dedup and lm.config.ff_activation == "relu"
    ids = torch.randint(0, hf.config.vocab_size, (2, length))
    assert max_diff(hf, lm, ids) < TOL


def test_enwik8_shape_with_its_four_hashes():
    hf = hf_model(ENWIK8_LIKE)
    lm = from_transformers(hf)
    assert lm.config.bucket_factors == (256,) and lm.blocks[2].attn.buckets_for(64) == 256
    assert (lm.config.lsh_chunk_len, lm.config.local_chunk_len) == (16, 8)
    ids = torch.randint(0, 258, (2, 112))
    assert max_diff(hf, lm, ids) < TOL


def test_without_hash_seed_one_chunk_matches():
    """Rotations from the global RNG differ, but where one LSH chunk covers the sequence
    the hashing does not matter."""
    hf = hf_model(ENWIK8_LIKE, hash_seed=None)
    lm = from_transformers(hf)
    ids = torch.randint(0, 258, (1, 16))
    assert max_diff(hf, lm, ids) < TOL


def test_lcm_padding():
    """Chunk lengths whose least common multiple is not the LSH one: transformers pads to it."""
    hf = hf_model(CRIME_LIKE, lsh_attn_chunk_length=8, local_attn_chunk_length=12)
    lm = from_transformers(hf)
    assert lm.config.pad_multiple == 24
    for length in (30, 100, 7):
        ids = torch.randint(0, 320, (2, length))
        assert max_diff(hf, lm, ids) < TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_through_from_pretrained(shape, tmp_path):
    lm = from_transformers(hf_model(SHAPES[shape], num_hashes=2))
    to_transformers(lm, tmp_path / "hf")
    back = ReformerModelWithLMHead.from_pretrained(tmp_path / "hf", dtype=F64).eval()
    ids = torch.randint(0, lm.config.vocab_size, (2, 75))
    assert max_diff(back, lm, ids) < TOL
    # and back again through the directory path
    again = from_transformers(tmp_path / "hf")
    with torch.no_grad():
        assert (again(ids) - lm(ids)).abs().max() == 0


def test_model_built_here_exports_exactly(tmp_path):
    """A model configured here with transformers' semantics (not imported first)."""
    cfg = ReformerConfig(
        vocab_size=40, d_model=24, n_heads=3, d_ff=48, n_layers=4, max_seq_len=96,
        attention="lsh,local", n_hashes=2, chunk_len=8, n_buckets=6, hash_seed=4,
        lsh_mode="chunk", lsh_wrap=True, lsh_dedup=False, key_norm="rms", attn_out_bias=False,
        axial_shape=(8, 12), axial_dims=(12, 12), ff_activation="relu",
    )  # fmt: skip
    torch.manual_seed(0)
    lm = ReformerLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    to_transformers(lm, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_buckets"] == 6
    back = ReformerModelWithLMHead.from_pretrained(tmp_path / "hf", dtype=F64).eval()
    for length in (96, 53):
        assert max_diff(back, lm, torch.randint(0, 40, (2, length))) < TOL


def test_save_pretrained_directory_and_bin(tmp_path):
    hf = hf_model(CRIME_LIKE, num_hashes=2)
    hf.save_pretrained(tmp_path / "st")
    ids = torch.randint(0, 320, (2, 40))
    assert max_diff(hf, from_transformers(tmp_path / "st"), ids) < TOL
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert max_diff(hf, from_transformers(tmp_path / "bin"), ids) < TOL


def test_directory_needs_no_transformers(tmp_path):
    hf = hf_model(CRIME_LIKE)
    hf.save_pretrained(tmp_path / "m")
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from reformer.interop import from_transformers\n"
        f"lm = from_transformers({str(tmp_path / 'm')!r})\n"
        "print(sum(p.numel() for p in lm.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == sum(
        p.numel() for n, p in hf.named_parameters() if n != "lm_head.bias"
    )


def test_imported_model_gradients_equal_autograd():
    """Fine-tuning: the reversible backward with the wrap and the seeded hash equals plain
    autograd of the same forward."""
    lm = from_transformers(hf_model(CRIME_LIKE, num_hashes=2)).train()
    ids = torch.randint(0, 320, (2, 40))
    grads = []
    for custom in (True, False):
        lm.custom_backward = custom
        lm.zero_grad()
        torch.manual_seed(0)
        lm.loss(ids[:, :-1], ids[:, 1:]).backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, float(b.abs().max()))


# --- refusals ---------------------------------------------------------------------------------
def _hf_dir(tmp_path, **over):
    hf = hf_model(CRIME_LIKE)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(over)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize(
    "over,field",
    [
        (dict(architectures=["ReformerForSequenceClassification"]), "architectures"),
        (dict(is_decoder=False), "is_decoder"),  # a ReformerModelWithLMHead's files
        (
            dict(is_decoder=False, architectures=["ReformerForMaskedLM"], local_num_chunks_after=1),
            "different chunk neighbours",
        ),
        (dict(lsh_num_chunks_after=1), "lsh_num_chunks_after"),
        (dict(hidden_act="gelu_new"), "hidden_act"),
        (dict(num_buckets=None), "num_buckets"),
        (dict(attn_layers=["local", "full"] * 3), "attn_layers"),
        (dict(model_type="bert"), "model_type"),
        (dict(num_hidden_layers=4), "num_hidden_layers"),
        (dict(lsh_attn_chunk_length=None), "lsh_attn_chunk_length"),
    ],
)
def test_import_refuses_what_it_cannot_represent(tmp_path, over, field):
    with pytest.raises(InteropError, match=field):
        from_transformers(_hf_dir(tmp_path, **over))


def hf_masked_lm(shape: dict, **over) -> ReformerForMaskedLM:
    return _random_hf(ReformerForMaskedLM, shape, 2, **({"is_decoder": False} | over))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("length", [64, 75, 8])  # chunk multiple, not, one local chunk
def test_masked_lm_import_matches_transformers(shape, length):
    """ReformerForMaskedLM (is_decoder false): non-causal LSH with the wrapped look-back and
    local attention wrapping around the ends, logits equal in float64, with padding."""
    hf = hf_masked_lm(SHAPES[shape], num_hashes=2)
    lm = from_transformers(hf)
    assert not lm.config.causal and lm.config.local_wrap and lm.config.resolved_chunks == (1, 0)
    ids = torch.randint(0, hf.config.vocab_size, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - length // 3 :] = 0
    with torch.no_grad():
        ours, theirs = lm(ids), hf(ids).logits
        assert float((ours - theirs).abs().max()) < TOL
        ours, theirs = lm(ids, mask), hf(ids, attention_mask=mask).logits
        real = mask.bool()
        assert float((ours - theirs)[real].abs().max()) < TOL


@pytest.mark.parametrize("around", [(1, 1), (0, 0), (2, 1)])
def test_local_masked_lm_with_wider_windows_matches_transformers(around):
    """A local-only encoder may set its neighbours freely (one setting for all layers)."""
    before, after = around
    shape = dict(CRIME_LIKE, attn_layers=["local", "local"], num_hashes=1)
    hf = hf_masked_lm(shape, local_num_chunks_before=before, local_num_chunks_after=after)
    lm = from_transformers(hf)
    assert lm.config.resolved_chunks == around and lm.config.local_wrap
    ids = torch.randint(0, 320, (2, 61))
    with torch.no_grad():
        assert float((lm(ids) - hf(ids).logits).abs().max()) < TOL


def test_masked_lm_directory_imports_and_convert_refuses(tmp_path, capsys):
    from reformer.cli import main

    hf = hf_masked_lm(CRIME_LIKE)
    hf.save_pretrained(tmp_path / "mlm")
    lm = from_transformers(tmp_path / "mlm")
    ids = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        assert float((lm(ids) - hf(ids).logits).abs().max()) < TOL
    out = tmp_path / "run"
    assert main(["convert", "--from-transformers", str(tmp_path / "mlm"), "--out", str(out)]) == 2
    assert "from_transformers" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "over,field",
    [
        (dict(), "lsh_mode"),  # the library's defaults: window mode
        (dict(lsh_mode="chunk"), "lsh_wrap"),
        (dict(attention="full", key_norm="rms", attn_out_bias=False), "attention"),
        (dict(reversible=False), "reversible"),
        (dict(causal=False), "causal"),
        (dict(TRANSFORMERS_SEMANTICS, attn_out_bias=True), "attn_out_bias"),
        (dict(TRANSFORMERS_SEMANTICS, key_norm="l2"), "key_norm"),
        (dict(TRANSFORMERS_SEMANTICS, attention="local", shared_qk=True), "shared_qk"),
        (dict(TRANSFORMERS_SEMANTICS, pos_emb="none"), "pos_emb"),
        (dict(TRANSFORMERS_SEMANTICS, pad_multiple=128), "pad_multiple"),
    ],
)
def test_export_refuses_what_transformers_cannot_represent(tmp_path, over, field):
    lm = ReformerLM(ReformerConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2, **over))
    with pytest.raises(InteropError, match=field):
        to_transformers(lm, tmp_path / "out", seq_len=64)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_export_needs_the_bucket_count(tmp_path):
    imported = from_transformers(hf_model(CRIME_LIKE))
    cfg = ReformerConfig.from_dict(imported.config.to_dict() | {"bucket_factors": None})
    with pytest.raises(InteropError, match="n_buckets"):
        to_transformers(ReformerLM(cfg), tmp_path / "out")


def test_window_mode_without_dedup_generates_by_full_forward():
    """The cache needs the duplicate correction; without it `generate` recomputes."""
    from reformer.generate import generate, not_decodable

    lm = from_transformers(hf_model(CRIME_LIKE, num_hashes=2))
    lm.config.lsh_mode, lm.config.lsh_wrap = "window", False
    lm2 = ReformerLM(ReformerConfig.from_dict(lm.config.to_dict())).to(F64)
    lm2.load_state_dict(lm.state_dict())
    assert "lsh_dedup" in not_decodable(lm2)
    ids = torch.randint(0, 320, (1, 20))
    out = generate(lm2, ids, 5, temperature=0)
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, lm2(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)

"""The transformers-compatibility switches live in `ReformerConfig.compat`; configs, code and
flags written before the section keep working or fail naming the new spelling."""

import json

import pytest

from reformer import ReformerConfig
from reformer.cli import main
from reformer.config import COMPAT_FIELDS, HFCompat, moved_compat_flag, nest_compat
from reformer.run_config import TrainConfig, _merge, config_from_dict, config_to_dict
from reformer.training.resume import with_defaults


def _flat(saved: dict) -> dict:
    """A saved run config as written before the section: the switches flat under model."""
    model = dict(saved["model"])
    return saved | {"model": {k: v for k, v in model.items() if k != "compat"} | model["compat"]}


def test_the_section_holds_the_eleven_switches():
    assert len(COMPAT_FIELDS) == 11 and "local_wrap" in COMPAT_FIELDS
    assert not set(COMPAT_FIELDS) & {f for f in ReformerConfig.__dataclass_fields__}
    assert ReformerConfig().compat == HFCompat()


def test_keywords_and_attributes_of_the_flat_spelling():
    cfg = ReformerConfig(causal=False, local_wrap=True, key_norm="rms")
    assert cfg.compat == HFCompat(local_wrap=True, key_norm="rms")
    assert cfg.local_wrap and cfg.key_norm == "rms"  # read through the section
    cfg.key_norm = "l2"
    assert cfg.compat.key_norm == "l2"
    # a flat keyword wins over the same switch in compat, the others are kept
    both = ReformerConfig(compat=HFCompat(key_norm="rms", attn_out_bias=False), key_norm="l2")
    assert both.compat == HFCompat(key_norm="l2", attn_out_bias=False)
    with pytest.raises(ValueError, match=r"ReformerConfig\.compat\.key_norm .*'l2' \| 'rms'"):
        ReformerConfig(key_norm="l1")
    with pytest.raises(TypeError, match=r"ReformerConfig\.compat\.lsh_dedup"):
        ReformerConfig(compat=HFCompat(lsh_dedup="no"))


def test_dicts_nested_and_flat_give_the_same_config():
    cfg = ReformerConfig(causal=False, local_wrap=True, bucket_factors=(4, 8), n_buckets=None)
    nested = cfg.to_dict()
    assert nested["compat"]["bucket_factors"] == [4, 8] and "local_wrap" not in nested
    flat = {k: v for k, v in nested.items() if k != "compat"} | nested["compat"]
    assert ReformerConfig.from_dict(nested) == ReformerConfig.from_dict(flat) == cfg
    assert nest_compat(flat) == nested
    with pytest.raises(ValueError, match=r"unknown ReformerConfig\.compat field"):
        ReformerConfig.from_dict(nested | {"compat": {"wrap": True}})


def test_saved_flat_run_config_loads_and_resumes_alike():
    """A checkpoint's config.json from before the section: it loads, and --resume compares
    it with today's resolved config as equal."""
    resolved = config_to_dict(TrainConfig())
    old = _flat(json.loads(json.dumps(resolved)))
    assert "compat" not in old["model"] and "lsh_wrap" in old["model"]
    assert config_from_dict(old) == TrainConfig()
    assert with_defaults(old)["model"] == resolved["model"]
    old["model"]["lsh_chunk_len"] = 32
    assert with_defaults(old)["model"]["compat"]["lsh_chunk_len"] == 32


def test_config_layers_spelled_either_way():
    """The higher layer wins whichever way each layer spells a switch."""
    saved = _flat(config_to_dict(TrainConfig()))  # e.g. an --init-from run from before
    over = {"model": {"compat": {"hash_seed": 3}}}
    assert config_from_dict(_merge(saved, over)).model.compat.hash_seed == 3
    assert config_from_dict(_merge(over, {"model": {"hash_seed": 5}})).model.hash_seed == 5
    with pytest.raises(ValueError, match=r"\[model.compat\]"):
        config_from_dict({"model": {"compat": {"hash_sed": 1}}})


@pytest.mark.parametrize(
    "old,new",
    [
        ("--model.lsh-wrap", "--model.compat.lsh-wrap"),
        ("--model.no-lsh-wrap", "--model.compat.no-lsh-wrap"),
        ("--model.key_norm=rms", "--model.compat.key-norm"),
        ("--model.lsh-chunk-len", "--model.compat.lsh-chunk-len"),
        ("--model.chunk-len", None),
        ("--model.compat.hash-seed", None),
    ],
)
def test_old_flags_name_the_new_one(old, new):
    assert moved_compat_flag(old) == new


def test_old_flag_fails_naming_the_new_one(capsys):
    assert main(["train", "--model.lsh-chunk-len", "32", "--out", "unused"]) == 2
    assert "--model.compat.lsh-chunk-len" in capsys.readouterr().err
    assert main(["plan", "--model.hash-seed", "1"]) == 2
    assert "--model.compat.hash-seed" in capsys.readouterr().err

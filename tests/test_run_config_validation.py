"""Every run-config field is validated at construction, from Python, YAML, TOML and flags,
before any file is written, with a message that names the field."""

import pytest
import yaml

from reformer.cli import main
from reformer.run_config import OptimConfig, TrainConfig, TranslationConfig, config_from_dict

# (section, field, bad value): the values a new user tried (issue 16), and each field of
# OptimConfig and TranslationConfig out of its range or of the wrong type.
BAD = [
    ("optim", "schedule", "linear"),
    ("optim", "name", "sgd"),
    ("", "precision", "fp16"),
    ("optim", "min_lr_ratio", 2.0),
    ("optim", "lr", -0.001),
    ("optim", "lr", 0),
    ("optim", "weight_decay", -0.1),
    ("optim", "warmup_steps", -1),
    ("optim", "clip", -1.0),
    ("optim", "accumulate", 0),
    ("optim", "lr", "fast"),
    ("translation", "beam", 0),
    ("translation", "vocab_size", -1),
    ("translation", "eval_beam", 0),
    ("translation", "n_enc_layers", 0),
    ("translation", "enc_attention", "local"),
    ("translation", "label_smoothing", 1.0),
    ("translation", "max_len", 0),
    ("translation", "max_tokens", 8),  # below max_len
    ("translation", "length_penalty", -1.0),
    ("translation", "bleu_sentences", -3),
    ("translation", "src_lang", "de"),  # equal to tgt_lang
    ("translation", "tgt_lang", " "),
    ("translation", "tie_embeddings", "yes"),
    ("", "steps", 0),
    ("", "task", "summarise"),
    ("", "parallel", "zero"),
    ("", "eval_hashes", [0]),
    ("", "max_minutes", -5),
    ("", "cpu_cache_gib", -1.0),
]


def _preset(section: str, field: str) -> str:
    return "multi30k-small" if section == "translation" else "duplication-small"


def _nested(section: str, field: str, value) -> dict:
    return {section: {field: value}} if section else {field: value}


def _name(section: str, field: str) -> str:
    return f"{section}.{field}" if section else field


@pytest.mark.parametrize("section,field,value", BAD)
def test_python_api_refuses(section, field, value):
    with pytest.raises((ValueError, TypeError), match=_name(section, field)):
        task = {"task": "translation"} if section == "translation" else {}
        config_from_dict(task | _nested(section, field, value))
    cls = {"optim": OptimConfig, "translation": TranslationConfig, "": TrainConfig}[section]
    with pytest.raises((ValueError, TypeError), match=_name(section, field)):
        cls(**{field: value})


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
@pytest.mark.parametrize("section,field,value", BAD)
def test_config_files_refuse_before_writing(fmt, section, field, value, tmp_path, capsys):
    data = _nested(section, field, value)
    path = tmp_path / f"c.{fmt}"
    if fmt == "yaml":
        path.write_text(yaml.safe_dump(data))
    else:
        import json

        def toml_value(v):
            return json.dumps(v)  # TOML strings, numbers and arrays read like JSON's

        if section:
            path.write_text(f"[{section}]\n{field} = {toml_value(value)}\n")
        else:
            path.write_text(f"{field} = {toml_value(value)}\n")
    out = tmp_path / "run"
    argv = ["train", "--preset", _preset(section, field), "--config", str(path), "--out", str(out)]
    assert main(argv) == 2
    assert _name(section, field) in capsys.readouterr().err
    assert not out.exists()


def _run(argv: list[str]) -> int:
    """main(argv)'s exit code; tyro exits by itself (code 2, its message on stderr) when a
    flag's value is refused while it builds the config."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _plain(text: str) -> str:
    """tyro's error box, unwrapped: one line, no frame characters."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


# A boolean flag takes no value (tie_embeddings is covered through the files above).
FLAG_CASES = [b for b in BAD if not isinstance(b[2], list) and b[1] != "tie_embeddings"]


@pytest.mark.parametrize("section,field,value", FLAG_CASES)
def test_flags_refuse_before_writing(section, field, value, tmp_path, capsys):
    flag = "--" + (f"{section}." if section else "") + field.replace("_", "-")
    out = tmp_path / "run"
    argv = ["train", "--preset", _preset(section, field), flag, str(value), "--out", str(out)]
    assert _run(argv) == 2
    err = _plain(capsys.readouterr().err)
    assert _name(section, field) in err or flag in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flag,value", [("--model.attention", "local"), ("--model.vocab-size", "300"),
                   ("--model.max-seq-len", "512"), ("--seq-len", "64")],
)  # fmt: skip
def test_translation_refuses_model_fields_it_does_not_use(flag, value, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["train", "--preset", "multi30k-small", flag, value, "--out", str(out)]) == 2
    err = _plain(capsys.readouterr().err)
    assert flag.removeprefix("--").replace("-", "_") in err and "does not use" in err
    assert not out.exists()


def test_lm_tasks_refuse_translation_fields(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "duplication-small", "--translation.beam", "2", "--out", str(out)]
    assert _run(argv) == 2
    assert "translation.beam" in _plain(capsys.readouterr().err) and not out.exists()
    with pytest.raises(ValueError, match="data"):
        TrainConfig(task="duplication", data="some/file")
    with pytest.raises(ValueError, match="image_side"):
        TrainConfig(task="enwik8", image_side=16)


def test_each_task_class_has_only_the_fields_it_reads():
    from dataclasses import fields

    from reformer.run_config import TASK_CONFIGS, TranslationRun

    have = {t: {f.name for f in fields(cls)} for t, cls in TASK_CONFIGS.items()}
    assert [t for t in have if "image_side" in have[t]] == ["images"]
    assert [t for t in have if "byte_offset" in have[t]] == ["enwik8", "text"]
    assert [t for t in have if "tokenizer" in have[t]] == ["text", "classify"]
    assert [t for t in have if "translation" in have[t]] == ["translation"]
    assert {t for t in have if "data" not in have[t]} == {"duplication", "listops"}
    assert "seq_len" not in have["translation"] and "eval_hashes" not in have["mlm"]
    assert "vocab_size" not in {f.name for f in fields(TranslationRun().model)}
    assert TrainConfig(task="images", image_side=16).image_side == 16


def test_old_saved_configs_with_every_tasks_fields_still_load(recwarn):
    """Configs saved before one class per task hold every task's fields (at their defaults
    unless set): they load, the fields their task does not read left out."""
    from reformer.config import ReformerConfig
    from reformer.run_config import config_to_dict, saved_config_from_dict

    everything = {  # what the single TrainConfig of earlier versions saved
        "translation": config_to_dict(TranslationConfig()), "data": None, "seq_len": 1024,
        "image_side": 64, "eval_hashes": [1, 2, 4, 8], "byte_offset": 0, "tokenizer": None,
        "encoder": {"mask_rate": 0.15, "mask_token": 0.8, "random_token": 0.1,
                    "pooling": "mean", "vocab": "bytes", "spm_vocab_size": 2000,
                    "listops_train": 10000, "listops_val": 1000, "listops_min_len": 32,
                    "listops_max_depth": 10, "listops_max_args": 10, "listops_seed": 0},
        "model": config_to_dict(ReformerConfig()),
    }  # fmt: skip
    encoder = everything["model"] | {"causal": False}
    for task in ("duplication", "enwik8", "images", "translation", "listops"):
        model = encoder if task == "listops" else everything["model"]
        cfg = saved_config_from_dict(everything | {"task": task, "model": model})
        assert cfg.task == task and config_from_dict(config_to_dict(cfg)) == cfg
    assert not recwarn.list  # all at their defaults: nothing to say
    cfg = saved_config_from_dict(everything | {"task": "translation", "seq_len": 64})
    assert "seq_len" in str(recwarn.pop(UserWarning).message)
    # As a --config file (the resume command names RUN/config.yaml): the same, but a field
    # the task does not read that is set is refused, not left out.
    assert config_from_dict(everything | {"task": "translation"}).task == "translation"
    with pytest.raises(ValueError, match="seq_len"):
        config_from_dict(everything | {"task": "translation", "seq_len": 64})


def test_a_task_flag_can_be_completed_by_other_flags():
    from reformer.cli.train import parse_train_args

    cfg = parse_train_args(["--task", "mlm", "--model.no-causal", "--encoder.mask-rate", "0.2"])
    assert type(cfg).__name__ == "MLMRun" and cfg.encoder.mask_rate == 0.2
    with pytest.raises(ValueError, match=r"task 'mlm' does not use encoder\.pooling"):
        parse_train_args(["--task", "mlm", "--model.no-causal", "--encoder.pooling", "first"])

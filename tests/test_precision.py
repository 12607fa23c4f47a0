"""--precision auto: bf16 where the device multiplies bf16 natively, fp32 elsewhere; the
choice is printed and saved in the run's config, and a resumed run keeps its precision
(auto follows it, another explicit precision is refused)."""

import pytest
import torch
import yaml

import reformer.training.precision as precision
from reformer.cli import main
from reformer.run_config import config_from_dict
from reformer.training.precision import resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("flags", "want"),
    [({"amx_bf16", "avx512_bf16"}, "bf16"), ({"avx512_bf16"}, "bf16"), ({"avx2"}, "fp32")],
)
def test_auto_chooses_bf16_where_the_cpu_multiplies_it(flags, want, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    got, why = resolve_precision("auto", CPU)
    assert got == want
    assert why == (
        f"this CPU has {sorted(flags)[0]}"
        if want == "bf16"
        else "cpu has no native bf16 matrix multiplication"
    )
    assert resolve_precision("fp32", CPU) == ("fp32", "as asked")


def test_auto_in_a_config_file_and_a_clear_error_otherwise():
    assert config_from_dict({"precision": "auto"}).precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        config_from_dict({"precision": "fp16"})


def run_args(out, *extra: str) -> list[str]:
    return [
        "train", "--steps", "2", "--seq-len", "16", "--model.max-seq-len", "16",
        "--model.n-layers", "1", "--model.d-model", "16", "--model.d-ff", "16",
        "--model.n-heads", "2", "--model.chunk-len", "8", "--batch-size", "2",
        "--eval-every", "0", "--eval-hashes", "2", "--eval-batches", "1", "--no-progress",
        "--out", str(out), *extra,
    ]  # fmt: skip


def saved_precision(out) -> str:
    return yaml.safe_load((out / "config.yaml").read_text())["precision"]


def test_the_choice_is_printed_saved_and_kept_on_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    out = tmp_path / "run"
    assert main(run_args(out, "--precision", "auto")) == 0
    assert "precision auto: bf16 (this CPU has avx512_bf16)" in capsys.readouterr().out
    assert saved_precision(out) == "bf16"
    # on a machine without bf16, auto still resumes the bf16 run in bf16
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    assert main([*run_args(out, "--precision", "auto", "--resume"), "--steps", "3"]) == 0
    assert "precision auto: bf16 (the precision the run was trained in)" in (
        capsys.readouterr().out
    )
    assert saved_precision(out) == "bf16"
    assert main([*run_args(out, "--precision", "fp32", "--resume"), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "was trained with --precision bf16, not fp32; resume with --precision bf16" in err
    fresh = tmp_path / "fresh"
    assert main(run_args(fresh, "--precision", "auto")) == 0
    assert "precision auto: fp32 (cpu has no native bf16 matrix multiplication)" in (
        capsys.readouterr().out
    )
    assert saved_precision(fresh) == "fp32"

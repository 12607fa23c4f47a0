"""The `reformer` command: help, presets, config layering, resume after kill -9, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import logged_losses
from reformer.checkpoint import latest_checkpoint
from reformer.cli import main
from reformer.run_config import PRESETS, TrainConfig, config_from_dict
from reformer.training import TrainingDiverged, train

TINY = [
    "--model.d-model", "16", "--model.d-ff", "16", "--model.n-heads", "2",
    "--model.chunk-len", "8", "--no-progress", "--eval-batches", "1",
]  # fmt: skip


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reformer", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_of_tool_and_each_verb(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    for verb in ("train", "eval", "plot", "generate", "predict"):
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert f"reformer {verb}" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown verb" in capsys.readouterr().err
    assert main(["train", "--list-presets"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PRESETS)


def test_config_layers_and_unknown_keys(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 7\nmodel:\n  n_layers: 3\n  d_model: 32\n")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text("batch_size = 5\n[model]\nn_hashes = 3\n")
    import tyro

    from reformer.run_config import _merge, load_config_file, preset_dict

    layers = _merge(preset_dict("duplication-small"), load_config_file(str(cfg_file)))
    layers = _merge(layers, load_config_file(str(toml_file)))
    default = config_from_dict(layers)
    cfg = tyro.cli(type(default), default=default, args=["--model.n-layers", "2"])
    assert cfg.steps == 7  # config file over preset
    assert cfg.batch_size == 5 and cfg.model.n_hashes == 3  # TOML too
    assert cfg.model.d_model == 32
    assert cfg.model.n_layers == 2  # flag over config file
    assert cfg.seq_len == PRESETS["duplication-small"]["seq_len"]  # preset over default
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "d_modle" in capsys.readouterr().err
    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_resume_after_kill_9_is_bit_exact(tmp_path):
    args = [
        "train", "--preset", "duplication-small", "--seq-len", "16", "--model.max-seq-len", "16",
        "--model.n-hashes", "2", "--steps", "24", "--batch-size", "4", "--checkpoint-every", "3",
        "--eval-every", "5", "--log-every", "1", "--model.dropout", "0.1",
        "--eval-hashes", "2", *TINY,
    ]  # fmt: skip
    ref = tmp_path / "ref"
    assert run_cli(*args, "--out", str(ref)).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "reformer", *args, "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a checkpoint exists and training moved on
        ck = latest_checkpoint(run) if run.exists() else None
        if ck is not None and int(ck.name.split("-")[1]) >= 6:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(run).name.split("-")[1])
    assert killed_at < 24, "the run finished before it could be killed"
    resumed = run_cli(*args, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {killed_at}" in resumed.stdout
    a, b = logged_losses(ref), logged_losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}


def test_existing_run_needs_resume_and_corrupt_checkpoint_is_refused(tmp_path):
    args = ["train", "--steps", "2", "--seq-len", "16", "--model.max-seq-len", "16",
            "--model.n-layers", "1", "--batch-size", "2", *TINY]  # fmt: skip
    out = tmp_path / "r"
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out)]) == 2  # would overwrite: refused
    ck = latest_checkpoint(out)
    blob = bytearray((ck / "model.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(blob))
    res = run_cli("eval", "--checkpoint", str(out))
    assert res.returncode == 2 and "corrupt" in res.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"format": "something-else"}')
    res = run_cli("eval", "--checkpoint", str(foreign))
    assert res.returncode == 2 and "error" in res.stderr


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from reformer.model import ReformerLM

    cfg = config_from_dict(
        dict(steps=6, seq_len=16, batch_size=2, checkpoint_every=2, progress=False,
             eval_every=0, out=str(tmp_path / "r"),
             model=dict(d_model=16, d_ff=16, n_heads=2, n_layers=1, max_seq_len=16,
                        vocab_size=128, chunk_len=8))
    )  # fmt: skip
    real_loss, calls = ReformerLM.loss, {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        out = real_loss(self, *a, **k)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(ReformerLM, "loss", flaky)
    with pytest.raises(TrainingDiverged, match="step 5"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "r").name == "step-00000004"


def _data_files(tmp_path: Path) -> dict[str, str]:
    text = tmp_path / "text.txt"
    text.write_bytes(("The quick brown fox jumps over the lazy dog. " * 400).encode())
    img = tmp_path / "img"
    img.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        data = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
        np.savez(img / f"{split}_data.npz", data=data, labels=np.ones(n, dtype=np.int64))
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    for split in ("train", "val"):
        rows = [{"text": w * (i + 3), "label": w} for i in range(6) for w in ("ab ", "cd ")]
        (labelled / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "enwik8": str(text), "text": str(text), "images": str(img), "duplication": None,
        "mlm": str(text), "classify": str(labelled), "listops": None,
    }  # fmt: skip


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_at_tiny_size(preset, tmp_path):
    """Each preset's own architecture (layer pattern, attention kinds, task, optimiser),
    with sizes cut down, trains two steps and evaluates: presets cannot rot."""
    p = PRESETS[preset]
    if p["task"] == "translation":
        from test_translation_cli import write_corpus

        args = ["train", "--preset", preset, "--steps", "2", "--eval-every", "2",
                "--data", str(write_corpus(tmp_path)), "--out", str(tmp_path / "run"),
                "--model.d-model", "16", "--model.d-ff", "32", "--model.n-heads", "2",
                "--translation.vocab-size", "60", "--translation.max-tokens", "128",
                "--no-progress"]  # fmt: skip
        assert main(args) == 0
        recs = [
            json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        assert any("eval_bleu" in r for r in recs)
        return
    data = _data_files(tmp_path)[p["task"]]
    seq = 48 if p["task"] == "images" else 32
    side = ["--image-side", "4"] if p["task"] == "images" else ["--seq-len", str(seq)]
    n_layers = len(p["model"]["attention"].split(","))
    axial = ["--model.axial-shape", "8", "8"] if p["model"].get("axial_shape") else []
    encoder = p["task"] in ("mlm", "classify", "listops")
    hashes = [] if encoder else ["--eval-hashes", "1", "2"]  # encoders print no hash table
    if p["task"] == "listops":
        hashes = ["--encoder.listops-train", "20", "--encoder.listops-val", "8"]
    args = ["train", "--preset", preset, "--steps", "2", "--batch-size", "2",
            "--model.max-seq-len", "64", "--model.n-layers", str(n_layers), *axial,
            "--eval-every", "2", *hashes, "--out", str(tmp_path / "run"),
            *side, *TINY]  # fmt: skip
    if data:
        args += ["--data", data]
    assert main(args) == 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in recs)
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "plots" / "curves.png").stat().st_size > 1000


def test_metrics_schema_and_eval_table(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", "--steps", "4", "--seq-len", "16", "--model.max-seq-len", "16",
            "--model.n-layers", "1", "--batch-size", "2", "--log-every", "2",
            "--eval-every", "2", "--out", str(out), *TINY]  # fmt: skip
    assert main(args) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    eval_recs = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4]
    for r in train_recs:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
    assert {"eval_loss", "eval_bits", "eval_accuracy"} <= set(eval_recs[-1])
    capsys.readouterr()
    table = tmp_path / "t.json"
    assert main(["eval", "--checkpoint", str(out), "--n-hashes", "1", "8", "full",
                 "--batches", "1", "--json", str(table)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "n_hashes" in printed and "accuracy" in printed and "full" in printed
    rows = json.loads(table.read_text())["rows"]
    assert [r["n_hashes"] for r in rows] == [1, 8, "full"]
    assert rows[0]["loss"] != rows[2]["loss"]
    assert torch.tensor([r["accuracy"] for r in rows]).le(1).all()


def test_generate_text_and_image(tmp_path, capsys):
    files = _data_files(tmp_path)
    run = tmp_path / "t"
    assert main(["train", "--preset", "text", "--data", files["text"], "--steps", "2",
                 "--seq-len", "32", "--model.max-seq-len", "64", "--model.n-layers", "2",
                 "--batch-size", "2", "--eval-every", "0", "--eval-hashes", "1",
                 "--out", str(run), *TINY]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "The quick",
                 "--max-new-tokens", "20", "--seed", "1"]) == 0  # fmt: skip
    first = capsys.readouterr().out
    assert first.startswith("The quick") and len(first.encode()) >= len("The quick")
    assert main(["generate", "--checkpoint", str(run), "--prompt", "The quick",
                 "--max-new-tokens", "20", "--seed", "1"]) == 0  # fmt: skip
    assert capsys.readouterr().out == first  # seeded: reproducible
    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "70"]) == 2
    assert "max_seq_len" in capsys.readouterr().err
    img = tmp_path / "i"
    assert main(["train", "--preset", "imagenet64-small", "--data", files["images"],
                 "--image-side", "4", "--steps", "1", "--model.max-seq-len", "64",
                 "--model.n-layers", "2", "--batch-size", "2", "--eval-every", "0",
                 "--eval-hashes", "1", "--out", str(img), *TINY]) == 0  # fmt: skip
    png = tmp_path / "s.png"
    assert main(["generate", "--checkpoint", str(img), "--image", str(png)]) == 0
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (4, 4)


def test_presets_are_package_files_that_build_configs():
    from reformer.run_config import PRESET_DIR

    files = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert files == sorted(PRESETS) and len(files) >= 9
    for name in files:
        cfg = config_from_dict(dict(PRESETS[name]), where=f"preset {name}")
        assert cfg.task == PRESETS[name]["task"]


def test_tensorboard_logs_the_same_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    args = ["train", "--preset", "duplication-small", "--steps", "4", "--log-every", "1",
            "--eval-every", "2", "--eval-batches", "1", "--eval-hashes", "--no-progress",
            "--tensorboard", "--out", str(out), *TINY]  # fmt: skip
    assert main(args) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert logged.keys() == logged_losses(out).keys()
    for step, loss in logged_losses(out).items():
        assert abs(logged[step] - loss) <= 1e-6 * abs(loss)  # TensorBoard stores float32
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]


def test_tensorboard_missing_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    out = tmp_path / "r"
    assert main(["train", "--preset", "duplication-small", "--tensorboard", "--out", str(out)]) == 2
    assert "tensorboard package" in capsys.readouterr().err and not out.exists()


def test_resume_compares_old_configs_with_new_fields_at_their_defaults():
    """A run saved before a config field existed resumes: the missing field reads as its
    default (and a real difference is still a difference)."""
    from reformer.run_config import config_to_dict
    from reformer.training.resume import with_defaults as _with_defaults

    resolved = config_to_dict(TrainConfig())
    old = json.loads(json.dumps(resolved))
    del old["model"]["compat"]["local_wrap"], old["eval_hashes"]
    assert _with_defaults(old)["model"] == resolved["model"]
    old["model"]["d_model"] = 64
    assert _with_defaults(old)["model"]["d_model"] == 64 != resolved["model"]["d_model"]

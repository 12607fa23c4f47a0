"""Tests for reformer.checkpoint: round trips, pruning, corruption and crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import reformer.checkpoint as ckpt_mod
import reformer.checkpoint.codec as ckpt_codec
from reformer.checkpoint import (
    FORMAT,
    CheckpointError,
    LoadedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)

# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def make_mlp(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 8))


class TiedLM(nn.Module):
    """Tiny embedding + head with the output projection tied to the embedding."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(12, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(x)))


def make_tied(seed: int = 0) -> nn.Module:
    return TiedLM(seed)


def batch_for(model: nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    if isinstance(model, TiedLM):
        return torch.randint(0, 12, (4, 5), generator=g)
    return torch.randn(4, 8, generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    opt.zero_grad(set_to_none=True)
    out = model(batch_for(model, i))
    (out.float() ** 2).mean().backward()
    opt.step()


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2),
}
MODELS: dict[str, Callable[[int], nn.Module]] = {"mlp": make_mlp, "tied": make_tied}


def assert_same_tree(a: object, b: object, where: str = "") -> None:
    """Exact structural equality, tensors compared with torch.equal and dtype."""
    if isinstance(a, dict) and isinstance(b, dict):  # dict vs OrderedDict is fine
        pass
    else:
        assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def save_simple(run_dir: Path, step: int, model: nn.Module | None = None, **kw: object) -> Path:
    return save_checkpoint(run_dir, step, model if model is not None else make_mlp(), **kw)


# ----------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_model_and_optimizer_round_trip(tmp_path: Path, model_name: str, opt_name: str) -> None:
    model = MODELS[model_name](0)
    opt = OPTIMIZERS[opt_name](model)
    for i in range(3):
        train_step(model, opt, i)

    path = save_checkpoint(
        tmp_path, 3, model, opt, state={"data_pos": 12, "best": 0.5}, config={"d": 8}
    )
    assert path == tmp_path / "checkpoints" / "step-00000003"
    assert (path / "model.safetensors").is_file() and (path / "optimizer.safetensors").is_file()

    fresh = MODELS[model_name](123)
    fresh_opt = OPTIMIZERS[opt_name](fresh)
    loaded = load_checkpoint(path, fresh, fresh_opt)

    assert isinstance(loaded, LoadedCheckpoint)
    assert loaded.step == 3
    assert loaded.state == {"data_pos": 12, "best": 0.5}
    assert loaded.config == {"d": 8}
    assert_same_tree(model.state_dict(), fresh.state_dict(), "model")
    assert_same_tree(opt.state_dict(), fresh_opt.state_dict(), "optimizer")
    if model_name == "tied":
        assert fresh.head.weight is fresh.emb.weight

    # One more identical step on both must give bit-identical parameters.
    train_step(model, opt, 3)
    train_step(fresh, fresh_opt, 3)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert_same_tree(opt.state_dict(), fresh_opt.state_dict(), "optimizer after step")


def test_optimizer_json_layout_and_step_counters(tmp_path: Path) -> None:
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, 0)
    # A python-number step counter (as some optimizers keep) must survive too.
    opt.state[next(iter(model.parameters()))]["extra_counter"] = 7
    path = save_checkpoint(tmp_path, 1, model, opt)

    with safe_open(path / "optimizer.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"state/0/step", "state/0/exp_avg", "state/0/exp_avg_sq"} <= keys

    fresh = make_mlp(5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_checkpoint(path, fresh, fresh_opt)
    sd = fresh_opt.state_dict()
    assert sd["state"][0]["extra_counter"] == 7
    assert isinstance(sd["param_groups"][0]["betas"], tuple)
    assert torch.is_tensor(sd["state"][0]["step"]) and sd["state"][0]["step"].item() == 1.0


def test_tied_weights_saved_per_key(tmp_path: Path) -> None:
    model = make_tied()
    path = save_checkpoint(tmp_path, 0, model)
    tensors = load_file(path / "model.safetensors")
    assert torch.equal(tensors["emb.weight"], tensors["head.weight"])


def test_scheduler_round_trip(tmp_path: Path) -> None:
    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / 5)

    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    for i in range(3):
        train_step(model, opt, i)
        sched.step()
    path = save_checkpoint(tmp_path, 3, model, opt, sched)

    fresh = make_mlp(9)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, warmup)
    load_checkpoint(path, fresh, fresh_opt, fresh_sched)

    assert_same_tree(sched.state_dict(), fresh_sched.state_dict(), "scheduler")
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    for i in range(3, 7):
        train_step(model, opt, i)
        sched.step()
        train_step(fresh, fresh_opt, i)
        fresh_sched.step()
        assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_rng_restore(tmp_path: Path) -> None:
    model = make_mlp()  # make_mlp seeds torch, so build models before seeding
    target = make_mlp(1)
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    path = save_checkpoint(tmp_path, 1, model)
    expected = (torch.rand(5), random.random(), np.random.rand(3))

    # Advance every generator, then restore.
    torch.rand(100)
    random.random()
    np.random.rand(10)
    load_checkpoint(path, target)
    got = (torch.rand(5), random.random(), np.random.rand(3))

    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1]
    assert np.array_equal(got[2], expected[2])

    # restore_rng=False leaves the generators alone.
    torch.manual_seed(7)
    unrestored_expected = torch.rand(5)
    torch.manual_seed(7)
    load_checkpoint(path, target, restore_rng=False)
    assert torch.equal(torch.rand(5), unrestored_expected)


def test_load_from_run_dir_and_read_config(tmp_path: Path) -> None:
    config = {"model": {"d_model": 8, "layers": [1, 2]}, "lr": 1e-3, "name": "x"}
    save_simple(tmp_path, 1, config={"old": True})
    save_simple(tmp_path, 2, config=config, state={"best": float("inf")})

    assert read_checkpoint_config(tmp_path) == config
    assert read_checkpoint_config(tmp_path / "checkpoints" / "step-00000001") == {"old": True}
    loaded = load_checkpoint(tmp_path, make_mlp())
    assert loaded.step == 2
    assert loaded.state == {"best": float("inf")}
    assert loaded.path == tmp_path / "checkpoints" / "step-00000002"
    # The checkpoints/ directory itself is accepted as well.
    assert load_checkpoint(tmp_path / "checkpoints", make_mlp()).step == 2

    meta = json.loads((loaded.path / "meta.json").read_text())
    assert meta["format"] == FORMAT and meta["step"] == 2
    assert meta["torch_version"] == torch.__version__
    assert set(meta["files"]) >= {"model.safetensors", "config.json", "state.json", "rng.json"}


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    save_simple(tmp_path, 4, make_mlp(1))
    model = make_mlp(2)
    path = save_simple(tmp_path, 4, model)
    fresh = make_mlp(3)
    load_checkpoint(path, fresh)
    assert_same_tree(model.state_dict(), fresh.state_dict())
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# ----------------------------------------------------------------------------------------
# Pruning and latest_checkpoint
# ----------------------------------------------------------------------------------------


def test_keep_k_pruning(tmp_path: Path) -> None:
    model = make_mlp()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, model, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000040", "step-00000050"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000050"
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 60, model, keep=0)


def test_latest_ignores_tmp_and_incomplete_dirs(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    good = save_simple(tmp_path, 5)
    root = tmp_path / "checkpoints"

    # A stale, fully written temp dir from a crashed save of a later step.
    shutil.copytree(good, root / ".tmp-step-00000009-1234-abcd")
    # A step dir without meta.json, and one whose listed file is truncated.
    (root / "step-00000010").mkdir()
    (root / "step-00000010" / "model.safetensors").write_bytes(b"junk")
    truncated = root / "step-00000011"
    shutil.copytree(good, truncated)
    meta = json.loads((truncated / "meta.json").read_text())
    meta["step"] = 11
    (truncated / "meta.json").write_text(json.dumps(meta))
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(10)

    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(tmp_path, make_mlp()).step == 5

    # The next save removes stale temp dirs but leaves foreign step dirs alone.
    new = save_simple(tmp_path, 6)
    assert latest_checkpoint(tmp_path) == new
    assert not (root / ".tmp-step-00000009-1234-abcd").exists()
    assert (root / "step-00000010").exists()


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------


def test_flipped_byte_is_corrupt_and_model_untouched(tmp_path: Path) -> None:
    path = save_simple(tmp_path, 1, make_mlp(0))
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))

    target = make_mlp(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(path, target)
    assert "model.safetensors" in str(info.value) and "sha256" in str(info.value)
    assert_same_tree(before, target.state_dict())


def test_unreadable_safetensors_is_corrupt(tmp_path: Path) -> None:
    path = save_simple(tmp_path, 1)
    # Consistent checksum but garbage content: the safetensors reader must fail cleanly.
    junk = b"\xff" * 64
    (path / "model.safetensors").write_bytes(junk)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["model.safetensors"] = {"sha256": hashlib.sha256(junk).hexdigest(), "size": 64}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"corrupt.*safetensors"):
        load_checkpoint(path, make_mlp())


def test_foreign_directories(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(os.urandom(128))
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint") as info:
        load_checkpoint(foreign, make_mlp())
    assert str(foreign) in str(info.value)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint_config(foreign)

    (foreign / "meta.json").write_text(json.dumps({"format": "someone-else/3"}))
    with pytest.raises(CheckpointError, match="not a reformer checkpoint"):
        load_checkpoint(foreign, make_mlp())

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing", make_mlp())

    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(empty_run, make_mlp())


def test_incompatible_model_names_keys(tmp_path: Path) -> None:
    path = save_simple(tmp_path, 1, make_mlp(width=16))
    target = make_mlp(width=32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="incompatible model") as info:
        load_checkpoint(path, target)
    msg = str(info.value)
    assert "0.weight" in msg and "(16, 8)" in msg and "(32, 8)" in msg
    assert_same_tree(before, target.state_dict())

    other = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))
    with pytest.raises(CheckpointError, match="unexpected keys") as info:
        load_checkpoint(path, other)
    assert "3.weight" in str(info.value) and "3.bias" in str(info.value)


def test_optimizer_mismatches(tmp_path: Path) -> None:
    model = make_mlp()
    path = save_simple(tmp_path, 1, model)
    with pytest.raises(CheckpointError, match="optimizer=None"):
        load_checkpoint(path, make_mlp(), torch.optim.AdamW(make_mlp().parameters()))

    opt = torch.optim.AdamW(model.parameters())
    path = save_simple(tmp_path, 2, model, optimizer=opt)
    other = make_mlp()
    with pytest.raises(CheckpointError, match="optimizer mismatch"):
        load_checkpoint(path, other, torch.optim.Adafactor(other.parameters()))
    with pytest.raises(CheckpointError, match="parameter groups"):
        load_checkpoint(path, other, torch.optim.AdamW(list(other.parameters())[:2]))


def test_non_json_state_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="state is not JSON"):
        save_simple(tmp_path, 1, state={"obj": object()})
    assert latest_checkpoint(tmp_path) is None


# ----------------------------------------------------------------------------------------
# Crash safety
# ----------------------------------------------------------------------------------------


def _fail_replace(*args: object, **kwargs: object) -> None:
    raise OSError("simulated crash during os.replace")


def test_crash_in_replace_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_mlp(0)
    good = save_checkpoint(tmp_path, 1, first, config={"v": 1})

    with monkeypatch.context() as m:
        m.setattr(os, "replace", _fail_replace)
        with pytest.raises(OSError, match="simulated crash"):
            save_checkpoint(tmp_path, 2, make_mlp(1), config={"v": 2})

    assert latest_checkpoint(tmp_path) == good
    target = make_mlp(7)
    loaded = load_checkpoint(tmp_path, target)
    assert loaded.step == 1 and loaded.config == {"v": 1}
    assert_same_tree(first.state_dict(), target.state_dict())
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()

    # Saving works again afterwards and leaves no temp dirs.
    save_checkpoint(tmp_path, 2, make_mlp(1))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000002"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_hard_crash_mid_write_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after some files are written leaves a .tmp dir that is never picked."""
    good = save_simple(tmp_path, 1)
    real_save = ckpt_codec.save_file
    calls = {"n": 0}

    def crashing_save(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # model written, crash while writing the optimizer
            raise KeyboardInterrupt("simulated kill")
        real_save(*args, **kwargs)

    # Also disable cleanup, as a real kill would not run it.
    monkeypatch.setattr(ckpt_codec, "save_file", crashing_save)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda *a, **k: None)
    model = make_mlp(3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, torch.optim.AdamW(model.parameters()))
    monkeypatch.undo()

    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(tmp_path, make_mlp()).step == 1


def test_crash_while_resaving_same_step_restores_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_model = make_mlp(0)
    good = save_checkpoint(tmp_path, 4, old_model)
    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src: object, dst: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # old copy moved aside; crash moving the new one in
            raise OSError("simulated crash during os.replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 4, make_mlp(1))
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == good
    target = make_mlp(2)
    load_checkpoint(good, target)
    assert_same_tree(old_model.state_dict(), target.state_dict())


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """The safetensors files get the same mode as the JSON beside them: the umask's."""
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "run", 1, model, opt, config={"a": 1})
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes

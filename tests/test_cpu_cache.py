"""The caching CPU allocator (reformer.cpu_cache): the same numbers as PyTorch's allocator,
blocks reused, the limit kept, and a missing compiler costs a warning, not the run. Each test
runs in a fresh process: the allocator is the process's."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="the cache is built for Linux, with a C++ compiler",
)


def _run(code: str, build_dir, **env) -> dict:
    environ = {**os.environ, "REFORMER_BUILD_DIR": str(build_dir), **env}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=environ, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"stderr": proc.stderr}


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("build")


STEP = """
import json, torch
from reformer import ReformerConfig, ReformerLM, cpu_cache
torch.set_num_threads(1)  # two threads' reductions need not repeat bit for bit
cfg = ReformerConfig(vocab_size=64, d_model=64, n_heads=2, d_ff=128, n_layers=2,
                     max_seq_len=4096, attention="lsh", n_hashes=2, chunk_len=32)
torch.manual_seed(0)
model = ReformerLM(cfg)
ids = torch.randint(0, 64, (2, 4001))  # not a multiple of the chunk
def step():
    torch.manual_seed(1)  # the same hash rotations each time
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]
ref_loss, ref_grads = step()
on = cpu_cache.enable(1.0)
for _ in range(2):
    loss, grads = step()
same = bool(loss == ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
s = cpu_cache.stats()
returned = cpu_cache.empty()
print(json.dumps(dict(on=on, same=same, hits=s.hits, misses=s.misses, cached=s.cached_bytes,
                      returned=returned, after=cpu_cache.stats().cached_bytes)))
"""


def test_a_cached_step_matches_the_default_allocator_and_reuses_blocks(build_dir):
    got = _run(STEP, build_dir)
    assert got["on"] and got["same"], got
    # the second step finds every shape of the first in the cache
    assert got["hits"] > got["misses"] > 0, got
    assert got["returned"] == got["cached"] > 0 and got["after"] == 0


def test_the_free_blocks_kept_stay_within_the_limit(build_dir):
    got = _run(
        """
        import json, torch
        from reformer import cpu_cache
        assert cpu_cache.enable(3 * 2**20 / 2**30)  # 3 MiB
        xs = [torch.empty(2**20 + 4096, dtype=torch.uint8) for _ in range(4)]  # class 1.125 MiB
        del xs
        kept = cpu_cache.stats().cached_bytes
        y = torch.empty(2**20 + 100, dtype=torch.uint8)  # same class: a cached block
        print(json.dumps(dict(kept=kept, hits=cpu_cache.stats().hits)))
        """,
        build_dir,
    )
    assert got["kept"] == 2 * (2**20 + 2**17), got  # two blocks fit under 3 MiB, not three
    assert got["hits"] == 1


def test_without_a_compiler_it_warns_and_pytorch_allocates(build_dir, tmp_path):
    got = _run(
        """
        import json, torch
        from reformer import cpu_cache
        on = cpu_cache.enable(1.0)
        again = cpu_cache.enable(1.0)
        x = torch.ones(1 << 20) * 2
        print(json.dumps(dict(on=on, again=again, total=float(x.sum()))))
        """,
        tmp_path / "empty",  # nothing built there
        CXX="/bin/false",
    )
    assert got["on"] is False and got["again"] is False and got["total"] == 2.0 * (1 << 20)
    assert got["stderr"].count("caching CPU allocator could not be built") == 1


def test_reformer_train_with_the_cache_logs_the_same_losses(build_dir, tmp_path):
    from helpers import logged_losses

    args = [
        sys.executable, "-m", "reformer", "train", "--preset", "enwik8-small",
        "--data", str(tmp_path / "bytes.txt"), "--seq-len", "4096",
        "--model.max-seq-len", "4096", "--model.d-model", "64", "--model.d-ff", "128",
        "--model.n-layers", "2", "--batch-size", "2", "--steps", "3", "--log-every", "1",
        "--eval-every", "0", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    (tmp_path / "bytes.txt").write_bytes(bytes(range(256)) * 400)
    env = {**os.environ, "REFORMER_BUILD_DIR": str(build_dir), "OMP_NUM_THREADS": "1"}
    for name, extra in (("plain", []), ("cached", ["--cpu-cache-gib", "0.5"])):
        proc = subprocess.run(
            [*args, *extra, "--out", str(tmp_path / name)], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr
        assert ("cpu cache: on" in proc.stdout) == bool(extra)
    a, b = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "cached")
    assert sorted(a) == [1, 2, 3] and a == b


def test_a_limit_of_zero_is_refused_by_name():
    from reformer import cpu_cache

    with pytest.raises(ValueError, match="cpu_cache limit"):
        cpu_cache.enable(0)


def test_a_forked_child_allocates_from_its_copy_of_the_cache(build_dir):
    got = _run(
        """
        import json, os, torch
        from reformer import cpu_cache
        assert cpu_cache.enable(1.0)
        block = torch.empty(1 << 20)
        del block  # one cached block, inherited by the child
        pid = os.fork()
        if pid == 0:
            x = torch.ones(1 << 20) + torch.ones(1 << 20)
            ok = float(x.sum()) == 2.0 * (1 << 20) and cpu_cache.stats().hits >= 1
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(json.dumps(dict(status=status)))
        """,
        build_dir,
    )
    assert got["status"] == 0

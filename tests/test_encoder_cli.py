"""The encoder tasks from the command line: mlm, classify and listops each train a few steps
on generated data, resume bit-exactly after kill -9, evaluate, and (classifiers) predict;
classify fine-tunes an mlm run with a fresh head."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import logged_losses
from reformer.checkpoint import latest_checkpoint
from reformer.cli import main

CRASH_RUN = str(Path(__file__).with_name("crash_run.py"))
ENCODER = [
    "--model.d-model", "16", "--model.d-ff", "16", "--model.n-heads", "2",
    "--model.n-layers", "2", "--model.chunk-len", "8", "--model.n-hashes", "2",
    "--no-progress", "--eval-batches", "2", "--batch-size", "4", "--log-every", "1",
    "--model.dropout", "0.1",
]  # fmt: skip


def run_cli(*args: str, crash_at: int | None = None, stdin: str | None = None, cwd=None):
    cmd = [sys.executable, "-m", "reformer", *args]
    if crash_at is not None:
        cmd = [sys.executable, CRASH_RUN, str(crash_at), *args]
    env = os.environ | {"CRASH_SIGNAL": "KILL"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, input=stdin, env=env, cwd=cwd
    )


def _last_eval_loss(run: Path) -> float:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "eval_loss" in r][-1]["eval_loss"]


def _killed_run_resumes_bit_exactly(tmp_path: Path, args: list[str], steps: int, at: int):
    """A reference run, and one killed (SIGKILL) at step `at` and resumed: equal losses."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_cli(*args, "--out", str(ref))
    assert done.returncode == 0, done.stderr
    killed = run_cli(*args, "--out", str(run), crash_at=at)
    assert killed.returncode == -9, killed.stderr
    saved = int(latest_checkpoint(run).name.split("-")[1])
    assert saved < steps
    resumed = run_cli(*args, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {saved}" in resumed.stdout
    a, b = logged_losses(ref), logged_losses(run)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    return ref, done


def _text_file(path: Path, n_bytes: int = 40_000) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "reformer", "hash", "bucket", "chunk"]
    text = []
    while sum(map(len, text)) < n_bytes:
        text.append(" ".join(rng.choice(words) for _ in range(12)) + ".\n")
    path.write_text("".join(text))
    return path


def _labelled_dir(path: Path, fmt: str, n_train: int = 64, n_val: int = 16) -> Path:
    """Texts labelled by which of two words they repeat (a learnable rule)."""
    rng = random.Random(1)
    path.mkdir()
    for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
        rows = []
        for _ in range(n):
            label = rng.choice(["sport", "science"])
            word = "ball" if label == "sport" else "atom"
            text = " ".join(rng.choice([word, "the", "a", "of"]) for _ in range(rng.randint(5, 30)))
            rows.append((text, label))
        if fmt == "jsonl":
            lines = [
                json.dumps({"label": lab, "text": t, "id": i}) for i, (t, lab) in enumerate(rows)
            ]
            (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        else:
            lines = ["id\tlabel\ttext"] + [f"{i}\t{lab}\t{t}" for i, (t, lab) in enumerate(rows)]
            (path / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return path


def test_listops_trains_resumes_evaluates_and_predicts(tmp_path):
    args = [
        "train", "--preset", "listops-small", "--seq-len", "64", "--model.max-seq-len", "64",
        "--encoder.listops-train", "200", "--encoder.listops-val", "40", "--steps", "8",
        "--checkpoint-every", "2", "--eval-every", "4", *ENCODER,
    ]  # fmt: skip
    ref, done = _killed_run_resumes_bit_exactly(tmp_path, args, steps=8, at=5)
    assert "final eval: loss" in done.stdout and "macro_f1" in done.stdout

    out = tmp_path / "eval.json"
    ev = run_cli(
        "eval",
        "--checkpoint",
        str(ref),
        "--n-hashes",
        "1",
        "2",
        "--batches",
        "2",
        "--json",
        str(out),
    )
    assert ev.returncode == 0, ev.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["n_hashes"] for r in rows] == [1, 2]
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in rows)
    # the run's own last evaluation (2 hashes, same seed) is what eval reproduces
    assert rows[1]["loss"] == pytest.approx(_last_eval_loss(ref), abs=1e-6)

    from reformer.tasks.encoder import listops

    examples = listops.generate(12, seed=99, min_length=8, max_length=60)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in examples))
    pred = run_cli("predict", "--checkpoint", str(ref), "--input", str(inputs), "--probs")
    assert pred.returncode == 0, pred.stderr
    recs = [json.loads(x) for x in pred.stdout.splitlines()]
    assert len(recs) == 12 and all(r["label"] in [str(i) for i in range(10)] for r in recs)
    assert "accuracy" in pred.stderr
    # the probabilities are the model's own, as Python computes them on the same batch
    import torch

    from reformer.tasks.encoder.data import LabelledSet
    from reformer.tasks.encoder.recipe import load_encoder_run, run_tokenizer

    model, cfg, _, _, state = load_encoder_run(ref, torch.device("cpu"))
    rows = [(t, str(v)) for t, v in examples]
    ds = LabelledSet.from_examples(
        rows, run_tokenizer(cfg, state), state["labels"], max_len=64, add_cls=False
    )
    torch.manual_seed(0)  # predict's default --seed
    ids, mask, _ = next(ds.eval_batches(16))
    with torch.no_grad():
        probs = torch.softmax(model(ids, mask), -1)
    for rec, row in zip(recs, probs):
        assert [rec["probs"][n] for n in state["labels"]] == pytest.approx(row.tolist(), abs=1e-5)
        assert rec["label"] == state["labels"][int(row.argmax())]
    piped = run_cli("predict", "--checkpoint", str(ref), stdin=examples[0][0] + "\n")
    assert json.loads(piped.stdout)["label"] == recs[0]["label"]  # same seed, same answer


def test_mlm_trains_resumes_and_evaluates(tmp_path):
    corpus = _text_file(tmp_path / "corpus.txt")
    args = [
        "train", "--preset", "mlm-small", "--data", str(corpus), "--seq-len", "64",
        "--model.max-seq-len", "64", "--steps", "6", "--checkpoint-every", "2",
        "--eval-every", "3", *ENCODER,
    ]  # fmt: skip
    ref, done = _killed_run_resumes_bit_exactly(tmp_path, args, steps=6, at=3)
    assert "masked_accuracy" in done.stdout
    ev = run_cli("eval", "--checkpoint", str(ref), "--split", "test", "--batches", "2")
    assert ev.returncode == 0, ev.stderr
    assert "masked_accuracy" in ev.stdout and "test split" in ev.stdout
    out = tmp_path / "val.json"
    ev = run_cli("eval", "--checkpoint", str(ref), "--batches", "2", "--json", str(out))
    assert ev.returncode == 0, ev.stderr
    row = json.loads(out.read_text())["rows"][0]  # the run's last evaluation, reproduced
    assert row["loss"] == pytest.approx(_last_eval_loss(ref), abs=1e-6)
    assert row["bits"] == pytest.approx(row["loss"] / 0.6931471805599453)
    assert 0 <= row["masked_accuracy"] <= 1
    pred = run_cli("predict", "--checkpoint", str(ref), stdin="abc\n")
    assert pred.returncode == 2 and "masked-LM run" in pred.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_classify_trains_resumes_evaluates_and_predicts(tmp_path, fmt):
    """classify on JSONL with bytes, fine-tuned from an mlm run (its encoder, a fresh head),
    or on TSV with a sentencepiece model trained on the training texts (DIR/spm.model);
    resumes bit-exactly after kill -9, evaluates and predicts."""
    common = ["--seq-len", "64", "--model.max-seq-len", "64", *ENCODER]
    extra = []
    if fmt == "jsonl":
        mlm = tmp_path / "mlm"
        pre = run_cli(
            "train", "--preset", "mlm-small", "--data", str(_text_file(tmp_path / "c.txt")),
            "--steps", "2", "--out", str(mlm), *common,
        )  # fmt: skip
        assert pre.returncode == 0, pre.stderr
        extra = ["--init-from", str(mlm)]
    else:
        extra = ["--encoder.vocab", "sentencepiece", "--encoder.spm-vocab-size", "16"]
        extra += ["--model.vocab-size", "18"]
    data = _labelled_dir(tmp_path / "data", fmt)
    args = [
        "train", "--preset", "classify-small", "--data", str(data), "--steps", "6",
        "--checkpoint-every", "2", "--eval-every", "3", *common, *extra,
    ]  # fmt: skip
    ref, done = _killed_run_resumes_bit_exactly(tmp_path, args, steps=6, at=3)
    assert "2 classes" in done.stdout
    if fmt == "jsonl":
        assert f"initialised from {mlm}" in done.stdout and "bytes tokens" in done.stdout
    else:
        assert (ref / "spm.model").is_file() and "sentencepiece tokens" in done.stdout
    ev = run_cli("eval", "--checkpoint", str(ref), "--split", "test")
    assert ev.returncode == 0, ev.stderr
    assert "macro_f1" in ev.stdout
    out = tmp_path / "test.json"
    ev = run_cli("eval", "--checkpoint", str(ref), "--batches", "2", "--json", str(out))
    assert json.loads(out.read_text())["rows"][0]["loss"] == pytest.approx(
        _last_eval_loss(ref), abs=1e-6
    )  # the run's last evaluation (2 batches of val), reproduced
    pred = run_cli("predict", "--checkpoint", str(ref), stdin="ball the ball\natom of atom a\n")
    assert pred.returncode == 0, pred.stderr
    recs = [json.loads(x) for x in pred.stdout.splitlines()]
    assert len(recs) == 2 and all(r["label"] in ("sport", "science") for r in recs)
    assert all(0.5 <= r["confidence"] <= 1 for r in recs)  # the argmax of two classes
    if fmt == "tsv":
        # A --tokenizer given relative to the working directory is found by eval and
        # predict from anywhere (the checkpoint stores where it is).
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / "my.model").write_bytes((ref / "spm.model").read_bytes())
        args2 = [
            "train", "--preset", "classify-small", "--data", "data", "--steps", "1",
            "--encoder.vocab", "sentencepiece", "--tokenizer", "tok/my.model",
            "--model.vocab-size", "18", "--out", "clf2", *common,
        ]  # fmt: skip
        done = run_cli(*args2, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        pred = run_cli("predict", "--checkpoint", str(tmp_path / "clf2"), stdin="ball\n", cwd="/")
        assert pred.returncode == 0, pred.stderr


def _run(argv: list[str]) -> int:
    """main(argv)'s exit code; tyro exits by itself (code 2, its message on stderr) when it
    refuses a value while building the config."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _err(capsys) -> str:
    """stderr, tyro's error box unwrapped to one line."""
    text = capsys.readouterr().err
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def test_encoder_run_errors_name_the_fix(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert _run(["train", "--task", "listops", "--out", out]) == 2
    assert "--model.no-causal" in _err(capsys)
    assert _run(["train", "--preset", "mlm-small", "--out", out]) == 2
    assert "needs --data" in _err(capsys)
    assert _run(["train", "--preset", "listops-small", "--encoder.mask-rate", "0.2"]) == 2
    assert "encoder.mask_rate" in _err(capsys)
    assert _run(["train", "--preset", "listops-small", "--data", "x"]) == 2
    assert "generates its data" in _err(capsys)
    assert _run(["train", "--preset", "mlm-small", "--encoder.mask-token", "0.95"]) == 2
    assert "exceed 1" in _err(capsys)
    data = _labelled_dir(tmp_path / "d", "jsonl")
    args = ["train", "--preset", "classify-small", "--data", str(data), "--out", out]
    assert _run([*args, "--model.vocab-size", "100"]) == 2
    assert "--model.vocab-size 258" in _err(capsys)
    assert not Path(out).exists()  # refused before any file was written
    (data / "val.jsonl").unlink()
    assert _run(args) == 2
    assert "val.jsonl" in _err(capsys)


def test_more_refusals_and_a_resume_with_other_labels(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert _run(["train", "--preset", "duplication-small", "--model.no-causal"]) == 2
    assert "must be causal" in _err(capsys)
    data = _labelled_dir(tmp_path / "d", "jsonl", n_train=8, n_val=4)
    args = ["train", "--preset", "classify-small", "--data", str(data), "--out", out]
    assert _run([*args, "--encoder.vocab", "sentencepiece"]) == 2
    assert "--model.vocab-size 2002" in _err(capsys)
    assert not Path(out).exists()
    tiny = [*args, "--seq-len", "32", "--model.max-seq-len", "32", *ENCODER]
    assert _run([*tiny, "--steps", "1"]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    rows[0]["label"] = "art"  # a third class: the label ids would change meaning
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _run([*tiny, "--steps", "2", "--resume"]) == 2
    assert "trained with the labels ['science', 'sport']" in _err(capsys)
    assert _run([*tiny, "--steps", "2", "--resume", "--encoder.pooling", "first"]) == 2
    assert "different encoder config" in _err(capsys)

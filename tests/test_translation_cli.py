"""`reformer train` (task translation), `reformer eval` and `reformer translate`, end to end
on small generated parallel files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from reformer.cli import main

EN = "a the dog cat man woman child runs sits walks on in under red blue green big small house"
DE = "ein der hund katze mann frau kind läuft sitzt geht auf in unter rot blau grün groß klein haus"


def write_corpus(root: Path) -> Path:
    rng = random.Random(0)
    en, de = EN.split(), DE.split()
    splits = {"train": 300, "val": 12, "test_2016_flickr": 10}
    for split, n in splits.items():
        rows = []
        for _ in range(n):
            words = [rng.randrange(len(en)) for _ in range(rng.randint(2, 7))]
            rows.append((" ".join(en[w] for w in words), " ".join(de[w] for w in words)))
        (root / f"{split}.en").write_text("".join(s + "\n" for s, _ in rows))
        (root / f"{split}.de").write_text("".join(t + "\n" for _, t in rows))
    return root


TINY = ["--preset", "multi30k-small", "--model.d-model", "32", "--model.d-ff", "64",
        "--model.n-heads", "2", "--model.n-layers", "1", "--translation.n-enc-layers", "1",
        "--translation.vocab-size", "60", "--translation.max-tokens", "128",
        "--optim.schedule", "constant", "--optim.warmup-steps", "2", "--no-progress",
        "--log-every", "1", "--checkpoint-every", "3", "--eval-every", "3"]  # fmt: skip


def losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.parametrize("reversible", ["--model.reversible", "--model.no-reversible"])
def test_train_resume_eval_translate(tmp_path, capsys, reversible):
    data = write_corpus(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*TINY, reversible, "--data", str(data)]
    assert main(["train", *common, "--steps", "6", "--out", str(whole)]) == 0
    assert (whole / "spm.model").exists() and (whole / "config.yaml").exists()
    # Interrupted after 3 steps and resumed: the same losses, exactly.
    assert main(["train", *common, "--steps", "3", "--out", str(parts)]) == 0
    assert main(["train", *common, "--steps", "6", "--out", str(parts), "--resume"]) == 0
    assert losses(parts) == losses(whole) and len(losses(whole)) == 6
    recs = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "eval_bleu" in r] == [3, 6]
    # A second run into the same directory without --resume is refused.
    capsys.readouterr()
    assert main(["train", *common, "--steps", "6", "--out", str(whole)]) == 2
    assert "--resume" in capsys.readouterr().err

    out_json, hyp = tmp_path / "eval.json", tmp_path / "hyp.txt"
    assert main(["eval", "--checkpoint", str(whole), "--split", "test", "--beam", "2",
                 "--json", str(out_json), "--output", str(hyp)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "tok:13a" in printed
    result = json.loads(out_json.read_text())
    assert result["sentences"] == 10 and 0 <= result["bleu"] <= 100
    # translate reads a file (or stdin) and writes one line per sentence, as eval decoded it.
    translated = tmp_path / "de.txt"
    assert main(["translate", "--checkpoint", str(whole), "--input",
                 str(data / "test_2016_flickr.en"), "--beam", "2",
                 "--output", str(translated)]) == 0  # fmt: skip
    assert translated.read_text() == hyp.read_text()
    assert len(translated.read_text().splitlines()) == 10


def test_translation_errors(tmp_path, capsys):
    assert main(["train", *TINY, "--steps", "2", "--out", str(tmp_path / "r")]) == 2
    assert "--data DIR" in capsys.readouterr().err
    data = write_corpus(tmp_path)
    (data / "val.de").write_text("only one line\n")
    assert main(["train", *TINY, "--steps", "2", "--data", str(data),
                 "--out", str(tmp_path / "r2")]) == 2  # fmt: skip
    assert "val" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2

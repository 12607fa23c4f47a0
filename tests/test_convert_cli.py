"""`reformer convert` both ways, then eval, generate and fine-tuning of the converted run."""

import json
import random

import sentencepiece as spm
import torch
from transformers import ReformerModelWithLMHead

from reformer.cli import main
from reformer.training.runs import load_run
from test_interop import CRIME_LIKE, ENWIK8_LIKE, hf_model

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"]


def _text(path, n_words=3000):
    rng = random.Random(0)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    path.write_text("".join(" ".join(words[i : i + 10]) + "\n" for i in range(0, n_words, 10)))
    return path


def _hf_dir(tmp_path, shape, **over):
    hf = hf_model(shape, **over).float()
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def test_import_bytes_model_eval_generate_finetune_export(tmp_path, capsys):
    hf, src = _hf_dir(tmp_path, ENWIK8_LIKE)
    text = _text(tmp_path / "t.txt")
    run = tmp_path / "run"
    assert main(["convert", "--from-transformers", str(src), "--out", str(run),
                 "--task", "text", "--data", str(text), "--seq-len", "64"]) == 0  # fmt: skip
    assert "bytes + 2" in capsys.readouterr().out

    # eval: the run's loss on the first validation window equals transformers' own
    assert main(["eval", "--checkpoint", str(run), "--batches", "1", "--batch-size", "1",
                 "--json", str(tmp_path / "e.json")]) == 0  # fmt: skip
    loss = json.loads((tmp_path / "e.json").read_text())["rows"][0]["loss"]
    data = text.read_bytes()
    from reformer.data import split_sizes

    n_train = split_sizes(len(data))[0]
    window = torch.tensor([list(data[n_train : n_train + 65])]) + 2
    with torch.no_grad():
        logits = hf(window[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits[0], window[0, 1:])
    assert abs(loss - float(ref)) < 1e-4

    # generate (greedy): the same bytes as greedy decoding with transformers' model
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the ", "--max-new-tokens",
                 "6", "--temperature", "0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    ids = torch.tensor([list(b"the ")]) + 2
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expect = bytes(int(t) - 2 for t in ids[0, 4:] if t >= 2).decode("utf-8", "replace")
    assert printed.startswith("the " + expect)

    # fine-tune: weights from the run, fresh optimiser; the architecture comes with them
    ft = tmp_path / "ft"
    assert main(["train", "--init-from", str(run), "--data", str(text), "--seq-len", "64",
                 "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--log-every", "1",
                 "--checkpoint-every", "2", "--no-progress", "--out", str(ft)]) == 0  # fmt: skip
    tuned, cfg, _, step = load_run(ft, torch.device("cpu"))
    assert step == 2 and cfg.byte_offset == 2 and cfg.model.lsh_wrap
    base, _, _, _ = load_run(run, torch.device("cpu"))
    with torch.no_grad():
        moved = [float((a - b).abs().max()) for a, b in zip(tuned.parameters(), base.parameters())]
    assert 0 < max(moved) < 0.1  # trained from the imported weights, not from scratch

    # export the fine-tuned run; transformers loads it with the same logits
    out = tmp_path / "exported"
    assert main(["convert", "--to-transformers", str(ft), "--out", str(out)]) == 0
    back = ReformerModelWithLMHead.from_pretrained(out, dtype=torch.float64).eval()
    ids = torch.randint(0, 258, (2, 50))
    with torch.no_grad():
        assert (back(ids).logits - tuned.double()(ids)).abs().max() < 1e-9


def test_import_sentencepiece_model(tmp_path, capsys):
    text = _text(tmp_path / "t.txt", 6000)
    hf, src = _hf_dir(tmp_path, CRIME_LIKE)
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(src / "spiece"), vocab_size=40,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    run = tmp_path / "run"
    assert main(["convert", "--from-transformers", str(src), "--out", str(run),
                 "--data", str(text), "--seq-len", "64"]) == 0  # fmt: skip
    assert (run / "spm.model").is_file() and "sentencepiece" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run), "--batches", "1", "--batch-size", "1",
                 "--json", str(tmp_path / "e.json")]) == 0  # fmt: skip
    row = json.loads((tmp_path / "e.json").read_text())["rows"][0]
    sp = spm.SentencePieceProcessor(model_file=str(run / "spm.model"))
    ids = sp.encode(text.read_text())
    from reformer.data import split_sizes

    n_train = split_sizes(len(ids))[0]
    window = torch.tensor([ids[n_train : n_train + 65]])
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(hf(window[:, :-1]).logits[0], window[0, 1:])
    assert abs(row["loss"] - float(ref)) < 1e-4
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the quick",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0  # fmt: skip
    ids = torch.tensor([sp.encode("the quick")])
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = [int(t) for t in ids[0, len(sp.encode("the quick")) :] if t < sp.get_piece_size()]
    assert capsys.readouterr().out.startswith("the quick" + sp.decode(new))


def test_convert_refusals(tmp_path, capsys):
    _, src = _hf_dir(tmp_path, CRIME_LIKE)
    cfg = json.loads((src / "config.json").read_text())
    cfg["is_decoder"] = False
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", "--from-transformers", str(src), "--out", str(tmp_path / "r")]) == 2
    assert "is_decoder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["convert", "--out", str(tmp_path / "r")]) == 2
    _, src = _hf_dir(tmp_path / "b", ENWIK8_LIKE)  # vocabulary 258: bytes + at most 2
    for flags, field in (
        (["--byte-offset", "3"], "--byte-offset"),
        (["--seq-len", "999"], "--seq-len"),
    ):
        capsys.readouterr()
        assert (
            main(["convert", "--from-transformers", str(src), "--out", str(tmp_path / "r"), *flags])
            == 2
        )
        assert field in capsys.readouterr().err and not (tmp_path / "r").exists()
    # a run trained here in window mode cannot be exported, and nothing is written
    run = tmp_path / "dup"
    assert main(["train", "--preset", "duplication-small", "--steps", "1", "--eval-every", "0",
                 "--eval-hashes", "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["convert", "--to-transformers", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "lsh_mode" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_tokenizer_fields_are_validated(tmp_path, capsys):
    import pytest

    from reformer.run_config import TrainConfig

    with pytest.raises(ValueError, match="byte_offset"):
        TrainConfig(task="duplication", byte_offset=2)
    with pytest.raises(ValueError, match="byte_offset"):
        TrainConfig(task="text", byte_offset=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        TrainConfig(task="enwik8", tokenizer="x.model")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: images\nbyte_offset: 2\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "byte_offset" in capsys.readouterr().err and not (tmp_path / "r").exists()

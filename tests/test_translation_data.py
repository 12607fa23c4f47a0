"""Translation data: file readers, split resolution, tokenizer, batches, BLEU.

Every file is generated in tmp_path; nothing reads the real corpora.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from reformer.data import DataFileNotFoundError
from reformer.data.subword import Tokenizer
from reformer.tasks.translation.batches import ParallelData
from reformer.tasks.translation.data import (
    bleu,
    read_lines,
    read_parallel,
    resolve_pair_paths,
)

EN = "a the dog cat man woman child runs sits walks on in under red blue green big small house"
DE = "ein der hund katze mann frau kind läuft sitzt geht auf in unter rot blau grün groß klein haus"


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n word-for-word 'translations' of random sentences over two small word lists."""
    rng = random.Random(seed)
    en, de = EN.split(), DE.split()
    pairs = []
    for _ in range(n):
        words = [rng.randrange(len(en)) for _ in range(rng.randint(2, 9))]
        pairs.append((" ".join(en[w] for w in words), " ".join(de[w] for w in words)))
    return pairs


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


SGML = """<srcset setid="newstest2014" srclang="any">
<doc docid="d1" genre="news" origlang="de">
<seg id="1">Fish &amp; chips &lt;today&gt;</seg>
<seg id="2"> He said &quot;no&quot; &#39;twice&#39; </seg>
</doc>
<doc docid="d2">
<seg id="1">Größe</seg>
</doc>
</srcset>
"""


# -- files -----------------------------------------------------------------------------------


def test_read_lines_text_keeps_empty_lines_and_strips_trailing_space(tmp_path):
    path = write(tmp_path / "x.en", "a b  \r\nsecond\t\n\nlast ")
    assert read_lines(path) == ["a b", "second", "", "last"]
    assert read_lines(write(tmp_path / "y.en", "one\ntwo\n")) == ["one", "two"]
    assert read_lines(write(tmp_path / "z.en", "")) == []


def test_read_lines_sgml_unescapes_entities(tmp_path):
    expected = ["Fish & chips <today>", "He said \"no\" 'twice'", "Größe"]
    assert read_lines(write(tmp_path / "news.sgm", SGML)) == expected
    # Detected from the content too, whatever the suffix.
    assert read_lines(write(tmp_path / "news.txt", SGML)) == expected
    with pytest.raises(ValueError, match="no <seg"):
        read_lines(write(tmp_path / "empty.sgm", "<srcset>\n</srcset>\n"))


def test_read_lines_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.en"
    with pytest.raises(DataFileNotFoundError, match=r"nope\.en"):
        read_lines(missing)
    with pytest.raises(FileNotFoundError):
        read_lines(missing)


def test_read_parallel_aligns_and_rejects_mismatched_counts(tmp_path):
    src = write(tmp_path / "t.en", "a\nb\nc\n")
    tgt = write(tmp_path / "t.de", "x\ny\nz\n")
    assert read_parallel(src, tgt) == [("a", "x"), ("b", "y"), ("c", "z")]
    short = write(tmp_path / "short.de", "x\ny\n")
    with pytest.raises(ValueError, match=r"3 sentences in .*t\.en.* but 2 in .*short\.de"):
        read_parallel(src, short)


def test_read_parallel_mixes_sgml_and_text(tmp_path):
    src = write(tmp_path / "src.sgm", SGML)
    tgt = write(tmp_path / "ref.de", "eins\nzwei\ndrei\n")
    assert [t for _, t in read_parallel(src, tgt)] == ["eins", "zwei", "drei"]


def make_multi30k(root: Path, stems: list[str]) -> Path:
    root.mkdir()
    for stem in stems:
        write(root / f"{stem}.en", "a\n")
        write(root / f"{stem}.de", "b\n")
    return root


def test_resolve_pair_paths_named_splits_and_test_fallback(tmp_path):
    root = make_multi30k(tmp_path / "m30k", ["train", "val", "test_2016_flickr"])
    assert resolve_pair_paths(root, "train") == (root / "train.en", root / "train.de")
    assert resolve_pair_paths(root, "val", "de", "en") == (root / "val.de", root / "val.en")
    flickr = (root / "test_2016_flickr.en", root / "test_2016_flickr.de")
    assert resolve_pair_paths(root, "test") == flickr
    assert resolve_pair_paths(root, "test_2016_flickr") == flickr
    write(root / "test.en", "a\n")
    write(root / "test.de", "b\n")
    assert resolve_pair_paths(root, "test") == (root / "test.en", root / "test.de")


def test_resolve_pair_paths_errors_list_what_exists(tmp_path):
    root = make_multi30k(tmp_path / "m30k", ["train", "test_2016_flickr", "test_2017_mscoco"])
    with pytest.raises(ValueError, match=r"ambiguous.*test_2016_flickr, test_2017_mscoco"):
        resolve_pair_paths(root, "test")
    with pytest.raises(DataFileNotFoundError, match=r"dev\.en and dev\.de not found.*train"):
        resolve_pair_paths(root, "dev")
    write(root / "val.en", "a\n")  # one language only
    with pytest.raises(DataFileNotFoundError, match=r"val\.de not found"):
        resolve_pair_paths(root, "val")
    with pytest.raises(DataFileNotFoundError, match="no such directory"):
        resolve_pair_paths(tmp_path / "absent", "train")


# -- tokenizer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    return synthetic_pairs(300)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    texts = [s for pair in corpus for s in pair]
    return Tokenizer.train(texts, 60, tmp_path_factory.mktemp("spm") / "spm.model")


def test_tokenizer_round_trip_and_special_ids(tokenizer, corpus):
    assert tokenizer.vocab_size == 60
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    for src, tgt in corpus[:50]:
        for text in (src, tgt):
            ids = tokenizer.encode(text)
            assert ids and min(ids) > 3  # no specials added
            assert tokenizer.decode(ids) == text
    ids = tokenizer.encode_batch([corpus[0][0], corpus[1][1]])
    assert tokenizer.decode_batch(ids) == [corpus[0][0], corpus[1][1]]


def test_tokenizer_decode_drops_pad_bos_and_stops_at_eos(tokenizer):
    ids = tokenizer.encode("the dog runs")
    assert tokenizer.decode([1, *ids, 2, *tokenizer.encode("cat"), 0]) == "the dog runs"
    assert tokenizer.decode(torch.tensor([1, *ids, 0, 0])) == "the dog runs"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_tokenizer_load_and_deterministic_training(tokenizer, corpus, tmp_path):
    loaded = Tokenizer.load(tokenizer.path)
    texts = [s for pair in corpus for s in pair]
    assert loaded.encode_batch(texts) == tokenizer.encode_batch(texts)
    again = Tokenizer.train(texts, 60, tmp_path / "run" / "spm.model")
    assert again.path.read_bytes() == tokenizer.path.read_bytes()
    assert again.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["spm.model"]  # no temp left


def test_tokenizer_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="smaller vocab_size"):
        Tokenizer.train([s for s, _ in corpus], 5000, tmp_path / "big.model")
    assert not (tmp_path / "big.model").exists()
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train(["a b"], 10, tmp_path / "x.model", model_type="wordpiece")
    with pytest.raises(DataFileNotFoundError, match=r"missing\.model"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.load(write(tmp_path / "bad.model", "not a model"))


# -- batches ---------------------------------------------------------------------------------


def test_batch_layout_exact():
    data = ParallelData([([5, 6, 7], [8, 9]), ([10], [11, 12, 13]), ([14], [])])
    (batch,) = list(data.eval_batches(max_tokens=100))
    assert batch.src.tolist() == [[5, 6, 7], [10, 0, 0], [14, 0, 0]]
    assert batch.tgt_in.tolist() == [[1, 8, 9, 0], [1, 11, 12, 13], [1, 0, 0, 0]]
    assert batch.tgt_out.tolist() == [[8, 9, 2, -100], [11, 12, 13, 2], [2, -100, -100, -100]]
    assert batch.src_mask.tolist() == [[True] * 3, [True, False, False], [True, False, False]]
    assert batch.tgt_mask.tolist() == [[True] * 3 + [False], [True] * 4, [True] + [False] * 3]
    assert batch.index.tolist() == [0, 1, 2]
    assert all(t.dtype == torch.long for t in (batch.src, batch.tgt_in, batch.tgt_out))
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out) and len(moved) == 3


def test_max_len_drops_long_pairs_for_training_only():
    pairs = [([5] * 4, [6] * 3), ([5] * 5, [6]), ([5], [6] * 4), ([], [6]), ([7], [8])]
    data = ParallelData(pairs, max_len=4)
    assert data.dropped == 3  # source 5 > 4, target 4 + 1 > 4, empty source
    assert data.train_indices.tolist() == [0, 4]
    steps = [data.batch_at(s, max_tokens=8, seed=0) for s in range(data.batches_per_epoch(8))]
    assert sorted(i for b in steps for i in b.index.tolist()) == [0, 4]
    # Evaluation keeps every pair, truncated to max_len.
    rows = {
        int(i): (s, t) for b in data.eval_batches(8) for i, s, t in zip(b.index, b.src, b.tgt_out)
    }
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert rows[1][0].tolist() == [5] * 4
    assert rows[2][1].tolist() == [6, 6, 6, 2]
    assert rows[3][0].tolist() == [0]  # empty source: one padding column
    truncating = ParallelData(pairs, max_len=4, drop_long=False)
    assert truncating.dropped == 1  # only the empty source


def random_id_pairs(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        ([rng.randint(4, 50) for _ in range(rng.randint(1, 30))],
         [rng.randint(4, 50) for _ in range(rng.randint(0, 30))])
        for _ in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("max_tokens", [31, 97, 400])
def test_train_batches_cover_each_pair_once_per_epoch_within_budget(max_tokens):
    pairs = random_id_pairs(203)
    data = ParallelData(pairs)
    n = data.batches_per_epoch(max_tokens)
    for epoch in range(2):
        seen = []
        for step in range(epoch * n, (epoch + 1) * n):
            b = data.batch_at(step, max_tokens=max_tokens, seed=3)
            B, S = b.src.shape
            T = b.tgt_in.shape[1]
            assert B * max(S, T) <= max_tokens
            for row, i in enumerate(b.index.tolist()):
                src, tgt = pairs[i]
                assert b.src[row, : len(src)].tolist() == src
                assert b.tgt_out[row, : len(tgt)].tolist() == tgt
            seen += b.index.tolist()
        assert sorted(seen) == list(range(len(pairs)))


def test_batch_at_is_resumable_and_seeded():
    pairs = random_id_pairs(150, seed=1)
    data = ParallelData(pairs)
    n = data.batches_per_epoch(120)
    steps = [0, 1, n - 1, n, 2 * n + 3, 5]  # crosses epochs, then comes back
    first = [data.batch_at(s, max_tokens=120, seed=7) for s in steps]
    fresh = ParallelData(pairs)  # no cached plan: a resumed run
    for s, b in zip(reversed(steps), reversed(first)):
        again = fresh.batch_at(s, max_tokens=120, seed=7)
        assert torch.equal(again.index, b.index) and torch.equal(again.src, b.src)

    def order(seed: int, epoch: int) -> list[list[int]]:
        return [data.batch_at(epoch * n + i, 120, seed).index.tolist() for i in range(n)]

    assert order(7, 0) != order(7, 1)
    assert order(7, 0) != order(8, 0)


def test_eval_batches_cover_every_index_in_order():
    pairs = random_id_pairs(101, seed=2)
    data = ParallelData(pairs, max_len=20)
    batches = list(data.eval_batches(max_tokens=64))
    assert torch.cat([b.index for b in batches]).tolist() == list(range(101))
    assert all(len(b) * max(b.src.shape[1], b.tgt_in.shape[1]) <= 64 for b in batches)


def test_budget_errors():
    data = ParallelData([([5] * 10, [6])])
    with pytest.raises(ValueError, match=r"needs 10 padded tokens.*max_tokens=8"):
        data.batch_at(0, max_tokens=8, seed=0)
    with pytest.raises(ValueError, match="needs 10"):
        data.eval_batches(max_tokens=8)
    with pytest.raises(ValueError, match="no training pairs"):
        ParallelData([([5] * 10, [6])], max_len=4).batch_at(0, max_tokens=8, seed=0)
    with pytest.raises(ValueError, match="pad_id=0"):
        ParallelData([([5, 0], [6])])


def test_from_text_uses_tokenizer_ids(tokenizer, corpus):
    data = ParallelData.from_text(corpus[:20], tokenizer)
    b = next(data.eval_batches(max_tokens=10_000))
    assert len(b) == 20
    for row in range(20):
        assert tokenizer.decode(b.src[row]) == corpus[row][0]
        assert tokenizer.decode(b.tgt_in[row]) == corpus[row][1]  # bos dropped
        assert tokenizer.decode(b.tgt_out[row].clamp(min=0)) == corpus[row][1]  # stops at eos


# -- BLEU ------------------------------------------------------------------------------------


def test_bleu():
    refs = ["the cat sat on the mat .", "a dog runs in the big green park ."]
    score, signature = bleu(refs, refs)
    assert score == pytest.approx(100.0)
    assert "tok:13a" in signature and "nrefs:1" in signature
    partial, _ = bleu(["the cat sat on a mat .", "a dog walks in the park ."], refs)
    assert 0.0 < partial < 100.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(refs, refs[:1])

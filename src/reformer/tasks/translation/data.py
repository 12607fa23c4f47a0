"""Parallel text for translation: reading files, a shared subword tokenizer, BLEU (the
batches: `batches.py`).

Shapes: B sentence pairs in a batch, S padded source length, T padded target length
(longest target + 1, room for the BOS / EOS shift).

Files are plain text, one sentence per line (Multi30k's ``{split}.{lang}``), or WMT SGML
(newstest's ``<seg id="1">...</seg>``). Training batches are a pure function of
``(seed, step)``: pairs are sorted by (source, target) length with a seeded tie-break, cut into
batches under a padded-token budget, and the batch order is shuffled per epoch, so a resumed
run reproduces every batch without saved state.
"""

from __future__ import annotations

import html
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sacrebleu
import sentencepiece as spm

from reformer.data._common import (
    DataFileNotFoundError,
    check_file,
    check_positive,
)

from ...files import atomic_write

PathLike = str | os.PathLike[str]

_SGML_SUFFIXES = (".sgm", ".sgml")
_SGML_ROOTS = ("<srcset", "<refset")
# WMT SGML puts one <seg> per line, but nothing in the format requires it: match across lines.
_SEG_RE = re.compile(r"<seg\b[^>]*>(.*?)</seg\s*>", re.DOTALL | re.IGNORECASE)
_MODEL_TYPES = ("unigram", "bpe", "char", "word")


# ---------------------------------------------------------------------------------------------
# Files


def read_lines(path: PathLike) -> list[str]:
    """Sentences of a text file (one per line) or of a WMT SGML file (one per ``<seg>``).

    Text files: UTF-8, trailing whitespace stripped from each line, empty lines kept as ``""``
    so that two files stay aligned. SGML (suffix ``.sgm``/``.sgml``, or content starting with
    ``<srcset``/``<refset``): the text of every ``<seg>`` in document order, entities unescaped.

    Raises:
        DataFileNotFoundError: ``path`` does not exist.
        ValueError: the file is not UTF-8, or is SGML without any ``<seg>``.
    """
    p = check_file(path, "a text file with one sentence per line, or a WMT .sgm file")
    try:
        # Decode the bytes ourselves: read_text's universal newlines would split at a lone "\r".
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(p)!r} is not valid UTF-8 ({e}); re-encode it as UTF-8") from e
    text = text.removeprefix("\ufeff")
    if p.suffix.lower() in _SGML_SUFFIXES or text.lstrip().startswith(_SGML_ROOTS):
        segments = [html.unescape(m.group(1)).strip() for m in _SEG_RE.finditer(text)]
        if not segments:
            raise ValueError(
                f"{str(p)!r} looks like WMT SGML but has no <seg ...>...</seg> elements; "
                "pass a plain text file (one sentence per line) or a WMT .sgm file"
            )
        return segments
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline ends the last line; it does not start another
        lines.pop()
    return [line.rstrip() for line in lines]


def read_parallel(src_path: PathLike, tgt_path: PathLike) -> list[tuple[str, str]]:
    """Aligned ``(source, target)`` sentence pairs from two files (text or SGML, see read_lines).

    Raises:
        ValueError: the files hold different numbers of sentences (both counts are given).
    """
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(
            f"source and target are not aligned: {len(src)} sentences in {str(src_path)!r} but "
            f"{len(tgt)} in {str(tgt_path)!r}; both files need one sentence per line, in order"
        )
    return list(zip(src, tgt))


def resolve_pair_paths(
    data_dir: PathLike, split: str, src_lang: str = "en", tgt_lang: str = "de"
) -> tuple[Path, Path]:
    """Paths ``data_dir/{split}.{src_lang}`` and ``data_dir/{split}.{tgt_lang}`` (Multi30k layout).

    ``split`` is any file stem present in both languages ("train", "val", "test_2016_flickr").
    "test" falls back to the only ``test*`` stem when neither ``test.{lang}`` file exists.

    Raises:
        DataFileNotFoundError: no such directory, or no such split (lists those that exist).
        ValueError: "test" is ambiguous (several ``test*`` stems and no ``test.{lang}``).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataFileNotFoundError(
            f"no such directory: {str(root)!r}; expected a folder of {{split}}.{src_lang} and "
            f"{{split}}.{tgt_lang} files (the Multi30k layout)"
        )
    available = sorted(
        p.name[: -len(src_lang) - 1]
        for p in root.glob(f"*.{src_lang}")
        if (root / f"{p.name[: -len(src_lang) - 1]}.{tgt_lang}").is_file()
    )
    stem = split
    no_plain_test = not any((root / f"test.{lang}").exists() for lang in (src_lang, tgt_lang))
    if split == "test" and no_plain_test:
        tests = [s for s in available if s.startswith("test")]
        if len(tests) > 1:
            raise ValueError(
                f"split 'test' is ambiguous in {str(root)!r}: there is no test.{src_lang} and "
                f"several test* pairs ({', '.join(tests)}); pass one of them as the split"
            )
        if tests:
            stem = tests[0]
    src, tgt = root / f"{stem}.{src_lang}", root / f"{stem}.{tgt_lang}"
    if stem not in available:
        missing = " and ".join(p.name for p in (src, tgt) if not p.is_file())
        raise DataFileNotFoundError(
            f"no {split!r} split in {str(root)!r}: {missing} not found; "
            f"splits with both .{src_lang} and .{tgt_lang} files: {', '.join(available) or 'none'}"
        )
    return src, tgt


# ---------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A sentencepiece subword model shared by source and target, with fixed special ids.

    ``pad_id=0, bos_id=1, eos_id=2, unk_id=3``, so batches and the model can rely on them.
    Build one with :meth:`train` or :meth:`load`.
    """

    PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path) -> None:
        specials = (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id())
        expected = (self.PAD_ID, self.BOS_ID, self.EOS_ID, self.UNK_ID)
        if specials != expected:
            raise ValueError(
                f"{str(path)!r}: sentencepiece model has pad/bos/eos/unk ids {specials}, expected "
                f"{expected}; train the model with Tokenizer.train"
            )
        self._sp = processor
        self.path = path

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        path: PathLike,
        *,
        model_type: str = "unigram",
        seed: int = 0,
        character_coverage: float = 1.0,
    ) -> Tokenizer:
        """Train one vocabulary on ``texts`` (source and target sentences together), save it.

        The model file is written to ``path`` atomically (temp file + ``os.replace``). Training
        is deterministic: every sentence is used (no sampling), in the given order, on one
        thread. ``vocab_size`` is exact (sentencepiece's hard limit), so a size the data cannot
        fill is an error rather than a silently smaller vocabulary.

        Raises:
            ValueError: bad argument, no non-empty text, or ``vocab_size`` too large for it.
        """
        cls._check_train_args(vocab_size, model_type, character_coverage)
        sentences = [t for t in texts if t.strip()]  # sentencepiece skips empty ones anyway
        if not sentences:
            raise ValueError("no non-empty sentences to train the tokenizer on")
        out = Path(path).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        # Nothing below samples (input_sentence_size=0 keeps all, no shuffle); the seed is set
        # so that any sentencepiece randomness is pinned too.
        spm.set_random_generator_seed(int(seed))
        model = cls._train_model(sentences, vocab_size, model_type, character_coverage)
        atomic_write(out, model)
        return cls.load(out)

    @classmethod
    def _check_train_args(cls, vocab_size: int, model_type: str, character_coverage: float) -> None:
        """Raise ValueError for a vocabulary size, model type or coverage `train` refuses."""
        check_positive("vocab_size", vocab_size)
        if vocab_size <= cls.UNK_ID + 1:
            raise ValueError(f"vocab_size must be > 4 (the 4 special tokens), got {vocab_size}")
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {', '.join(_MODEL_TYPES)}, got {model_type!r}"
            )
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage!r}")

    @classmethod
    def _train_model(
        cls, sentences: list[str], vocab_size: int, model_type: str, character_coverage: float
    ) -> bytes:
        """The serialised sentencepiece model trained on `sentences` with the special ids,
        every sentence in order, one thread; a vocabulary too large for them is a ValueError."""
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                pad_id=cls.PAD_ID,
                bos_id=cls.BOS_ID,
                eos_id=cls.EOS_ID,
                unk_id=cls.UNK_ID,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                hard_vocab_limit=True,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            if "Vocabulary size too high" in str(e):
                raise ValueError(
                    f"vocab_size={vocab_size} is too large for these {len(sentences)} sentences "
                    f"({e}); choose a smaller vocab_size"
                ) from e
            raise
        return model.getvalue()

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Load a model written by :meth:`train`.

        Raises:
            DataFileNotFoundError: ``path`` does not exist.
            ValueError: not a sentencepiece model, or other special ids.
        """
        p = check_file(path, "a sentencepiece model written by Tokenizer.train (spm.model)")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(p))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{str(p)!r} is not a sentencepiece model ({e})") from e
        return cls(processor, p)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ones included."""
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        """Padding id (0)."""
        return self.PAD_ID

    @property
    def bos_id(self) -> int:
        """Beginning-of-sentence id (1), the first decoder input."""
        return self.BOS_ID

    @property
    def eos_id(self) -> int:
        """End-of-sentence id (2), the last decoder target."""
        return self.EOS_ID

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (3)."""
        return self.UNK_ID

    def encode(self, text: str) -> list[int]:
        """Subword ids of ``text``, without BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; use encode_batch")
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (ints or a 1-D tensor): PAD and BOS are dropped, the first EOS ends it.

        Raises:
            ValueError: an id outside ``[0, vocab_size)`` before the first EOS.
        """
        kept = []
        for raw in ids:
            i = int(raw)
            if i == self.EOS_ID:
                break
            if i in (self.PAD_ID, self.BOS_ID):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            kept.append(i)
        return self._sp.decode(kept)

    def decode_batch(self, rows: Iterable[Sequence[int]]) -> list[str]:
        """:meth:`decode` of each row (e.g. of a (B, T) tensor of generated ids)."""
        return [self.decode(row) for row in rows]

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# Metric


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU of detokenised text with sacrebleu's defaults (13a tokenisation, one ref).

    Returns:
        ``(score in [0, 100], signature)``, e.g. ``"nrefs:1|case:mixed|eff:no|tok:13a|..."``.

    Raises:
        ValueError: different numbers of hypotheses and references, or none.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; "
            "give one translation per reference sentence"
        )
    if not hypotheses:
        raise ValueError("bleu needs at least one hypothesis/reference pair")
    metric = sacrebleu.metrics.BLEU()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return float(result.score), str(metric.get_signature())

"""A sentencepiece subword tokenizer with fixed special ids: translation's shared source and
target vocabulary, and the classify task's sentencepiece vocabulary."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from ..files import atomic_write
from ._common import check_file, check_positive

PathLike = str | os.PathLike[str]

_MODEL_TYPES = ("unigram", "bpe", "char", "word")


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

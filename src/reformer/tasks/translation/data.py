"""Parallel text for translation: reading files and BLEU (the shared subword tokenizer:
`reformer.data.subword`; the batches: `batches.py`).

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
import os
import re
from collections.abc import Sequence
from pathlib import Path

import sacrebleu

from reformer.data._common import DataFileNotFoundError, check_file

PathLike = str | os.PathLike[str]

_SGML_SUFFIXES = (".sgm", ".sgml")
_SGML_ROOTS = ("<srcset", "<refset")
# WMT SGML puts one <seg> per line, but nothing in the format requires it: match across lines.
_SEG_RE = re.compile(r"<seg\b[^>]*>(.*?)</seg\s*>", re.DOTALL | re.IGNORECASE)


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

"""The ListOps task of the Long Range Arena (Tay et al. 2020, sec. 3.1): a generator, an
evaluator, the 15-token vocabulary, and a JSONL writer for the generic classification loader.

An expression is a string of space-separated tokens such as ``[MAX 2 9 [MIN 4 7 ] 0 ]``.
Each of ``[MAX``, ``[MIN``, ``[MED``, ``[SM`` opens a list that ``]`` closes; its arguments are
digits 0-9 or nested lists. MAX and MIN are what they say, MED is the median (the mean of the
two middle values rounded down when the count is even, as LRA's ``int(np.median(...))``), SM is
the sum mod 10. The label of an example is the value of the whole expression, one of 10 classes.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from ..files import atomic_output

DIGITS = tuple(str(v) for v in range(10))
OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
TOKENS = (*DIGITS, *OPERATORS, CLOSE)
"""The 15 tokens; a token's id is its index here, so a digit's id is its value."""

_INDEX = {token: i for i, token in enumerate(TOKENS)}
# Smallest list: an operator, two digits and "]". Generated lists have >= 2 arguments, as LRA's.
_MIN_LIST = 4


def encode(text: str) -> list[int]:
    """Token ids (indices into :data:`TOKENS`) of a whitespace-separated expression.

    Raises:
        ValueError: a token that is not in :data:`TOKENS` (named, with its position).
    """
    ids = []
    for pos, token in enumerate(text.split()):
        i = _INDEX.get(token)
        if i is None:
            raise ValueError(
                f"unknown ListOps token {token!r} at position {pos}; expected one of "
                f"{' '.join(TOKENS)} separated by spaces"
            )
        ids.append(i)
    return ids


def _apply(op: int, args: list[int]) -> int:
    """Value of operator ``OPERATORS[op]`` applied to digit values ``args`` (non-empty)."""
    if op == 0:
        return max(args)
    if op == 1:
        return min(args)
    if op == 2:
        s = sorted(args)
        h = len(s) // 2
        # int(np.median) of non-negative ints: the mean of the middle pair, rounded down
        return s[h] if len(s) % 2 else (s[h - 1] + s[h]) // 2
    return sum(args) % 10


# ---------------------------------------------------------------------------------------------
# Evaluator: the plain reference the generator's labels are tested against


def value(text: str) -> int:
    """Value (0-9) of an expression, by recursive descent over its tokens.

    A bare digit is an expression too; generated examples are always an operator list.

    Raises:
        ValueError: unknown token, a list with no arguments, an unclosed list, a stray ``]``,
            tokens after the end of the expression, or an empty string.
    """
    tokens = text.split()
    if not tokens:
        raise ValueError("empty ListOps expression; expected e.g. '[MAX 2 9 [MIN 4 7 ] 0 ]'")

    def parse(pos: int) -> tuple[int, int]:  # -> (value, position after the expression)
        token = tokens[pos]
        if token in _INDEX and _INDEX[token] < 10:
            return _INDEX[token], pos + 1
        if token not in OPERATORS:
            raise ValueError(
                f"unexpected token {token!r} at position {pos} of a ListOps expression; "
                f"expected a digit or one of {' '.join(OPERATORS)}"
            )
        args, pos = [], pos + 1
        while pos < len(tokens) and tokens[pos] != CLOSE:
            arg, pos = parse(pos)
            args.append(arg)
        if pos == len(tokens):
            raise ValueError(f"unclosed list {token!r}: the expression ends before its ']'")
        if not args:
            raise ValueError(f"list {token!r} at position {pos - 1} has no arguments")
        return _apply(OPERATORS.index(token), args), pos + 1

    try:
        result, end = parse(0)
    except RecursionError as e:
        raise ValueError("ListOps expression is nested too deeply to evaluate") from e
    if end != len(tokens):
        raise ValueError(
            f"extra tokens after the end of the expression at position {end}: "
            f"{' '.join(tokens[end : end + 5])!r}"
        )
    return result


# ---------------------------------------------------------------------------------------------
# Generator


def _list_sizes(total: int, parts: int, cap: int, rnd: Callable[[], float]) -> list[int]:
    """Random sizes in [4, cap], summing to ``total`` (the caller ensures 4*parts <= total <=
    cap*parts): a random composition of the spare tokens, clipped to ``cap``."""
    if parts == 1:
        return [total]
    spare = total - _MIN_LIST * parts
    cuts = sorted(int(rnd() * (spare + 1)) for _ in range(parts - 1))
    sizes = [_MIN_LIST + b - a for a, b in zip([0, *cuts], [*cuts, spare])]
    excess = sum(max(0, s - cap) for s in sizes)
    if excess:  # only near the depth limit, where cap is small: move the overflow to others
        sizes = [min(s, cap) for s in sizes]
        for j, s in enumerate(sizes):
            moved = min(cap - s, excess)
            sizes[j], excess = s + moved, excess - moved
    return sizes


def generate(
    n: int,
    *,
    seed: int,
    min_length: int = 16,
    max_length: int = 512,
    max_depth: int = 10,
    max_args: int = 10,
) -> list[tuple[str, int]]:
    """``n`` random ``(expression, label)`` examples, the same for a seed on every host.

    Each example draws a target length uniform in ``[min_length, max_length]`` and grows a tree
    of exactly that many tokens top-down: a list of ``m + 2`` tokens picks its argument count
    k in [2, max_args] and how many of the k arguments are sublists, both uniformly among the
    choices that can still fill the budget within the depth left; the sublists share the
    remaining tokens as a random composition, and digits and sublists are interleaved at
    random. The top level is always a list; ``max_depth`` counts list nesting (1 = digits
    only). Unlike LRA's rejection sampling, every length in range is equally likely and
    nothing is thrown away, so 10,000 examples of up to 2,000 tokens take about 2 s.

    Labels (10,000 examples, seed 0, lengths 16-512): most common class 9 with 18.2%, rarest
    class 3 with 5.9%, 0 with 16.6%; the skew toward 0 and 9 comes from MIN and MAX, as in LRA.

    Args:
        n: number of examples (>= 0).
        seed: seeds a private ``random.Random`` (Mersenne Twister, the same on every platform);
            the global RNG is never touched.
        min_length, max_length: token-count bounds, inclusive; ``4 <= min_length <=
            max_length``, and ``max_length`` must fit in ``max_depth`` levels of ``max_args``.
        max_depth: maximum list nesting (>= 1).
        max_args: maximum arguments of a list (>= 4, so that every length from 4 up can be
            built: with 2 or 3, lengths such as 6 cannot).

    Raises:
        ValueError: an argument out of range (named, with what is allowed).
    """
    for name, v, lo in (("n", n, 0), ("max_depth", max_depth, 1), ("max_args", max_args, 4)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not (isinstance(min_length, int) and isinstance(max_length, int)) or not (
        _MIN_LIST <= min_length <= max_length
    ):
        raise ValueError(
            f"need integers 4 <= min_length <= max_length (the shortest list is "
            f"'[MAX d d ]'), got min_length={min_length!r}, max_length={max_length!r}"
        )
    # caps[d]: the longest list with d levels of nesting, clipped where it no longer matters
    # (every length in [4, caps[d]] can then be built with d levels, proof in _build).
    limit = max(max_length, 2 + max_args)
    caps = [0, 2 + max_args]
    for _ in range(max_depth - 1):
        caps.append(min(2 + max_args * caps[-1], limit))
    if max_length > caps[max_depth]:
        raise ValueError(
            f"max_length={max_length} cannot be reached with max_depth={max_depth} and "
            f"max_args={max_args} (longest possible: {caps[max_depth]} tokens); raise "
            "max_depth or max_args, or lower max_length"
        )
    rnd = random.Random(seed).random
    out: list[str] = []
    emit, emit_all = out.append, out.extend

    def build(size: int, depth: int) -> int:
        # Appends a list of exactly `size` tokens (4 <= size <= caps[depth]); returns its value.
        # A list of m + 2 tokens with k arguments, i of them sublists of sizes in [4, c]
        # (c = caps[depth - 1]), needs i = 0 and k = m, or k + 3i <= m <= k + (c - 1)i. For
        # c >= 6 (max_args >= 4) some i fits exactly when ceil(m / c) <= k <= m - 3.
        m = size - 2
        op = int(rnd() * 4)
        emit(OPERATORS[op])
        n_mixed = 0
        if depth > 1:
            cap = caps[depth - 1]
            k_lo, k_hi = max(2, -(-m // cap)), min(max_args, m - 3)
            n_mixed = max(0, k_hi - k_lo + 1)
        choice = int(rnd() * (n_mixed + (m <= max_args)))
        if choice == n_mixed:  # only digits
            args = [int(rnd() * 10) for _ in range(m)]
            emit_all([DIGITS[v] for v in args])
        else:
            k = k_lo + choice
            i_lo, i_hi = max(1, -(-(m - k) // (cap - 1))), min(k, (m - k) // 3)
            lists = i_lo + int(rnd() * (i_hi - i_lo + 1))
            digits = k - lists
            sizes = _list_sizes(m - digits, lists, cap, rnd)
            args = []
            for _ in range(k):
                if rnd() * (digits + lists) < lists:  # a uniform interleaving
                    lists -= 1
                    args.append(build(sizes[lists], depth - 1))
                else:
                    digits -= 1
                    v = int(rnd() * 10)
                    args.append(v)
                    emit(DIGITS[v])
        emit(CLOSE)
        return _apply(op, args)

    examples = []
    span = max_length - min_length + 1
    for _ in range(n):
        out.clear()
        label = build(min_length + int(rnd() * span), max_depth)
        examples.append((" ".join(out), label))
    return examples


def write_jsonl(examples: Iterable[tuple[str, int]], path: str | os.PathLike[str]) -> Path:
    """Write ``{"text": ..., "label": ...}`` lines (label an int), atomically; return the path.

    The file appears complete or not at all (a temp file beside it is renamed over it), so an
    interrupted run never leaves a truncated split for :func:`reformer.encoder.data.read_labelled`.
    """
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text, label in examples:
            f.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return out

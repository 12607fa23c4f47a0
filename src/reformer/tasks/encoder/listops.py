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

import numpy as np

from ...files import atomic_output

DIGITS = tuple(str(v) for v in range(10))
OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
TOKENS = (*DIGITS, *OPERATORS, CLOSE)
"""The 15 tokens; a token's id is its index here, so a digit's id is its value."""

_INDEX = {token: i for i, token in enumerate(TOKENS)}
_OP_IDS = tuple(_INDEX[op] for op in OPERATORS)
_CLOSE_ID = _INDEX[CLOSE]
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


def _median(args: list[int]) -> int:
    s = sorted(args)
    h = len(s) // 2
    # int(np.median) of non-negative ints: the mean of the middle pair, rounded down
    return s[h] if len(s) % 2 else (s[h - 1] + s[h]) // 2


def _sum_mod_10(args: list[int]) -> int:
    return sum(args) % 10


# The value of OPERATORS[op] applied to a non-empty list of argument values.
_REDUCE: tuple[Callable[[list[int]], int], ...] = (max, min, _median, _sum_mod_10)


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
        return _REDUCE[OPERATORS.index(token)](args), pos + 1

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
    spare = total - _MIN_LIST * parts
    cuts = [int(rnd() * (spare + 1)) for _ in range(parts - 1)]
    cuts.sort()
    cuts.append(spare)
    sizes = [_MIN_LIST + b - a for a, b in zip([0, *cuts], cuts)]
    if max(sizes) > cap:  # only near the depth limit, where cap is small: move the overflow
        excess = sum(s - cap for s in sizes if s > cap)
        sizes = [min(s, cap) for s in sizes]
        for j, s in enumerate(sizes):
            moved = min(cap - s, excess)
            sizes[j], excess = s + moved, excess - moved
    return sizes


def _sublist_sizes(m: int, k: int, cap: int, rnd: Callable[[], float]) -> tuple[int, list[int]]:
    """(i, sizes): how many of the k arguments of an m-token list body are sublists (1 or
    more, each of 4 to ``cap`` tokens), and the sizes of those i sublists."""
    spare = m - k  # tokens beyond one per argument: 3 or more per sublist
    i_lo = 1 if spare < cap else -(-spare // (cap - 1))
    i_hi = min(k, spare // 3)
    u = rnd()  # u*u: favour few sublists (LRA's lists are mostly digits)
    lists = i_lo + int(u * u * (i_hi - i_lo + 1))
    sizes = [spare + lists] if lists == 1 else _list_sizes(spare + lists, lists, cap, rnd)
    return lists, sizes


def _plans(caps: list[int], max_args: int) -> list[list[tuple[int, int, int]]]:
    """``plans[d][m] = (k_lo, n_mixed, n_choices)`` for a list of ``m + 2`` tokens, d levels.

    A list with k arguments, i of them sublists of sizes in [4, c] (c = caps[d - 1]), fits in
    m tokens when i = 0 and k = m, or when k + 3i <= m <= k + (c - 1)i. For c >= 6 (which
    max_args >= 4 ensures) some i fits exactly when ceil(m / c) <= k <= m - 3: those
    ``n_mixed`` values of k from ``k_lo`` are choices 0 .. n_mixed - 1, and choice ``n_mixed``
    (allowed when m <= max_args) is a list of digits only. By induction every size in
    [4, caps[d]] has at least one choice.
    """
    plans: list[list[tuple[int, int, int]]] = [[]]
    for d in range(1, len(caps)):
        row = []
        for m in range(caps[d] - 1):
            if d == 1:
                k_lo, n_mixed = 0, 0
            else:
                k_lo = max(2, -(-m // caps[d - 1]))
                n_mixed = max(0, min(max_args, m - 3) - k_lo + 1)
            row.append((k_lo, n_mixed, n_mixed + (m <= max_args)))
        plans.append(row)
    return plans


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
    of exactly that many tokens top-down (see :func:`_plans`): a list of ``m + 2`` tokens picks
    its argument count k in [2, max_args] uniformly among the counts that can still fill the
    budget within the depth left, then how many arguments are sublists (skewed toward few, as
    LRA's lists are mostly digits); the sublists share the remaining tokens as a random
    composition, and digits and sublists are interleaved at random. Lists have 2 or more
    arguments, as in LRA. The top level is always a list; ``max_depth`` counts list nesting
    (1 = a list of digits only). Unlike LRA's rejection sampling, nothing is thrown away, so
    10,000 examples of 16-2,000 tokens take 4.6-5 s on a slow 2-core machine (~0.5 us a token).

    Labels measured on 10,000 examples (seed 0, lengths 16-512): most common class 9 with
    15.8%, then 0 with 15.5%, the others 7.3-9.4%; MAX and MIN of many arguments pull toward
    9 and 0, as in LRA. At lengths 16-2,000: 9 with 16.2%, 0 with 15.7%, the others 7.6-9.1%.

    Args:
        n: number of examples (>= 0).
        seed: an integer >= 0; it seeds a private ``random.Random`` for the tree shapes and
            ``numpy.random.default_rng`` for the digits (both the same on every platform); no
            global RNG is touched.
        min_length, max_length: token-count bounds, inclusive; ``4 <= min_length <=
            max_length``, and ``max_length`` must fit in ``max_depth`` levels of ``max_args``.
        max_depth: maximum list nesting (>= 1).
        max_args: maximum arguments of a list (>= 4, so that every length from 4 up can be
            built: with 2 or 3, lengths such as 6 cannot).

    Raises:
        ValueError: an argument out of range (named, with what is allowed).
    """
    _check_generate_args(n, seed, min_length, max_length, max_depth, max_args)
    caps = _length_caps(max_length, max_depth, max_args)
    rnd = random.Random(seed).random
    # Digits come in bulk from a second generator: one numpy call per example instead of one
    # Python-level draw per digit (most tokens are digits).
    digit_rng = np.random.default_rng(seed)
    grow = _tree_grower(rnd, caps, _plans(caps, max_args))
    examples = []
    span = max_length - min_length + 1
    for _ in range(n):
        size = min_length + int(rnd() * span)
        # at most size - 2 digits (a digits-only top list)
        digits = digit_rng.integers(0, 10, size=size).tolist()
        examples.append(grow(size, max_depth, digits))
    return examples


def _check_generate_args(
    n: int, seed: int, min_length: int, max_length: int, max_depth: int, max_args: int
) -> None:
    """Raise ValueError naming the first of :func:`generate`'s arguments out of range."""
    lows = {"n": (n, 0), "seed": (seed, 0), "max_depth": (max_depth, 1), "max_args": (max_args, 4)}
    for name, (v, lo) in lows.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not (isinstance(min_length, int) and isinstance(max_length, int)) or not (
        _MIN_LIST <= min_length <= max_length
    ):
        raise ValueError(
            f"need integers 4 <= min_length <= max_length (the shortest list is "
            f"'[MAX d d ]'), got min_length={min_length!r}, max_length={max_length!r}"
        )


def _length_caps(max_length: int, max_depth: int, max_args: int) -> list[int]:
    """``caps[d]``: the longest list with d levels of nesting (``caps[0] = 0``), clipped where
    it no longer matters: every length in [4, caps[d]] can then be built with d levels (see
    :func:`_plans`). Raises ValueError when ``max_length`` exceeds ``caps[max_depth]``."""
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
    return caps


def _tree_grower(
    rnd: Callable[[], float], caps: list[int], plans: list[list[tuple[int, int, int]]]
) -> Callable[[int, int, list[int]], tuple[str, int]]:
    """``grow(size, depth, digits) -> (expression, value)``: one random expression of exactly
    ``size`` tokens and at most ``depth`` levels, its shape drawn from ``rnd`` and its digits
    taken in order from ``digits`` (at least size - 2 of them).

    Closures over local names rather than a class: most of the generator's time is spent in
    ``build``, and local lookups keep it at ~0.5 us a token.
    """
    out: list[int] = []  # token ids; a digit's id is its value
    emit, emit_all = out.append, out.extend
    pool: list[int] = []
    used = 0

    def build(size: int, depth: int) -> int:
        # Appends a list of exactly `size` tokens (4 <= size <= caps[depth]); returns its value.
        nonlocal used
        m = size - 2
        op = int(rnd() * 4)
        emit(_OP_IDS[op])
        k_lo, n_mixed, n_choices = plans[depth][m]
        choice = int(rnd() * n_choices) if n_choices > 1 else 0
        if choice == n_mixed:  # only digits
            args = pool[used : used + m]
            used += m
            emit_all(args)
        else:
            args = mixed_args(m, k_lo + choice, depth)
        emit(_CLOSE_ID)
        return _REDUCE[op](args)

    def mixed_args(m: int, k: int, depth: int) -> list[int]:
        # Appends k arguments filling m tokens, one or more of them sublists of depth - 1
        # levels, interleaved with digits at random; returns their values.
        nonlocal used
        lists, sizes = _sublist_sizes(m, k, caps[depth - 1], rnd)
        digits = k - lists
        args = []
        push = args.append
        for _ in range(k):
            if rnd() * (digits + lists) < lists:  # a uniform interleaving
                lists -= 1
                push(build(sizes[lists], depth - 1))
            else:
                digits -= 1
                v = pool[used]
                used += 1
                push(v)
                emit(v)
        return args

    def grow(size: int, depth: int, digits: list[int]) -> tuple[str, int]:
        nonlocal pool, used
        out.clear()
        pool, used = digits, 0
        label = build(size, depth)
        return " ".join(map(TOKENS.__getitem__, out)), label

    return grow


def write_jsonl(examples: Iterable[tuple[str, int]], path: str | os.PathLike[str]) -> Path:
    """Write ``{"text": ..., "label": ...}`` lines (label an int), atomically; return the path.

    The file appears complete or not at all (a temp file beside it is renamed over it), so an
    interrupted run never leaves a truncated split for `data.read_labelled`.
    """
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text, label in examples:
            f.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return out

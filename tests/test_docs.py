"""Docs that cannot drift: README.md, docs/*.md and bench/README.md against the checkout and
today's CLI. Each case is named FILE:LINE.

1. Links: every relative link (`[text](path)`, `![alt](path)`, `path#anchor`, `#anchor`)
   names a file or directory of the checkout, and an anchor into a Markdown file names one of
   its headings under GitHub's slug rules.
2. Commands: every `reformer ...` line in a fenced code block (also `python -m reformer ...`
   and `torchrun ... -m reformer ...`; backslash continuations joined; in a pipeline, the
   stage that runs `reformer`; in a `$ `-prompted transcript, the prompted lines only)
   parses with today's CLI. The parse is dry: each verb's own parser (`parse_train_args` for
   train and plan, the verb's tyro dataclass for the others), which reads no data, builds no
   model and writes nothing. Parsing reads one kind of file: the run that `--init-from RUN`
   names. Such a RUN must be one that an earlier command of the same page writes (its
   `--out`); the test writes it into a temporary directory as a step-0 checkpoint holding
   the config that command resolves (a `reformer convert --from-transformers` import stands
   in as the default run config of its task, since the transformers directory is not here).
3. The README's first Python block runs as it is.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import tyro

from reformer.checkpoint import save_checkpoint
from reformer.cli.convert import ConvertArgs
from reformer.cli.eval import EvalArgs
from reformer.cli.generate import GenerateArgs
from reformer.cli.plan import parse_plan_args
from reformer.cli.plot import PlotArgs
from reformer.cli.predict import PredictArgs
from reformer.cli.train import cmd_train, parse_train_args
from reformer.cli.translate import TranslateArgs
from reformer.plan import parse_size
from reformer.run_config import TrainConfig, config_to_dict

ROOT = Path(__file__).resolve().parents[1]
EXTRA_PAGES = ("bench/README.md", "repro/README.md")  # checked when they exist
PAGES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *(ROOT / e for e in EXTRA_PAGES)]
    if p.is_file()
)
VERBS = ("train", "eval", "plot", "generate", "translate", "predict", "convert", "plan")


# --- reading Markdown ----------------------------------------------------------------------------
def _lines_outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the prose: fenced code blocks left out."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*(```+|~~~+)", line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = None if fence else m.group(1)
            continue
        if fence is None:
            out.append((n, line))
    return out


def _fenced_blocks(text: str) -> list[list[tuple[int, str]]]:
    """Each fenced code block as its (line number, line) pairs."""
    blocks, fence, block = [], None, []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*(```+|~~~+)", line)
        if m and (fence is None or m.group(1).startswith(fence)):
            if fence is None:
                fence, block = m.group(1), []
            else:
                fence = None
                blocks.append(block)
            continue
        if fence is not None:
            block.append((n, line))
    return blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, every character but
    letters, digits, `_`, `-` and spaces dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags render as nothing
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of a Markdown file's ATX headings; repeats get -1, -2, ... as on GitHub."""
    anchors, seen = set(), {}
    for _, line in _lines_outside_fences(page.read_text()):
        m = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen[slug] = seen.get(slug, -1) + 1
            anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links() -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        for n, line in _lines_outside_fences((ROOT / page).read_text()):
            prose = re.sub(r"(`+)(?:(?!\1).)+\1", "``", line)  # code spans hold no links
            found += [(page, n, m.group(1)) for m in LINK.finditer(prose)]
    return found


# --- commands in code blocks ---------------------------------------------------------------------
def _strip_comment(line: str) -> str:
    """The line without a shell comment: `#` outside quotes, at a word's start."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _reformer_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after `reformer` when this pipeline stage runs the CLI, else None."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]  # VAR=value prefixes
    if not tokens:
        return None
    head = Path(tokens[0]).name
    if tokens[0] == "reformer" or tokens[0].endswith("/bin/reformer"):
        return tokens[1:]
    if head.startswith("python") or head == "torchrun":
        for i in range(1, len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "reformer":
                return tokens[i + 2 :]
            if head.startswith("python") and tokens[i] == "-m":
                return None  # python -m another.module
    return None


def _commands(page: str) -> list[tuple[int, str, list[str]]]:
    """(line, command as written, argv after `reformer`) for each documented command."""
    found = []
    for block in _fenced_blocks((ROOT / page).read_text()):
        transcript = any(line.lstrip().startswith("$ ") for _, line in block)
        logical: list[tuple[int, str]] = []
        joining = False
        for n, line in block:
            if joining:
                logical[-1] = (logical[-1][0], logical[-1][1][:-1] + " " + line.strip())
            else:
                logical.append((n, line.strip()))
            joining = logical[-1][1].endswith("\\")
        for n, line in logical:
            if transcript:
                if not line.startswith("$ "):
                    continue  # output in a transcript
                line = line[2:]
            lex = shlex.shlex(_strip_comment(line), posix=True, punctuation_chars="|&;")
            lex.whitespace_split = True
            try:
                tokens = list(lex)
            except ValueError as e:  # not shell (Python, say), unless it starts as a command
                if re.match(r"(\S+=\S*\s+)*(\S*/)?(reformer|python3?|torchrun)\s", line):
                    found.append((n, line, [f"(not shell: {e})"]))
                continue
            stage: list[str] = []
            for tok in [*tokens, "|"]:
                if tok and set(tok) <= set("|&;"):
                    argv = _reformer_argv(stage)
                    if argv is not None:
                        found.append((n, line, argv))
                    stage = []
                else:
                    stage.append(tok)
    return found


COMMANDS = [(page, n, line, argv) for page in PAGES for n, line, argv in _commands(page)]


def _flag(argv: list[str], *names: str) -> str | None:
    for i, a in enumerate(argv):
        for name in names:
            if a == name and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
    return None


def _dry_parse(argv: list[str]) -> object:
    """What `reformer VERB ...` makes of its arguments before it runs anything: train's and
    plan's resolved TrainConfig, or the verb's arguments dataclass."""
    assert argv and argv[0] in VERBS, f"unknown verb {argv[:1]}; the CLI has {VERBS}"
    verb, rest = argv[0], argv[1:]
    if verb == "train":
        if "--list-presets" in rest:  # answered before any parsing: prints the presets
            assert cmd_train(rest) == 0
            return None
        return parse_train_args(rest)
    if verb == "plan":  # cmd_plan's own flags, then train's layers on the rest
        args, rest = parse_plan_args(rest)
        if args.budget is not None:
            parse_size(args.budget)
        return parse_train_args(rest)
    if verb == "convert":
        args = tyro.cli(ConvertArgs, args=rest, prog="reformer convert")
        assert (args.from_transformers is None) != (args.to_transformers is None), (
            "reformer convert needs exactly one of --from-transformers and --to-transformers"
        )
        return args
    kind = {
        "eval": EvalArgs,
        "plot": PlotArgs,
        "generate": GenerateArgs,
        "translate": TranslateArgs,
        "predict": PredictArgs,
    }[verb]
    return tyro.cli(kind, args=rest, prog=f"reformer {verb}")


def _write_run(page: str, run: str, before: int) -> None:
    """Write the run `--init-from run` names, as the last command of `page` before line
    `before` whose --out it is resolves it (in the current directory: the test's tmp)."""
    makers = [
        (n, argv)
        for n, _, argv in _commands(page)
        if n < before and argv[0] in ("train", "convert") and _flag(argv, "--out") == run
    ]
    assert makers, (
        f"--init-from {run}: no earlier command on {page} writes it (--out {run}); show "
        "where the run comes from"
    )
    n, argv = makers[-1]
    if argv[0] == "train":
        parent = _flag(argv[1:], "--init-from", "--init_from")
        if parent is not None and not Path(parent).exists():
            _write_run(page, parent, n)
        config = config_to_dict(_dry_parse(argv))
    else:  # an import: the transformers directory decides the model; not here
        args = _dry_parse(argv)
        config = config_to_dict(TrainConfig(task=args.task or "enwik8"))
    save_checkpoint(run, 0, torch.nn.Module(), config=config)


@pytest.mark.parametrize(
    ("page", "line", "command", "argv"),
    COMMANDS,
    ids=[f"{page}:{n}" for page, n, _, _ in COMMANDS],
)
def test_documented_command_parses(page, line, command, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing a parse might write lands in the checkout
    init = _flag(argv[1:], "--init-from", "--init_from")
    try:
        if argv[0] in ("train", "plan") and init is not None and not Path(init).exists():
            _write_run(page, init, line)
        _dry_parse(argv)
    except SystemExit as e:  # tyro and argparse exit on a flag or value they refuse
        if e.code:
            err = capsys.readouterr().err[-2000:]
            pytest.fail(f"{page}:{line}: `{command}` does not parse:\n{err}", pytrace=False)
    except (ValueError, TypeError, FileNotFoundError, AssertionError) as e:
        pytest.fail(f"{page}:{line}: `{command}` does not parse: {e}", pytrace=False)


def test_commands_are_found():
    """The extraction sees the documented commands: the README shows every verb."""
    in_readme = {argv[0] for page, _, _, argv in COMMANDS if page == "README.md"}
    assert in_readme == set(VERBS), f"README.md lacks an example of {set(VERBS) - in_readme}"
    assert len(COMMANDS) >= 30, COMMANDS


# --- links ---------------------------------------------------------------------------------------
LINKS = _links()


@pytest.mark.parametrize(
    ("page", "line", "target"), LINKS, ids=[f"{p}:{n}:{target}" for p, n, target in LINKS]
)
def test_link_resolves(page, line, target):
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):
        return  # http:, https:, mailto:: not this checkout's business
    path, _, anchor = target.partition("#")
    dest = (ROOT / page).parent / path if path else ROOT / page
    assert dest.exists(), (
        f"{page}:{line}: link to {target}: {os.path.relpath(dest, ROOT)} is missing"
    )
    if anchor and dest.suffix == ".md":
        anchors = _anchors(dest)
        assert anchor in anchors, (
            f"{page}:{line}: link to {target}: {os.path.relpath(dest, ROOT)} has no heading "
            f"#{anchor}; its anchors: {sorted(anchors)}"
        )


def test_github_slug():
    assert github_slug("FSDP (`--parallel fsdp`)") == "fsdp---parallel-fsdp"
    assert github_slug("transformers' checkpoints: import and export") == (
        "transformers-checkpoints-import-and-export"
    )
    assert github_slug("Interruptions, exit codes, locking and I/O errors") == (
        "interruptions-exit-codes-locking-and-io-errors"
    )
    assert github_slug("Time per token (the paper's Figure 5)") == (
        "time-per-token-the-papers-figure-5"
    )


# --- the README's example ------------------------------------------------------------------------
def test_readme_python_example_runs():
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert blocks, "README.md has no ```python block"
    exec(compile(blocks[0], "README.md (first python block)", "exec"), {"__name__": "readme"})

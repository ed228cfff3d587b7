"""README.md's command lines against the real command line: documentation drift fails here.

Every ``hyperface ...`` command in a ```bash block of README.md (also ``python -m hyperface ...``
and ``torchrun ... -m hyperface ...``, continued over lines with a trailing backslash, several per
line joined by ``&&``, ``;`` or ``|``) is read with shlex and given to ``hyperface.cli.main`` with
every stage's ``func`` replaced by a recorder: the exact parsing ``hyperface`` does (argparse, then
main's own check of what argparse left over), and no stage run. A flag or sub-command the CLI does
not know, a bad value for a typed option, or a missing required argument fails the case of its
README line, with argparse's message. README conventions read as a reader would:

- ``...`` between arguments means "as in the command before" (``hyperface generate ids.npy ...
  --lcm-lora X``): it stands for the options of the previous command of the same stage in the same
  block, so that command's required arguments count as given;
- ``$VAR``, ``${VAR}`` and ``$(...)`` become ``1`` (a valid path, int and float);
- a usage synopsis (``hyperface evaluate MODEL BIN... [--json FILE] ...``, brackets, continued on
  indented lines that start with ``[``) is not a command: its options must exist (a test of its own).

Options must also be spelled in full: argparse takes an unambiguous prefix, but a README that
relies on one breaks the day an option sharing the prefix is added.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hyperface.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"

SHELL_BLOCK_LANGUAGES = {"bash", "sh", "shell", "console"}
CONTROL_OPERATORS = {"&&", "||", ";", "|", "&", ";;", "|&"}
REDIRECTIONS = {">", ">>", "<", "<<", ">&", "<&", "&>", ">|"}
# words that may come before the command word of a simple command (`do hyperface ...` in a for loop)
COMMAND_PREFIXES = {"do", "then", "else", "time", "nohup", "exec", "env", "command", "!", "(", ")", "{"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"\$\([^)]*\)|\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")
PLACEHOLDER = "1"
ELLIPSIS = "..."
OPTION_IN_SYNOPSIS = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def _sub_parsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


PARSER = build_parser()  # hyperface's own; the stage words of README commands are read with it


@dataclass
class Command:
    line: int  # README line the command starts on (1-based)
    text: str  # the command as written (continuations joined)
    argv: list[str]  # what `hyperface` receives
    stage: str
    elided_from: int | None = None  # line of the command `...` stands for
    id: str = ""


@dataclass
class Synopsis:
    line: int
    text: str
    words: list[str]  # stage (and action) named before the first option
    options: list[str] = field(default_factory=list)


def shell_blocks(text: str):
    """(line number of the block's first line, its lines) of every fenced shell block."""
    lines = text.splitlines()
    inside, language, start, body = False, "", 0, []
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and not inside:
            inside, language, start, body = True, fence.group(1).lower(), number + 1, []
        elif fence and inside:
            inside = False
            if language in SHELL_BLOCK_LANGUAGES:
                yield start, body
        elif inside:
            body.append(line)


def logical_lines(start: int, body: list[str]):
    """(first line number, text) of each logical line, trailing-backslash continuations joined."""
    pending, first = [], None
    for offset, line in enumerate(body):
        if first is None:
            first = start + offset
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        pending.append(line)
        yield first, " ".join(pending)
        pending, first = [], None
    if pending:
        yield first, " ".join(pending)


def tokens(text: str) -> list[str]:
    lexer = shlex.shlex(VARIABLE.sub(PLACEHOLDER, text), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True  # `data/a+b`, `cuda:0`, `1e-3` stay words; only ();<>|& split
    return list(lexer)


def simple_commands(words: list[str]):
    """The simple commands of a pipeline/list: split on && || ; | &, redirections dropped."""
    command: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in CONTROL_OPERATORS:
            if command:
                yield command
            command = []
        elif word in REDIRECTIONS:
            skip_next = True  # the redirection's target
        else:
            command.append(word)
    if command:
        yield command


def hyperface_arguments(command: list[str]) -> list[str] | None:
    """The arguments `hyperface` gets from one simple command, or None when it does not run hyperface."""
    for i in range(len(command) - 1):  # python -m hyperface ..., torchrun ... -m hyperface ...
        if command[i] == "-m" and command[i + 1] in ("hyperface", "hyperface.cli"):
            return command[i + 2:]
    i = 0
    while i < len(command) and (command[i] in COMMAND_PREFIXES or ASSIGNMENT.match(command[i])):
        i += 1
    if i < len(command) and (command[i] == "hyperface" or command[i].endswith("/hyperface")):
        return command[i + 1:]
    return None


def stage_words(argv: list[str]) -> list[str]:
    """The sub-command words argv starts with, as the real parser has them (`train`, `dataset convert`)."""
    words, parser = [], PARSER
    for word in argv:
        choices = dict(_sub_parsers(parser))
        if word not in choices:
            break
        words.append(word)
        parser = choices[word]
    return words


def extract(text: str) -> tuple[list[Command], list[Synopsis]]:
    commands: list[Command] = []
    synopses: list[Synopsis] = []
    for start, body in shell_blocks(text):
        last_by_stage: dict[str, Command] = {}  # for `...`: within one block only
        synopsis = None  # the synopsis the next indented `[...]` line continues
        for number, line in logical_lines(start, body):
            if synopsis is not None and line[:1].isspace() and line.strip().startswith("["):
                synopsis.text += " " + line.strip()
                synopsis.options += OPTION_IN_SYNOPSIS.findall(line)
                continue
            synopsis = None
            for simple in simple_commands(tokens(line)):
                argv = hyperface_arguments(simple)
                if argv is None:
                    continue
                if any(word.startswith("[") for word in argv):
                    words = stage_words(argv)
                    synopsis = Synopsis(number, line.strip(), words, OPTION_IN_SYNOPSIS.findall(" ".join(argv[len(words):])))
                    synopses.append(synopsis)
                    continue
                stage = " ".join(stage_words(argv)) or "(none)"
                command = Command(number, " ".join(line.split("#")[0].split()), argv, stage)
                if ELLIPSIS in argv:
                    before = last_by_stage.get(stage)
                    if before is not None:
                        options = before.argv[next((k for k, w in enumerate(before.argv) if w.startswith("-")), len(before.argv)):]
                        i = argv.index(ELLIPSIS)
                        command.argv = argv[:i] + options + [w for w in argv[i + 1:] if w != ELLIPSIS]
                        command.elided_from = before.line
                    # else: argv keeps `...`, and the case fails saying what it could not expand
                last_by_stage[stage] = command
                commands.append(command)
    seen: dict[str, int] = {}
    for command in commands:
        base = f"README.md:{command.line}-{command.stage.replace(' ', '-')}"
        seen[base] = seen.get(base, 0) + 1
        command.id = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return commands, synopses


def _stage_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        choices = dict(_sub_parsers(parser))
        if word not in choices:
            break
        parser = choices[word]
    return parser


COMMANDS, SYNOPSES = extract(README.read_text(encoding="utf-8"))
STAGES_IN_README = {"embed", "pack", "generate", "train", "evaluate", "report", "dataset"}


@pytest.fixture(scope="module")
def recording_parser():
    """hyperface's real parser with every stage's func replaced by a recorder of its arguments."""
    parser = PARSER
    calls: list[argparse.Namespace] = []

    def record(args: argparse.Namespace) -> int:
        calls.append(args)
        return 0

    def replace(p: argparse.ArgumentParser) -> int:
        replaced = 0
        for _, sub in _sub_parsers(p):
            if sub.get_default("func") is not None:
                sub.set_defaults(func=record)
                replaced += 1
            replaced += replace(sub)
        return replaced

    assert replace(parser) >= len(STAGES_IN_README)
    return parser, calls


def test_readme_commands_extracted():
    """A broken extractor must not pass by finding nothing: the README shows every stage, many times."""
    assert len(COMMANDS) >= 45, [c.id for c in COMMANDS]  # 57 when this test was written
    stages = {c.stage.split()[0] for c in COMMANDS}
    assert STAGES_IN_README <= stages, STAGES_IN_README - stages
    assert {"dataset info", "dataset convert", "dataset pairs"} <= {c.stage for c in COMMANDS}
    assert any(c.elided_from for c in COMMANDS)  # the `...` convention is understood
    assert SYNOPSES, "the evaluate synopsis was not found"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_parses(command: Command, recording_parser, monkeypatch, capsys):
    import hyperface.cli

    parser, calls = recording_parser
    where = f"README.md line {command.line}: {command.text}"
    if command.elided_from:
        where += f"\n  (`...` read as the options of the command on line {command.elided_from})"
    if ELLIPSIS in command.argv:
        pytest.fail(f"{where}\n  `...` with no earlier `hyperface {command.stage}` command in its block to stand for", pytrace=False)
    monkeypatch.setattr(hyperface.cli, "build_parser", lambda: parser)
    calls.clear()
    exited = False
    try:
        code = hyperface.cli.main(list(command.argv))
    except SystemExit as exc:  # argparse's error (2), or --help / --version (0)
        exited, code = True, exc.code or 0
    if exited and code == 0:
        return
    if exited:
        message = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"{where}\n  argv: {command.argv}\n  {message[-1] if message else f'exit {code}'}", pytrace=False)
    assert code == 0 and len(calls) == 1, f"{where}\n  names no stage (main printed its help)"
    args = calls[0]
    assert " ".join(filter(None, (args.stage, getattr(args, "action", None)))) == command.stage, where

    stage_parser = _stage_parser(parser, command.stage.split())
    known = {name for action in stage_parser._actions + parser._actions for name in action.option_strings}
    for word in command.argv[: command.argv.index("--") if "--" in command.argv else len(command.argv)]:
        name = word.split("=", 1)[0]
        if name.startswith("--") and name not in known:
            pytest.fail(f"{where}\n  {name} is an abbreviation argparse expands; the README should spell the option", pytrace=False)


@pytest.mark.parametrize("synopsis", SYNOPSES, ids=[f"README.md:{s.line}-synopsis-{'-'.join(s.words)}" for s in SYNOPSES])
def test_readme_synopsis_options_exist(synopsis: Synopsis, recording_parser):
    parser, _ = recording_parser
    stage_parser = _stage_parser(parser, synopsis.words)
    assert stage_parser is not parser, f"README.md line {synopsis.line}: no stage {synopsis.words}"
    known = {name for action in stage_parser._actions for name in action.option_strings}
    assert synopsis.options, synopsis.text
    unknown = [name for name in synopsis.options if name not in known]
    if unknown:
        pytest.fail(f"README.md line {synopsis.line}: {synopsis.text}\n  `hyperface {' '.join(synopsis.words)}` has no "
                    f"{', '.join(unknown)}", pytrace=False)

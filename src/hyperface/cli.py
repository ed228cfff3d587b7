"""``hyperface <stage>``: a thin command line over each stage's Python API.

Each stage owns ``hyperface/<package>/cli.py`` with ``register(subparsers)``, which adds its
sub-command and sets ``func(args) -> int``. Those modules import only argparse at top level, so
``hyperface --help`` stays instant; the heavy imports happen inside ``func``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from hyperface import __version__
from hyperface.common.errors import HyperfaceError

# Pipeline order: the order `hyperface --help` lists the stages in.
STAGE_CLI_MODULES = [
    "hyperface.recognition.cli",  # embed
    "hyperface.packing.cli",  # pack
    "hyperface.generation.cli",  # generate
    "hyperface.training.cli",  # train
    "hyperface.evaluation.cli",  # evaluate
    "hyperface.report.cli",  # report
    "hyperface.datasets.cli",  # dataset: info, --check, convert
    "hyperface.common.env_cli",  # env: not a stage; what this machine offers
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose paragraphs of a description or epilog to the terminal; keeps any paragraph with
    indented lines (examples, tables) exactly as written."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        # option help: never split "--channels-last" or "max-autotune" at its hyphen
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line[:1].isspace() for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(
                    " ".join(lines), width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
                ))
        return "\n\n".join(paragraphs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperface",
        description=(
            "Synthetic face-recognition datasets with HyperFace: embed a gallery, pack identities on "
            "the hypersphere, generate images with Arc2Face, train and evaluate FR models."
        ),
        epilog="Run `hyperface <stage> --help` for each stage's options.",
    )
    parser.add_argument("--version", action="version", version=f"hyperface {__version__}")
    subparsers = parser.add_subparsers(dest="stage", metavar="<stage>")
    for module_name in STAGE_CLI_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # stage not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options ``argv`` gives explicitly (their dests), as argparse reads them: exact names,
    ``--name=value``, and unambiguous prefixes of long names. What a resume may fill in is the rest."""
    options = {name: action.dest for action in parser._actions for name in action.option_strings}
    given = set()
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-"):
            continue
        name = token.split("=", 1)[0]
        if name in options:
            given.add(options[name])
        elif name.startswith("--"):
            matches = {dest for option, dest in options.items() if option.startswith(name)}
            if len(matches) == 1:
                given |= matches
    return given


def _stage_parser(parser: argparse.ArgumentParser, *names: str | None) -> argparse.ArgumentParser:
    """The parser of ``hyperface <stage> [<action>]``, so its errors name the command as typed."""
    for name in names:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or name not in sub.choices:
            break
        parser = sub.choices[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 2
    stage_parser = _stage_parser(parser, args.stage, getattr(args, "action", None))
    late = getattr(args, "late_positionals", None)  # a stage whose last positional may follow options
    if extra:
        unknown = [token for token in extra if token.startswith("-") and token != "--"]
        names = [token for token in extra if not token.startswith("-")]
        if unknown or (names and not late):
            stage_parser.error(f"unrecognized arguments: {' '.join(unknown or names)}")
        if late:
            getattr(args, late).extend(names)
    args.argv, args.stage_parser = argv, stage_parser
    _quiet_opencv()
    previous_sigterm = _sigterm_as_interrupt()
    try:
        return int(args.func(args) or 0)
    except HyperfaceError as exc:
        print(f"{stage_parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `hyperface ... | head`: the reader left; not an error of ours
        import os

        try:  # so the flush at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor (io.UnsupportedOperation is a ValueError)
            pass
        return 0
    except OSError as exc:
        if exc.filename is None and exc.errno != errno.ENOSPC:
            raise  # not about a path the user gave: a bug, keep the traceback
        where = f": {exc.filename}" if exc.filename is not None else ""
        print(f"{stage_parser.prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{stage_parser.prog}: interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130
    finally:
        if previous_sigterm is not None:
            import signal

            signal.signal(signal.SIGTERM, previous_sigterm)


def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's or `kill`'s stop) as Ctrl-C for the whole command, not only inside the
    loops that checkpoint (they take both signals themselves): a stop while the last files are
    written is then the same clean exit 130 with its --resume hint, not a silent 143. Returns the
    handler it replaced, or None where it left SIGTERM alone (not the main thread; a program
    calling ``main`` with its own handler)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _quiet_opencv() -> None:
    """OpenCV's own decoder warnings ("PNG input buffer is incomplete") repeat, on a line of their
    own, what our errors and rejected lists already say: shown only with HYPERFACE_LOG=DEBUG. The
    command line only: a program importing hyperface keeps its own OpenCV settings."""
    import os

    if os.environ.get("HYPERFACE_LOG", "").upper() == "DEBUG":
        return
    try:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except (ImportError, AttributeError):  # an OpenCV build without its logging module
        pass


def _after_interrupt(args: argparse.Namespace) -> str:
    """What to run after Ctrl-C: only the stages that checkpoint have --resume."""
    if hasattr(args, "resume") and not getattr(args, "export", None):  # train --export has nothing to resume
        return "rerun with --resume to continue"
    if args.stage == "evaluate":
        return ("rerun the same command" + (" (the IJB features in --cache are kept)" if getattr(args, "cache", None)
                else "; with --ijb, --cache DIR keeps finished features across interruptions"))
    return "rerun the same command (with --overwrite if it says the output folder is not empty)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``deepemd`` command: a thin dispatcher.

The core knows no job. Each job registers its subcommands through the entry-point group
``deepemd.commands``: the value is a function ``register(subparsers)`` that adds parsers and sets
``func=callable(args) -> int | None`` on them. User errors (:class:`DeepEMDError`) print one
message and exit 2; ``--debug`` shows the traceback instead. So do failures of the user's file
system (permission denied, a file where a folder should be, a full or read-only disk: an
``OSError`` naming a file, see :data:`deepemd.io.USER_ERRNOS`); a command's ``out`` (flag or
YAML) is checked when its options are read (``deepemd.config.add_command``), before it runs.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import warnings
from importlib.metadata import entry_points
from typing import Any, NoReturn, Sequence

from deepemd.config import HelpFormatter
from deepemd.errors import DeepEMDError
from deepemd.io import USER_ERRNOS, os_error
from deepemd.memory import keep_freed_memory

ENTRY_POINT_GROUP = "deepemd.commands"


_UNKNOWN_OWNER = "_deepemd_unknown_owner"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one ``deepemd: error:`` line, like every other error.

    No prefix matching (``--rerank`` is not ``--rerank-k``: a renamed option must not silently
    change meaning), and an unknown option gets a did-you-mean from the parser it was given to.
    Subparsers are of this class too: ``add_subparsers`` makes its parsers with the class of the parser it is called on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]  # same contract, narrower types
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        namespace = parsed if parsed is not None else argparse.Namespace()
        if extras and not hasattr(namespace, _UNKNOWN_OWNER):
            # a subcommand's leftovers reach the top parser mixed in with its own: remember which
            # (innermost) parser could not use them, so the suggestion comes from its options
            setattr(namespace, _UNKNOWN_OWNER, self)
        return namespace, extras

    def parse_args(  # type: ignore[override]  # same contract, narrower types
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        owner = vars(namespace).pop(_UNKNOWN_OWNER, self)
        if extras:
            owner.error(owner.unknown_argument(extras[0]))
        return namespace

    def unknown_argument(self, arg: str) -> str:
        """What is wrong with ``arg``, an argument this parser has no place for."""
        if not re.match(r"-\D", arg):
            return f"unexpected argument '{arg}' to {self.prog}"
        flag = arg.partition("=")[0]
        # compared without the dashes every option shares, or '--bogus' would be close to '--out'
        names = {o.lstrip("-"): o for a in self._actions for o in a.option_strings}
        close = difflib.get_close_matches(flag.lstrip("-"), names, n=1)
        hint = f"did you mean '{names[close[0]]}'?" if close else f"see '{self.prog} --help' for its options"
        return f"unknown option '{flag}' ({hint})"

    def error(self, message: str) -> NoReturn:
        """One line, no usage block: the error is the news, ``--help`` has the usage."""
        self.exit(2, f"deepemd: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="deepemd",
        description="DeepEMD: Earth Mover's Distance over local CNN features, for retrieval "
        "reranking and few-shot classification.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        ep.load()(subparsers)
    return parser


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as the command's user reads it: ``deepemd: warning: ...`` on one line, not
    Python's ``file.py:123: UserWarning:`` with the source line of the ``warn`` call."""
    return "deepemd: warning: " + " ".join(str(message).split()) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    keep_freed_memory()  # batch after batch of the same large tensors: no page-fault churn
    # formatwarning, not showwarning: pytest.warns and warnings.catch_warnings(record=True)
    # still record the warnings of a command run inside them.
    python_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _run(argv, debug)
    finally:
        warnings.formatwarning = python_format


def _run(argv: list[str], debug: bool) -> int:
    """The command itself, its user errors one line each (``--debug`` re-raises them)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0 if not argv else 2
        result = args.func(args)
        return int(result or 0)
    except DeepEMDError as exc:
        if debug:
            raise
        print(f"deepemd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug or exc.filename is None or exc.errno not in USER_ERRNOS:
            raise
        print(f"deepemd: error: {os_error(exc, action='read or write')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepemd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

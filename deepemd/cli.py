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
import sys
from importlib.metadata import entry_points
from typing import Sequence

from deepemd.errors import DeepEMDError
from deepemd.io import USER_ERRNOS, os_error
from deepemd.memory import keep_freed_memory

ENTRY_POINT_GROUP = "deepemd.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepemd",
        description="DeepEMD: Earth Mover's Distance over local CNN features, for retrieval "
        "reranking and few-shot classification.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        ep.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    keep_freed_memory()  # batch after batch of the same large tensors: no page-fault churn
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

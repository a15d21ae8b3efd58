"""``deepemd bench ...``: speed tables, each with ratios to a reference measured in the same run.

``bench`` is registered like every other command (entry point ``deepemd.commands``); its
subcommands are the entry points of the group ``deepemd.benchmarks`` (a function
``register(subparsers)`` each), so a job adds its own benchmark without the core knowing it.
The core's own is ``emd`` (:mod:`deepemd.bench.emd`: every EMD solver per problem).
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points

BENCHMARK_GROUP = "deepemd.benchmarks"


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="speed tables with ratios measured in one run")
    found = sorted(entry_points(group=BENCHMARK_GROUP), key=lambda e: e.name)
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join(e.name for e in found) + "}")
    for ep in found:
        ep.load()(sub)


__all__ = ["register", "BENCHMARK_GROUP"]

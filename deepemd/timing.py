"""Where a job's time goes, and how long the rest of it will take.

``with recording() as timer:`` collects the seconds of every ``with stage("name"):`` block run
inside it (in any module, with no timer passed around; outside a recording a stage costs one
``perf_counter`` call), so a benchmark reads the real per-stage times of the job's own code path
instead of timing a copy of it.

:class:`JobClock` turns per-stage work estimates into one ETA for the whole job: each stage
starts from a planned number of work units and a guessed cost per unit, and the guess is
replaced by the measured rate as soon as the stage has done some work, so the total shown on
every progress bar covers every stage still to come, not only the current one.
"""

from __future__ import annotations

import contextvars
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageTimer:
    """Seconds and calls per stage name, in the order stages first ran."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1

    def get(self, name: str) -> float:
        return float(self.seconds.get(name, 0.0))


_ACTIVE: contextvars.ContextVar[StageTimer | None] = contextvars.ContextVar("deepemd_timer", default=None)


@contextmanager
def recording() -> Iterator[StageTimer]:
    """Collect every :func:`stage` run inside the block (nested recordings each get their own)."""
    timer = StageTimer()
    token = _ACTIVE.set(timer)
    try:
        yield timer
    finally:
        _ACTIVE.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block into the active recording, if any."""
    timer = _ACTIVE.get()
    if timer is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timer.add(name, time.perf_counter() - start)


def record(name: str, seconds: float) -> None:
    """Add ``seconds`` measured elsewhere to stage ``name`` of the active recording, if any."""
    timer = _ACTIVE.get()
    if timer is not None:
        timer.add(name, seconds)


def format_seconds(seconds: float) -> str:
    """``75 -> '1m15s'``, ``4000 -> '1h07m'``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


@dataclass
class _Plan:
    units: float
    per_unit: float  # guessed seconds per unit until measured
    done: float = 0.0
    spent: float = 0.0

    def remaining(self) -> float:
        rate = self.spent / self.done if self.done > 0 else self.per_unit
        return max(0.0, self.units - self.done) * rate


class JobClock:
    """ETA of a whole job made of stages (``plan`` each, then ``advance`` as work is done)."""

    def __init__(self) -> None:
        self.plans: dict[str, _Plan] = {}
        self.start = time.perf_counter()

    def plan(self, name: str, units: float, seconds_per_unit: float) -> None:
        self.plans[name] = _Plan(float(units), float(seconds_per_unit))

    def advance(self, name: str, units: float, seconds: float) -> None:
        plan = self.plans[name]
        plan.done += units
        plan.spent += seconds

    def remaining(self) -> float:
        return sum(p.remaining() for p in self.plans.values())

    def total(self) -> float:
        """Estimated wall time of the whole job: spent so far plus what remains."""
        return time.perf_counter() - self.start + self.remaining()

    def describe(self) -> str:
        return f"job ETA {format_seconds(self.remaining())} of ~{format_seconds(self.total())}"


__all__ = ["JobClock", "StageTimer", "format_seconds", "record", "recording", "stage"]

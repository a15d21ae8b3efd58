"""One registry type for every named, pluggable piece: backbones, layouts, local kinds, solvers,
losses, few-shot methods (timm's ``register_model`` / ``create_model`` is the model).

A :class:`Registry` maps a name to an object (usually a builder) plus free-form ``info``. The
options layer reads :meth:`Registry.names` to list valid choices in ``--help`` and to answer a
wrong name with a did-you-mean; tests read the same list instead of hard-coding it.

>>> solvers = Registry("EMD solver")
>>> @solvers.register("exact", summary="ours")
... def exact(): return "x"
>>> solvers.get("exact")()
'x'
>>> solvers.names()
['exact']
>>> solvers.get("exakt")
Traceback (most recent call last):
...
deepemd.errors.DeepEMDError: unknown EMD solver 'exakt'
fix: did you mean 'exact'?
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from deepemd.errors import DeepEMDError

T = TypeVar("T")


def _identity(name: str) -> str:
    return name


class Registry(Generic[T]):
    """Named objects of one kind, in registration order.

    ``normalise`` maps a user's spelling to the registered key (e.g. ``efficientnet-lite0`` ->
    ``efficientnet_lite0``) before lookup.
    """

    def __init__(self, kind: str, normalise: Callable[[str], str] = _identity):
        self.kind = kind
        self._normalise = normalise
        self._items: dict[str, T] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def add(self, name: str, obj: T, **info: Any) -> T:
        """Register ``obj`` under ``name``; a second object under one name is a bug, not a choice."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        self._info[name] = info
        return obj

    def register(self, name: str | None = None, **info: Any) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; the name defaults to the object's ``__name__``."""

        def decorate(obj: T) -> T:
            return self.add(name or obj.__name__, obj, **info)  # type: ignore[attr-defined]

        return decorate

    def key(self, name: str) -> str:
        """The registered key for ``name``, or one DeepEMDError with a did-you-mean."""
        key = self._normalise(str(name))
        if key in self._items:
            return key
        close = difflib.get_close_matches(key, self._items, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(self.names())}"
        raise DeepEMDError(f"unknown {self.kind} '{name}'", fix=hint)

    def get(self, name: str) -> T:
        return self._items[self.key(name)]

    def info(self, name: str) -> dict[str, Any]:
        return self._info[self.key(name)]

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalise(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


__all__ = ["Registry"]

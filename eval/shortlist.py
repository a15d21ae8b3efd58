"""The shortlist every retrieval stage hands on: ids and scores per query, best first.

A FAISS search, a DeepEMD rerank and the metrics all pass the same value, so its rules are
checked once, where it is made, and never again downstream:

- ``ids (Q, K)`` int64 and ``scores (Q, K)`` float32 of the same shape;
- padding (FAISS found fewer than K results) is id ``-1`` with score ``-inf``, only at the end
  of a row;
- scores never increase along a row (``+inf`` marks an entry kept first on purpose, e.g. the
  query itself in a leave-one-out run); NaN is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepemd.errors import DeepEMDError


@dataclass(frozen=True)
class Shortlist:
    """Top-K candidates of each query, best first (see the module docstring for the rules)."""

    ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        scores = np.array(self.scores, dtype=np.float32)  # a copy: the caller's array stays theirs
        if ids.ndim != 2 or ids.shape != scores.shape:
            raise DeepEMDError(f"shortlist ids {ids.shape} and scores {scores.shape} must both be (queries, K)")
        pad = ids < 0
        if (pad[:, :-1] & ~pad[:, 1:]).any():
            row = int(np.flatnonzero((pad[:, :-1] & ~pad[:, 1:]).any(axis=1))[0])
            raise DeepEMDError(
                f"shortlist row {row} has a real id after a -1 padding id",
                fix="padding (-1) may only fill the end of a row",
            )
        scores[pad] = -np.inf
        if np.isnan(scores).any():
            raise DeepEMDError("shortlist scores contain NaN", fix="check the vectors that were searched")
        with np.errstate(invalid="ignore"):  # inf - inf between two kept-first entries
            rising = np.diff(scores, axis=1) > 0
        if rising.any():
            row = int(np.flatnonzero(rising.any(axis=1))[0])
            raise DeepEMDError(
                f"shortlist row {row} is not sorted best first",
                fix="sort each row by decreasing score (Shortlist.from_unsorted does)",
            )
        ids.flags.writeable = False
        scores.flags.writeable = False
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "scores", scores)

    @classmethod
    def from_unsorted(cls, ids: np.ndarray, scores: np.ndarray) -> Shortlist:
        """Rows sorted by decreasing score (stable: ties keep their order), padding last."""
        ids = np.asarray(ids, dtype=np.int64)
        key = np.where(ids < 0, -np.inf, np.asarray(scores, dtype=np.float32))
        order = np.argsort(-key, axis=1, kind="stable")
        return cls(np.take_along_axis(ids, order, 1), np.take_along_axis(key, order, 1))

    @property
    def queries(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def head(self, k: int) -> Shortlist:
        """The first ``k`` entries of every row."""
        return Shortlist(self.ids[:, :k], self.scores[:, :k])

    def __len__(self) -> int:
        return self.queries


__all__ = ["Shortlist"]

"""Exact BGE-M3 scores (REFERENCE.md section 3), in numpy.

This module is the reference every backend is tested against: engines may
retrieve candidates however they like, but a :class:`~m3connect.types.Hit`
score is always computed here.

>>> import numpy as np
>>> sparse_score({7: 0.5, 9: 0.1}, {7: 0.4})
0.2
>>> combine({"dense": 0.8, "sparse": 0.2, "colbert": 0.6}, (0.4, 0.2, 0.4))
0.6
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .errors import InvalidInputError, InvalidTypeError
from .types import ROUTES, EncodeOutput, Route

__all__ = [
    "Weights",
    "ROUTES",
    "validate_weights",
    "dense_score",
    "sparse_score",
    "colbert_score",
    "combine",
    "pair_scores",
    "check_pairs",
    "score_pairs",
]


class Weights(NamedTuple):
    """Fusion weights in the order ``(dense, sparse, colbert)``."""

    dense: float
    sparse: float
    colbert: float

    @property
    def active_routes(self) -> tuple[Route, ...]:
        """Routes with a non-zero weight; a zero weight drops its route."""
        return tuple(r for r, w in zip(ROUTES, self) if w > 0)


def validate_weights(weights: Sequence[float] | Mapping[str, float]) -> Weights:
    """Return checked :class:`Weights`; negative, non-finite or all-zero weights are an error.

    Accepts a 3-sequence ``(dense, sparse, colbert)`` or a mapping with those keys
    (missing keys count as 0).
    """
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(ROUTES)
        if unknown:
            raise InvalidInputError(f"unknown weight keys {sorted(unknown)}; use {ROUTES}")
        values = [weights.get(r, 0.0) for r in ROUTES]
    else:
        values = list(weights)
        if len(values) != 3:
            raise InvalidInputError(
                f"weights must be 3 numbers (dense, sparse, colbert), got {len(values)}"
            )
    checked: list[float] = []
    for route, value in zip(ROUTES, values):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise InvalidInputError(f"weight for {route!r} must be a number, got {value!r}")
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise InvalidInputError(f"weight for {route!r} must be finite and >= 0, got {v}")
        checked.append(v)
    if sum(checked) <= 0:
        raise InvalidInputError("weights sum to zero: at least one route needs a positive weight")
    return Weights(*checked)


def dense_score(query: np.ndarray, passage: np.ndarray) -> float:
    """Inner product of two (normalised) dense vectors."""
    return float(np.dot(np.asarray(query, np.float64), np.asarray(passage, np.float64)))


def sparse_score(query: Mapping[int, float], passage: Mapping[int, float]) -> float:
    """``sum(q[t] * p[t])`` over the token ids both sides share (not normalised)."""
    if len(query) > len(passage):
        query, passage = passage, query
    total = 0.0
    for token, weight in query.items():
        other = passage.get(token)
        if other is not None:
            total += float(weight) * float(other)
    return total


def colbert_score(query: np.ndarray, passage: np.ndarray) -> float:
    """MaxSim averaged over the query vectors: ``mean_i max_j q_i . p_j``.

    An empty passage scores 0 for every query vector; an empty query scores 0.
    """
    q = np.asarray(query, np.float64)
    p = np.asarray(passage, np.float64)
    if q.shape[0] == 0:
        return 0.0
    if p.shape[0] == 0:
        return 0.0
    return float((q @ p.T).max(axis=1).mean())


def combine(route_scores: Mapping[str, float], weights: Sequence[float] | Weights) -> float:
    """Weighted M3 combination ``sum(w_r * s_r) / sum(w_r)`` over the routes with ``w_r > 0``."""
    w = weights if isinstance(weights, Weights) else validate_weights(weights)
    total = 0.0
    for route, weight in zip(ROUTES, w):
        if weight > 0:
            total += weight * route_scores[route]
    return total / (w.dense + w.sparse + w.colbert)


def pair_scores(
    query: Mapping[str, object], passage: Mapping[str, object], routes: Sequence[str] = ROUTES
) -> dict[str, float]:
    """Per-route scores of one query/passage pair of representations.

    ``query`` and ``passage`` map ``"dense"``/``"sparse"``/``"colbert"`` to the
    encoder's outputs for one text.
    """
    out: dict[str, float] = {}
    if "dense" in routes:
        out["dense"] = dense_score(query["dense"], passage["dense"])  # type: ignore[arg-type]
    if "sparse" in routes:
        out["sparse"] = sparse_score(query["sparse"], passage["sparse"])  # type: ignore[arg-type]
    if "colbert" in routes:
        out["colbert"] = colbert_score(query["colbert"], passage["colbert"])  # type: ignore[arg-type]
    return out


def check_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` as a list, each checked to be a ``(query, passage)`` pair."""
    pair_list = list(pairs)
    for i, pair in enumerate(pair_list):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InvalidTypeError(f"pairs[{i}] must be a (query, passage) pair, got {pair!r}")
    return pair_list


def score_pairs(queries: EncodeOutput, passages: EncodeOutput, weights: Weights) -> dict[str, list[float]]:
    """FlagEmbedding's ``compute_score`` output for row-aligned query and passage encodings.

    Lists under ``"dense"``, ``"sparse"``, ``"colbert"``, ``"sparse+dense"`` and
    ``"colbert+sparse+dense"``.
    """
    keys = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
    out: dict[str, list[float]] = {k: [] for k in keys}
    pair_weight = weights.sparse + weights.dense
    for i in range(len(queries)):
        s = pair_scores(queries.item(i), passages.item(i))
        for route in ROUTES:
            out[route].append(s[route])
        # Like the reference, "sparse+dense" is undefined (nan) when both weights are 0.
        pair = weights.sparse * s["sparse"] + weights.dense * s["dense"]
        out["sparse+dense"].append(pair / pair_weight if pair_weight > 0 else float("nan"))
        out["colbert+sparse+dense"].append(combine(s, weights))
    return out

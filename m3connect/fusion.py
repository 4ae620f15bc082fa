"""Fusion: the one place where route results become ranked :class:`~m3connect.types.Hit` lists.

Three methods, one fetch each:

- :func:`exact` (the default): candidates from the engine's routes, every candidate
  scored exactly for every active route (route scores the engine returned where
  they are exact, :meth:`Adapter.score` in the engine for the rest), ranked by
  M3's weighted formula. ``Hit.score`` equals ``compute_score``.
- :func:`pushed` with ``method="weighted"``: the engine's own weighted fusion
  (``fusion="engine"``); with ``method="rrf"``: the engine's reciprocal rank fusion.

Candidate generation follows the paper's retrieval setting: dense (and sparse)
candidates are re-ranked with the other scores; ColBERT generates candidates only
when the dense weight is 0, or when the caller names it in ``candidate_routes``.

>>> candidate_routes(Weights(0.4, 0.2, 0.4))
('dense', 'sparse')
>>> candidate_routes(Weights(0, 0, 1))
('colbert',)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from .adapters.base import Adapter, FusionMethod
from .errors import InvalidInputError
from .filters import FilterNode, matches
from .scoring import Weights, combine
from .types import ROUTES, Hit, Route, Vectors

__all__ = ["QueryStats", "COLBERT_NORM_LIMIT", "candidate_routes", "colbert_upper_bound", "exact", "pushed"]

#: longest stored ColBERT row accepted (1 + rounding of float16 storage and of callers' normalisation)
COLBERT_NORM_LIMIT = 1.01


@dataclass
class QueryStats:
    """What one search did: candidates ranked, ``Adapter.score`` calls, records fetched."""

    candidates: int = 0
    score_calls: int = 0
    fetched_records: int = 0
    #: candidates never scored for ColBERT because they provably could not reach the top k
    pruned: int = 0
    #: the (dense, sparse, colbert) weights the search used
    weights: tuple[float, float, float] = (0.0, 0.0, 0.0)


def candidate_routes(weights: Weights, asked: Sequence[str] | None = None) -> tuple[Route, ...]:
    """Routes that generate candidates for exact fusion."""
    if asked is not None:
        routes = tuple(dict.fromkeys(asked))
        bad = [r for r in routes if r not in ROUTES]
        if bad or not routes:
            raise InvalidInputError(f"candidate_routes must name routes of {ROUTES}, got {list(asked)!r}")
        return cast("tuple[Route, ...]", routes)  # every one checked against ROUTES above
    active = weights.active_routes
    if weights.dense > 0:
        return tuple(r for r in active if r != "colbert")
    return active


def _usable(route: str, query: Vectors) -> bool:
    value = query[route]
    if value is None:
        raise InvalidInputError(f"the query has no {route} representation but the weights use it")
    return len(value) > 0


def exact(
    adapter: Adapter,
    query: Vectors,
    weights: Weights,
    k: int,
    flt: FilterNode | None,
    depth: int,
    *,
    routes: Sequence[str] | None = None,
    stats: QueryStats | None = None,
) -> list[Hit]:
    """Exact M3 fusion over the candidates of ``routes`` (default :func:`candidate_routes`)."""
    stats = stats if stats is not None else QueryStats()
    active = weights.active_routes
    for route in active:
        _usable(route, query)
    scores: dict[str, dict[str, float]] = {}
    generators = candidate_routes(weights, routes)
    if generators == active and len(active) == 1 and active[0] in adapter.exact_routes:
        # One exact route: its own top k is the answer, fetched with the hits in one call
        # where the engine allows, as a raw search is.
        return _one_route(adapter, active[0], query, weights, k, flt, stats)
    for route in generators:
        if not _usable(route, query):
            continue  # an empty sparse or ColBERT query retrieves nothing
        for rid, s in adapter.search_route(route, query[route], depth, flt):
            entry = scores.setdefault(rid, {})
            if route in active and route in adapter.exact_routes:
                entry[route] = float(s)
    stats.candidates = len(scores)
    # Every active route needs a score for every candidate: ask the engine for the missing
    # ones, one call per group of routes that miss the same candidates. ColBERT, the costly
    # one, comes last and only for candidates that can still reach the top k.
    groups: dict[tuple[str, ...], list[str]] = {}
    for route in active:
        missing = tuple(rid for rid, entry in scores.items() if route not in entry)
        if not missing:
            continue
        if not _usable(route, query):  # an empty query side scores 0 against anything
            for rid in missing:
                scores[rid][route] = 0.0
            continue
        if route != "colbert":
            groups.setdefault(missing, []).append(route)
    for missing, group in groups.items():
        _score_into(adapter, scores, list(missing), query, group, stats)
    if "colbert" in active and _usable("colbert", query):
        _colbert_with_threshold(adapter, scores, query, weights, k, stats)
    ranked = sorted(
        ((combine(entry, weights), rid) for rid, entry in scores.items()), key=lambda t: (-t[0], t[1])
    )
    return _hits(adapter, ranked, scores, k, flt, stats)


def _one_route(
    adapter: Adapter, route: Route, query: Vectors, weights: Weights, k: int, flt: FilterNode | None,
    stats: QueryStats,
) -> list[Hit]:
    found = adapter.search_route_records(route, query[route], k, flt) if _usable(route, query) else []
    stats.candidates = stats.fetched_records = len(found)
    hits = []
    for rid, s, rec in found:
        if flt is not None and not matches(flt, rec.metadata):
            continue  # a stray an engine let through (the guard of _hits)
        entry: dict[str, float] = {route: float(s)}
        hits.append(Hit(rid, combine(entry, weights), rec.text, rec.metadata, entry))
    hits.sort(key=lambda h: (-h.score, h.id))
    return hits[:k]


def _score_into(
    adapter: Adapter,
    scores: dict[str, dict[str, float]],
    ids: list[str],
    query: Vectors,
    routes: Sequence[str],
    stats: QueryStats,
) -> None:
    stats.score_calls += 1
    got = adapter.score(ids, query, routes)  # type: ignore[arg-type]
    for rid in ids:
        if rid in got:
            scores[rid].update((r, got[rid][r]) for r in routes)
        else:  # deleted between search and scoring
            scores.pop(rid, None)


def colbert_upper_bound(query: Vectors) -> float:
    """An upper bound of the ColBERT score of ``query`` against any stored document.

    Stored ColBERT rows are L2-normalised (the encoder normalises them; ``add_vectors``
    refuses rows longer than :data:`COLBERT_NORM_LIMIT`), so ``q_i . p_j <= |q_i| * limit``.
    """
    q = np.asarray(query.colbert, np.float64)
    return float(np.linalg.norm(q, axis=1).mean()) * COLBERT_NORM_LIMIT if len(q) else 0.0


def _colbert_with_threshold(
    adapter: Adapter,
    scores: dict[str, dict[str, float]],
    query: Vectors,
    weights: Weights,
    k: int,
    stats: QueryStats,
) -> None:
    """Score ColBERT for the candidates that can still enter the top k, best first.

    Candidates go in order of their other routes' weighted sum; once the k-th best exact
    score beats what the next candidate could reach with a perfect ColBERT score, the rest
    are left out: they cannot be in the top k (a threshold algorithm, so still exact).
    """
    total = sum(weights)
    partial = {
        rid: sum(getattr(weights, r) * entry[r] for r in weights.active_routes if r != "colbert")
        for rid, entry in scores.items()
    }
    best: list[float] = sorted(
        (combine(entry, weights) for entry in scores.values() if "colbert" in entry), reverse=True
    )[:k]
    todo = sorted((rid for rid, entry in scores.items() if "colbert" not in entry), key=lambda r: -partial[r])
    reach = weights.colbert * colbert_upper_bound(query)
    # Rounds grow geometrically: the first sets a k-th best to prune against, later ones
    # prune less per call, and each engine call has a fixed cost (at most ~log2 rounds).
    batch = max(2 * k, 32)
    start = 0
    while start < len(todo):
        if len(best) >= k and (partial[todo[start]] + reach) / total < best[k - 1]:
            break
        chunk = todo[start : start + batch]
        start += len(chunk)
        batch *= 2
        _score_into(adapter, scores, chunk, query, ["colbert"], stats)
        best = sorted(best + [combine(scores[r], weights) for r in chunk if r in scores], reverse=True)[:k]
    stats.pruned = len(todo) - start
    for rid in todo[start:]:  # provably outside the top k
        del scores[rid]


def _hits(
    adapter: Adapter,
    ranked: list[tuple[float, str]],
    scores: dict[str, dict[str, float]],
    k: int,
    flt: FilterNode | None,
    stats: QueryStats,
) -> list[Hit]:
    """Top ``k`` hits with text and metadata; the filter is checked again as a guard."""
    hits: list[Hit] = []
    start = 0
    while len(hits) < k and start < len(ranked):
        window = ranked[start : start + (k - len(hits))]
        start += len(window)
        found = adapter.fetch([rid for _, rid in window], fields=())
        stats.fetched_records += len(found)
        for score, rid in window:
            rec = found.get(rid)
            if rec is None or (flt is not None and not matches(flt, rec.metadata)):
                continue  # deleted meanwhile, or a stray an engine let through
            hits.append(Hit(rid, float(score), rec.text, rec.metadata, dict(scores.get(rid, {}))))
    return hits


def pushed(
    adapter: Adapter,
    query: Vectors,
    weights: Weights,
    k: int,
    flt: FilterNode | None,
    depth: int,
    method: FusionMethod,
    *,
    stats: QueryStats | None = None,
) -> list[Hit]:
    """Fusion in the engine (``"weighted"`` or ``"rrf"``); ``Hit.scores`` are exact route scores."""
    stats = stats if stats is not None else QueryStats()
    ranked = adapter.engine_search(query, weights, k, flt, depth, method)[:k]
    stats.candidates = len(ranked)
    ids = [rid for rid, _ in ranked]
    routes = [r for r in weights.active_routes if _usable(r, query)]
    route_scores = adapter.score(ids, query, routes) if ids and routes else {}
    stats.score_calls += 1 if ids and routes else 0
    for rid in ids:
        entry = route_scores.setdefault(rid, {})
        for r in weights.active_routes:
            entry.setdefault(r, 0.0)
    return _hits(adapter, [(s, rid) for rid, s in ranked], route_scores, k, flt, stats)

"""What the Qdrant (qdrant-client) and Qdrant Edge adapters share: point ids, payload records
and the route searches over a point query each of them implements.

Qdrant ids are unsigned ints or UUIDs; a document id maps to a name-based UUID (uuid5), so
both adapters address the same point for the same id (a directory written by one opens in
the other's tools). Hot paths map the same ids many times per query, hence the cache.
Neither client library is imported here.
"""

from __future__ import annotations

import functools
import uuid
from abc import abstractmethod
from typing import Any

import numpy as np

from ..filters import FilterNode
from ..types import Route
from .base import Adapter, Candidate, Record, RecordCandidate

__all__ = ["QdrantFamily", "point_id", "record_of"]

_NAMESPACE = uuid.UUID("6f1c3a52-6b1e-4f0e-9a39-3a0c5e1f7d21")


@functools.lru_cache(maxsize=1 << 16)
def point_id(doc_id: str) -> str:
    """Stable UUID string for a string id.

    >>> point_id("doc-1") == point_id("doc-1") != point_id("doc-2")
    True
    """
    return str(uuid.uuid5(_NAMESPACE, doc_id))


def record_of(payload: dict[str, Any]) -> Record:
    """A record (text and metadata, no vectors) from a point's payload."""
    return Record(id=payload["doc_id"], text=payload.get("text", ""), metadata=payload.get("metadata") or {})


class QdrantFamily(Adapter):
    """Base of the two Qdrant adapters: one client-specific route query, the seam's route
    searches over it, and how a point stored without a ColBERT multivector reads back."""

    @abstractmethod
    def _route_points(
        self, route: Route, query: Any, k: int, flt: FilterNode | None, payload: Any
    ) -> list[tuple[dict[str, Any], float]]:
        """(payload, exact route score) of the route's top k, filtered in the engine."""

    def search_route(self, route: Route, query: Any, k: int, flt: FilterNode | None) -> list[Candidate]:
        return [(payload["doc_id"], s) for payload, s in self._route_points(route, query, k, flt, ["doc_id"])]

    def search_route_records(
        self, route: Route, query: Any, k: int, flt: FilterNode | None
    ) -> list[RecordCandidate]:
        hits = self._route_points(route, query, k, flt, True)
        return [(rec.id, s, rec) for payload, s in hits for rec in [record_of(payload)]]

    def _stored_colbert_of(self, vectors: dict[str, Any]) -> np.ndarray:
        """A point's ColBERT matrix; empty for a point stored without one (Qdrant refuses an
        empty multivector, so such a document's point carries none)."""
        if "colbert" in vectors:
            return np.asarray(vectors["colbert"], np.float32)
        return np.zeros((0, self.spec.colbert_dim if self.spec else 0), np.float32)

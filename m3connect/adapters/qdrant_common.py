"""What the Qdrant (qdrant-client) and Qdrant Edge adapters share: point ids and payload records.

Qdrant ids are unsigned ints or UUIDs; a document id maps to a name-based UUID (uuid5), so
both adapters address the same point for the same id (a directory written by one opens in
the other's tools). Hot paths map the same ids many times per query, hence the cache.
Neither client library is imported here.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from .base import Record

__all__ = ["point_id", "record_of"]

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

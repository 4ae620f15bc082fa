"""The seam between the backend-neutral store and one engine.

An adapter stores and retrieves *representations*; it never sees the encoder.
The store does fusion and exact scoring; an adapter only has to:

- create or recognise its collection (:class:`CollectionSpec`),
- upsert, delete, count and fetch :class:`Record` objects,
- return candidates per route (``search_route``),
- optionally push fusion down into the engine (``engine_search``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from ..errors import BackendError, InvalidInputError
from ..filters import FilterNode
from ..scoring import Weights

__all__ = ["CollectionSpec", "Record", "Adapter", "Candidate", "FusionMethod", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
FusionMethod = Literal["weighted", "rrf"]
Candidate = tuple[str, float]  # (id, engine score)


@dataclass(frozen=True)
class CollectionSpec:
    """What m3connect writes beside a collection so that a reopen can check it."""

    model: str
    fingerprint: str
    dense_dim: int
    colbert_dim: int
    colbert_dtype: str = "float32"
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CollectionSpec:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def check_colbert_dtype(self) -> None:
        if self.colbert_dtype not in ("float32", "float16"):
            raise InvalidInputError(f"colbert_dtype must be 'float32' or 'float16', got {self.colbert_dtype!r}")


@dataclass
class Record:
    """One stored document: text, metadata and its three representations."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    dense: np.ndarray | None = None
    sparse: dict[int, float] | None = None
    colbert: np.ndarray | None = None

    def nbytes(self, colbert_itemsize: int = 4) -> int:
        """Rough wire size, used to cut database batches by bytes."""
        size = len(self.text.encode("utf-8")) + len(json.dumps(self.metadata, default=str)) + 64
        if self.dense is not None:
            size += self.dense.size * 4
        if self.sparse is not None:
            size += len(self.sparse) * 12
        if self.colbert is not None:
            size += self.colbert.size * colbert_itemsize + self.colbert.shape[0] * 48
        return size


class Adapter(ABC):
    """Base class of every engine adapter."""

    #: engine name used in URIs and messages
    engine: str = ""
    #: largest write batch in bytes; the store cuts batches to fit
    max_batch_bytes: int = 16 * 1024 * 1024
    #: whether ``engine_search`` is implemented
    supports_engine_fusion: bool = False

    def __init__(self, collection: str) -> None:
        self.collection = collection
        self.spec: CollectionSpec | None = None

    # -- schema -----------------------------------------------------------------------------

    @abstractmethod
    def read_spec(self) -> CollectionSpec | None:
        """The spec written when the collection was created; ``None`` if it does not exist.

        Raises ``SchemaMismatchError`` if the collection exists but was not made by m3connect.
        """

    @abstractmethod
    def create(self, spec: CollectionSpec) -> None:
        """Create the collection (and its companions) for ``spec``."""

    @abstractmethod
    def drop(self) -> None:
        """Remove the collection and everything m3connect stored beside it."""

    # -- data -------------------------------------------------------------------------------

    @abstractmethod
    def upsert(self, records: Sequence[Record]) -> None:
        """Insert or overwrite records by id (all three representations present)."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Delete by id; unknown ids are ignored."""

    @abstractmethod
    def count(self) -> int:
        """Number of stored documents."""

    @abstractmethod
    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` already stored (used to resume ingestion)."""

    @abstractmethod
    def fetch(self, ids: Sequence[str], *, with_vectors: bool = True) -> dict[str, Record]:
        """Stored records by id; missing ids are absent from the result."""

    def flush(self) -> None:
        """Make recent writes durable and searchable (engines that need it override)."""

    def close(self) -> None:
        """Release the client."""

    # -- search -----------------------------------------------------------------------------

    @abstractmethod
    def search_route(
        self, route: str, query: Any, k: int, flt: FilterNode | None
    ) -> list[Candidate]:
        """Top-``k`` candidates of one route (``"dense"``, ``"sparse"`` or ``"colbert"``)."""

    def engine_search(
        self,
        query: dict[str, Any],
        weights: Weights,
        k: int,
        flt: FilterNode | None,
        depth: int,
        method: FusionMethod,
    ) -> list[Candidate]:
        """Fusion pushed into the engine; scores are the engine's (see each adapter)."""
        raise BackendError(f"{self.engine} cannot fuse in the engine; use fusion='exact'")

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def batched(ids: Iterable[str], size: int) -> Iterable[list[str]]:
        chunk: list[str] = []
        for i in ids:
            chunk.append(i)
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

"""The typed seam between the backend-neutral store and one engine.

An adapter stores and retrieves :class:`~m3connect.types.Vectors`; it never sees the
encoder, and it never fuses: :mod:`m3connect.fusion` does. What every adapter
guarantees (the conformance suite checks each point on every engine):

- **Filters run in the engine.** ``search_route``, ``score`` and ``engine_search``
  apply the filter inside the engine (pre-filtering), so ``k`` results come back
  whenever at least ``k`` stored documents match.
- **Route scores are exact** for the routes in :attr:`Adapter.exact_routes`: the score
  that ``search_route`` returns equals :mod:`m3connect.scoring`'s for the stored form
  (an engine's transformed score is converted back; ColBERT is divided by ``n_q``).
- **Scoring happens where the vectors live.** ``score`` computes per-route scores of
  given ids in the engine where the engine can (MaxSim, inner products); the base
  implementation, which fetches the needed vectors, is the fallback.
- **``fetch`` moves only the fields asked for.** Text and metadata always; vectors
  only for the routes named.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from ..errors import BackendError, InvalidInputError
from ..filters import FilterNode
from ..scoring import Weights, pair_scores
from ..types import ROUTES, Route, Vectors

__all__ = [
    "CollectionSpec",
    "Record",
    "Adapter",
    "Candidate",
    "FusionMethod",
    "RouteScores",
    "SCHEMA_VERSION",
    "COLBERT_DTYPES",
]

SCHEMA_VERSION = 1
COLBERT_DTYPES = ("float32", "float16")
FusionMethod = Literal["weighted", "rrf"]
Candidate = tuple[str, float]  # (id, score)
RouteScores = dict[str, dict[str, float]]  # id -> route -> exact score


@dataclass(frozen=True)
class CollectionSpec:
    """What m3connect writes beside a collection so that a reopen can check it.

    Pass one to :func:`~m3connect.connect` (``spec=``) to create a collection for
    precomputed vectors without an encoder.

    >>> CollectionSpec(model="my-m3", fingerprint="v1", dense_dim=1024, colbert_dim=1024).colbert_itemsize
    4
    """

    model: str
    fingerprint: str
    dense_dim: int
    colbert_dim: int
    colbert_dtype: str = "float32"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.colbert_dtype not in COLBERT_DTYPES:
            raise InvalidInputError(
                f"colbert_dtype must be one of {COLBERT_DTYPES}, got {self.colbert_dtype!r}"
            )
        for name in ("dense_dim", "colbert_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {value!r}")

    @property
    def colbert_itemsize(self) -> int:
        return 2 if self.colbert_dtype == "float16" else 4

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CollectionSpec:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Record:
    """One stored document: text, metadata and (those fetched of) its three representations."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    dense: np.ndarray | None = None
    sparse: dict[int, float] | None = None
    colbert: np.ndarray | None = None

    @property
    def vectors(self) -> Vectors:
        return Vectors(dense=self.dense, sparse=self.sparse, colbert=self.colbert)

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
    """Base class of every engine adapter (see the module docstring for its guarantees)."""

    #: engine name used in URIs and messages
    engine: ClassVar[str] = ""
    #: largest write batch in bytes; the store cuts batches to fit
    max_batch_bytes: ClassVar[int] = 16 * 1024 * 1024
    #: whether ``engine_search`` is implemented
    supports_engine_fusion: ClassVar[bool] = False
    #: routes whose ``search_route`` scores are exact (see the module docstring)
    exact_routes: ClassVar[frozenset[str]] = frozenset(ROUTES)

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
        """Create the collection (and its companions) for ``spec``; then ``self.spec is spec``."""

    def open(self, spec: CollectionSpec) -> None:
        """Use an existing collection whose stored spec is ``spec``."""
        self.spec = spec

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
    def fetch(self, ids: Sequence[str], *, fields: Collection[str] = ROUTES) -> dict[str, Record]:
        """Stored records by id with text, metadata and the vectors of the routes in ``fields``.

        Missing ids are absent from the result. ``fields=()`` moves no vectors.
        """

    def flush(self) -> None:
        """Make recent writes durable and searchable (engines that need it override)."""

    def close(self) -> None:
        """Release the client."""

    # -- search -----------------------------------------------------------------------------

    @abstractmethod
    def search_route(self, route: Route, query: Any, k: int, flt: FilterNode | None) -> list[Candidate]:
        """Top-``k`` candidates of one route, best first, filtered in the engine.

        ``query`` is that route's query representation (``Vectors[route]``). Scores are
        exact for routes in :attr:`exact_routes`.
        """

    def score(self, ids: Sequence[str], query: Vectors, routes: Sequence[Route]) -> RouteScores:
        """Exact scores of the stored documents ``ids`` for ``routes``: ``{id: {route: s}}``.

        Adapters override this to score in the engine. This fallback fetches the needed
        vectors into the client and scores them with :mod:`m3connect.scoring`.
        """
        if not ids or not routes:
            return {}
        found = self.fetch(ids, fields=routes)
        return {rid: pair_scores(query, rec.vectors, routes) for rid, rec in found.items()}

    def engine_search(
        self,
        query: Vectors,
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

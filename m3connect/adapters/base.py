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
- **Only m3connect errors leave.** Every public method runs inside one translator
  (:meth:`Adapter.translate_error`, like httpx's ``map_exceptions``): a client's
  exception becomes ``CollectionNotFoundError``, ``BackendUnavailableError`` or
  ``BackendError`` with the engine's one-line reason, and any secret the adapter was
  given (password, API key, token) is redacted from the message.
"""

from __future__ import annotations

import functools
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from ..colbert_storage import COLBERT_DTYPES, check_pool_factor, row_bytes
from ..errors import (
    BackendError,
    BackendUnavailableError,
    CollectionNotFoundError,
    InvalidInputError,
    M3Error,
    redact_error,
)
from ..filters import FilterNode
from ..scoring import Weights, pair_scores
from ..types import ROUTES, Route, Vectors

__all__ = [
    "CollectionSpec",
    "Record",
    "Adapter",
    "Candidate",
    "FusionMethod",
    "RecordCandidate",
    "RouteScores",
    "SCHEMA_VERSION",
    "COLBERT_DTYPES",
    "one_line",
]

SCHEMA_VERSION = 1
FusionMethod = Literal["weighted", "rrf"]
Candidate = tuple[str, float]  # (id, score)
RecordCandidate = tuple[str, float, "Record"]  # (id, score, record with text and metadata)
RouteScores = dict[str, dict[str, float]]  # id -> route -> exact score


@dataclass(frozen=True)
class CollectionSpec:
    """What m3connect writes beside a collection so that a reopen can check it.

    Pass one to :func:`~m3connect.connect` (``spec=``) to create a collection for
    precomputed vectors without an encoder.

    ColBERT storage (:mod:`m3connect.colbert_storage`): ``colbert_dtype`` is one of
    ``float32``, ``float16``, ``int8`` (per-row scale) or ``binary`` (1 bit per value);
    ``colbert_pool_factor`` > 1 pools each document's token vectors at ingestion;
    ``store_colbert=False`` keeps no ColBERT vectors at all (every document's matrix is
    stored empty; searches use dense and sparse). All are fixed at creation. A spec written
    before these fields existed reads as float32 / 1 / True.

    >>> CollectionSpec(model="my-m3", fingerprint="v1", dense_dim=1024, colbert_dim=1024).colbert_itemsize
    4
    >>> CollectionSpec("my-m3", "v1", 1024, 1024, colbert_dtype="int8").colbert_row_bytes
    1028
    """

    model: str
    fingerprint: str
    dense_dim: int
    colbert_dim: int
    colbert_dtype: str = "float32"
    schema_version: int = SCHEMA_VERSION
    colbert_pool_factor: int = 1
    store_colbert: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.store_colbert, bool):
            raise InvalidInputError(f"store_colbert must be True or False, got {self.store_colbert!r}")
        if self.colbert_dtype not in COLBERT_DTYPES:
            raise InvalidInputError(
                f"colbert_dtype must be one of {COLBERT_DTYPES}, got {self.colbert_dtype!r}"
            )
        check_pool_factor(self.colbert_pool_factor)
        for name in ("dense_dim", "colbert_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {value!r}")

    @property
    def colbert_itemsize(self) -> int:
        """Bytes per stored value, rounded up (binary packs 8 values per byte)."""
        return {"float32": 4, "float16": 2}.get(self.colbert_dtype, 1)

    @property
    def colbert_row_bytes(self) -> int:
        """Bytes of one stored ColBERT row (int8: codes and the row's scale)."""
        return row_bytes(self.colbert_dim, self.colbert_dtype)

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


#: public adapter methods that run inside the error translator
TRANSLATED_METHODS = (
    "read_spec", "create", "open", "drop", "upsert", "delete", "count", "existing_ids", "fetch",
    "flush", "close", "search_route", "search_route_records", "score", "engine_search", "iter_ids",
)
_F = TypeVar("_F", bound=Callable[..., Any])


def says_collection_missing(text: str) -> bool:
    """Whether an engine's message reports a missing collection (clients word it differently)."""
    lowered = text.lower()
    return "collection" in lowered and any(p in lowered for p in ("not found", "does not exist", "doesn't exist"))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters (the engine's reason)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _translating(method: _F, operation: str) -> _F:
    if inspect.isgeneratorfunction(method):  # e.g. iter_ids: errors come while it is iterated
        return _translating_generator(method, operation)

    @functools.wraps(method)
    def wrapper(self: Adapter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except M3Error as exc:
            raise redact_error(exc, self.secrets)  # noqa: B904 - the same exception, redacted in place
        except (AssertionError, NotImplementedError, RecursionError, MemoryError):
            raise  # our own bugs and resource exhaustion stay what they are
        except Exception as exc:
            raise redact_error(self.translate_error(exc, operation), self.secrets) from exc

    wrapper._m3_translated = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _translating_generator(method: _F, operation: str) -> _F:
    """:func:`_translating` for a generator method: the translator covers every step of the iteration."""

    @functools.wraps(method)
    def wrapper(self: Adapter, *args: Any, **kwargs: Any) -> Any:
        try:
            yield from method(self, *args, **kwargs)
        except M3Error as exc:
            raise redact_error(exc, self.secrets)  # noqa: B904 - the same exception, redacted in place
        except (AssertionError, NotImplementedError, RecursionError, MemoryError):
            raise
        except Exception as exc:
            raise redact_error(self.translate_error(exc, operation), self.secrets) from exc

    wrapper._m3_translated = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


class Adapter(ABC):
    """Base class of every engine adapter (see the module docstring for its guarantees)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in TRANSLATED_METHODS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_m3_translated", False):
                setattr(cls, name, _translating(method, name))

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
        #: credentials given to the client, redacted from every message
        self.secrets: tuple[str, ...] = ()

    # -- errors -----------------------------------------------------------------------------

    def translate_error(self, exc: Exception, operation: str) -> M3Error:
        """Map a client exception to the m3connect tree; adapters refine it for their client.

        The default knows the standard library: connection and timeout errors mean the
        engine is unreachable; anything else is the engine rejecting the operation.
        """
        where = f"{self.engine} collection {self.collection!r}"
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return BackendUnavailableError(f"{self.engine} is unreachable during {operation}: {one_line(exc)}")
        if says_collection_missing(str(exc)):
            return self.not_found()
        return BackendError(f"{operation} on {where} failed: {type(exc).__name__}: {one_line(exc)}")

    def not_found(self) -> CollectionNotFoundError:
        return CollectionNotFoundError(
            f"{self.engine} collection {self.collection!r} does not exist (dropped, or never written); "
            "add documents to create it"
        )

    # -- schema -----------------------------------------------------------------------------

    @abstractmethod
    def read_spec(self) -> CollectionSpec | None:
        """The spec written when the collection was created; ``None`` if it does not exist.

        Raises ``SchemaMismatchError`` if the collection exists but was not made by m3connect.
        """

    @classmethod  # noqa: B027 - optional hook, accepting everything by default
    def check_spec(cls, location: Any, spec: CollectionSpec) -> None:
        """Refuse, before anything exists, a spec this engine cannot store (``location`` is
        the parsed URI). ``connect()`` calls it, so the error comes at connect, not at the
        first write or query. The default accepts everything."""

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

    def iter_ids(self, flt: FilterNode | None, batch_size: int = 1000) -> Iterator[list[str]]:
        """Every stored id, or those whose metadata matches ``flt`` (applied in the engine),
        in lists of at most ``batch_size``, with no cap on the total (an engine cursor, not a
        search window). The order is the engine's. Deleting the ids of a batch already
        yielded does not make the iteration skip others.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list ids")
        yield  # pragma: no cover - makes this a generator, as the overrides are

    def flush(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Make recent writes durable and searchable (engines that need it override)."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the client."""

    # -- search -----------------------------------------------------------------------------

    @abstractmethod
    def search_route(self, route: Route, query: Any, k: int, flt: FilterNode | None) -> list[Candidate]:
        """Top-``k`` candidates of one route, best first, filtered in the engine.

        ``query`` is that route's query representation (``Vectors[route]``). Scores are
        exact for routes in :attr:`exact_routes`.
        """

    def search_route_records(
        self, route: Route, query: Any, k: int, flt: FilterNode | None
    ) -> list[RecordCandidate]:
        """:meth:`search_route` with each hit's text and metadata (no vectors).

        Exact fusion answers a one-route query with this (the route's top k is the answer),
        so engines that return payloads with their hits override it to make one call, as a
        raw search does. This fallback searches, then fetches; a hit deleted in between is
        left out.
        """
        hits = self.search_route(route, query, k, flt)
        found = self.fetch([rid for rid, _ in hits], fields=()) if hits else {}
        return [(rid, s, found[rid]) for rid, s in hits if rid in found]

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

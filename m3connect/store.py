"""The store facade: :func:`connect` opens a collection named by a URI, :class:`M3Store` ingests,
reads and searches it (exact M3 fusion by default), and a reopen is checked against the stored spec.

URIs, credentials and adapters live in :mod:`m3connect.uri`, input checks in
:mod:`m3connect.validation`, the ingestion parts in :mod:`m3connect.ingestion`; their public names
are importable from here too.

>>> store = connect("qdrant://:memory:", collection="docs", encoder=enc)   # doctest: +SKIP
>>> store.add(["first text", "second text"], metadata=[{"lang": "en"}] * 2)  # doctest: +SKIP
>>> store.search("text", k=5, weights=(0.4, 0.2, 0.4), filter={"lang": "en"})  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from tqdm.auto import tqdm

from . import fusion as _fusion  # the parameter `fusion` names the method
from . import scoring
from .adapters.base import Adapter, CollectionSpec, FusionMethod, Record
from .defaults import DEFAULT_WEIGHTS
from .errors import CollectionNotFoundError, InvalidInputError, InvalidTypeError, SchemaMismatchError
from .filters import parse_filter
from .ingestion import IngestReport, _records_from, _write_batches, document_id
from .types import Document, Hit, Vectors
from .uri import (
    ParsedURI,
    ReadWriteLock,
    _adapter_class,
    _adapter_key,
    _lock_for,
    _NoLock,
    check_options,
    location_of_client,
    parse_uri,
    safe_uri,
)
from .uri import _load_adapter as _load_adapter  # connect() looks it up here: tests patch store._load_adapter
from .uri import _with_credentials as _with_credentials  # distributed.py imports it from here
from .validation import _MAX_K, _check_batch_size, _check_ids, _check_routes, _check_text, _check_vectors

if TYPE_CHECKING:
    from .protocols import Encoder

__all__ = ["connect", "M3Store", "ParsedURI", "parse_uri", "safe_uri", "IngestReport", "document_id"]

_log = logging.getLogger(__name__)  # DEBUG: searches, timings; the library never configures logging
Fusion = Literal["exact", "engine", "rrf"]


class M3Store:
    """One collection in one engine, holding dense, sparse and ColBERT for every text.

    Build it with :func:`connect`. Searches default to exact M3 fusion: each active
    route gathers ``candidate_depth`` candidates in the engine, the client fetches
    their stored representations and rescores them with :mod:`m3connect.scoring`.
    """

    def __init__(
        self,
        adapter: Adapter | Callable[[], Adapter],
        encoder: Encoder | None,
        *,
        candidate_depth: int | None = None,
        max_length: int | None = None,
        query_max_length: int | None = None,
        pending_spec: CollectionSpec | None = None,
        engine: str = "",
        collection: str = "",
        lock: ReadWriteLock | _NoLock | None = None,
    ) -> None:
        """Wrap an adapter whose collection is open, or (``pending_spec``) one to create on the
        first write. ``adapter`` may be a factory, called on first use, so that a read of a
        missing embedded store leaves nothing on disk."""
        if isinstance(adapter, Adapter):
            self._adapter: Adapter | None = adapter
            self._make_adapter: Callable[[], Adapter] | None = None
            engine, collection = adapter.engine, adapter.collection
        else:
            self._adapter, self._make_adapter = None, adapter
        self.engine = engine
        self.collection = collection
        self._pending_spec = pending_spec
        self._lock = lock or _NoLock()
        self.encoder = encoder
        self.candidate_depth = candidate_depth
        self.max_length = max_length  # tokens per document (None: the encoder's own limit)
        self.query_max_length = query_max_length  # tokens per query (None: as documents)
        #: what the last search did (:class:`~m3connect.fusion.QueryStats`)
        self.last_query_stats = _fusion.QueryStats()

    @property
    def adapter(self) -> Adapter:
        """The engine adapter (created on first use; creating the collection waits for a write)."""
        if self._adapter is None:
            assert self._make_adapter is not None
            self._adapter = self._make_adapter()
        return self._adapter

    @property
    def exists(self) -> bool:
        """Whether the collection exists (a store from :func:`connect` creates it on the first write)."""
        return self._pending_spec is None

    @property
    def spec(self) -> CollectionSpec:
        """The collection's spec: model, fingerprint, dimensions, ColBERT storage."""
        if self._pending_spec is not None:
            return self._pending_spec
        spec = self.adapter.spec
        if spec is None:
            raise self._not_found()
        return spec

    def _not_found(self) -> CollectionNotFoundError:
        return CollectionNotFoundError(
            f"{self.engine} collection {self.collection!r} does not exist; "
            "it is created by the first add() (m3connect ingest)"
        )

    def _reader(self) -> Adapter:
        """The adapter for a read: never creates anything."""
        if self._pending_spec is not None:
            raise self._not_found()
        return self.adapter

    def _writer(self) -> Adapter:
        """The adapter for a write: creates the collection if it is still pending."""
        adapter = self.adapter
        if self._pending_spec is not None:
            spec = self._pending_spec
            existing = adapter.read_spec()  # another process may have created it meanwhile
            if existing is None:
                adapter.create(spec)
                existing = spec
            else:
                _check_compatible(self.collection, existing, spec)
            adapter.open(existing)
            self._pending_spec = None
        return adapter

    # -- ingestion --------------------------------------------------------------------------

    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise InvalidInputError(
                "this store was opened without an encoder; pass encoder=M3Encoder(...), "
                "or use add_vectors()/search_by_vectors() with precomputed vectors"
            )
        return self.encoder

    # distributed.py derives ids through it, exactly as ingest() does
    _records_from = staticmethod(_records_from)

    def add(
        self,
        texts: Iterable[Any],
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        encode_batch_size: int = 256,
        skip_existing: bool = False,
        show_progress: bool | None = None,
    ) -> list[str]:
        """Encode and store texts; returns their ids. The same id twice overwrites.

        ``texts`` may be any iterable of strings, dicts with ``text``/``id``/``metadata``,
        or :class:`~m3connect.types.Document`. Without ids, ids derive from content.
        """
        return self.ingest(
            texts, ids, metadata, encode_batch_size=encode_batch_size,
            skip_existing=skip_existing, show_progress=show_progress,
        ).ids

    def add_vectors(
        self,
        vectors: Sequence[Vectors | Mapping[str, Any]],
        texts: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[str]:
        """Store documents whose representations were computed elsewhere; returns their ids.

        Each item of ``vectors`` needs all three representations, checked against the
        collection: dense ``[dense_dim]``, sparse ``{int: float}``, ColBERT
        ``[tokens, colbert_dim]``, all finite. Without ``texts`` the text is ``""``;
        without ``ids``, ids derive from text and metadata (give ids then).

        >>> store.add_vectors([{"dense": d, "sparse": {7: 0.3}, "colbert": c}], ids=["a"])  # doctest: +SKIP
        """
        if isinstance(vectors, Mapping) or not isinstance(vectors, Sequence):
            raise InvalidTypeError("vectors must be a list of Vectors (or dicts with dense/sparse/colbert)")
        if texts is None:
            texts = [""] * len(vectors)
        if len(texts) != len(vectors):
            raise InvalidInputError(f"texts has {len(texts)} entries for {len(vectors)} vectors")
        rows = list(_records_from(texts, ids, metadata, need_text=False))
        records = [
            Record(id=rid, text=text, metadata=meta, **_check_vectors(vectors[i], i, self.spec).__dict__)
            for i, rid, text, meta in rows
        ]
        report = IngestReport(ids=[r.id for r in records])
        if not records:
            return []
        self._write(list({r.id: r for r in records}.values()), report)
        self.adapter.flush()
        return report.ids

    def ingest(
        self,
        texts: Iterable[Any],
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        encode_batch_size: int = 256,
        skip_existing: bool = False,
        show_progress: bool | None = None,
    ) -> IngestReport:
        """Like :meth:`add`, streaming, and returning an :class:`IngestReport`.

        ``skip_existing=True`` does not re-encode ids already stored: a re-run after a
        crash then only writes what is missing.
        """
        encoder = self._require_encoder()
        if isinstance(texts, (str, bytes)):
            raise InvalidTypeError("texts must be a list of strings, not a single string: add([text])")
        report = IngestReport()
        pending: list[tuple[int, str, str, dict[str, Any]]] = []
        bar = tqdm(desc="Writing", unit="doc", disable=not show_progress)  # library code: off unless asked
        with bar:
            for item in _records_from(texts, ids, metadata):
                pending.append(item)
                if len(pending) >= encode_batch_size:
                    self._ingest_chunk(encoder, pending, report, skip_existing, bar)
                    pending = []
            if pending:
                self._ingest_chunk(encoder, pending, report, skip_existing, bar)
        if self._pending_spec is None:  # nothing was read: nothing was created either
            self.adapter.flush()
        return report

    def _ingest_chunk(
        self,
        encoder: Encoder,
        chunk: list[tuple[int, str, str, dict[str, Any]]],
        report: IngestReport,
        skip_existing: bool,
        bar: Any,
    ) -> None:
        # Within a chunk the last occurrence of an id wins, as in a sequence of upserts.
        latest = {rid: (i, rid, text, meta) for i, rid, text, meta in chunk}
        report.ids.extend(rid for _, rid, _, _ in chunk)
        todo = list(latest.values())
        if skip_existing and self._pending_spec is None:
            have = self.adapter.existing_ids([r[1] for r in todo])
            report.skipped += len(have)
            todo = [r for r in todo if r[1] not in have]
        if not todo:
            bar.update(len(chunk))
            return
        t0 = time.perf_counter()
        out = encoder.encode([r[2] for r in todo], max_length=self.max_length, show_progress=False)
        report.encode_seconds += time.perf_counter() - t0
        report.truncated += out.num_truncated
        assert out.dense is not None and out.sparse is not None and out.colbert is not None
        records = [
            Record(id=rid, text=text, metadata=meta, dense=out.dense[j], sparse=out.sparse[j], colbert=out.colbert[j])
            for j, (_, rid, text, meta) in enumerate(todo)
        ]
        t0 = time.perf_counter()
        self._write(records, report)
        report.write_seconds += time.perf_counter() - t0
        bar.update(len(chunk))

    def _write(self, records: list[Record], report: IngestReport) -> None:
        """Write records in batches cut by bytes, creating the collection if it is still pending."""
        adapter = self._writer()
        _write_batches(adapter, records, self.spec, self._lock, report)

    # -- reading ----------------------------------------------------------------------------

    def count(self) -> int:
        """Number of stored documents (``CollectionNotFoundError`` if the collection does not exist)."""
        with self._lock.read():
            return self._reader().count()

    def delete(self, ids: Sequence[str]) -> None:
        """Delete documents by id; unknown ids are ignored (as is a collection not yet created)."""
        ids = _check_ids(ids)
        if ids and self._pending_spec is None:
            with self._lock.write():
                self.adapter.delete(ids)
                self.adapter.flush()

    def get(self, ids: Sequence[str], *, vectors: Iterable[str] | str = ()) -> list[Document]:
        """Stored documents by id, in the order asked; missing ids are left out.

        ``vectors`` names routes (``("dense", "sparse", "colbert")``) whose stored vectors come
        back in :attr:`Document.vectors <m3connect.types.Document.vectors>`, in their stored
        form (ColBERT after the collection's ``colbert_pool_factor`` and ``colbert_dtype``);
        routes not named stay ``None``. By default no vector moves and ``vectors`` is ``None``.
        """
        ids = _check_ids(ids)
        routes = _check_routes(vectors)
        with self._lock.read():
            found = self._reader().fetch(ids, fields=routes)
        return [
            Document(found[i].id, found[i].text, found[i].metadata, found[i].vectors if routes else None)
            for i in ids if i in found
        ]

    def ids(self, filter: Mapping[str, Any] | None = None, *, batch_size: int = 1000) -> Iterator[str]:
        """Every stored id, or those of the documents whose metadata matches ``filter``.

        The filter runs in the engine, and the ids come from the engine's cursor (Milvus
        ``query_iterator``, Qdrant ``scroll``, OpenSearch scroll), ``batch_size`` per round
        trip, with no cap on how many (a search stops at 10,000). The order is the engine's;
        documents written or deleted during the iteration may or may not be seen. Raises
        ``CollectionNotFoundError`` at the call if the collection does not exist.

        >>> sorted(store.ids({"lang": "en"}))  # doctest: +SKIP
        """
        size = _check_batch_size(batch_size)
        flt = parse_filter(filter)
        return self._ids(self._reader().iter_ids(flt, size))

    def _ids(self, batches: Iterator[list[str]]) -> Iterator[str]:
        # The lock is held per round trip, not across the caller's loop, which may write.
        try:
            while True:
                with self._lock.read():
                    batch = next(batches, None)
                if batch is None:
                    return
                yield from batch
        finally:
            batches.close()  # type: ignore[attr-defined]  # a generator: ends the engine cursor

    def clear(self, filter: Mapping[str, Any] | None = None, *, batch_size: int = 1000) -> int:
        """Delete every document, or those whose metadata matches ``filter``; returns how many.

        The collection and its schema stay (:meth:`drop` removes them). Ids are listed as
        by :meth:`ids` and deleted ``batch_size`` at a time. A collection that does not exist
        yet holds nothing: 0.
        """
        size = _check_batch_size(batch_size)
        flt = parse_filter(filter)
        if self._pending_spec is not None:
            return 0
        adapter = self.adapter
        deleted = 0
        with self._lock.write():
            for batch in adapter.iter_ids(flt, size):
                adapter.delete(batch)
                deleted += len(batch)
            if deleted:
                adapter.flush()
        return deleted

    # -- search -----------------------------------------------------------------------------

    def search(
        self,
        query: str,
        k: int = 10,
        weights: Sequence[float] | Mapping[str, float] = DEFAULT_WEIGHTS,
        filter: Mapping[str, Any] | None = None,
        *,
        fusion: Fusion = "exact",
        candidate_depth: int | None = None,
        candidate_routes: Sequence[str] | None = None,
        reencode_colbert: bool = False,
    ) -> list[Hit]:
        """Hybrid search with M3's weighted fusion.

        Args:
            query: the query text.
            k: number of hits.
            weights: ``(dense, sparse, colbert)``; a zero weight drops that route. A
                collection created with ``store_colbert=False`` searches with
                ``(0.4, 0.2, 0)`` by default and refuses a ColBERT weight.
            filter: metadata filter (see :mod:`m3connect.filters`).
            fusion: ``"exact"`` rescores candidates in the client (``Hit.score`` equals
                ``compute_score``); ``"engine"`` pushes the weighted sum into the engine;
                ``"rrf"`` is reciprocal rank fusion in the engine.
            candidate_depth: candidates per route (default ``max(100, 10*k)``).
            candidate_routes: routes that generate candidates for exact fusion; default
                dense and sparse (as in the paper), ColBERT only when the dense weight is 0.
            reencode_colbert: on a collection created with ``store_colbert=False``, score
                ColBERT anyway by encoding the candidates' stored texts again (exact fusion
                only; an encoder pass over ~100 texts per search).
        """
        _check_text(query, "query", True)
        encoder = self._require_encoder()
        q = encoder.encode_one(query, max_length=self.query_max_length or self.max_length)
        return self.search_by_vectors(
            q, k=k, weights=weights, filter=filter, fusion=fusion,
            candidate_depth=candidate_depth, candidate_routes=candidate_routes, reencode_colbert=reencode_colbert,
        )

    def search_by_vectors(
        self,
        query: Mapping[str, Any],
        k: int = 10,
        weights: Sequence[float] | Mapping[str, float] = DEFAULT_WEIGHTS,
        filter: Mapping[str, Any] | None = None,
        *,
        fusion: Fusion = "exact",
        candidate_depth: int | None = None,
        candidate_routes: Sequence[str] | None = None,
        reencode_colbert: bool = False,
    ) -> list[Hit]:
        """:meth:`search` with precomputed query representations (``encoder.encode_one``)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be a positive int, got {k!r}")
        if k > _MAX_K:
            raise InvalidInputError(f"k={k} is over {_MAX_K}, the most hits one search returns")
        if candidate_depth is not None and (
            isinstance(candidate_depth, bool) or not isinstance(candidate_depth, int) or candidate_depth < 1
        ):
            raise InvalidInputError(f"candidate_depth must be a positive int, got {candidate_depth!r}")
        if weights is None or isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, Mapping)):
            raise InvalidTypeError(f"weights must be (dense, sparse, colbert) numbers, got {weights!r}")
        w = scoring.validate_weights(weights)
        flt = parse_filter(filter)
        depth = candidate_depth or self.candidate_depth or max(100, 10 * k)
        depth = min(max(depth, k), _MAX_K)
        adapter = self._reader()
        if not isinstance(reencode_colbert, bool):
            raise InvalidInputError(f"reencode_colbert must be True or False, got {reencode_colbert!r}")
        if reencode_colbert and self.spec.store_colbert:
            raise InvalidInputError(
                "reencode_colbert=True is for a collection created with store_colbert=False; "
                f"collection {self.collection!r} stores its ColBERT vectors"
            )
        if reencode_colbert:
            adapter = self._reencoding(adapter, w, fusion, candidate_routes)
        elif not self.spec.store_colbert:
            if weights is DEFAULT_WEIGHTS:  # the default without its ColBERT part
                w = scoring.validate_weights((DEFAULT_WEIGHTS[0], DEFAULT_WEIGHTS[1], 0.0))
            elif w.colbert > 0 or "colbert" in (candidate_routes or ()):
                raise InvalidInputError(
                    f"collection {self.collection!r} stores no ColBERT vectors (store_colbert=False): search "
                    f"with weights without a ColBERT part, e.g. (0.4, 0.2, 0), not {tuple(w)}; or pass "
                    "reencode_colbert=True to score ColBERT by encoding the candidates' texts (costs an encoder "
                    "pass per search)"
                )
        try:
            q = Vectors.of(query)
        except TypeError as exc:
            raise InvalidTypeError(f"query: {exc}") from None
        stats = self.last_query_stats = _fusion.QueryStats(weights=(w.dense, w.sparse, w.colbert))
        if fusion not in ("exact", "engine", "rrf"):
            raise InvalidInputError(f"fusion must be 'exact', 'engine' or 'rrf', got {fusion!r}")
        t0 = time.perf_counter()
        with self._lock.read():
            if fusion == "exact":
                hits = _fusion.exact(adapter, q, w, k, flt, depth, routes=candidate_routes, stats=stats)
            else:
                method: FusionMethod = "weighted" if fusion == "engine" else "rrf"
                hits = _fusion.pushed(adapter, q, w, k, flt, depth, method, stats=stats)
        _log.debug("%s %r: %s search k=%d depth=%d: %d candidates, %d score calls, %d pruned, %.1f ms",
                   adapter.engine, adapter.collection, fusion, k, depth, stats.candidates, stats.score_calls,
                   stats.pruned, 1000 * (time.perf_counter() - t0))
        return hits

    def _reencoding(
        self, adapter: Adapter, weights: scoring.Weights, fusion: str, routes: Sequence[str] | None
    ) -> Adapter:
        """``adapter`` seen through :class:`_ReencodedColBERT`, after checking the search can use it."""
        if fusion != "exact":
            raise InvalidInputError("reencode_colbert=True needs fusion='exact' (the engine holds no ColBERT)")
        if "colbert" in _fusion.candidate_routes(weights, routes):
            raise InvalidInputError(
                "reencode_colbert=True: ColBERT cannot generate candidates in a collection without it; "
                "pass candidate_routes=['dense', 'sparse']"
            )
        view = _ReencodedColBERT(adapter, self._require_encoder(), self.max_length)
        return cast("Adapter", view)  # the same calls; only score() differs

    # -- admin ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Engine, collection, schema and count (``CollectionNotFoundError`` if it does not exist)."""
        adapter = self._reader()
        spec = self.spec
        return {
            "engine": adapter.engine,
            "collection": adapter.collection,
            "count": adapter.count(),
            "spec": json.loads(spec.to_json()),
        }

    def drop(self) -> None:
        """Delete the whole collection. Reads then raise ``CollectionNotFoundError``; the next
        write creates it again with the same spec."""
        if self._pending_spec is not None:
            return
        spec = self.spec
        self.adapter.drop()
        self.adapter.spec = None
        self._pending_spec = spec

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.close()

    def __enter__(self) -> M3Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    uri: str | Any,
    collection: str = "m3connect",
    encoder: Encoder | str | None = None,
    *,
    colbert_dtype: str | None = None,
    colbert_pool_factor: int | None = None,
    store_colbert: bool | None = None,
    candidate_depth: int | None = None,
    max_length: int | None = None,
    query_max_length: int | None = None,
    spec: CollectionSpec | None = None,
    **options: Any,
) -> M3Store:
    """Open a collection in the engine named by ``uri``; a missing one is created by the first write.

    Reads of a collection that does not exist (``count``, ``get``, ``search``, ``info``)
    raise :class:`~m3connect.errors.CollectionNotFoundError` and leave nothing behind.

    Args:
        uri: ``milvus:///abs/m3.db``, ``milvus://host:19530``, ``qdrant://:memory:``,
            ``qdrant:///abs/dir``, ``qdrant://host:6333``, ``opensearch://host:9200``; or your own
            ``MilvusClient``, ``QdrantClient`` or ``OpenSearch`` client, which m3connect uses as
            it is and never closes.
        collection: collection (index) name.
        encoder: the encoder whose vectors the collection holds: an :class:`~m3connect.M3Encoder`,
            a :class:`~m3connect.RemoteEncoder`, or the URL of an ``m3connect serve`` server.
            A collection written for another model or dimension is refused.
        colbert_dtype: how a new collection stores ColBERT vectors: ``"float32"`` (default),
            ``"float16"``, ``"int8"`` (per-row scale) or ``"binary"`` (1 bit per value; queries
            stay float). See :mod:`m3connect.colbert_storage`; Qdrant keeps float32/float16 only.
        colbert_pool_factor: token pooling at ingestion: each document keeps
            ``ceil(tokens / factor)`` Ward-clustered mean vectors (default 1: all of them).
        store_colbert: ``False`` creates a collection that keeps no ColBERT vectors (each
            document's matrix is stored empty, ~0 bytes): searches default to weights
            ``(0.4, 0.2, 0)`` and a ColBERT weight is an ``InvalidInputError``.
            The ColBERT options are fixed when the collection is created. Left out (``None``),
            a reopen uses what the collection stores; given, they must match it
            (``SchemaMismatchError`` otherwise).
        candidate_depth: candidates per route for exact fusion.
        max_length / query_max_length: token limits for documents and for queries (as
            FlagEmbedding's ``passage_max_length``/``query_max_length``; default: the encoder's).
        spec: without an encoder, the :class:`CollectionSpec` to create the collection
            with, for :meth:`M3Store.add_vectors` of precomputed vectors (``colbert_dtype`` and
            ``colbert_pool_factor``, when given, replace the spec's).
        options: engine options: ``token``/``user``/``password``/``api_key``, ``timeout``...
    """
    if not isinstance(collection, str) or not collection or not collection.replace("_", "").replace("-", "").isalnum():
        raise InvalidInputError(f"collection name {collection!r} must be letters, digits, '_' or '-'")
    if isinstance(encoder, str):  # an encoder server: connect(..., encoder="http://host:8080")
        from .remote import RemoteEncoder, is_remote_model

        if not is_remote_model(encoder):
            raise InvalidInputError(f"encoder={encoder!r}: pass an encoder object, or an http(s):// server URL")
        encoder = RemoteEncoder(encoder)
    if isinstance(uri, str):
        location = parse_uri(uri)
        options = _with_credentials(location, options)
    else:  # the user's own client object
        location = location_of_client(uri)
        options = {**options, "client": uri}
        uri = f"{location.engine} client"
    storage = _storage_options(colbert_dtype, colbert_pool_factor, store_colbert)
    if encoder is not None:
        if spec is not None:
            raise InvalidInputError("pass either encoder= or spec=, not both: the encoder defines the spec")
        spec = CollectionSpec(
            model=encoder.model_name,
            fingerprint=encoder.fingerprint,
            dense_dim=encoder.dense_dim,
            colbert_dim=encoder.colbert_dim,
            **storage,
        )
        asked: set[str] = set(storage)
    elif spec is not None:
        spec = dataclasses.replace(spec, **storage) if storage else spec
        asked = set(storage) | _non_default_storage(spec)
    else:
        CollectionSpec("check", "check", 1, 1, **storage)  # the same errors for bad values
        asked = set(storage)
    engine = _adapter_key(location)
    if spec is not None:
        _adapter_class(location).check_spec(location, spec)
    missing_file = (location.embedded and location.path != ":memory:" and location.transport != "client"
                    and not Path(location.path or "").exists())
    if missing_file:  # nothing on disk yet: open the engine only when something is written
        check_options(location, options)  # now, not at the first write (_load_adapter checks the other paths)
        if spec is None:
            raise CollectionNotFoundError(
                f"{engine} collection {collection!r} does not exist: there is nothing at {location.path}"
            )
        return M3Store(
            lambda: _load_adapter(location, collection, options), encoder, candidate_depth=candidate_depth,
            max_length=max_length, query_max_length=query_max_length, pending_spec=spec, engine=engine,
            collection=collection,
            lock=_lock_for(location),
        )
    adapter = _load_adapter(location, collection, options)
    try:
        existing = adapter.read_spec()
        if existing is None:
            if spec is None:
                raise CollectionNotFoundError(
                    f"{engine} collection {collection!r} does not exist at {safe_uri(uri)}; "
                    "pass an encoder (or spec=) and add documents to create it"
                )
            return M3Store(adapter, encoder, candidate_depth=candidate_depth, max_length=max_length,
                           query_max_length=query_max_length, pending_spec=spec, lock=_lock_for(location))
        if spec is not None:
            _check_compatible(collection, existing, spec, asked)
        elif asked:
            _check_storage(collection, existing, storage, asked)
        adapter.open(existing)
    except BaseException:
        adapter.close()
        raise
    return M3Store(adapter, encoder, candidate_depth=candidate_depth, max_length=max_length,
                   query_max_length=query_max_length, lock=_lock_for(location))


class _ReencodedColBERT:
    """An adapter whose ColBERT scores come from encoding the documents' stored texts again.

    ``search(..., reencode_colbert=True)`` on a collection created with ``store_colbert=False``:
    the candidates' texts are fetched and encoded (ColBERT output only, at the store's
    ``max_length``) and MaxSim runs here; every other call goes to the adapter.
    """

    def __init__(self, adapter: Adapter, encoder: Encoder, max_length: int | None) -> None:
        self._adapter, self._encoder, self._max_length = adapter, encoder, max_length

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def score(self, ids: Sequence[str], query: Vectors, routes: Sequence[str]) -> dict[str, dict[str, float]]:
        others = [r for r in routes if r != "colbert"]
        out = self._adapter.score(ids, query, others) if others else {}  # type: ignore[arg-type]
        if "colbert" not in routes:
            return out
        found = self._adapter.fetch(ids, fields=())
        present = [rid for rid in dict.fromkeys(ids) if rid in found and (not others or rid in out)]
        encoded = self._encoder.encode(
            [found[rid].text for rid in present], max_length=self._max_length, return_dense=False,
            return_sparse=False, show_progress=False,
        )
        assert encoded.colbert is not None and query.colbert is not None  # asked for; checked by fusion
        return {rid: {**out.get(rid, {}), "colbert": scoring.colbert_score(query.colbert, m)}
                for rid, m in zip(present, encoded.colbert)}


def _storage_options(
    colbert_dtype: str | None, colbert_pool_factor: int | None, store_colbert: bool | None
) -> dict[str, Any]:
    """The ColBERT storage options a caller gave (``None``: left to the collection or the default)."""
    given = (("colbert_dtype", colbert_dtype), ("colbert_pool_factor", colbert_pool_factor),
             ("store_colbert", store_colbert))
    return {name: value for name, value in given if value is not None}


_STORAGE_FIELDS = ("colbert_dtype", "colbert_pool_factor", "store_colbert")


def _non_default_storage(spec: CollectionSpec) -> set[str]:
    """The ColBERT storage fields of ``spec`` that differ from the defaults (float32, no pooling)."""
    defaults = {f.name: f.default for f in dataclasses.fields(CollectionSpec)}
    return {name for name in _STORAGE_FIELDS if getattr(spec, name) != defaults[name]}


def _check_storage(collection: str, existing: CollectionSpec, wanted: Mapping[str, Any], asked: Iterable[str]) -> None:
    for name in _STORAGE_FIELDS:
        if name in asked and getattr(existing, name) != wanted[name]:
            raise SchemaMismatchError(
                f"collection {collection!r} stores ColBERT as {existing.colbert_dtype} with "
                f"colbert_pool_factor={existing.colbert_pool_factor}, store_colbert={existing.store_colbert}, "
                f"but {name}={wanted[name]!r} was asked: "
                "ColBERT storage is fixed when a collection is created. Leave the option out to use the "
                "stored one, or write to another collection."
            )


def _check_compatible(
    collection: str, existing: CollectionSpec, wanted: CollectionSpec, asked: Iterable[str] | None = None
) -> None:
    """Refuse a reopen for another model, or with ColBERT storage options other than the stored ones.

    ``asked`` names the storage options the caller chose (default: those of ``wanted`` that
    differ from the defaults); the others follow the collection.
    """
    for name in ("dense_dim", "colbert_dim", "fingerprint"):
        have, want = getattr(existing, name), getattr(wanted, name)
        if have != want:
            what = "model weights" if name == "fingerprint" else name
            raise SchemaMismatchError(
                f"collection {collection!r} holds vectors of model {existing.model!r} "
                f"({name}={have}), but the encoder is {wanted.model!r} ({name}={want}): different {what}. "
                "Use another collection name, or drop this one explicitly."
            )
    asked = _non_default_storage(wanted) if asked is None else set(asked)
    _check_storage(collection, existing, {name: getattr(wanted, name) for name in _STORAGE_FIELDS}, asked)


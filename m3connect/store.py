"""The backend-neutral store: ingestion, exact M3 search, and the URI facade.

>>> store = connect("qdrant://:memory:", collection="docs", encoder=enc)   # doctest: +SKIP
>>> store.add(["first text", "second text"], metadata=[{"lang": "en"}] * 2)  # doctest: +SKIP
>>> store.search("text", k=5, weights=(0.4, 0.2, 0.4), filter={"lang": "en"})  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from tqdm.auto import tqdm

import numpy as np

from . import fusion as _fusion  # the parameter `fusion` names the method
from . import scoring
from .adapters.base import Adapter, CollectionSpec, Record
from .errors import IngestError, InvalidInputError, InvalidTypeError, SchemaMismatchError
from .filters import parse_filter
from .types import Document, Hit, Vectors

if TYPE_CHECKING:
    from .protocols import Encoder

__all__ = ["connect", "M3Store", "ParsedURI", "parse_uri", "IngestReport", "document_id"]

Fusion = Literal["exact", "engine", "rrf"]
_ADAPTERS = {
    "milvus": "m3connect.adapters.milvus:MilvusAdapter",
    "qdrant": "m3connect.adapters.qdrant:QdrantAdapter",
    "qdrant-edge": "m3connect.adapters.qdrant_edge:QdrantEdgeAdapter",
    "opensearch": "m3connect.adapters.opensearch:OpenSearchAdapter",
}
_SCHEMES = ("milvus", "qdrant", "opensearch")


@dataclass(frozen=True)
class ParsedURI:
    """A store URI split into engine and location.

    ``milvus:///abs/file.db`` → embedded file; ``qdrant://:memory:``; ``qdrant:///abs/dir``;
    ``milvus://host:19530``, ``qdrant://host:6333``, ``opensearch://host:9200`` → servers.
    ``+https`` after the engine (``qdrant+https://host``) asks for TLS. ``qdrant:///abs/dir``
    is Qdrant Edge (Qdrant's Rust engine in-process); ``qdrant+local:///abs/dir`` is
    qdrant-client's pure-Python local mode, which also opens a directory it wrote before.
    """

    engine: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    tls: bool = False
    transport: str = ""

    @property
    def embedded(self) -> bool:
        return self.host is None

    def url(self, default_port: int) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port or default_port}"


def parse_uri(uri: str) -> ParsedURI:
    """Parse a store URI; an unknown scheme or a relative path is an ``InvalidInputError``."""
    if not isinstance(uri, str):
        raise InvalidTypeError(f"uri must be a string, got {type(uri).__name__}")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise InvalidInputError(f"{uri!r} is not a store URI; expected e.g. milvus:///abs/m3.db or qdrant://:memory:")
    engine, _, transport = scheme.lower().partition("+")
    if engine not in _SCHEMES or transport not in ("", "https", "http") + (("local",) if engine == "qdrant" else ()):
        raise InvalidInputError(f"unknown URI scheme {scheme!r} in {uri!r}; use one of {list(_SCHEMES)}")
    tls = transport == "https"
    if rest == ":memory:":
        if engine != "qdrant":
            raise InvalidInputError(f"{engine} has no in-memory mode; use a file path")
        return ParsedURI(engine, path=":memory:", transport="local")
    if rest.startswith("/"):
        if engine == "opensearch":
            raise InvalidInputError("OpenSearch has no embedded mode; use opensearch://host:9200")
        return ParsedURI(engine, path=rest, transport=transport)
    parts = urlsplit(f"//{rest}")
    if not parts.hostname:
        raise InvalidInputError(f"{uri!r} names neither a host nor an absolute path")
    return ParsedURI(engine, host=parts.hostname, port=parts.port, tls=tls)


def document_id(text: str, metadata: Mapping[str, Any] | None = None) -> str:
    """Deterministic id from content, so re-running an ingestion overwrites, never duplicates."""
    digest = hashlib.sha256(text.encode("utf-8"))
    if metadata:
        digest.update(json.dumps(metadata, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:32]


def _adapter_key(location: ParsedURI) -> str:
    """Which adapter serves a location: embedded Qdrant directories go to Qdrant Edge,
    except ``qdrant+local://`` and directories that qdrant-client's local mode wrote."""
    if location.engine != "qdrant" or not location.embedded or location.transport == "local":
        return location.engine
    if (Path(location.path or "") / _QDRANT_LOCAL_MARKER).exists():
        return "qdrant"
    return "qdrant-edge"


_QDRANT_LOCAL_MARKER = "meta.json"  # qdrant-client's local mode keeps its catalogue there


def _load_adapter(location: ParsedURI, collection: str, options: dict[str, Any]) -> Adapter:
    module_name, _, cls_name = _ADAPTERS[_adapter_key(location)].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    adapter: Adapter = cls(location, collection, **options)
    return adapter


@dataclass
class IngestReport:
    """What one ingestion did."""

    written: int = 0
    skipped: int = 0
    truncated: int = 0
    batches: int = 0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    ids: list[str] = field(default_factory=list)


class M3Store:
    """One collection in one engine, holding dense, sparse and ColBERT for every text.

    Build it with :func:`connect`. Searches default to exact M3 fusion: each active
    route gathers ``candidate_depth`` candidates in the engine, the client fetches
    their stored representations and rescores them with :mod:`m3connect.scoring`.
    """

    def __init__(
        self,
        adapter: Adapter,
        encoder: Encoder | None,
        *,
        candidate_depth: int | None = None,
        max_length: int | None = None,
    ) -> None:
        self.adapter = adapter
        self.encoder = encoder
        self.candidate_depth = candidate_depth
        self.max_length = max_length
        #: what the last search did (:class:`~m3connect.fusion.QueryStats`)
        self.last_query_stats = _fusion.QueryStats()

    @property
    def spec(self) -> CollectionSpec:
        """The collection's spec: model, fingerprint, dimensions, ColBERT storage."""
        assert self.adapter.spec is not None, "connect() always sets the spec"
        return self.adapter.spec

    # -- ingestion --------------------------------------------------------------------------

    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise InvalidInputError(
                "this store was opened without an encoder; pass encoder=M3Encoder(...), "
                "or use add_vectors()/search_by_vectors() with precomputed vectors"
            )
        return self.encoder

    @staticmethod
    def _records_from(
        texts: Iterable[Any], ids: Sequence[str] | None, metadata: Sequence[Mapping[str, Any] | None] | None
    ) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
        """Yield (index, id, text, metadata) from texts or record dicts, checking types."""
        id_list = None if ids is None else list(ids)
        meta_list = None if metadata is None else list(metadata)
        count = 0
        for i, item in enumerate(texts):
            count += 1
            if isinstance(item, Document):
                text, rid, meta = item.text, item.id, dict(item.metadata)
            elif isinstance(item, Mapping):
                text = item.get("text")
                rid = item.get("id")
                meta = dict(item.get("metadata") or {})
            else:
                text, rid, meta = item, None, {}
            if not isinstance(text, str):
                raise InvalidTypeError(f"texts[{i}] is {type(text).__name__}, not str")
            if id_list is not None:
                if i >= len(id_list):
                    raise InvalidInputError(f"ids has {len(id_list)} entries but texts has more")
                rid = id_list[i]
            if meta_list is not None:
                if i >= len(meta_list):
                    raise InvalidInputError(f"metadata has {len(meta_list)} entries but texts has more")
                meta = dict(meta_list[i] or {})
            if rid is not None and (not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == ""):
                raise InvalidTypeError(f"ids[{i}] must be a non-empty str or int, got {rid!r}")
            for key in meta:
                if not isinstance(key, str):
                    raise InvalidTypeError(f"metadata[{i}] has a non-string key {key!r}")
            yield i, str(rid) if rid is not None else document_id(text, meta), text, meta
        if id_list is not None and len(id_list) != count:
            raise InvalidInputError(f"ids has {len(id_list)} entries for {count} texts")
        if meta_list is not None and len(meta_list) != count:
            raise InvalidInputError(f"metadata has {len(meta_list)} entries for {count} texts")

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
        rows = list(self._records_from(texts, ids, metadata))
        records = [
            Record(id=rid, text=text, metadata=meta, **self._checked_vectors(vectors[i], i).__dict__)
            for i, rid, text, meta in rows
        ]
        report = IngestReport(ids=[r.id for r in records])
        self._write(list({r.id: r for r in records}.values()), report)
        self.adapter.flush()
        return report.ids

    def _checked_vectors(self, value: Any, i: int) -> Vectors:
        try:
            v = Vectors.of(value)
        except TypeError as exc:
            raise InvalidTypeError(f"vectors[{i}]: {exc}") from None
        spec = self.spec
        dense = np.asarray(v.dense, np.float32) if v.dense is not None else None
        if dense is None or dense.shape != (spec.dense_dim,):
            raise InvalidInputError(
                f"vectors[{i}].dense must have shape ({spec.dense_dim},), got "
                f"{None if dense is None else dense.shape}"
            )
        colbert = np.asarray(v.colbert, np.float32) if v.colbert is not None else None
        if colbert is None or colbert.ndim != 2 or colbert.shape[1] != spec.colbert_dim:
            raise InvalidInputError(
                f"vectors[{i}].colbert must have shape (tokens, {spec.colbert_dim}), got "
                f"{None if colbert is None else colbert.shape}"
            )
        if not isinstance(v.sparse, Mapping):
            raise InvalidTypeError(f"vectors[{i}].sparse must be a dict {{token_id: weight}}")
        sparse: dict[int, float] = {}
        for key, weight in v.sparse.items():
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
                raise InvalidTypeError(f"vectors[{i}].sparse key {key!r} is not a non-negative int token id")
            sparse[int(key)] = float(weight)
        if not (np.isfinite(dense).all() and np.isfinite(colbert).all() and np.isfinite(list(sparse.values())).all()):
            raise InvalidInputError(f"vectors[{i}] holds NaN or infinite values")
        norms = np.linalg.norm(colbert, axis=1)
        if len(norms) and norms.max() > _fusion.COLBERT_NORM_LIMIT:
            row = int(norms.argmax())
            raise InvalidInputError(
                f"vectors[{i}].colbert row {row} has norm {norms[row]:.4f}: ColBERT rows must be "
                "L2-normalised, as BGE-M3 makes them (exact fusion relies on it)"
            )
        return Vectors(dense=dense, sparse=sparse, colbert=colbert)

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
        report = IngestReport()
        pending: list[tuple[int, str, str, dict[str, Any]]] = []
        bar = tqdm(desc="Writing", unit="doc", disable=show_progress is False)
        with bar:
            for item in self._records_from(texts, ids, metadata):
                pending.append(item)
                if len(pending) >= encode_batch_size:
                    self._ingest_chunk(encoder, pending, report, skip_existing, bar)
                    pending = []
            if pending:
                self._ingest_chunk(encoder, pending, report, skip_existing, bar)
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
        if skip_existing:
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
        """Cut records into batches by bytes and upsert them; a failure names its batch."""
        limit = self.adapter.max_batch_bytes
        itemsize = self.spec.colbert_itemsize
        batch: list[Record] = []
        size = 0
        for record in records + [None]:  # type: ignore[list-item]
            rec_size = 0 if record is None else record.nbytes(itemsize)
            if batch and (record is None or size + rec_size > limit):
                try:
                    self.adapter.upsert(batch)
                except Exception as exc:
                    raise IngestError(
                        f"writing batch {report.batches} ({len(batch)} documents, ids {batch[0].id!r}...) "
                        f"to {self.adapter.engine} failed: {type(exc).__name__}: {exc}. "
                        "Earlier batches are stored; re-run to resume.",
                        batch_index=report.batches,
                        ids=[r.id for r in batch],
                    ) from exc
                report.batches += 1
                report.written += len(batch)
                batch, size = [], 0
            if record is not None:
                batch.append(record)
                size += rec_size

    # -- reading ----------------------------------------------------------------------------

    def count(self) -> int:
        """Number of stored documents."""
        return self.adapter.count()

    def delete(self, ids: Sequence[str]) -> None:
        """Delete documents by id; unknown ids are ignored."""
        ids = self._check_ids(ids)
        if ids:
            self.adapter.delete(ids)
            self.adapter.flush()

    def get(self, ids: Sequence[str]) -> list[Document]:
        """Stored documents by id, in the order asked; missing ids are left out."""
        ids = self._check_ids(ids)
        found = self.adapter.fetch(ids, fields=())
        return [Document(found[i].id, found[i].text, found[i].metadata) for i in ids if i in found]

    @staticmethod
    def _check_ids(ids: Sequence[str]) -> list[str]:
        if isinstance(ids, str):
            raise InvalidTypeError("ids must be a list of strings, not a single string")
        out = []
        for i, value in enumerate(ids):
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise InvalidTypeError(f"ids[{i}] is {type(value).__name__}, not str")
            out.append(str(value))
        return out

    # -- search -----------------------------------------------------------------------------

    def search(
        self,
        query: str,
        k: int = 10,
        weights: Sequence[float] | Mapping[str, float] = (0.4, 0.2, 0.4),
        filter: Mapping[str, Any] | None = None,
        *,
        fusion: Fusion = "exact",
        candidate_depth: int | None = None,
        candidate_routes: Sequence[str] | None = None,
    ) -> list[Hit]:
        """Hybrid search with M3's weighted fusion.

        Args:
            query: the query text.
            k: number of hits.
            weights: ``(dense, sparse, colbert)``; a zero weight drops that route.
            filter: metadata filter (see :mod:`m3connect.filters`).
            fusion: ``"exact"`` rescores candidates in the client (``Hit.score`` equals
                ``compute_score``); ``"engine"`` pushes the weighted sum into the engine;
                ``"rrf"`` is reciprocal rank fusion in the engine.
            candidate_depth: candidates per route (default ``max(100, 10*k)``).
            candidate_routes: routes that generate candidates for exact fusion; default
                dense and sparse (as in the paper), ColBERT only when the dense weight is 0.
        """
        if not isinstance(query, str):
            raise InvalidTypeError(f"query must be a str, got {type(query).__name__}")
        encoder = self._require_encoder()
        q = encoder.encode_one(query, max_length=self.max_length)
        return self.search_by_vectors(
            q, k=k, weights=weights, filter=filter, fusion=fusion,
            candidate_depth=candidate_depth, candidate_routes=candidate_routes,
        )

    def search_by_vectors(
        self,
        query: Mapping[str, Any],
        k: int = 10,
        weights: Sequence[float] | Mapping[str, float] = (0.4, 0.2, 0.4),
        filter: Mapping[str, Any] | None = None,
        *,
        fusion: Fusion = "exact",
        candidate_depth: int | None = None,
        candidate_routes: Sequence[str] | None = None,
    ) -> list[Hit]:
        """:meth:`search` with precomputed query representations (``encoder.encode_one``)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be a positive int, got {k!r}")
        w = scoring.validate_weights(weights)
        flt = parse_filter(filter)
        depth = candidate_depth or self.candidate_depth or max(100, 10 * k)
        depth = max(depth, k)
        try:
            q = Vectors.of(query)
        except TypeError as exc:
            raise InvalidTypeError(f"query: {exc}") from None
        stats = self.last_query_stats = _fusion.QueryStats()
        if fusion == "exact":
            return _fusion.exact(self.adapter, q, w, k, flt, depth, routes=candidate_routes, stats=stats)
        if fusion not in ("engine", "rrf"):
            raise InvalidInputError(f"fusion must be 'exact', 'engine' or 'rrf', got {fusion!r}")
        method = "weighted" if fusion == "engine" else "rrf"
        return _fusion.pushed(self.adapter, q, w, k, flt, depth, method, stats=stats)

    # -- admin ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Engine, collection, schema and count."""
        spec = self.adapter.spec
        return {
            "engine": self.adapter.engine,
            "collection": self.adapter.collection,
            "count": self.count(),
            "spec": None if spec is None else json.loads(spec.to_json()),
        }

    def drop(self) -> None:
        """Delete the whole collection."""
        self.adapter.drop()

    def close(self) -> None:
        self.adapter.close()

    def __enter__(self) -> M3Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    uri: str,
    collection: str = "m3connect",
    encoder: Encoder | str | None = None,
    *,
    colbert_dtype: str = "float32",
    candidate_depth: int | None = None,
    max_length: int | None = None,
    spec: CollectionSpec | None = None,
    **options: Any,
) -> M3Store:
    """Open (or create) a collection in the engine named by ``uri``.

    Args:
        uri: ``milvus:///abs/m3.db``, ``milvus://host:19530``, ``qdrant://:memory:``,
            ``qdrant:///abs/dir``, ``qdrant://host:6333``, ``opensearch://host:9200``.
        collection: collection (index) name.
        encoder: the encoder whose vectors the collection holds: an :class:`~m3connect.M3Encoder`,
            a :class:`~m3connect.RemoteEncoder`, or the URL of an ``m3connect serve`` server.
            A collection written for another model or dimension is refused.
        colbert_dtype: ``"float32"`` or ``"float16"`` storage for ColBERT vectors.
        candidate_depth: candidates per route for exact fusion.
        spec: without an encoder, the :class:`CollectionSpec` to create the collection
            with, for :meth:`M3Store.add_vectors` of precomputed vectors.
        options: engine options: ``token``/``user``/``password``/``api_key``, ``timeout``...
    """
    if not isinstance(collection, str) or not collection or not collection.replace("_", "").replace("-", "").isalnum():
        raise InvalidInputError(f"collection name {collection!r} must be letters, digits, '_' or '-'")
    if isinstance(encoder, str):  # an encoder server: connect(..., encoder="http://host:8080")
        from .remote import RemoteEncoder, is_remote_model

        if not is_remote_model(encoder):
            raise InvalidInputError(f"encoder={encoder!r}: pass an encoder object, or an http(s):// server URL")
        encoder = RemoteEncoder(encoder)
    location = parse_uri(uri)
    adapter = _load_adapter(location, collection, options)
    existing = adapter.read_spec()
    if encoder is not None:
        if spec is not None:
            raise InvalidInputError("pass either encoder= or spec=, not both: the encoder defines the spec")
        spec = CollectionSpec(
            model=encoder.model_name,
            fingerprint=encoder.fingerprint,
            dense_dim=encoder.dense_dim,
            colbert_dim=encoder.colbert_dim,
            colbert_dtype=colbert_dtype,
        )
    if spec is not None:
        if existing is None:
            adapter.create(spec)
            existing = spec
        else:
            _check_compatible(collection, existing, spec)
    elif existing is None:
        raise InvalidInputError(f"collection {collection!r} does not exist; pass an encoder to create it")
    adapter.open(existing)
    return M3Store(adapter, encoder, candidate_depth=candidate_depth, max_length=max_length)


def _check_compatible(collection: str, existing: CollectionSpec, wanted: CollectionSpec) -> None:
    for name in ("dense_dim", "colbert_dim", "fingerprint"):
        have, want = getattr(existing, name), getattr(wanted, name)
        if have != want:
            what = "model weights" if name == "fingerprint" else name
            raise SchemaMismatchError(
                f"collection {collection!r} holds vectors of model {existing.model!r} "
                f"({name}={have}), but the encoder is {wanted.model!r} ({name}={want}): different {what}. "
                "Use another collection name, or drop this one explicitly."
            )
    if existing.colbert_dtype != wanted.colbert_dtype and wanted.colbert_dtype != "float32":
        raise SchemaMismatchError(
            f"collection {collection!r} stores ColBERT as {existing.colbert_dtype}, not {wanted.colbert_dtype}"
        )


"""The backend-neutral store: ingestion, exact M3 search, and the URI facade.

>>> store = connect("qdrant://:memory:", collection="docs", encoder=enc)   # doctest: +SKIP
>>> store.add(["first text", "second text"], metadata=[{"lang": "en"}] * 2)  # doctest: +SKIP
>>> store.search("text", k=5, weights=(0.4, 0.2, 0.4), filter={"lang": "en"})  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import contextlib
import hashlib
import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal
from urllib.parse import unquote, urlsplit

from tqdm.auto import tqdm

import numpy as np

from . import fusion as _fusion  # the parameter `fusion` names the method
from . import scoring
from .adapters.base import Adapter, CollectionSpec, Record
from .colbert_storage import pool_tokens
from .errors import (
    CollectionNotFoundError,
    IngestError,
    InvalidInputError,
    InvalidTypeError,
    M3Error,
    SchemaMismatchError,
    redact_error,
)
from .filters import parse_filter
from .types import ROUTES, Document, Hit, Vectors

if TYPE_CHECKING:
    from .protocols import Encoder

__all__ = ["connect", "M3Store", "ParsedURI", "parse_uri", "safe_uri", "IngestReport", "document_id"]

_log = logging.getLogger(__name__)  # DEBUG: batches, searches, timings; the library never configures logging
Fusion = Literal["exact", "engine", "rrf"]
_MAX_K = 10_000  # OpenSearch's result window and Milvus' topk limit; Qdrant takes more, no user needs it
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
    ``milvus://./m3.db`` (or ``../``, ``~/``) is a path relative to the working directory,
    resolved here. ``user:password@host`` carries credentials (the password never shows in
    ``repr``); for Qdrant the password is the API key.
    """

    engine: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    tls: bool = False
    transport: str = ""
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        return self.host is None

    def url(self, default_port: int) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port or default_port}"


def safe_uri(uri: str) -> str:
    """``uri`` with the password of ``user:password@`` replaced by ``***`` (for messages)."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, tail = rest.partition("/")
    if sep and "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    return f"{scheme}{sep}{netloc}{slash}{tail}"


def parse_uri(uri: str) -> ParsedURI:
    """Parse a store URI; an unknown scheme or an unusable location is an ``InvalidInputError``."""
    if not isinstance(uri, str):
        raise InvalidTypeError(f"uri must be a string, got {type(uri).__name__}")
    shown = safe_uri(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        hint = f"; for a Milvus Lite file say milvus://./{uri}" if uri.endswith(".db") else ""
        raise InvalidInputError(
            f"{shown!r} is not a store URI; expected e.g. milvus:///abs/m3.db, qdrant:///abs/dir or "
            f"opensearch://host:9200{hint}"
        )
    engine, _, transport = scheme.lower().partition("+")
    if engine not in _SCHEMES or transport not in ("", "https", "http") + (("local",) if engine == "qdrant" else ()):
        raise InvalidInputError(f"unknown URI scheme {scheme!r} in {shown!r}; use one of {list(_SCHEMES)}")
    tls = transport == "https"
    if rest == ":memory:":
        if engine != "qdrant":
            raise InvalidInputError(f"{engine} has no in-memory mode; use a file path")
        return ParsedURI(engine, path=":memory:", transport="local")
    if rest.startswith(("./", "../", "~/")) or rest in (".", ".."):
        rest = str(Path(rest).expanduser().resolve())
    if rest.startswith("/"):
        if engine == "opensearch":
            raise InvalidInputError("OpenSearch has no embedded mode; use opensearch://host:9200")
        return ParsedURI(engine, path="/" + rest.lstrip("/"), transport=transport)
    parts = urlsplit(f"//{rest}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidInputError(f"{shown!r}: the port must be a number in 1..65535") from None
    if not parts.hostname:
        raise InvalidInputError(f"{shown!r} names neither a host nor an absolute path")
    if engine != "opensearch" and parts.hostname.endswith((".db", ".sqlite")):
        raise InvalidInputError(
            f"{shown!r} reads as host {parts.hostname!r}; for an embedded file give an absolute path "
            f"({engine}:///abs/path) or one relative to the working directory ({engine}://./{parts.hostname})"
        )
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return ParsedURI(engine, host=parts.hostname, port=port, tls=tls, user=user, password=password)


_BAD_KEY_CHARS = frozenset('."\'\\`$')


def _check_text(text: Any, where: str, need_text: bool) -> None:
    if not isinstance(text, str):
        raise InvalidTypeError(f"{where} is {type(text).__name__}, not str")
    if need_text and not text.strip():
        raise InvalidInputError(f"{where} is empty or only whitespace")
    if "\x00" in text:
        raise InvalidInputError(f"{where} holds a NUL character at {text.index(chr(0))}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{where} is not valid Unicode (a lone surrogate at {exc.start})") from None


def _check_id(rid: str, where: str) -> None:
    if not rid.strip():
        raise InvalidInputError(f"{where} is empty")
    if "\x00" in rid:
        raise InvalidInputError(f"{where} {rid!r} holds a NUL character")
    try:
        rid.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{where} {rid!r} is not valid Unicode") from None


def _check_metadata(meta: Mapping[str, Any], where: str) -> None:
    """Metadata must survive every engine unchanged: string keys a filter can name, JSON values."""
    for key, value in meta.items():
        if not isinstance(key, str):
            raise InvalidTypeError(f"{where} has a non-string key {key!r}")
        if not key or key.startswith("$") or _BAD_KEY_CHARS & set(key) or not key.isprintable():
            raise InvalidInputError(
                f"{where} key {key!r} is not allowed: keys must be non-empty, not start with '$', "
                "and hold no dots, quotes, backslashes or control characters"
            )
        _check_json_value(value, f"{where}[{key!r}]")


def _check_json_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        if isinstance(value, str):
            _check_text(value, where, False)
        return
    if isinstance(value, float):
        if not np.isfinite(value):
            raise InvalidInputError(f"{where} is {value}: NaN and infinity are not JSON values")
        return
    if isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            _check_json_value(item, f"{where}[{j}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidTypeError(f"{where} has a non-string key {key!r}")
            _check_json_value(item, f"{where}[{key!r}]")
        return
    raise InvalidTypeError(
        f"{where} is {type(value).__name__}; metadata values must be str, int, float, bool, None, "
        "or lists/dicts of them"
    )


def _check_batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_K:
        raise InvalidInputError(f"batch_size must be an int in 1..{_MAX_K}, got {value!r}")
    return value


def _check_routes(vectors: Any) -> tuple[str, ...]:
    """``get(vectors=...)``: a route name or names of routes, checked; ``()`` for none."""
    if vectors is None:
        return ()
    if isinstance(vectors, str):
        vectors = (vectors,)
    if not isinstance(vectors, Iterable):
        raise InvalidTypeError(f"vectors must name routes of {ROUTES}, got {type(vectors).__name__}")
    named = list(vectors)
    unknown = [r for r in named if not isinstance(r, str) or r not in ROUTES]
    if unknown:
        raise InvalidInputError(f"vectors must name routes of {ROUTES}, got {unknown[0]!r}")
    return tuple(dict.fromkeys(named))


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


_SECRET_OPTIONS = ("password", "api_key", "token")


def _with_credentials(location: ParsedURI, options: dict[str, Any]) -> dict[str, Any]:
    """Options with the URI's ``user:password@`` added where no explicit option overrides it."""
    options = dict(options)
    if location.engine == "qdrant":
        if location.password and "api_key" not in options:
            options["api_key"] = location.password
    else:
        if location.user and "user" not in options:
            options["user"] = location.user
        if location.password is not None and "password" not in options:
            options["password"] = location.password
    return options


def _secrets(options: Mapping[str, Any]) -> tuple[str, ...]:
    found: list[str] = []
    for name in _SECRET_OPTIONS:
        value = options.get(name)
        if isinstance(value, str) and value:
            found.append(value)
            found.extend(part for part in value.split(":")[1:] if part)  # Milvus token "user:password"
    return tuple(found)


def _adapter_class(location: ParsedURI) -> type[Adapter]:
    module_name, _, cls_name = _ADAPTERS[_adapter_key(location)].partition(":")
    cls: type[Adapter] = getattr(importlib.import_module(module_name), cls_name)
    return cls


def _load_adapter(location: ParsedURI, collection: str, options: dict[str, Any]) -> Adapter:
    cls = _adapter_class(location)
    secrets = _secrets(options)
    try:
        adapter: Adapter = cls(location, collection, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise InvalidInputError(f"{cls.engine} does not take the option {str(exc).rpartition(' ')[2]}") from None
    except M3Error as exc:
        raise redact_error(exc, secrets)
    adapter.secrets = secrets
    return adapter


class ReadWriteLock:
    """Many readers or one writer. Embedded engines share one per location, so that threads of
    one process never see a half-applied overwrite (Milvus Lite applies an upsert as a delete
    and an insert; a search in between would miss the document on some routes)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _NoLock:
    """Servers order concurrent requests themselves."""

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        yield

    write = read


_EMBEDDED_LOCKS: dict[tuple[str, str], ReadWriteLock] = {}
_EMBEDDED_LOCKS_GUARD = threading.Lock()


def _lock_for(location: ParsedURI) -> ReadWriteLock | _NoLock:
    if not location.embedded or location.path == ":memory:":
        return ReadWriteLock() if location.embedded else _NoLock()
    with _EMBEDDED_LOCKS_GUARD:
        return _EMBEDDED_LOCKS.setdefault((location.engine, os.path.realpath(location.path or "")), ReadWriteLock())


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
        adapter: Adapter | Callable[[], Adapter],
        encoder: Encoder | None,
        *,
        candidate_depth: int | None = None,
        max_length: int | None = None,
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
        self.max_length = max_length
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

    @staticmethod
    def _records_from(
        texts: Iterable[Any],
        ids: Sequence[str] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
        *,
        need_text: bool = True,
    ) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
        """Yield (index, id, text, metadata) from texts or record dicts, checking every value.

        Everything is checked before it reaches an engine, so a bad item stops the run with
        a message naming it, and nothing after it is written."""
        if texts is None or isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise InvalidTypeError(
                f"texts must be a list of strings, got {type(texts).__name__}"
                + (": wrap a single text in a list" if isinstance(texts, str) else "")
            )
        if ids is not None and (isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable)):
            raise InvalidTypeError(f"ids must be a list of strings, got {type(ids).__name__}")
        if metadata is not None and (isinstance(metadata, Mapping) or not isinstance(metadata, Iterable)):
            raise InvalidTypeError(f"metadata must be a list of dicts (one per text), got {type(metadata).__name__}")
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
            _check_text(text, f"texts[{i}]", need_text)
            if id_list is not None:
                if i >= len(id_list):
                    raise InvalidInputError(f"ids has {len(id_list)} entries but texts has more")
                rid = id_list[i]
                if rid is None:
                    raise InvalidTypeError(f"ids[{i}] is None; give every text an id, or pass no ids at all")
            if meta_list is not None:
                if i >= len(meta_list):
                    raise InvalidInputError(f"metadata has {len(meta_list)} entries but texts has more")
                if meta_list[i] is not None and not isinstance(meta_list[i], Mapping):
                    raise InvalidTypeError(f"metadata[{i}] is {type(meta_list[i]).__name__}, not a dict")
                meta = dict(meta_list[i] or {})
            if rid is not None:
                if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                    raise InvalidTypeError(f"ids[{i}] must be a str or int, got {type(rid).__name__}")
                _check_id(str(rid), f"ids[{i}]")
            _check_metadata(meta, f"metadata[{i}]")
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
        rows = list(self._records_from(texts, ids, metadata, need_text=False))
        records = [
            Record(id=rid, text=text, metadata=meta, **self._checked_vectors(vectors[i], i).__dict__)
            for i, rid, text, meta in rows
        ]
        report = IngestReport(ids=[r.id for r in records])
        if not records:
            return []
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
        if isinstance(texts, (str, bytes)):
            raise InvalidTypeError("texts must be a list of strings, not a single string: add([text])")
        report = IngestReport()
        pending: list[tuple[int, str, str, dict[str, Any]]] = []
        bar = tqdm(desc="Writing", unit="doc", disable=not show_progress)  # library code: off unless asked
        with bar:
            for item in self._records_from(texts, ids, metadata):
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
        """Cut records into batches by bytes and upsert them; a failure names its batch."""
        adapter = self._writer()
        limit = adapter.max_batch_bytes
        spec = self.spec
        if spec.colbert_pool_factor > 1:  # token pooling happens here, once, for every engine
            for record in records:
                record.colbert = pool_tokens(record.colbert, spec.colbert_pool_factor)
        row_bytes = spec.colbert_row_bytes
        batch: list[Record] = []
        size = 0
        for record in records + [None]:  # type: ignore[list-item]
            rec_size = 0 if record is None else record.nbytes(0) + len(record.colbert) * row_bytes  # type: ignore[arg-type]
            if batch and (record is None or size + rec_size > limit):
                try:
                    t0 = time.perf_counter()
                    with self._lock.write():
                        adapter.upsert(batch)
                    _log.debug("%s %r: wrote batch %d (%d documents, %.0f kB) in %.1f ms", adapter.engine,
                               adapter.collection, report.batches, len(batch), size / 1024,
                               1000 * (time.perf_counter() - t0))
                except (InvalidInputError, InvalidTypeError):
                    raise  # a bad record: its message names it; earlier batches are stored
                except Exception as exc:  # adapters raise M3Errors; a wrapped or patched one may not
                    raise IngestError(
                        f"writing batch {report.batches} ({len(batch)} documents, ids {batch[0].id!r}...) "
                        f"to {adapter.engine} failed: {exc}. "
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
        """Number of stored documents (``CollectionNotFoundError`` if the collection does not exist)."""
        with self._lock.read():
            return self._reader().count()

    def delete(self, ids: Sequence[str]) -> None:
        """Delete documents by id; unknown ids are ignored (as is a collection not yet created)."""
        ids = self._check_ids(ids)
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
        ids = self._check_ids(ids)
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

    @staticmethod
    def _check_ids(ids: Sequence[str]) -> list[str]:
        if isinstance(ids, str):
            raise InvalidTypeError("ids must be a list of strings, not a single string")
        if not isinstance(ids, Iterable):
            raise InvalidTypeError(f"ids must be a list of strings, got {type(ids).__name__}")
        out = []
        for i, value in enumerate(ids):
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise InvalidTypeError(f"ids[{i}] is {type(value).__name__}, not str")
            _check_id(str(value), f"ids[{i}]")
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
        _check_text(query, "query", True)
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
        try:
            q = Vectors.of(query)
        except TypeError as exc:
            raise InvalidTypeError(f"query: {exc}") from None
        stats = self.last_query_stats = _fusion.QueryStats()
        if fusion not in ("exact", "engine", "rrf"):
            raise InvalidInputError(f"fusion must be 'exact', 'engine' or 'rrf', got {fusion!r}")
        t0 = time.perf_counter()
        with self._lock.read():
            if fusion == "exact":
                hits = _fusion.exact(adapter, q, w, k, flt, depth, routes=candidate_routes, stats=stats)
            else:
                method = "weighted" if fusion == "engine" else "rrf"
                hits = _fusion.pushed(adapter, q, w, k, flt, depth, method, stats=stats)
        _log.debug("%s %r: %s search k=%d depth=%d: %d candidates, %d score calls, %d pruned, %.1f ms",
                   adapter.engine, adapter.collection, fusion, k, depth, stats.candidates, stats.score_calls,
                   stats.pruned, 1000 * (time.perf_counter() - t0))
        return hits

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
    uri: str,
    collection: str = "m3connect",
    encoder: Encoder | str | None = None,
    *,
    colbert_dtype: str | None = None,
    colbert_pool_factor: int | None = None,
    candidate_depth: int | None = None,
    max_length: int | None = None,
    spec: CollectionSpec | None = None,
    **options: Any,
) -> M3Store:
    """Open a collection in the engine named by ``uri``; a missing one is created by the first write.

    Reads of a collection that does not exist (``count``, ``get``, ``search``, ``info``)
    raise :class:`~m3connect.errors.CollectionNotFoundError` and leave nothing behind.

    Args:
        uri: ``milvus:///abs/m3.db``, ``milvus://host:19530``, ``qdrant://:memory:``,
            ``qdrant:///abs/dir``, ``qdrant://host:6333``, ``opensearch://host:9200``.
        collection: collection (index) name.
        encoder: the encoder whose vectors the collection holds: an :class:`~m3connect.M3Encoder`,
            a :class:`~m3connect.RemoteEncoder`, or the URL of an ``m3connect serve`` server.
            A collection written for another model or dimension is refused.
        colbert_dtype: how a new collection stores ColBERT vectors: ``"float32"`` (default),
            ``"float16"``, ``"int8"`` (per-row scale) or ``"binary"`` (1 bit per value; queries
            stay float). See :mod:`m3connect.colbert_storage`; Qdrant keeps float32/float16 only.
        colbert_pool_factor: token pooling at ingestion: each document keeps
            ``ceil(tokens / factor)`` Ward-clustered mean vectors (default 1: all of them).
            Both ColBERT options are fixed when the collection is created. Left out (``None``),
            a reopen uses what the collection stores; given, they must match it
            (``SchemaMismatchError`` otherwise).
        candidate_depth: candidates per route for exact fusion.
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
    location = parse_uri(uri)
    options = _with_credentials(location, options)
    storage: dict[str, Any] = {
        name: value for name, value in (("colbert_dtype", colbert_dtype), ("colbert_pool_factor", colbert_pool_factor))
        if value is not None
    }
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
    missing_file = location.embedded and location.path != ":memory:" and not Path(location.path or "").exists()
    if missing_file:  # nothing on disk yet: open the engine only when something is written
        if spec is None:
            raise CollectionNotFoundError(
                f"{engine} collection {collection!r} does not exist: there is nothing at {location.path}"
            )
        return M3Store(
            lambda: _load_adapter(location, collection, options), encoder, candidate_depth=candidate_depth,
            max_length=max_length, pending_spec=spec, engine=engine, collection=collection,
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
                           pending_spec=spec, lock=_lock_for(location))
        if spec is not None:
            _check_compatible(collection, existing, spec, asked)
        elif asked:
            _check_storage(collection, existing, storage, asked)
        adapter.open(existing)
    except BaseException:
        adapter.close()
        raise
    return M3Store(adapter, encoder, candidate_depth=candidate_depth, max_length=max_length,
                   lock=_lock_for(location))


_STORAGE_FIELDS = ("colbert_dtype", "colbert_pool_factor")


def _non_default_storage(spec: CollectionSpec) -> set[str]:
    """The ColBERT storage fields of ``spec`` that differ from the defaults (float32, no pooling)."""
    defaults = {f.name: f.default for f in dataclasses.fields(CollectionSpec)}
    return {name for name in _STORAGE_FIELDS if getattr(spec, name) != defaults[name]}


def _check_storage(collection: str, existing: CollectionSpec, wanted: Mapping[str, Any], asked: Iterable[str]) -> None:
    for name in _STORAGE_FIELDS:
        if name in asked and getattr(existing, name) != wanted[name]:
            raise SchemaMismatchError(
                f"collection {collection!r} stores ColBERT as {existing.colbert_dtype} with "
                f"colbert_pool_factor={existing.colbert_pool_factor}, but {name}={wanted[name]!r} was asked: "
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


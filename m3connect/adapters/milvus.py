"""Milvus adapter: ``FLOAT_VECTOR``/IP dense, ``SPARSE_FLOAT_VECTOR`` sparse, ColBERT packed beside.

Embedded: ``milvus:///abs/file.db`` (Milvus Lite). Server: ``milvus://host:19530``
(``token=``/``user=``/``password=`` options, ``milvus+https://`` for TLS).

Layout (``"layout": "packed-v2"`` in the collection's row of ``m3connect_meta``):

- ``<name>``: one row per document: ``id``, ``text``, ``metadata`` (JSON), ``dense``
  (IP), ``sparse`` (IP), ``n_tokens``, ``colbert_ref`` and ``colbert_mean``, the plain
  mean of the document's ColBERT vectors (IP; see the ColBERT route below).
- ``<name>__colbert``: each document's ColBERT matrix as the bytes of its
  ``colbert_dtype`` (float32, float16, int8 with a scale per row, or binary; see
  :mod:`m3connect.colbert_storage`), base64 in ``VARCHAR`` chunks of 60,000
  characters (45,000 bytes, about 11 tokens of 1024-d float32, 43 of int8, 351 of
  binary), keyed ``<colbert_ref>:<chunk>``, with ``doc_id`` for deletion. Every dtype
  works on Lite and on servers: the engine only keeps the bytes; MaxSim runs in the
  client on the decoded stored form.

Why packed chunks and not one row per token (``benchmarks/milvus_designs.py``,
``benchmarks/results/milvus-designs-*.md``; 1,000 BGE-M3-sized documents on a loaded
2-core machine): Milvus Lite 3.2 cannot store arrays of vectors, and it is Python
inside: every float of a ``FLOAT_VECTOR`` is converted and type-checked one by one on
insert and on read, and every search walks all rows of the collection in Python. One
row per token wrote 4 to 6 documents/s; exact ``(0.4, 0.2, 0.4)`` took 14 s reading
token vectors into the client, and 7.6 s with MaxSim in the engine (one ``search`` with
all query vectors, ``filter=doc_id in [...]``, ``group_by_field="doc_id"``), which is
not even exact on Lite: it groups only its top ``10 x limit`` token hits, so 3% of the
(document, query vector) pairs were missing and had to be searched or read again. Packed
chunks wrote 33 documents/s and answered in 2.6 s (0.8 s for ``fusion="engine"``):
reading the candidates' bytes costs in proportion to the candidates, not to the
collection, and one numpy product scores them all.

Routes and scores:

- ``dense`` and ``sparse``: engine search, exact inner products (``exact_routes``).
- ``colbert`` (candidate generation, only used for ColBERT-only weights): IP of the mean
  query vector with ``colbert_mean``, filtered in the engine. This is an estimate:
  ``mean_i q_i . mean_j p_j`` is a lower bound of M3's ``mean_i max_j q_i . p_j``.
- :meth:`MilvusAdapter.score`: dense and sparse in the engine (a search restricted to
  the ids with ``id in [...]``; a dense vector is fetched only where a server's ANN
  index missed an id). ColBERT: the candidates' packed matrices are read and MaxSim
  runs in the client, batched in numpy. Ids enter expressions only escaped
  (:func:`literal`), never through pymilvus' ``ids=``, which does not escape quotes.

Bytes moved to the client per query (measured; k = 10, default depth 100, 1,000
documents of ~150 tokens of 1024-d float32, i.e. ~0.8 MB of base64 per document):
``(1, 0, 0)`` exact 0.3 kB (ids and scores of the dense route, text and metadata of the
top k); ``(0.4, 0.2, 0.4)`` exact ~160 MB (MaxSim for the ~190 candidates of dense ∪
sparse), ``fusion="engine"`` ~50 MB (MaxSim for 50 documents plus the 10 hits that
:func:`m3connect.fusion.pushed` scores again), ``fusion="rrf"`` ~8 MB (the 10 hits'
route scores); ColBERT-only exact ~80 MB (100 candidates); a filter matching 20
documents ~16 MB. Dense and sparse scores never move vectors.

Every search (``search_route``, ``engine_search``, both fusions) runs on the main
collection with the metadata filter compiled into the Milvus expression, so filters
apply in the engine on every route.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .. import colbert_storage
from ..errors import (
    BackendError,
    BackendUnavailableError,
    InvalidInputError,
    M3Error,
    MissingDependencyError,
    SchemaMismatchError,
)
from ..filters import And, Cmp, Eq, FilterNode, In, Or
from ..scoring import Weights
from ..types import ROUTES, Route, Vectors
from .base import (
    Adapter,
    Candidate,
    CollectionSpec,
    FusionMethod,
    Record,
    RecordCandidate,
    RouteScores,
    one_line,
    says_collection_missing,
)

try:
    from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker, WeightedRanker
    from pymilvus.exceptions import (
        CollectionNotExistException,
        ConnectionNotExistException,
        DescribeCollectionException,
        MilvusException,
        MilvusUnavailableException,
    )
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError.for_extra("pymilvus", "milvus") from exc

__all__ = ["MilvusAdapter", "compile_filter", "literal", "LAYOUT"]

META_COLLECTION = "m3connect_meta"
LAYOUT = "packed-v2"
# The main collection's fields: an empty collection with exactly these and no meta row is
# a creation that crashed before its meta row (older versions wrote the row last).
_MAIN_FIELDS = frozenset({"id", "text", "metadata", "n_tokens", "colbert_ref", "dense", "sparse", "colbert_mean"})
# A server collection whose meta row still says "creating" after this long is abandoned.
_STALE_CREATE_S = 300.0
MAX_ID_LENGTH = 512
MAX_TEXT_BYTES = 65535
_QUERY_WINDOW = 16384  # Milvus caps offset+limit of one query/search at 16384
_ID_BATCH = 1024  # ids per expression
_CHUNK_BYTES = 45000  # raw bytes per ColBERT chunk: base64 gives 60,000 characters
_CHUNK_CHARS = 4 * _CHUNK_BYTES // 3
_INSERT_BYTES = 16 * 1024 * 1024  # per insert RPC (Milvus refuses RPCs over 64 MB)
_READ_KEYS = 256  # chunk rows per read RPC (about 15 MB)
# Milvus refuses a sparse vector without a non-zero weight. An empty one (a text whose
# tokens all got weight 0) is stored as this placeholder on token 0, the CLS id, which
# the encoder always drops from real lexical weights, so it can never score.
_EMPTY_SPARSE = {0: 1e-30}
_OP = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
# Milvus string literals know these escapes (Milvus Lite knows no others).
_ESCAPE = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_UNQUOTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_OUT = ["id"]  # Lite returns every field, vectors included, for output_fields=[]


def literal(value: Any) -> str:
    r"""A Milvus expression literal. Strings are quoted with every quote, backslash and
    line break escaped, so a value can never end the literal and change the expression.

    >>> print(literal('a "b" \\ c'))
    "a \"b\" \\ c"
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _UNQUOTABLE.search(value):
            raise InvalidInputError(f"{value[:40]!r} holds control characters that a Milvus expression cannot quote")
        return '"' + value.translate(_ESCAPE) + '"'
    raise InvalidInputError(f"cannot use {value!r} in a Milvus filter")


def compile_filter(node: FilterNode | None) -> str:
    """Filter tree → Milvus boolean expression over the ``metadata`` JSON field."""
    if node is None:
        return ""
    if isinstance(node, Eq):
        return f"metadata[{literal(node.field)}] == {literal(node.value)}"
    if isinstance(node, In):
        # Milvus Lite refuses `json_path in [...]`; a disjunction means the same everywhere.
        return "(" + " or ".join(compile_filter(Eq(node.field, v)) for v in node.values) + ")"
    if isinstance(node, Cmp):
        return f"metadata[{literal(node.field)}] {_OP[node.op]} {literal(node.value)}"
    joiner = " and " if isinstance(node, And) else " or "
    assert isinstance(node, (And, Or))
    return "(" + joiner.join(f"({compile_filter(n)})" for n in node.items) + ")"


def _id_list(ids: Iterable[str]) -> str:
    return "[" + ", ".join(literal(i) for i in ids) + "]"


class _LiteSessionTsFilter(logging.Filter):
    """Milvus Lite returns no MVCC session timestamp to ``query_iterator``; pymilvus then warns
    and uses a client-side one, which is what Lite needs. Hides that one expected warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


_QUERY_ITERATOR_LOG = logging.getLogger("pymilvus.client.iterator.query_iterator")


def _both(expr: str, other: str) -> str:
    return f"({expr}) and ({other})" if expr and other else expr or other


class _Packed(str):
    """A chunk string that pymilvus need not walk character by character.

    pymilvus 3.0.2 checks a row's VARCHAR value with a helper written for columns: it
    iterates the value and calls ``isinstance``/``len`` on every character, which made
    packed rows as slow to insert as one row per token. Iterating this subclass yields
    nothing; its length (at most ``_CHUNK_CHARS``) is guaranteed here, and the value
    sent is the same string.
    """

    __slots__ = ()

    def __iter__(self) -> Iterator[str]:
        return iter(())


def pack_colbert(matrix: np.ndarray, dtype: str = "float32") -> list[str]:
    """A ColBERT matrix as base64 chunks of at most 60,000 characters of its stored bytes
    (:func:`m3connect.colbert_storage.to_bytes`)."""
    raw = colbert_storage.to_bytes(matrix, dtype)
    return [base64.b64encode(raw[i : i + _CHUNK_BYTES]).decode("ascii") for i in range(0, len(raw), _CHUNK_BYTES)]


def unpack_colbert(chunks: Sequence[str], n_tokens: int, dim: int, dtype: str = "float32") -> np.ndarray:
    """Inverse of :func:`pack_colbert`: the stored form, float32 ``[n_tokens, dim]``."""
    raw = b"".join(binascii.a2b_base64(c) for c in chunks)  # accepts the str as is
    return colbert_storage.from_bytes(raw, dim, dtype, n_tokens)


def maxsim(query: np.ndarray, matrices: Sequence[np.ndarray]) -> list[float]:
    """M3's ColBERT score of one query against several documents, in one matrix product."""
    q = np.asarray(query, np.float32)
    if not matrices:
        return []
    if q.shape[0] == 0:
        return [0.0] * len(matrices)
    sizes = [m.shape[0] for m in matrices]
    out = [0.0] * len(matrices)
    nonempty = [i for i, n in enumerate(sizes) if n > 0]
    if not nonempty:
        return out
    stacked = np.concatenate([matrices[i] for i in nonempty]).astype(np.float32, copy=False)
    sims = stacked @ q.T  # [tokens, n_q]
    starts = np.cumsum([0] + [sizes[i] for i in nonempty[:-1]])
    best = np.maximum.reduceat(sims, starts, axis=0)  # [docs, n_q]
    for row, i in enumerate(nonempty):
        out[i] = float(best[row].astype(np.float64).mean())
    return out


# Milvus Lite runs in-process, one server per data file, and pymilvus keeps it (and the
# file's lock) until the process exits. The adapters of each file are counted so the last
# close() stops it, and another process can then open the file.
_LITE_OPEN: dict[str, int] = {}
_LITE_GUARD = threading.Lock()


def _lite_release(path: str) -> None:
    with _LITE_GUARD:
        _LITE_OPEN[path] -= 1
        if _LITE_OPEN[path] > 0:
            return
        del _LITE_OPEN[path]
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # pragma: no cover - Lite not installed: nothing to stop
        return
    server_manager_instance.release_server(path)


def _lite_locked(path: str) -> bool:
    """Whether another process holds Milvus Lite's lock on ``path`` (probed after a failed open)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: Lite's lock is not an flock there
        return False
    try:
        fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class MilvusAdapter(Adapter):
    engine = "milvus"
    max_batch_bytes = 24 * 1024 * 1024  # Milvus rejects insert RPCs over 64 MB
    supports_engine_fusion = True
    #: ColBERT candidates come from the mean vector, an estimate (see the module docstring)
    exact_routes = frozenset({"dense", "sparse"})

    def __init__(self, location: Any, collection: str, *, token: str = "", user: str = "",
                 password: str = "", timeout: float = 30.0, client: Any = None, **client_options: Any) -> None:
        super().__init__(collection)
        self.lite = location.embedded
        self.colbert_collection = f"{collection}__colbert"
        self._owns_client = client is None
        if client is not None:  # the user's MilvusClient: used as it is, never closed here
            self.client = client
            self.client_uri = location.path or ""
            return
        uri = self.client_uri = location.path if location.embedded else location.url(19530)
        try:
            self.client = MilvusClient(
                uri=uri, token=token, user=user, password=password, timeout=timeout, **client_options
            )
            self.client.list_collections()
            if self.lite:
                with _LITE_GUARD:
                    _LITE_OPEN[os.path.abspath(uri)] = _LITE_OPEN.get(os.path.abspath(uri), 0) + 1
        except Exception as exc:
            if self.lite and _lite_locked(uri):
                raise BackendUnavailableError(
                    f"Milvus Lite file {uri} is open in another process (it holds {uri}/LOCK); a Milvus Lite "
                    "file has one process at a time (use a Milvus server to share it)"
                ) from exc
            raise BackendUnavailableError(f"cannot reach Milvus at {uri}: {exc}") from exc

    def translate_error(self, exc: Exception, operation: str) -> M3Error:
        reason = one_line(getattr(exc, "message", None) or exc)
        if isinstance(exc, (CollectionNotExistException, DescribeCollectionException)) or says_collection_missing(
            reason
        ):
            return self.not_found()
        unavailable = isinstance(exc, (MilvusUnavailableException, ConnectionNotExistException))
        if unavailable or "unavailable" in reason.lower():
            return BackendUnavailableError(f"Milvus is unreachable during {operation}: {reason}")
        if isinstance(exc, MilvusException):
            return BackendError(f"Milvus {operation} on {self.collection!r} failed: {reason}")
        return super().translate_error(exc, operation)

    # -- schema -----------------------------------------------------------------------------

    def _ensure_meta_collection(self) -> None:
        if self.client.has_collection(META_COLLECTION):
            self.client.load_collection(META_COLLECTION)
            return
        schema = self.client.create_schema(auto_id=False)
        schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("spec", DataType.VARCHAR, max_length=4096)
        schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field
        index = self.client.prepare_index_params()
        index.add_index("unused", index_type="FLAT", metric_type="L2")
        self._create(META_COLLECTION, schema, index)

    def _meta(self) -> dict[str, Any] | None:
        """This collection's row of ``m3connect_meta``, if any."""
        if not self.client.has_collection(META_COLLECTION):
            return None
        self.client.load_collection(META_COLLECTION)
        rows = self.client.query(META_COLLECTION, filter=f"name == {literal(self.collection)}", output_fields=["spec"])
        return json.loads(rows[0]["spec"]) if rows else None

    def _write_meta(self, meta: dict[str, Any]) -> None:
        self.client.upsert(META_COLLECTION, [{"name": self.collection, "spec": json.dumps(meta, sort_keys=True),
                                              "unused": [0.0, 0.0]}])

    def read_spec(self) -> CollectionSpec | None:
        """The stored spec; a creation that crashed half-way is removed and reads as absent."""
        if not self.client.has_collection(self.collection):
            return None
        meta = self._meta()
        if meta is not None and "creating" in meta:
            age = time.time() - float(meta["creating"])
            if not self.lite and age < _STALE_CREATE_S:  # Lite: the file lock rules out another creator
                raise BackendUnavailableError(
                    f"Milvus collection {self.collection!r} is being created by another client "
                    f"(started {age:.0f} s ago); retry in a moment"
                )
            self.drop()
            return None
        if meta is None:
            if self._half_created():
                self.drop()
                return None
            raise SchemaMismatchError(
                f"Milvus collection {self.collection!r} exists but was not created by m3connect"
            )
        if not self.client.has_collection(self.colbert_collection):
            raise SchemaMismatchError(
                f"Milvus collection {self.collection!r} lost its ColBERT companion {self.colbert_collection!r}; "
                "drop it and re-ingest"
            )
        if meta.get("layout") != LAYOUT:
            raise SchemaMismatchError(
                f"Milvus collection {self.collection!r} was written by an older m3connect (ColBERT layout "
                f"{meta.get('layout', 'one row per token')!r}, this version reads {LAYOUT!r}); "
                "re-ingest it into a new collection"
            )
        self.client.load_collection(self.collection)
        self.client.load_collection(self.colbert_collection)
        return CollectionSpec.from_json(json.dumps(meta))

    def create(self, spec: CollectionSpec) -> None:
        # Every colbert_dtype works, on Lite too: the chunks are bytes (see the module docstring).
        ivf = "FLAT" if self.lite else "AUTOINDEX"
        main = self.client.create_schema(auto_id=False)
        main.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        main.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        main.add_field("metadata", DataType.JSON)
        main.add_field("n_tokens", DataType.INT64)
        main.add_field("colbert_ref", DataType.VARCHAR, max_length=64)
        main.add_field("dense", DataType.FLOAT_VECTOR, dim=spec.dense_dim)
        main.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        main.add_field("colbert_mean", DataType.FLOAT_VECTOR, dim=spec.colbert_dim)
        index = self.client.prepare_index_params()
        index.add_index("dense", index_type=ivf, metric_type="IP")
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        index.add_index("colbert_mean", index_type=ivf, metric_type="IP")
        # Ordered so that a crash at any step leaves a state read_spec repairs: the meta
        # row goes first, marked "creating", and loses the mark once both collections exist.
        meta = {**json.loads(spec.to_json()), "layout": LAYOUT}
        self._ensure_meta_collection()
        self._write_meta({**meta, "creating": time.time()})
        if self.client.has_collection(self.colbert_collection):  # left by a crash; no document points into it
            self.client.drop_collection(self.colbert_collection)
        self._create_colbert_collection(spec)
        self._create(self.collection, main, index)
        self._write_meta(meta)
        self.spec = spec

    def _half_created(self) -> bool:
        """Whether the main collection (without a meta row) is an empty m3connect one: what a
        crash during creation left behind before meta rows were written first."""
        fields = {f["name"] for f in self.client.describe_collection(self.collection).get("fields", [])}
        if fields != _MAIN_FIELDS:
            return False
        self.client.load_collection(self.collection)
        return self.count() == 0

    def _create_colbert_collection(self, spec: CollectionSpec) -> None:
        schema = self.client.create_schema(auto_id=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_LENGTH)
        schema.add_field("data", DataType.VARCHAR, max_length=_CHUNK_CHARS)
        schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field
        index = self.client.prepare_index_params()
        index.add_index("unused", index_type="FLAT", metric_type="L2")
        self._create(self.colbert_collection, schema, index)

    def _create(self, name: str, schema: Any, index: Any) -> None:
        """Create and load a collection. On Lite, without pymilvus' index wait: it polls
        an RPC that Lite lacks and sleeps 0.5 s per index; Lite's FLAT "indexes" exist
        at once."""
        if not self.lite:
            self.client.create_collection(name, schema=schema, index_params=index)
            return
        self.client.create_collection(name, schema=schema)
        self.client.create_index(name, index, sync=False)
        self.client.load_collection(name)

    def drop(self) -> None:
        for name in (self.collection, self.colbert_collection):
            if self.client.has_collection(name):
                self.client.drop_collection(name)
        if self.client.has_collection(META_COLLECTION):
            self.client.delete(META_COLLECTION, filter=f"name == {literal(self.collection)}")

    # -- data -------------------------------------------------------------------------------

    @property
    def _dtype(self) -> str:
        return self.spec.colbert_dtype if self.spec is not None else "float32"

    @property
    def _dim(self) -> int:
        assert self.spec is not None, "open or create the collection first"
        return self.spec.colbert_dim

    def _n_chunks(self, n_tokens: int) -> int:
        size = n_tokens * colbert_storage.row_bytes(self._dim, self._dtype)
        return -(-size // _CHUNK_BYTES)

    def _check(self, r: Record) -> None:
        assert r.dense is not None and r.sparse is not None and r.colbert is not None
        if len(r.id) > MAX_ID_LENGTH:
            raise InvalidInputError(f"id {r.id[:40]!r}... is longer than {MAX_ID_LENGTH} characters")
        literal(r.id)  # refuses ids that no expression could name
        if len(r.text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise InvalidInputError(f"text of id {r.id!r} is over {MAX_TEXT_BYTES} bytes, Milvus' VARCHAR limit")

    def _insert(self, name: str, rows: list[dict[str, Any]], sizes: list[int], *, upsert: bool = False) -> None:
        """Insert (or upsert) rows in RPCs of at most ``_INSERT_BYTES``."""
        start, total = 0, 0
        for i, size in enumerate(sizes + [None]):
            if i > start and (size is None or total + size > _INSERT_BYTES):
                (self.client.upsert if upsert else self.client.insert)(name, rows[start:i])
                start, total = i, 0
            total += size or 0

    def upsert(self, records: Sequence[Record]) -> None:
        """Write records; crash-safe: a document row appears only after all of its ColBERT.

        1. the ColBERT chunks of each record go in under a fresh ``colbert_ref``;
        2. the document rows are upserted, pointing at the new chunks;
        3. the chunks of the versions just replaced are deleted by key.

        A crash between the steps leaves at worst unreferenced chunks (``delete`` and
        ``drop`` remove them); no document ever points at missing chunks. Ids seen for the
        first time cost no delete at all.
        """
        for r in records:
            self._check(r)
        old = self._old_colbert([r.id for r in records])
        refs = self._write_colbert(records)
        rows, sizes = [], []
        for r in records:
            colbert = np.asarray(r.colbert, np.float32)
            mean = colbert.mean(axis=0) if colbert.shape[0] else np.zeros(self._dim, np.float32)
            rows.append({
                "id": r.id, "text": r.text, "metadata": r.metadata, "n_tokens": int(colbert.shape[0]),
                "colbert_ref": refs.get(r.id, ""),
                "dense": np.asarray(r.dense, np.float32).tolist(),
                "sparse": {int(k): float(v) for k, v in r.sparse.items()} or _EMPTY_SPARSE,  # type: ignore[union-attr]
                "colbert_mean": mean.astype(np.float32).tolist(),
            })
            sizes.append(len(r.text) + 16 * (len(rows[-1]["dense"]) + len(r.sparse or ()) + self._dim) + 1024)
        self._insert(self.collection, rows, sizes, upsert=True)
        self._retire_colbert(old)

    def _old_colbert(self, ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """``{id: (colbert_ref, n_tokens)}`` of the stored versions of ``ids``."""
        out: dict[str, tuple[str, int]] = {}
        for chunk in self.batched(dict.fromkeys(ids), _ID_BATCH):
            for row in self.client.query(self.collection, filter=f"id in {_id_list(chunk)}",
                                         output_fields=["colbert_ref", "n_tokens"]):
                out[row["id"]] = (row["colbert_ref"], int(row["n_tokens"]))
        return out

    def _write_colbert(self, records: Sequence[Record]) -> dict[str, str]:
        refs: dict[str, str] = {}
        rows, sizes = [], []
        for r in records:
            ref = refs[r.id] = uuid.uuid4().hex
            for i, data in enumerate(pack_colbert(r.colbert, self._dtype)):  # type: ignore[arg-type]
                rows.append({"key": f"{ref}:{i}", "doc_id": r.id, "data": _Packed(data), "unused": [0.0, 0.0]})
                sizes.append(len(data) + len(r.id) + 64)
        self._insert(self.colbert_collection, rows, sizes)
        return refs

    def _retire_colbert(self, old: dict[str, tuple[str, int]]) -> None:
        keys = [f"{ref}:{i}" for ref, n in old.values() for i in range(self._n_chunks(n))]
        for chunk in self.batched(keys, _ID_BATCH):
            self.client.delete(self.colbert_collection, filter=f"key in {_id_list(chunk)}")

    def delete(self, ids: Sequence[str]) -> None:
        # Document rows first: a document never exists without its ColBERT chunks.
        for chunk in self.batched(dict.fromkeys(ids), _ID_BATCH):
            self.client.delete(self.collection, filter=f"id in {_id_list(chunk)}")
        self._delete_colbert(ids)

    def _delete_colbert(self, ids: Sequence[str]) -> None:
        for chunk in self.batched(dict.fromkeys(ids), _ID_BATCH):
            self.client.delete(self.colbert_collection, filter=f"doc_id in {_id_list(chunk)}")

    def flush(self) -> None:
        # Lite answers queries ~30x faster on flushed segments (REFERENCE.md section 5).
        for name in (self.collection, self.colbert_collection):
            self.client.flush(name)

    def count(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The stored ``ids`` whose ColBERT chunks are all present. A document missing any
        counts as absent, so a resumed ingestion writes it again rather than skip it."""
        refs = self._old_colbert(ids)
        keys = {rid: [f"{ref}:{i}" for i in range(self._n_chunks(n))] for rid, (ref, n) in refs.items()}
        present: set[str] = set()
        for chunk in self.batched([k for ks in keys.values() for k in ks], _ID_BATCH):
            rows = self.client.query(self.colbert_collection, filter=f"key in {_id_list(chunk)}", output_fields=["key"])
            present.update(r["key"] for r in rows)
        return {rid for rid, ks in keys.items() if present.issuperset(ks)}

    def _stored_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` with a document row."""
        found: set[str] = set()
        for chunk in self.batched(dict.fromkeys(ids), _ID_BATCH):
            found.update(r["id"] for r in self.client.query(self.collection, filter=f"id in {_id_list(chunk)}",
                                                            output_fields=["id"]))
        return found

    def iter_ids(self, flt: FilterNode | None, batch_size: int = 1000) -> Iterator[list[str]]:
        """``query_iterator`` over the main collection with the compiled filter (``""``: all):
        a primary-key cursor, so no 16,384 window, and deleting yielded ids skips nothing."""
        kwargs: dict[str, Any] = {"batch_size": batch_size, "filter": compile_filter(flt), "output_fields": ["id"]}
        if self.lite:
            quiet = _LiteSessionTsFilter()
            _QUERY_ITERATOR_LOG.addFilter(quiet)
            try:
                iterator = self.client.query_iterator(self.collection, **kwargs)
            finally:
                _QUERY_ITERATOR_LOG.removeFilter(quiet)
        else:
            iterator = self.client.query_iterator(self.collection, **kwargs)
        try:
            while True:
                rows = iterator.next()
                if not rows:
                    return
                yield [row["id"] for row in rows]
        finally:
            iterator.close()

    def fetch(self, ids: Sequence[str], *, fields: Collection[str] = ROUTES) -> dict[str, Record]:
        wanted = [r for r in ROUTES if r in fields]
        out_fields = ["text", "metadata"] + [r for r in ("dense", "sparse") if r in wanted]
        if "colbert" in wanted:
            out_fields += ["colbert_ref", "n_tokens"]
        out: dict[str, Record] = {}
        refs: dict[str, tuple[str, int]] = {}
        for chunk in self.batched(dict.fromkeys(ids), _ID_BATCH):
            for row in self.client.query(self.collection, filter=f"id in {_id_list(chunk)}", output_fields=out_fields):
                rec = Record(id=row["id"], text=row["text"], metadata=dict(row["metadata"] or {}))
                if "dense" in wanted:
                    rec.dense = np.asarray(row["dense"], np.float32)
                if "sparse" in wanted:
                    rec.sparse = self._sparse(row["sparse"])
                if "colbert" in wanted:
                    refs[rec.id] = (row["colbert_ref"], int(row["n_tokens"]))
                out[rec.id] = rec
        if refs:
            for rid, matrix in self._load_colbert(refs).items():
                out[rid].colbert = matrix
        return out

    @staticmethod
    def _sparse(value: Any) -> dict[int, float]:
        sparse = {int(k): float(v) for k, v in dict(value).items()}
        return {} if sparse.keys() == _EMPTY_SPARSE.keys() and sparse[0] < 1e-20 else sparse

    def _load_colbert(self, refs: dict[str, tuple[str, int]], *, retries: int = 3) -> dict[str, np.ndarray]:
        """ColBERT matrices by ``{id: (colbert_ref, n_tokens)}``, read by primary key.

        A reader racing an overwrite may hold the ref of a version whose chunks were just
        retired; the row already points at the new, complete chunks (``upsert`` writes them
        first), so those ids are re-read with their current ref. Chunks still missing under
        an unchanged ref mean real damage."""
        keys = [f"{ref}:{i}" for ref, n in refs.values() for i in range(self._n_chunks(n))]
        data: dict[str, str] = {}
        # a retry reads with Strong consistency: the default may not see chunks just written
        level = {} if retries >= 3 else {"consistency_level": "Strong"}
        for chunk in self.batched(keys, _READ_KEYS):
            for row in self.client.query(self.colbert_collection, filter=f"key in {_id_list(chunk)}",
                                         output_fields=["data"], **level):
                data[row["key"]] = row["data"]
        out: dict[str, np.ndarray] = {}
        stale: list[str] = []
        for rid, (ref, n) in refs.items():
            parts = [data.get(f"{ref}:{i}") for i in range(self._n_chunks(n))]
            if any(p is None for p in parts):
                stale.append(rid)
                continue
            out[rid] = unpack_colbert(parts, n, self._dim, self._dtype)  # type: ignore[arg-type]
        if stale:
            now = self._old_colbert(stale)  # a document deleted meanwhile is simply left out
            again = {rid: now[rid] for rid in stale if rid in now}
            if again and retries <= 0:
                raise BackendError(f"ColBERT vectors of {next(iter(again))!r} are incomplete; re-ingest it")
            if again:
                out.update(self._load_colbert(again, retries=retries - 1))
        return out

    # -- search -----------------------------------------------------------------------------

    def _search_hits(self, field: str, data: list[Any], k: int, expr: str, fields: list[str]) -> list[Any]:
        res = self.client.search(
            self.collection, data=data, anns_field=field, limit=min(k, _QUERY_WINDOW), filter=expr,
            search_params={"metric_type": "IP"}, output_fields=fields,
        )
        return list(res[0])

    def _search(self, field: str, data: list[Any], k: int, expr: str) -> list[Candidate]:
        return [(h["id"], float(h["distance"])) for h in self._search_hits(field, data, k, expr, _OUT)]

    @staticmethod
    def _route_data(route: str, query: Any) -> list[Any]:
        if route == "sparse":
            return [{int(t): float(w) for t, w in query.items()}]
        if route == "colbert":  # the mean query vector against the mean document vectors
            return [np.asarray(query, np.float32).mean(axis=0).tolist()]
        return [np.asarray(query, np.float32).tolist()]

    _FIELD = {"dense": "dense", "sparse": "sparse", "colbert": "colbert_mean"}

    def search_route(self, route: Route, query: Any, k: int, flt: FilterNode | None) -> list[Candidate]:
        if query is None or len(query) == 0:
            return []
        return self._search(self._FIELD[route], self._route_data(route, query), k, compile_filter(flt))

    def search_route_records(
        self, route: Route, query: Any, k: int, flt: FilterNode | None
    ) -> list[RecordCandidate]:
        if query is None or len(query) == 0:
            return []
        hits = self._search_hits(self._FIELD[route], self._route_data(route, query), k, compile_filter(flt),
                                 ["id", "text", "metadata"])
        out: list[RecordCandidate] = []
        for h in hits:
            row = h["entity"]
            rec = Record(id=h["id"], text=row["text"], metadata=dict(row["metadata"] or {}))
            out.append((rec.id, float(h["distance"]), rec))
        return out

    def score(self, ids: Sequence[str], query: Vectors, routes: Sequence[Route]) -> RouteScores:
        """Exact per-route scores of stored ``ids``; ids not stored are left out.

        Dense and sparse: one engine search per 1,024 ids restricted to them
        (``id in [...]``), so only ids and scores travel. A stored id the sparse search
        does not return shares no term (score 0); a dense vector the engine did not
        return (a server's ANN index can miss) is fetched and scored here. ColBERT: the
        packed matrices are read and MaxSim runs here, batched.
        """
        ids = list(dict.fromkeys(ids))
        if not ids or not routes:
            return {}
        per_route: dict[str, dict[str, float]] = {}
        for route in dict.fromkeys(routes):
            if route == "colbert":
                per_route[route] = self._colbert_scores(ids, query.colbert)
            else:
                per_route[route] = self._ip_scores(route, ids, query[route])
        present = set.intersection(*(set(s) for s in per_route.values()))
        return {rid: {r: s[rid] for r, s in per_route.items()} for rid in ids if rid in present}

    def _ip_scores(self, route: str, ids: list[str], query: Any) -> dict[str, float]:
        got: dict[str, float] = {}
        if query is not None and len(query) > 0:
            data = self._route_data(route, query)
            for chunk in self.batched(ids, _ID_BATCH):
                got.update(self._search(route, data, len(chunk), f"id in {_id_list(chunk)}"))
        missing = [i for i in ids if i not in got]
        if not missing:
            return got
        if route == "sparse" or query is None or len(query) == 0:
            # An exact sparse search returns every document sharing a term: the rest score 0.
            got.update(dict.fromkeys(self._stored_ids(missing), 0.0))
            return got
        if self.lite:  # FLAT search is exhaustive: an id it did not return is not stored
            return got
        # Not returned by the engine (a server's ANN index can miss): score the stored vectors.
        vec = np.asarray(query, np.float64)
        for rid, rec in self.fetch(missing, fields=("dense",)).items():
            got[rid] = float(vec @ np.asarray(rec.dense, np.float64))
        return got

    def _colbert_scores(self, ids: list[str], query: Any) -> dict[str, float]:
        refs = self._old_colbert(ids)
        q = np.zeros((0, self._dim), np.float32) if query is None else np.asarray(query, np.float32)
        if q.shape[0] == 0:
            return {rid: 0.0 for rid in refs}
        out: dict[str, float] = {}
        # Bounded memory: about 64 documents' matrices at a time.
        items = list(refs.items())
        for start in range(0, len(items), 64):
            part = dict(items[start : start + 64])
            matrices = self._load_colbert(part)
            out.update(zip(part, maxsim(q, [matrices[rid] for rid in part])))
        return out

    def engine_search(self, query: Vectors, weights: Weights, k: int, flt: FilterNode | None,
                      depth: int, method: FusionMethod) -> list[Candidate]:
        """Fusion in the engine, filtered on every route.

        ``"weighted"`` without a ColBERT weight: ``hybrid_search`` over dense and sparse
        with ``WeightedRanker(w/sum(w), norm_score=False)``, the raw weighted sum in which
        a route that did not return a document adds 0 (one route alone: its own search).

        ``"weighted"`` with a ColBERT weight: ColBERT is outside ``hybrid_search`` on
        Milvus Lite, and MaxSim costs about 0.8 MB read per document, so the engine
        prepares and the client adds: ``hybrid_search`` returns the union of the dense
        and sparse top-``depth`` lists (limit ``2 * depth``); their exact dense and sparse
        scores come from :meth:`score` (engine searches, no vectors moved), which removes
        the "missing route adds 0" error; MaxSim is computed for the best
        ``max(k, depth // 2)`` of them by that partial sum only, and the top ``k`` by the
        full M3 sum is returned (scores ``sum(w*s)/sum(w)``). ColBERT alone: the ColBERT
        route's ``depth`` candidates ranked by MaxSim.

        ``"rrf"``: ``RRFRanker(60)`` over the active routes' rankings (ColBERT's is the
        ``colbert_mean`` route).
        """
        expr = compile_filter(flt)
        total = float(sum(weights))
        usable = [r for r, w in zip(ROUTES, weights) if w > 0 and query[r] is not None and len(query[r]) > 0]
        if method == "rrf":
            requests = [self._request(r, query[r], depth, expr) for r in usable]
            if not requests:
                return []
            res = self.client.hybrid_search(self.collection, requests, RRFRanker(60), limit=min(k, _QUERY_WINDOW),
                                            output_fields=_OUT)
            return [(h["id"], float(h["distance"])) for h in res[0]]
        lexical = [r for r in usable if r != "colbert"]
        w = {r: getattr(weights, r) / total for r in ROUTES}
        if "colbert" not in usable:
            if not lexical:
                return []
            if len(lexical) == 1:
                return [(d, s * w[lexical[0]]) for d, s in self.search_route(lexical[0], query[lexical[0]], k, flt)]
            ranker = WeightedRanker(w["dense"], w["sparse"], norm_score=False)
            res = self.client.hybrid_search(self.collection, [self._request(r, query[r], depth, expr) for r in lexical],
                                            ranker, limit=min(k, _QUERY_WINDOW), output_fields=_OUT)
            return [(h["id"], float(h["distance"])) for h in res[0]]
        if not lexical:  # ColBERT alone: its own candidates
            partial = {d: 0.0 for d, _ in self.search_route("colbert", query.colbert, depth, flt)}
            keep = len(partial)
        elif len(lexical) == 1:
            route = lexical[0]
            partial = {d: s * w[route] for d, s in self.search_route(route, query[route], depth, flt)}
            keep = max(k, depth // 2)
        else:
            ranker = WeightedRanker(w["dense"], w["sparse"], norm_score=False)
            res = self.client.hybrid_search(self.collection, [self._request(r, query[r], depth, expr) for r in lexical],
                                            ranker, limit=min(2 * depth, _QUERY_WINDOW), output_fields=_OUT)
            exact = self.score([h["id"] for h in res[0]], query, ["dense", "sparse"])
            partial = {d: w["dense"] * s["dense"] + w["sparse"] * s["sparse"] for d, s in exact.items()}
            keep = max(k, depth // 2)
        top = sorted(partial, key=lambda d: (-partial[d], d))[:keep]
        maxsims = self._colbert_scores(top, query.colbert)
        fused = [(d, partial[d] + w["colbert"] * maxsims[d]) for d in top if d in maxsims]
        fused.sort(key=lambda t: (-t[1], t[0]))
        return fused[:k]

    def _request(self, route: str, value: Any, depth: int, expr: str) -> Any:
        return AnnSearchRequest(self._route_data(route, value), self._FIELD[route], {"metric_type": "IP"},
                                limit=min(depth, _QUERY_WINDOW), expr=expr)

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if not self._owns_client:
            return
        self.client.close()
        if self.lite:  # the last adapter of a Lite file releases it (see _LITE_OPEN)
            _lite_release(os.path.abspath(self.client_uri))

"""Qdrant Edge adapter: Qdrant's Rust engine in-process (``qdrant-edge-py``), no server.

``qdrant:///abs/dir`` opens one Edge shard per collection::

    /abs/dir/<collection>/shard/           the Edge shard (segments, edge_config.json)
    /abs/dir/<collection>/m3connect.json   the CollectionSpec, written atomically

Named vectors as in the qdrant-client adapter: ``dense`` (DOT), ``sparse`` (no IDF
modifier), ``colbert`` (multivector, MAX_SIM, no HNSW graph: ``m=0``; float16 storage
when the spec asks for it). String ids map to the same UUIDv5 point ids as
:mod:`m3connect.adapters.qdrant`; the original id lives in the payload.

The shard runs without a write-ahead log and is flushed after every write batch: each
batch is durable when ``upsert`` returns, and writes skip the WAL copy of every vector.
Route scores, :meth:`QdrantEdgeAdapter.score` (a query restricted to the ids) and the
fusion of :meth:`QdrantEdgeAdapter.engine_search` all run in the engine.

``qdrant-edge-py`` is a beta: the ``qdrant`` extra pins its version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..colbert_storage import require_dtype
from ..errors import (
    BackendError,
    BackendUnavailableError,
    InvalidInputError,
    M3Error,
    MissingDependencyError,
    SchemaMismatchError,
)
from ..filters import And, Cmp, Eq, FilterNode, In, Or, float_comparable
from ..fusion import candidate_routes
from ..scoring import Weights
from ..types import ROUTES, Route, Vectors
from .base import Candidate, CollectionSpec, FusionMethod, Record, RouteScores
from .qdrant_common import QdrantFamily, point_id, record_of

try:
    import qdrant_edge as qe
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError.for_extra("qdrant-edge-py", "qdrant") from exc

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["QdrantEdgeAdapter", "compile_filter", "point_id", "SPEC_FILE", "SHARD_DIR"]

# Same namespace as m3connect.adapters.qdrant, so a document has one point id in both.
SPEC_FILE = "m3connect.json"
SHARD_DIR = "shard"
LOCK_FILE = ".lock"
CREATING_FILE = ".m3connect-creating"  # present from the start of create() until its spec is written
RRF_K = 60



# -- filters ---------------------------------------------------------------------------------


def compile_filter(node: FilterNode | None) -> Any:
    """Filter tree → Edge ``Filter`` over ``metadata.<field>`` payload keys.

    Numbers compare through a range, as :func:`~m3connect.filters.matches` does
    (``2`` matches a stored ``2.0`` and the reverse; a range never matches a bool).
    Edge's ``MatchValue`` reads a Python ``bool`` as the integer 0/1 (``bool`` is an
    ``int``), which would match integer payloads; ``numpy.bool_`` is read as a bool.
    """
    if node is None:
        return None
    cond = _condition(node)
    return cond if isinstance(cond, qe.Filter) else qe.Filter(must=[cond])


def _match_value(value: Any) -> Any:
    # qdrant_edge's stub says str | int | bool, but the binding takes numpy.bool_ (and reads it as a bool)
    return qe.MatchValue(np.bool_(value) if isinstance(value, bool) else value)  # type: ignore[arg-type]


def _condition(node: FilterNode) -> Any:
    if isinstance(node, Eq):
        key = f"metadata.{node.field}"
        if float_comparable(node.value):
            return qe.FieldCondition(key, range=qe.RangeFloat(gte=float(node.value), lte=float(node.value)))
        return qe.FieldCondition(key, match=_match_value(node.value))
    if isinstance(node, In):
        values = list(node.values)
        if all(isinstance(v, str) for v in values):
            return qe.FieldCondition(f"metadata.{node.field}", match=qe.MatchAny(cast("list[str]", values)))
        return qe.Filter(should=[_condition(Eq(node.field, v)) for v in values])
    if isinstance(node, Cmp):
        bound = {node.op[1:]: float(node.value)}
        return qe.FieldCondition(f"metadata.{node.field}", range=qe.RangeFloat(**bound))
    if isinstance(node, And):
        return qe.Filter(must=[_condition(n) for n in node.items])
    assert isinstance(node, Or)
    return qe.Filter(should=[_condition(n) for n in node.items])


# -- open shards -----------------------------------------------------------------------------
#
# Edge does not lock its directory, and two EdgeShard objects on one directory would
# overwrite each other's segments. Within a process, every adapter of a collection shares
# one open shard (reference counted); across processes, an advisory lock on
# ``<collection>/.lock`` refuses a second opener, as qdrant-client's local mode does.


class _Open:
    def __init__(self, shard: Any, lock: Any) -> None:
        self.shard = shard
        self.lock = lock
        self.refs = 1


_OPEN: dict[str, _Open] = {}
_OPEN_GUARD = threading.Lock()


def _lock(directory: Path) -> Any:
    handle = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 - held while the shard is open
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise BackendUnavailableError(
                f"Qdrant Edge collection {directory} is open in another process; "
                "an embedded shard has one process at a time (use a Qdrant server to share it)"
            ) from exc
    return handle


def _acquire(directory: Path, make: Any) -> Any:
    key = str(directory)
    with _OPEN_GUARD:
        entry = _OPEN.get(key)
        if entry is not None:
            entry.refs += 1
            return entry.shard
        lock = _lock(directory)
        try:
            shard = make()
        except BaseException:
            lock.close()
            raise
        _OPEN[key] = _Open(shard, lock)
        return shard


def _release(directory: Path, *, force: bool = False) -> None:
    """Drop one reference; the last one (or ``force``) flushes and closes the shard."""
    key = str(directory)
    with _OPEN_GUARD:
        entry = _OPEN.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs > 0 and not force:
            return
        del _OPEN[key]
    try:
        entry.shard.flush()
    finally:
        try:
            entry.shard.close()
        finally:
            entry.lock.close()  # releases the flock


# -- adapter ---------------------------------------------------------------------------------


def _edge_config(spec: CollectionSpec, wal: bool = True) -> Any:
    storage = qe.VectorStorageDatatype
    colbert_type = storage.Float16 if spec.colbert_dtype == "float16" else storage.Float32
    return qe.EdgeConfig(
        vectors={
            "dense": qe.EdgeVectorParams(size=spec.dense_dim, distance=qe.Distance.Dot),
            "colbert": qe.EdgeVectorParams(
                size=spec.colbert_dim,
                distance=qe.Distance.Dot,
                datatype=colbert_type,
                multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim),
                # no graph: ColBERT re-ranks candidates with exact MaxSim
                hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10000),
            ),
        },
        sparse_vectors={"sparse": qe.EdgeSparseVectorParams()},  # no IDF modifier
        # The write-ahead log makes a write atomic across a crash: without it a process killed
        # while Edge flushes can leave a batch torn (old payload, new dense, either ColBERT).
        # It costs write rate (BGE-M3 sizes, fp16: ~260 docs/s with it, ~800 without).
        wal_enabled=wal,
    )



def _usable(route: str, query: Vectors) -> bool:
    value = query[route]
    return value is not None and len(value) > 0


class QdrantEdgeAdapter(QdrantFamily):
    """One Qdrant Edge shard per collection under the URI's directory."""

    engine = "qdrant"
    max_batch_bytes = 32 * 1024 * 1024  # no RPC limit; bounds the Python-side copies
    supports_engine_fusion = True

    @classmethod
    def check_spec(cls, location: Any, spec: CollectionSpec) -> None:
        """Multivectors are float32 or float16 here (token pooling works with both)."""
        require_dtype("Qdrant Edge", spec, ("float32", "float16"))

    def __init__(self, location: Any, collection: str, *, wal: bool = True, **options: Any) -> None:
        """``wal=False`` trades crash atomicity for ~3x write rate (bulk loads you can redo)."""
        super().__init__(collection)
        self.wal = bool(wal)
        if options:
            raise InvalidInputError(
                f"Qdrant Edge (qdrant:///dir) takes only the option wal=, got {sorted(options)}; "
                "options such as api_key or timeout are for a Qdrant server (qdrant://host:6333)"
            )
        path = location.path
        if not path or path == ":memory:" or not os.path.isabs(path):
            raise InvalidInputError(f"Qdrant Edge needs an absolute directory, got {path!r}")
        self.root = Path(os.path.normpath(path))
        if self.root.exists() and not self.root.is_dir():
            raise BackendUnavailableError(f"cannot open Qdrant Edge at {self.root}: not a directory")
        self.dir = self.root / collection
        self.shard_path = self.dir / SHARD_DIR
        self.spec_path = self.dir / SPEC_FILE
        self._shard: Any = None

    def translate_error(self, exc: Exception, operation: str) -> M3Error:
        if not self.spec_path.exists():  # dropped, here or by another store on the same directory
            return self.not_found()
        return super().translate_error(exc, operation)

    # -- schema -----------------------------------------------------------------------------

    def read_spec(self) -> CollectionSpec | None:
        if (self.dir / CREATING_FILE).exists():
            self._remove_crashed_creation()
            return None
        if self.spec_path.exists():
            try:
                return CollectionSpec.from_json(self.spec_path.read_text("utf-8"))
            except (ValueError, KeyError, TypeError) as exc:
                raise SchemaMismatchError(f"{self.spec_path} is not a readable m3connect spec: {exc}") from exc
        if self.dir.exists() and any(p.name != LOCK_FILE for p in self.dir.iterdir()):
            raise SchemaMismatchError(
                f"Qdrant Edge collection directory {self.dir} exists but was not created by m3connect"
            )
        return None

    def _remove_crashed_creation(self) -> None:
        """A creation that died before its spec was written: remove what it left (under the lock)."""
        lock = _lock(self.dir)  # refuses while another process is creating it right now
        try:
            for child in self.dir.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        finally:
            lock.close()

    def create(self, spec: CollectionSpec) -> None:
        self.check_spec(None, spec)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create Qdrant Edge collection directory {self.dir}: {exc}") from exc

        def make() -> Any:
            # Ordered so that a crash at any point is repaired by the next read_spec: the marker
            # first, then the shard, then the spec file, and the marker goes last.
            (self.dir / CREATING_FILE).touch()
            try:
                return qe.EdgeShard.create(str(self.shard_path), _edge_config(spec, self.wal))
            except Exception as exc:
                raise BackendError(f"cannot create Qdrant Edge shard at {self.shard_path}: {exc}") from exc

        self._shard = _acquire(self.dir, make)
        self._write_spec(spec)  # after the shard: a spec file always has its shard
        (self.dir / CREATING_FILE).unlink(missing_ok=True)
        self.spec = spec

    def _write_spec(self, spec: CollectionSpec) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".m3connect-", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(spec.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.spec_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def open(self, spec: CollectionSpec) -> None:
        if self._shard is None:

            def make() -> Any:
                try:
                    # the config makes Edge check the stored vectors against the spec
                    return qe.EdgeShard.load(str(self.shard_path), _edge_config(spec, self.wal))
                except Exception as exc:
                    if "incompatible" in str(exc).lower():
                        raise SchemaMismatchError(
                            f"Qdrant Edge shard {self.shard_path} does not match its spec {self.spec_path}: {exc}"
                        ) from exc
                    raise BackendUnavailableError(f"cannot open Qdrant Edge shard at {self.shard_path}: {exc}") from exc

            self._shard = _acquire(self.dir, make)
        self.spec = spec

    def drop(self) -> None:
        """Remove the collection's directory; every store of it in this process is closed."""
        self._shard = None
        if str(self.dir) in _OPEN:
            _release(self.dir, force=True)
        if self.dir.exists():
            lock = _lock(self.dir)  # refuses while another process has it open
            try:
                shutil.rmtree(self.dir, ignore_errors=True)
            finally:
                lock.close()

    @property
    def shard(self) -> Any:
        if self._shard is None:
            raise BackendError(f"Qdrant Edge collection {self.collection!r} is not open")
        return self._shard

    # -- data -------------------------------------------------------------------------------

    def upsert(self, records: Sequence[Record]) -> None:
        points = []
        for r in records:
            assert r.dense is not None and r.sparse is not None and r.colbert is not None
            # Python lists convert faster than numpy arrays, which Edge reads element by element.
            vector = {
                "dense": np.asarray(r.dense, np.float32).tolist(),
                "sparse": qe.SparseVector(list(r.sparse), list(r.sparse.values())),
            }
            if len(r.colbert):  # Qdrant refuses an empty multivector: the point goes without one
                vector["colbert"] = np.asarray(r.colbert, np.float32).tolist()
            payload = {"doc_id": r.id, "text": r.text, "metadata": r.metadata}
            points.append(qe.Point(point_id(r.id), vector, payload))
        self.shard.update(qe.UpdateOperation.upsert_points(points))  # errors: translate_error
        if not self.wal:
            self.shard.flush()  # without the log, a flushed batch is the unit that survives a crash

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self.shard.update(qe.UpdateOperation.delete_points([point_id(i) for i in dict.fromkeys(ids)]))

    def count(self) -> int:
        return int(self.shard.count(qe.CountRequest(exact=True)))

    def _present(self, ids: Sequence[str]) -> dict[str, str]:
        """``{point id: doc id}`` of the stored ``ids``."""
        by_pid = {point_id(i): i for i in ids}
        if not by_pid:
            return {}
        found = self.shard.retrieve(list(by_pid), with_payload=False, with_vector=False)
        return {str(p.id): by_pid[str(p.id)] for p in found}

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return set(self._present(ids).values())

    def iter_ids(self, flt: FilterNode | None, batch_size: int = 1000) -> Iterator[list[str]]:
        """``EdgeShard.scroll`` (a ``ScrollRequest`` with the compiled filter), paged by the
        next offset it returns (a point-id cursor), reading only the ``doc_id`` payload key."""
        qfilter, offset = compile_filter(flt), None
        while True:
            points, offset = self.shard.scroll(qe.ScrollRequest(
                offset=offset, limit=batch_size, filter=qfilter, with_payload=["doc_id"], with_vector=False,
            ))
            ids = [(p.payload or {})["doc_id"] for p in points]
            if ids:
                yield ids
            if offset is None:
                return

    def fetch(self, ids: Sequence[str], *, fields: Collection[str] = ROUTES) -> dict[str, Record]:
        names = [r for r in ROUTES if r in fields]
        pids = list(dict.fromkeys(point_id(i) for i in ids))
        if not pids:
            return {}
        points = self.shard.retrieve(pids, with_payload=True, with_vector=names or False)
        out: dict[str, Record] = {}
        for p in points:
            rec = record_of(p.payload or {})
            vec = p.vector or {}
            if "dense" in names:
                rec.dense = np.asarray(vec["dense"], np.float32)
            if "sparse" in names:
                sparse = vec["sparse"]
                rec.sparse = dict(zip(sparse.indices, sparse.values))
            if "colbert" in names:
                rec.colbert = self._stored_colbert_of(vec)
            out[rec.id] = rec
        return out

    def flush(self) -> None:
        if self._shard is not None:
            self._shard.flush()

    def close(self) -> None:
        """Flush and release the shard (closed when the last store of this collection closes)."""
        if self._shard is not None:
            self._shard = None
            _release(self.dir)

    # -- search -----------------------------------------------------------------------------

    @staticmethod
    def _vector(route: str, query: Any) -> Any:
        if route == "sparse":
            return qe.SparseVector([int(t) for t in query], [float(w) for w in query.values()])
        return np.asarray(query, np.float32).tolist()

    def _nearest(self, route: str, query: Any) -> Any:
        return qe.Query.Nearest(self._vector(route, query), using=route)

    @staticmethod
    def _scale(route: str, query: Any) -> float:
        """Factor from the engine's score to the exact one (MaxSim is a sum over query vectors)."""
        return 1.0 / max(1, len(query)) if route == "colbert" else 1.0

    def _run(self, request: Any) -> list[Any]:
        return list(self.shard.query(request))

    def _route_points(
        self, route: Route, query: Any, k: int, flt: FilterNode | None, payload: Any
    ) -> list[tuple[dict[str, Any], float]]:
        """(payload, exact route score) of the route's top k, filtered in the engine."""
        if query is None or len(query) == 0:
            return []
        scale = self._scale(route, query)
        request = qe.QueryRequest(limit=k, query=self._nearest(route, query), filter=compile_filter(flt),
                                  with_payload=payload)
        return [(p.payload or {}, float(p.score) * scale) for p in self._run(request)]

    def score(self, ids: Sequence[str], query: Vectors, routes: Sequence[Route]) -> RouteScores:
        """Per-route scores of ``ids`` from queries restricted to them (``HasIdCondition``).

        A document that shares no token with the sparse query is not returned by the
        sparse query: it scores 0.0. Ids that are not stored are left out.
        """
        by_pid = {point_id(i): i for i in ids}
        if not by_pid or not routes:
            return {}
        only = qe.Filter(must=[qe.HasIdCondition(set(by_pid))])
        exact = qe.SearchParams(exact=True)
        asked = [r for r in routes if query[r] is not None and len(query[r]) > 0]  # empty: 0 against anything
        requests = [
            qe.QueryRequest(limit=len(by_pid), query=self._nearest(r, query[r]), filter=only, params=exact)
            for r in asked
        ]
        # one planned batch: the routes share a pass over the segments
        results = self.shard.query_batch(qe.QueryBatchRequest(requests)) if requests else []
        out: RouteScores = {}
        present: set[str] | None = None
        for route, points in zip(asked, results):
            scale = self._scale(route, query[route])
            got = {by_pid[str(p.id)]: float(p.score) * scale for p in points}
            for rid, s in got.items():
                out.setdefault(rid, {})[route] = s
            if route != "sparse":  # dense and ColBERT return every stored id
                present = set(got) if present is None else present | set(got)
        if present is None:
            present = set(self._present(list(by_pid.values())).values())
        return {rid: {r: out.get(rid, {}).get(r, 0.0) for r in routes} for rid in present}

    def engine_search(
        self,
        query: Vectors,
        weights: Weights,
        k: int,
        flt: FilterNode | None,
        depth: int,
        method: FusionMethod,
    ) -> list[Candidate]:
        """Fusion in the engine over the candidates of :func:`~m3connect.fusion.candidate_routes`.

        Candidates come from prefetches (dense and sparse at ``depth``; ColBERT only
        when the dense weight is 0). One prefetch per active route re-scores their
        union with that route's query, so every candidate carries all of its route
        scores (a sparse miss is a true 0). ``"weighted"`` combines them with a
        ``Formula``: ``sum(w_r * s_r) / sum(w)``, ColBERT divided by ``n_q``: the exact
        M3 score over the same candidates as exact fusion. ``"rrf"`` fuses the
        re-scored routes by reciprocal rank (k=60). The filter runs in every prefetch.
        """
        q = Vectors.of(query)
        active = [r for r in weights.active_routes if _usable(r, q)]
        cand = [r for r in candidate_routes(weights) if r in active]
        if not active or not cand:
            return []
        qfilter = compile_filter(flt)
        total = float(sum(weights))
        if method != "rrf" and len(active) == 1 and cand == active:
            (route,) = active
            factor = getattr(weights, route) / total * self._scale(route, q[route])
            points = self._run(
                qe.QueryRequest(limit=k, query=self._nearest(route, q[route]), filter=qfilter, with_payload=["doc_id"])
            )
            return [(p.payload["doc_id"], float(p.score) * factor) for p in points]
        sources = [qe.Prefetch(limit=depth, query=self._nearest(r, q[r]), filter=qfilter) for r in cand]
        rescored = [
            qe.Prefetch(limit=depth * len(cand), query=self._nearest(r, q[r]), prefetches=sources, filter=qfilter)
            for r in active
        ]
        if method == "rrf":
            fused: Any = qe.Fusion.Rrf(k=RRF_K)
        else:
            E = qe.Expression
            terms = [
                E.Mult([E.Constant(getattr(weights, r) / total * self._scale(r, q[r])), E.Variable(f"$score[{i}]")])
                for i, r in enumerate(active)
            ]
            fused = qe.Formula(E.Sum(terms), defaults={f"$score[{i}]": 0.0 for i in range(len(active))})
        points = self._run(
            qe.QueryRequest(limit=k, prefetches=rescored, query=fused, filter=qfilter, with_payload=["doc_id"])
        )
        return [(p.payload["doc_id"], float(p.score)) for p in points]

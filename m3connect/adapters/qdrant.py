"""Qdrant adapter (qdrant-client): named dense vector (DOT), sparse vector, MAX_SIM multivector.

Embedded: ``qdrant://:memory:``, ``qdrant+local:///abs/dir`` (qdrant-client's local mode;
a plain ``qdrant:///abs/dir`` is Qdrant Edge, :mod:`m3connect.adapters.qdrant_edge`,
unless the directory already holds a local-mode ``meta.json``).
Server: ``qdrant://host:6333`` (``qdrant+https://`` for TLS, ``api_key=`` option).
String ids map to UUIDv5 point ids; the original id lives in the payload.

Route scores, :meth:`QdrantAdapter.score` (a ``query_points`` restricted to the ids by a
``HasIdCondition``) and :meth:`QdrantAdapter.engine_search` (prefetches, a re-scoring
prefetch per route, then ``FormulaQuery`` or RRF) all run in the engine.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any, cast

import numpy as np

from ..colbert_storage import require_dtype
from ..errors import BackendError, BackendUnavailableError, M3Error, MissingDependencyError, SchemaMismatchError
from ..filters import And, Cmp, Eq, FilterNode, In, Or, float_comparable
from ..fusion import candidate_routes
from ..scoring import Weights
from ..types import ROUTES, Route, Vectors
from .base import (
    Candidate,
    CollectionSpec,
    FusionMethod,
    Record,
    RouteScores,
    one_line,
)
from .qdrant_common import QdrantFamily, point_id, record_of

try:
    from qdrant_client import QdrantClient, models
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError.for_extra("qdrant-client", "qdrant") from exc

__all__ = ["QdrantAdapter", "compile_filter", "point_id"]

_META_KEY = "m3connect"
RRF_K = 60



def compile_filter(node: FilterNode | None) -> models.Filter | None:
    """Filter tree → Qdrant ``Filter`` over ``metadata.<field>`` payload keys.

    Numbers compare through a range, as :func:`~m3connect.filters.matches` does
    (``2`` matches a stored ``2.0`` and the reverse; a range never matches a bool);
    ``$in`` lists that are not all strings become a ``should`` of equalities.
    """
    if node is None:
        return None
    cond = _condition(node)
    return cond if isinstance(cond, models.Filter) else models.Filter(must=[cond])


def _condition(node: FilterNode) -> Any:
    if isinstance(node, Eq):
        key = f"metadata.{node.field}"
        if float_comparable(node.value):
            return models.FieldCondition(key=key, range=models.Range(gte=node.value, lte=node.value))
        # every float is float_comparable: what is left is a str, a bool or an int beyond 2**53
        exact = cast("str | int | bool", node.value)
        return models.FieldCondition(key=key, match=models.MatchValue(value=exact))
    if isinstance(node, In):
        values = list(node.values)
        if all(isinstance(v, str) for v in values):
            strings = cast("list[str]", values)
            return models.FieldCondition(key=f"metadata.{node.field}", match=models.MatchAny(any=strings))
        return models.Filter(should=[_condition(Eq(node.field, v)) for v in values])
    if isinstance(node, Cmp):
        bound = {node.op[1:]: node.value}
        return models.FieldCondition(key=f"metadata.{node.field}", range=models.Range(**bound))
    if isinstance(node, And):
        return models.Filter(must=[_condition(n) for n in node.items])
    assert isinstance(node, Or)
    return models.Filter(should=[_condition(n) for n in node.items])



def _usable(route: str, query: Vectors) -> bool:
    value = query[route]
    return value is not None and len(value) > 0


class QdrantAdapter(QdrantFamily):
    engine = "qdrant"
    max_batch_bytes = 24 * 1024 * 1024  # a server's default request limit is 32 MB
    supports_engine_fusion = True

    @classmethod
    def check_spec(cls, location: Any, spec: CollectionSpec) -> None:
        """Multivectors are float32 or float16 here (token pooling works with both)."""
        require_dtype("Qdrant", spec, ("float32", "float16"))

    def __init__(self, location: Any, collection: str, *, api_key: str | None = None,
                 timeout: float = 30.0, client: Any = None, max_retries: int = 3,
                 **client_options: Any) -> None:
        super().__init__(collection)
        self._local = bool(location.embedded)  # local mode always searches exactly
        self._owns_client = client is None
        self.max_retries = max(0, int(max_retries))
        try:
            if client is not None:  # the user's QdrantClient: used as it is, never closed here
                self.client = client
            elif location.embedded:
                in_memory = location.path == ":memory:"
                self.client = QdrantClient(location=":memory:") if in_memory else QdrantClient(path=location.path)
            else:
                self.client = QdrantClient(
                    url=location.url(6333), api_key=api_key, timeout=int(timeout), **client_options
                )
                self.client.get_collections()
        except Exception as exc:
            where = location.path or location.url(6333)
            raise BackendUnavailableError(f"cannot reach Qdrant at {where}: {exc}") from exc

    def translate_error(self, exc: Exception, operation: str) -> M3Error:
        if isinstance(exc, UnexpectedResponse) and exc.status_code == 404:
            return self.not_found()
        if isinstance(exc, ResponseHandlingException):
            return BackendUnavailableError(f"Qdrant is unreachable during {operation}: {one_line(exc)}")
        if isinstance(exc, RuntimeError) and "closed" in str(exc):
            return BackendError(f"the Qdrant store of {self.collection!r} is closed; connect() again")
        return super().translate_error(exc, operation)

    # -- schema -----------------------------------------------------------------------------

    def read_spec(self) -> CollectionSpec | None:
        if not self.client.collection_exists(self.collection):
            return None
        info = self.client.get_collection(self.collection)
        meta = (info.config.metadata or {}).get(_META_KEY)
        if not meta:
            raise SchemaMismatchError(
                f"Qdrant collection {self.collection!r} exists but was not created by m3connect"
            )
        return CollectionSpec.from_json(meta)

    def create(self, spec: CollectionSpec) -> None:
        self.check_spec(None, spec)
        colbert_type = models.Datatype.FLOAT16 if spec.colbert_dtype == "float16" else models.Datatype.FLOAT32
        self.client.create_collection(
            self.collection,
            vectors_config={
                "dense": models.VectorParams(size=spec.dense_dim, distance=models.Distance.DOT),
                "colbert": models.VectorParams(
                    size=spec.colbert_dim,
                    distance=models.Distance.DOT,
                    datatype=colbert_type,
                    multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
                    hnsw_config=models.HnswConfigDiff(m=0),  # no graph: exact MaxSim over candidates
                ),
            },
            sparse_vectors_config={"sparse": models.SparseVectorParams()},  # no IDF modifier
            metadata={_META_KEY: spec.to_json()},
        )
        self.spec = spec

    def drop(self) -> None:
        self.client.delete_collection(self.collection)

    # -- data -------------------------------------------------------------------------------

    def _stored_colbert(self, colbert: np.ndarray) -> np.ndarray:
        """float16 collections round ColBERT to float16 here: qdrant-client's local mode ignores the
        datatype and would keep float32, so scores would differ from a Qdrant server's."""
        if self._local and self.spec is not None and self.spec.colbert_dtype == "float16":
            return np.asarray(colbert, np.float16).astype(np.float32)
        return np.asarray(colbert, np.float32)

    def upsert(self, records: Sequence[Record]) -> None:
        points = []
        for r in records:
            assert r.dense is not None and r.sparse is not None and r.colbert is not None
            vector: dict[str, Any] = {
                "dense": r.dense.tolist(),
                "sparse": models.SparseVector(indices=list(r.sparse), values=list(r.sparse.values())),
            }
            if len(r.colbert):  # Qdrant refuses an empty multivector: the point goes without one
                vector["colbert"] = self._stored_colbert(r.colbert).tolist()
            points.append(models.PointStruct(id=point_id(r.id), vector=vector,
                                             payload={"doc_id": r.id, "text": r.text, "metadata": r.metadata}))
        if self._local:
            self.client.upsert(self.collection, points=points, wait=True)  # errors: translate_error
        else:  # a server: the client's own uploader retries transient failures with backoff
            self.client.upload_points(self.collection, points, batch_size=len(points) or 1,
                                      max_retries=self.max_retries, wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        self.client.delete(
            self.collection, points_selector=models.PointIdsList(points=[point_id(i) for i in ids]), wait=True
        )

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        points = self.client.retrieve(
            self.collection, ids=[point_id(i) for i in ids], with_payload=["doc_id"], with_vectors=False
        )
        return {p.payload["doc_id"] for p in points if p.payload}

    def iter_ids(self, flt: FilterNode | None, batch_size: int = 1000) -> Iterator[list[str]]:
        """``scroll`` with the compiled filter, paged by ``next_page_offset`` (a point-id cursor),
        reading only the ``doc_id`` payload key."""
        qfilter, offset = compile_filter(flt), None
        while True:
            points, offset = self.client.scroll(
                self.collection, scroll_filter=qfilter, limit=batch_size, offset=offset,
                with_payload=["doc_id"], with_vectors=False,
            )
            ids = [(p.payload or {})["doc_id"] for p in points]
            if ids:
                yield ids
            if offset is None:
                return

    def fetch(self, ids: Sequence[str], *, fields: Collection[str] = ROUTES) -> dict[str, Record]:
        names: list[str] = [r for r in ROUTES if r in fields]
        out: dict[str, Record] = {}
        for chunk in self.batched(dict.fromkeys(ids), 256):
            points = self.client.retrieve(
                self.collection, ids=[point_id(i) for i in chunk], with_payload=True, with_vectors=names or False
            )
            for p in points:
                rec = record_of(p.payload or {})
                vec = p.vector if isinstance(p.vector, dict) else {}
                if "dense" in names:
                    rec.dense = np.asarray(vec["dense"], np.float32)
                if "sparse" in names:
                    sparse = cast(models.SparseVector, vec["sparse"])
                    rec.sparse = dict(zip(sparse.indices, sparse.values))
                if "colbert" in names:
                    rec.colbert = self._stored_colbert_of(vec)
                out[rec.id] = rec
        return out

    # -- search -----------------------------------------------------------------------------

    @staticmethod
    def _query(route: str, query: Any) -> Any:
        if route == "sparse":
            return models.SparseVector(indices=[int(t) for t in query], values=[float(w) for w in query.values()])
        return np.asarray(query, np.float32).tolist()

    @staticmethod
    def _scale(route: str, query: Any) -> float:
        """Factor from the engine's score to the exact one (MaxSim is a sum over query vectors)."""
        return 1.0 / max(1, len(query)) if route == "colbert" else 1.0

    def _query_points(self, **kwargs: Any) -> list[Any]:
        return list(self.client.query_points(self.collection, **kwargs).points)

    def _route_points(
        self, route: Route, query: Any, k: int, flt: FilterNode | None, payload: Any
    ) -> list[tuple[dict[str, Any], float]]:
        """(payload, exact route score) of the route's top k, filtered in the engine."""
        if query is None or len(query) == 0:
            return []
        scale = self._scale(route, query)
        points = self._query_points(
            query=self._query(route, query), using=route, limit=k, query_filter=compile_filter(flt),
            with_payload=payload,
        )
        return [(p.payload or {}, float(p.score) * scale) for p in points]

    def score(self, ids: Sequence[str], query: Vectors, routes: Sequence[Route]) -> RouteScores:
        """Per-route scores of ``ids`` from ``query_points`` restricted to them (``HasIdCondition``).

        A document that shares no token with the sparse query is not returned by the
        sparse query: it scores 0.0. Ids that are not stored are left out.
        """
        by_pid = {point_id(i): i for i in ids}
        if not by_pid or not routes:
            return {}
        only = models.Filter(must=[models.HasIdCondition(has_id=list(by_pid))])
        out: RouteScores = {}
        present: set[str] | None = None
        for route in routes:
            q = query[route]
            if q is None or len(q) == 0:
                continue  # an empty query side scores 0 against anything
            scale = self._scale(route, q)
            points = self._query_points(
                query=self._query(route, q), using=route, limit=len(by_pid), query_filter=only,
                with_payload=False, search_params=None if self._local else models.SearchParams(exact=True),
            )
            got = {by_pid[str(p.id)]: float(p.score) * scale for p in points}
            for rid, s in got.items():
                out.setdefault(rid, {})[route] = s
            if route != "sparse":  # dense and ColBERT return every stored id
                present = set(got) if present is None else present | set(got)
        if present is None:
            present = self.existing_ids(list(by_pid.values()))
        return {rid: {r: out.get(rid, {}).get(r, 0.0) for r in routes} for rid in present}

    def engine_search(self, query: Vectors, weights: Weights, k: int, flt: FilterNode | None,
                      depth: int, method: FusionMethod) -> list[Candidate]:
        """Fusion in the engine over the candidates of :func:`~m3connect.fusion.candidate_routes`.

        Candidates come from prefetches (dense and sparse at ``depth``; ColBERT only
        when the dense weight is 0). One nested prefetch per active route re-scores
        their union with that route's query, so every candidate carries all of its
        route scores (a sparse miss is a true 0). ``"weighted"`` combines them with a
        ``FormulaQuery``: ``sum(w_r * s_r) / sum(w)``, ColBERT divided by ``n_q``: the
        exact M3 score over the same candidates as exact fusion. ``"rrf"`` fuses the
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
            points = self._query_points(
                query=self._query(route, q[route]), using=route, limit=k, query_filter=qfilter,
                with_payload=["doc_id"],
            )
            return [((p.payload or {})["doc_id"], float(p.score) * factor) for p in points]
        sources = [
            models.Prefetch(query=self._query(r, q[r]), using=r, limit=depth, filter=qfilter) for r in cand
        ]
        rescored = [
            models.Prefetch(prefetch=sources, query=self._query(r, q[r]), using=r, limit=depth * len(cand),
                            filter=qfilter)
            for r in active
        ]
        if method == "rrf":
            fused: Any = models.RrfQuery(rrf=models.Rrf(k=RRF_K))
        else:
            terms: list[Any] = [
                models.MultExpression(mult=[getattr(weights, r) / total * self._scale(r, q[r]), f"$score[{i}]"])
                for i, r in enumerate(active)
            ]
            fused = models.FormulaQuery(
                formula=models.SumExpression(sum=terms), defaults={f"$score[{i}]": 0.0 for i in range(len(active))}
            )
        points = self._query_points(
            prefetch=rescored, query=fused, limit=k, query_filter=qfilter, with_payload=["doc_id"]
        )
        return [((p.payload or {})["doc_id"], float(p.score)) for p in points]

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

"""Qdrant adapter: named dense vector (DOT), sparse vector, and a MAX_SIM multivector.

Embedded: ``qdrant://:memory:`` or ``qdrant:///abs/dir`` (qdrant-client local mode).
Server: ``qdrant://host:6333`` (``qdrant+https://`` for TLS, ``api_key=`` option).
String ids map to UUIDv5 point ids; the original id lives in the payload.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import BackendError, BackendUnavailableError, MissingDependencyError, SchemaMismatchError
from ..filters import And, Cmp, Eq, FilterNode, In, Or
from ..scoring import Weights
from .base import Adapter, Candidate, CollectionSpec, FusionMethod, Record

try:
    from qdrant_client import QdrantClient, models
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError.for_extra("qdrant-client", "qdrant") from exc

__all__ = ["QdrantAdapter", "point_id"]

_NAMESPACE = uuid.UUID("6f1c3a52-6b1e-4f0e-9a39-3a0c5e1f7d21")
_META_KEY = "m3connect"


def point_id(doc_id: str) -> str:
    """Stable UUID for a string id."""
    return str(uuid.uuid5(_NAMESPACE, doc_id))


def compile_filter(node: FilterNode | None) -> models.Filter | None:
    """Filter tree → Qdrant ``Filter`` over ``metadata.<field>`` payload keys."""
    if node is None:
        return None
    cond = _condition(node)
    return cond if isinstance(cond, models.Filter) else models.Filter(must=[cond])


def _condition(node: FilterNode) -> Any:
    if isinstance(node, Eq):
        key = f"metadata.{node.field}"
        if isinstance(node.value, float) and not node.value.is_integer():
            return models.FieldCondition(key=key, range=models.Range(gte=node.value, lte=node.value))
        return models.FieldCondition(key=key, match=models.MatchValue(value=node.value))
    if isinstance(node, In):
        if any(isinstance(v, float) for v in node.values):
            return models.Filter(should=[_condition(Eq(node.field, v)) for v in node.values])
        return models.FieldCondition(key=f"metadata.{node.field}", match=models.MatchAny(any=list(node.values)))
    if isinstance(node, Cmp):
        bound = {node.op[1:]: node.value}
        return models.FieldCondition(key=f"metadata.{node.field}", range=models.Range(**bound))
    if isinstance(node, And):
        return models.Filter(must=[_condition(n) for n in node.items])
    assert isinstance(node, Or)
    return models.Filter(should=[_condition(n) for n in node.items])


class QdrantAdapter(Adapter):
    engine = "qdrant"
    max_batch_bytes = 24 * 1024 * 1024  # a server's default request limit is 32 MB
    supports_engine_fusion = True

    def __init__(self, location: Any, collection: str, *, api_key: str | None = None,
                 timeout: float = 30.0, **client_options: Any) -> None:
        super().__init__(collection)
        try:
            if location.embedded:
                self.client = QdrantClient(location=":memory:") if location.path == ":memory:" else QdrantClient(path=location.path)
            else:
                self.client = QdrantClient(url=location.url(6333), api_key=api_key, timeout=int(timeout), **client_options)
                self.client.get_collections()
        except Exception as exc:
            where = location.path or location.url(6333)
            raise BackendUnavailableError(f"cannot reach Qdrant at {where}: {exc}") from exc

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

    def upsert(self, records: Sequence[Record]) -> None:
        points = []
        for r in records:
            assert r.dense is not None and r.sparse is not None and r.colbert is not None
            points.append(
                models.PointStruct(
                    id=point_id(r.id),
                    vector={
                        "dense": r.dense.tolist(),
                        "sparse": models.SparseVector(indices=list(r.sparse), values=list(r.sparse.values())),
                        "colbert": r.colbert.tolist(),
                    },
                    payload={"doc_id": r.id, "text": r.text, "metadata": r.metadata},
                )
            )
        try:
            self.client.upsert(self.collection, points=points, wait=True)
        except Exception as exc:
            raise BackendError(f"Qdrant upsert into {self.collection!r} failed: {exc}") from exc

    def delete(self, ids: Sequence[str]) -> None:
        self.client.delete(self.collection, points_selector=models.PointIdsList(points=[point_id(i) for i in ids]), wait=True)

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        points = self.client.retrieve(self.collection, ids=[point_id(i) for i in ids], with_payload=["doc_id"], with_vectors=False)
        return {p.payload["doc_id"] for p in points if p.payload}

    def fetch(self, ids: Sequence[str], *, with_vectors: bool = True) -> dict[str, Record]:
        out: dict[str, Record] = {}
        for chunk in self.batched(ids, 256):
            points = self.client.retrieve(self.collection, ids=[point_id(i) for i in chunk], with_payload=True, with_vectors=with_vectors)
            for p in points:
                payload = p.payload or {}
                rec = Record(id=payload["doc_id"], text=payload.get("text", ""), metadata=payload.get("metadata") or {})
                if with_vectors and isinstance(p.vector, dict):
                    sparse = p.vector["sparse"]
                    rec.dense = np.asarray(p.vector["dense"], np.float32)
                    rec.sparse = dict(zip(sparse.indices, sparse.values))
                    rec.colbert = np.asarray(p.vector["colbert"], np.float32)
                out[rec.id] = rec
        return out

    # -- search -----------------------------------------------------------------------------

    @staticmethod
    def _query(route: str, query: Any) -> Any:
        if route == "sparse":
            return models.SparseVector(indices=list(query), values=list(query.values()))
        return np.asarray(query, np.float32).tolist()

    def _points(self, result: Any) -> list[Candidate]:
        return [((p.payload or {})["doc_id"], float(p.score)) for p in result.points]

    def search_route(self, route: str, query: Any, k: int, flt: FilterNode | None) -> list[Candidate]:
        if route == "sparse" and not query:
            return []
        result = self.client.query_points(
            self.collection, query=self._query(route, query), using=route, limit=k,
            query_filter=compile_filter(flt), with_payload=["doc_id"],
        )
        return self._points(result)

    def engine_search(self, query: dict[str, Any], weights: Weights, k: int, flt: FilterNode | None,
                      depth: int, method: FusionMethod) -> list[Candidate]:
        """Prefetch per route, then ``FormulaQuery`` (weighted) or RRF in the engine.

        The weighted score is ``sum(w_r * s_r) / sum(w)`` with ColBERT divided by the
        number of query vectors, and 0 for a route that did not return the point.
        """
        routes = [r for r in weights.active_routes if not (r == "sparse" and not query["sparse"])]
        qfilter = compile_filter(flt)
        prefetch = [
            models.Prefetch(query=self._query(r, query[r]), using=r, limit=depth, filter=qfilter) for r in routes
        ]
        if method == "rrf":
            fused: Any = models.FusionQuery(fusion=models.Fusion.RRF)
        else:
            total = sum(weights)
            terms: list[Any] = []
            for i, route in enumerate(routes):
                w = getattr(weights, route) / total
                if route == "colbert":
                    w /= max(1, len(query["colbert"]))
                terms.append(models.MultExpression(mult=[w, f"$score[{i}]"]))
            fused = models.FormulaQuery(
                formula=models.SumExpression(sum=terms), defaults={f"$score[{i}]": 0.0 for i in range(len(routes))}
            )
        result = self.client.query_points(
            self.collection, prefetch=prefetch, query=fused, limit=k, query_filter=qfilter, with_payload=["doc_id"]
        )
        return self._points(result)

    def close(self) -> None:
        self.client.close()

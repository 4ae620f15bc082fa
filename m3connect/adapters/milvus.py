"""Milvus adapter: ``FLOAT_VECTOR``/IP dense, ``SPARSE_FLOAT_VECTOR`` sparse, ColBERT beside.

Embedded: ``milvus:///abs/file.db`` (Milvus Lite). Server: ``milvus://host:19530``
(``token=``/``user=``/``password=`` options, ``milvus+https://`` for TLS).

Milvus Lite 3.2 cannot store arrays of vectors (Array-of-Structs + ``MAX_SIM``), so
ColBERT goes into a companion collection ``<name>__colbert`` with one row per token
vector. It serves candidate generation (top tokens per query vector, summed per
document) and holds the exact vectors for client re-ranking. A collection spec is
kept in the shared ``m3connect_meta`` collection of the same database.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import (
    BackendError,
    BackendUnavailableError,
    InvalidInputError,
    MissingDependencyError,
    SchemaMismatchError,
)
from ..filters import And, Cmp, Eq, FilterNode, In, Or
from ..scoring import Weights, colbert_score
from .base import Adapter, Candidate, CollectionSpec, FusionMethod, Record

try:
    from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker, WeightedRanker
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError.for_extra("pymilvus", "milvus") from exc

__all__ = ["MilvusAdapter", "compile_filter", "literal"]

META_COLLECTION = "m3connect_meta"
MAX_ID_LENGTH = 512
MAX_TEXT_BYTES = 65535
_QUERY_WINDOW = 16384  # Milvus caps offset+limit of one query/search at 16384
# Milvus refuses a sparse vector without a non-zero weight. An empty one (a text whose
# tokens all got weight 0) is stored as this placeholder on token 0, the CLS id, which
# the encoder always drops from real lexical weights, so it can never score.
_EMPTY_SPARSE = {0: 1e-30}
_OP = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def literal(value: Any) -> str:
    """A Milvus expression literal. Strings are JSON-quoted, so quotes and backslashes
    are escaped and a value can never end the literal and change the expression."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
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


def _id_list(ids: Sequence[str]) -> str:
    return "[" + ", ".join(literal(i) for i in ids) + "]"


class MilvusAdapter(Adapter):
    engine = "milvus"
    max_batch_bytes = 24 * 1024 * 1024  # Milvus rejects insert RPCs over 64 MB
    supports_engine_fusion = True

    def __init__(self, location: Any, collection: str, *, token: str = "", user: str = "",
                 password: str = "", timeout: float = 30.0, **client_options: Any) -> None:
        super().__init__(collection)
        self.lite = location.embedded
        self.colbert_collection = f"{collection}__colbert"
        uri = location.path if location.embedded else location.url(19530)
        try:
            self.client = MilvusClient(uri=uri, token=token, user=user, password=password, timeout=timeout, **client_options)
            self.client.list_collections()
        except Exception as exc:
            raise BackendUnavailableError(f"cannot reach Milvus at {uri}: {exc}") from exc

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
        self.client.create_collection(META_COLLECTION, schema=schema, index_params=index)

    def read_spec(self) -> CollectionSpec | None:
        if not self.client.has_collection(self.collection):
            return None
        spec: CollectionSpec | None = None
        if self.client.has_collection(META_COLLECTION):
            self.client.load_collection(META_COLLECTION)
            rows = self.client.get(META_COLLECTION, ids=[self.collection], output_fields=["spec"])
            if rows:
                spec = CollectionSpec.from_json(rows[0]["spec"])
        if spec is None or not self.client.has_collection(self.colbert_collection):
            raise SchemaMismatchError(
                f"Milvus collection {self.collection!r} exists but was not created by m3connect"
            )
        self.client.load_collection(self.collection)
        self.client.load_collection(self.colbert_collection)
        return spec

    def create(self, spec: CollectionSpec) -> None:
        ivf = "FLAT" if self.lite else "AUTOINDEX"
        main = self.client.create_schema(auto_id=False)
        main.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        main.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        main.add_field("metadata", DataType.JSON)
        main.add_field("n_tokens", DataType.INT64)
        main.add_field("dense", DataType.FLOAT_VECTOR, dim=spec.dense_dim)
        main.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        index = self.client.prepare_index_params()
        index.add_index("dense", index_type=ivf, metric_type="IP")
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")

        vec_type = DataType.FLOAT16_VECTOR if spec.colbert_dtype == "float16" else DataType.FLOAT_VECTOR
        tokens = self.client.create_schema(auto_id=False)
        tokens.add_field("key", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH + 12)
        tokens.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_LENGTH)
        tokens.add_field("pos", DataType.INT64)
        tokens.add_field("vec", vec_type, dim=spec.colbert_dim)
        token_index = self.client.prepare_index_params()
        token_index.add_index("vec", index_type=ivf, metric_type="IP")
        try:
            self.client.create_collection(self.colbert_collection, schema=tokens, index_params=token_index)
        except Exception as exc:
            raise BackendError(
                f"Milvus refused the ColBERT collection ({spec.colbert_dtype}): {exc}. "
                "Milvus Lite stores only float32 vectors: use colbert_dtype='float32' there."
            ) from exc
        self.client.create_collection(self.collection, schema=main, index_params=index)
        self._ensure_meta_collection()
        self.client.upsert(META_COLLECTION, [{"name": self.collection, "spec": spec.to_json(), "unused": [0.0, 0.0]}])
        self.spec = spec

    def drop(self) -> None:
        for name in (self.collection, self.colbert_collection):
            if self.client.has_collection(name):
                self.client.drop_collection(name)
        if self.client.has_collection(META_COLLECTION):
            self.client.delete(META_COLLECTION, ids=[self.collection])

    # -- data -------------------------------------------------------------------------------

    def _colbert_value(self, vec: np.ndarray) -> Any:
        if self.spec is not None and self.spec.colbert_dtype == "float16":
            return vec.astype(np.float16)
        return vec.astype(np.float32)

    def upsert(self, records: Sequence[Record]) -> None:
        rows, token_rows = [], []
        for r in records:
            assert r.dense is not None and r.sparse is not None and r.colbert is not None
            if len(r.id) > MAX_ID_LENGTH:
                raise InvalidInputError(f"id {r.id[:40]!r}... is longer than {MAX_ID_LENGTH} characters")
            if len(r.text.encode("utf-8")) > MAX_TEXT_BYTES:
                raise InvalidInputError(f"text of id {r.id!r} is over {MAX_TEXT_BYTES} bytes, Milvus' VARCHAR limit")
            rows.append({
                "id": r.id, "text": r.text, "metadata": r.metadata, "n_tokens": int(r.colbert.shape[0]),
                "dense": r.dense.astype(np.float32).tolist(),
                "sparse": {int(k): float(v) for k, v in r.sparse.items()} or _EMPTY_SPARSE,
            })
            for pos, vec in enumerate(r.colbert):
                token_rows.append({"key": f"{r.id}#{pos}", "doc_id": r.id, "pos": pos, "vec": self._colbert_value(vec)})
        ids = [r.id for r in records]
        # Tokens first, then the document row: a document that exists has its tokens,
        # so "skip existing ids" on a re-run never leaves a document without ColBERT.
        self._delete_tokens(ids)
        for start in range(0, len(token_rows), 4096):
            self.client.insert(self.colbert_collection, token_rows[start : start + 4096])
        self.client.upsert(self.collection, rows)

    def _delete_tokens(self, ids: Sequence[str]) -> None:
        for chunk in self.batched(ids, 512):
            self.client.delete(self.colbert_collection, filter=f"doc_id in {_id_list(chunk)}")

    def delete(self, ids: Sequence[str]) -> None:
        for chunk in self.batched(ids, 512):
            self.client.delete(self.collection, ids=chunk)
        self._delete_tokens(ids)

    def flush(self) -> None:
        # Lite answers queries ~30x faster on flushed segments (REFERENCE.md section 5).
        for name in (self.collection, self.colbert_collection):
            self.client.flush(name)

    def count(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in self.batched(ids, 1024):
            found.update(r["id"] for r in self.client.get(self.collection, ids=chunk, output_fields=["id"]))
        return found

    def fetch(self, ids: Sequence[str], *, with_vectors: bool = True) -> dict[str, Record]:
        fields = ["text", "metadata", "n_tokens"] + (["dense", "sparse"] if with_vectors else [])
        out: dict[str, Record] = {}
        for chunk in self.batched(ids, 1024):
            for row in self.client.get(self.collection, ids=chunk, output_fields=fields):
                rec = Record(id=row["id"], text=row["text"], metadata=dict(row["metadata"] or {}))
                if with_vectors:
                    rec.dense = np.asarray(row["dense"], np.float32)
                    sparse = {int(k): float(v) for k, v in dict(row["sparse"]).items()}
                    rec.sparse = {} if sparse.keys() == _EMPTY_SPARSE.keys() and sparse[0] < 1e-20 else sparse
                    rec.colbert = np.zeros((int(row["n_tokens"]), 0), np.float32)  # filled below
                out[rec.id] = rec
        if with_vectors and out:
            self._fill_colbert(out)
        return out

    def _fill_colbert(self, records: dict[str, Record]) -> None:
        """Load token vectors by primary key: ``n_tokens`` tells every key ``<id>#<pos>``.

        Primary-key lookups use Milvus' key index; a ``doc_id in [...]`` query would scan
        the whole token collection.
        """
        keys = [f"{rid}#{pos}" for rid, rec in records.items() for pos in range(rec.colbert.shape[0])]  # type: ignore[union-attr]
        vectors: dict[str, np.ndarray] = {}
        for chunk in self.batched(keys, 4096):
            for row in self.client.get(self.colbert_collection, ids=chunk, output_fields=["vec"]):
                vectors[row["key"]] = self._as_float(row["vec"])
        dim = self.spec.colbert_dim if self.spec else 0
        for rid, rec in records.items():
            n = rec.colbert.shape[0]  # type: ignore[union-attr]
            toks = [vectors[f"{rid}#{pos}"] for pos in range(n) if f"{rid}#{pos}" in vectors]
            if len(toks) != n:
                raise BackendError(f"ColBERT vectors of {rid!r} are incomplete ({len(toks)} of {n}); re-ingest it")
            rec.colbert = np.asarray(toks, np.float32).reshape(n, dim)

    @staticmethod
    def _as_float(vec: Any) -> np.ndarray:
        if isinstance(vec, (bytes, bytearray)):
            return np.frombuffer(vec, dtype=np.float16).astype(np.float32)
        if isinstance(vec, list) and vec and isinstance(vec[0], (bytes, bytearray)):
            return np.frombuffer(vec[0], dtype=np.float16).astype(np.float32)
        return np.asarray(vec, np.float32)

    # -- search -----------------------------------------------------------------------------

    def _search(self, collection: str, field: str, data: list[Any], k: int, expr: str, out: list[str]) -> Any:
        return self.client.search(
            collection, data=data, anns_field=field, limit=min(k, _QUERY_WINDOW), filter=expr,
            search_params={"metric_type": "IP"}, output_fields=out,
        )

    def search_route(self, route: str, query: Any, k: int, flt: FilterNode | None) -> list[Candidate]:
        expr = compile_filter(flt)
        if route == "dense":
            res = self._search(self.collection, "dense", [np.asarray(query, np.float32).tolist()], k, expr, [])
            return [(h["id"], float(h["distance"])) for h in res[0]]
        if route == "sparse":
            if not query:
                return []
            res = self._search(self.collection, "sparse", [{int(t): float(w) for t, w in query.items()}], k, expr, [])
            return [(h["id"], float(h["distance"])) for h in res[0]]
        # ColBERT: top tokens per query vector, MaxSim summed per document (an upper
        # bound estimate). Token rows carry no metadata; the store post-filters.
        q = np.asarray(query, np.float32)
        if q.shape[0] == 0:
            return []
        res = self._search(self.colbert_collection, "vec", [self._colbert_value(v) for v in q], k, "", ["doc_id"])
        totals: dict[str, float] = defaultdict(float)
        for hits in res:
            best: dict[str, float] = {}
            for h in hits:
                doc = h["entity"]["doc_id"]
                best[doc] = max(best.get(doc, -np.inf), float(h["distance"]))
            for doc, s in best.items():
                totals[doc] += s
        ranked = sorted(totals.items(), key=lambda t: -t[1])[:k]
        return [(d, s / q.shape[0]) for d, s in ranked]

    def engine_search(self, query: dict[str, Any], weights: Weights, k: int, flt: FilterNode | None,
                      depth: int, method: FusionMethod) -> list[Candidate]:
        """``hybrid_search`` over dense and sparse with ``WeightedRanker(norm_score=False)``
        (weights ``w/sum(w)``, all in [0, 1]) or ``RRFRanker(60)``.

        ColBERT lives in the companion collection, outside ``hybrid_search``: with a
        ColBERT weight its term ``w_c/sum(w) * MaxSim`` is added for the fused
        candidates from their stored token vectors (RRF ignores ColBERT).
        """
        expr = compile_filter(flt)
        total = sum(weights)
        requests, route_weights = [], []
        if weights.dense > 0:
            requests.append(AnnSearchRequest([np.asarray(query["dense"], np.float32).tolist()], "dense",
                                             {"metric_type": "IP"}, limit=depth, expr=expr))
            route_weights.append(weights.dense / total)
        if weights.sparse > 0 and query["sparse"]:
            requests.append(AnnSearchRequest([{int(t): float(w) for t, w in query["sparse"].items()}], "sparse",
                                             {"metric_type": "IP"}, limit=depth, expr=expr))
            route_weights.append(weights.sparse / total)
        colbert_weight = weights.colbert / total if method == "weighted" else 0.0
        if not requests:  # ColBERT alone: its own candidates and MaxSim
            fused = [(d, 0.0) for d, _ in self.search_route("colbert", query["colbert"], depth, flt)]
        else:
            ranker = WeightedRanker(*route_weights, norm_score=False) if method == "weighted" else RRFRanker(60)
            limit = depth if colbert_weight > 0 else k
            res = self.client.hybrid_search(self.collection, requests, ranker, limit=min(limit, _QUERY_WINDOW))
            fused = [(h["id"], float(h["distance"])) for h in res[0]]
        if colbert_weight > 0:
            recs = self.fetch([d for d, _ in fused])
            q = np.asarray(query["colbert"], np.float32)
            fused = [(d, s + colbert_weight * colbert_score(q, recs[d].colbert)) for d, s in fused if d in recs]
            fused.sort(key=lambda t: -t[1])
        return fused[:k]

    def close(self) -> None:
        self.client.close()

"""OpenSearch adapter: ``knn_vector`` (lucene HNSW, innerproduct), ``rank_features``, ColBERT in ``_source``.

Server only: ``opensearch://host:9200`` (``opensearch+https://`` for TLS; options ``user``,
``password``, ``api_key``, ``verify_certs``, ``timeout``). The index name is the collection
name lowercased (OpenSearch index names must be lowercase), so ``Docs`` and ``docs`` are the
same index.

Layout of one document (``_id`` = the m3connect id)::

    doc_id    keyword
    text      text, index: false (kept in _source only)
    metadata  object; strings map to keyword, numbers to double, bools to boolean
    dense     knn_vector (dimension, innerproduct, hnsw, engine lucene; faiss/nmslib need
              native libraries and are never used)
    sparse    rank_features {"<token id>": weight}; zero weights dropped (values must be > 0);
              Lucene keeps ~9 significant bits, so this field only finds candidates
    colbert   enabled:false array of float lists (6 decimals), read by k-NN's
              ``lateInteractionScore`` (it does not resolve a path inside another object)
    m3        enabled:false object with the exact representations:
              sparse {"i": [ids], "v": [weights]}, colbert {"b64", "shape", "dtype"}
              (little-endian float32/float16 bytes per the collection's ``colbert_dtype``)

The collection spec is stored in the mapping's ``_meta`` under ``m3connect``.
Writes are not refreshed per batch; :meth:`flush` refreshes (and so do searches and counts
after writes made through this adapter).
"""

from __future__ import annotations

import base64
import json
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
from ..scoring import Weights
from .base import Adapter, Candidate, CollectionSpec, FusionMethod, Record

try:
    from opensearchpy import OpenSearch
    from opensearchpy import exceptions as os_exc
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError.for_extra("opensearch-py", "opensearch") from exc

__all__ = ["OpenSearchAdapter", "compile_filter", "index_name"]

_META_KEY = "m3connect"
_MAX_WINDOW = 10_000  # index.max_result_window and the k-NN k limit
_BULK_BYTES = 16 * 1024 * 1024  # real request bytes per _bulk call (the store's estimate is smaller)
_RRF_K = 60
_LATE_INTERACTION = "lateInteractionScore(params.query_vectors, 'colbert', params._source, 'innerproduct')"


def index_name(collection: str) -> str:
    """The OpenSearch index for a collection: lowercased; must not start with ``_``, ``-`` or ``+``."""
    name = collection.lower()
    if not name or name[0] in "_-+" or name in (".", ".."):
        raise InvalidInputError(f"{collection!r} cannot be an OpenSearch index name (it must not start with '_', '-' or '+')")
    return name


# -- filters ---------------------------------------------------------------------------------


_NUMERIC = {"double", "float", "long", "integer", "short", "byte", "half_float", "scaled_float", "unsigned_long"}


def compile_filter(node: FilterNode | None, field_types: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Filter tree → list of bool ``filter`` clauses over ``metadata.<field>``.

    Equality is a ``match`` with ``lenient: true`` (an exact term on keyword, numeric and
    boolean fields; a value of the wrong type for the field matches nothing instead of failing
    the search). ``field_types`` (``{field: mapping type}``) lets a range on a field that is not
    numeric match nothing, as in :func:`m3connect.filters.matches`, instead of comparing strings.
    """
    return [] if node is None else [_clause(node, field_types or {})]


def _eq(field: str, value: Any) -> dict[str, Any]:
    return {"match": {f"metadata.{field}": {"query": value, "lenient": True}}}


def _clause(node: FilterNode, types: dict[str, str]) -> dict[str, Any]:
    if isinstance(node, Eq):
        return _eq(node.field, node.value)
    if isinstance(node, In):
        return {"bool": {"should": [_eq(node.field, v) for v in node.values], "minimum_should_match": 1}}
    if isinstance(node, Cmp):
        if node.field in types and types[node.field] not in _NUMERIC:
            return {"match_none": {}}
        return {"range": {f"metadata.{node.field}": {node.op[1:]: node.value}}}
    if isinstance(node, And):
        return {"bool": {"filter": [_clause(n, types) for n in node.items]}}
    assert isinstance(node, Or)
    return {"bool": {"should": [_clause(n, types) for n in node.items], "minimum_should_match": 1}}


def _has_range(node: FilterNode | None) -> bool:
    if isinstance(node, Cmp):
        return True
    if isinstance(node, (And, Or)):
        return any(_has_range(n) for n in node.items)
    return False


# -- encoding of the exact representations -----------------------------------------------------


def _encode_colbert(colbert: np.ndarray, dtype: str) -> dict[str, Any]:
    arr = np.ascontiguousarray(colbert, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"b64": base64.b64encode(arr.tobytes()).decode("ascii"), "shape": list(arr.shape), "dtype": dtype}


def _decode_colbert(data: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(data["b64"])
    arr = np.frombuffer(raw, dtype=np.dtype(data.get("dtype", "float32")).newbyteorder("<"))
    return arr.reshape(data["shape"]).astype(np.float32)


def _source(record: Record, colbert_dtype: str) -> dict[str, Any]:
    assert record.dense is not None and record.sparse is not None and record.colbert is not None
    ids = [int(t) for t in record.sparse]
    vals = [float(v) for v in record.sparse.values()]
    colbert = np.asarray(record.colbert, np.float32)
    if colbert_dtype == "float16":
        colbert = colbert.astype(np.float16).astype(np.float32)
    return {
        "doc_id": record.id,
        "text": record.text,
        "metadata": record.metadata,
        "dense": np.asarray(record.dense, np.float32).tolist(),
        "sparse": {str(t): v for t, v in zip(ids, vals) if v > 0},
        "colbert": np.round(colbert.astype(np.float64), 6).tolist(),
        "m3": {"sparse": {"i": ids, "v": vals}, "colbert": _encode_colbert(colbert, colbert_dtype)},
    }


def _rrf(ranked_lists: Sequence[Sequence[Candidate]], k: int) -> list[Candidate]:
    scores: dict[str, float] = {}
    for ranked in ranked_lists:
        for rank, (rid, _) in enumerate(ranked, start=1):
            scores[rid] = scores.get(rid, 0.0) + 1.0 / (_RRF_K + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class OpenSearchAdapter(Adapter):
    engine = "opensearch"
    max_batch_bytes = 8 * 1024 * 1024
    supports_engine_fusion = True

    def __init__(self, location: Any, collection: str, *, user: str | None = None, password: str | None = None,
                 api_key: str | None = None, verify_certs: bool = True, timeout: float = 30.0,
                 connect_timeout: float = 5.0, shards: int = 1, replicas: int = 0,
                 ef_construction: int = 128, m: int = 16, **client_options: Any) -> None:
        super().__init__(collection)
        if location.embedded:
            raise InvalidInputError("OpenSearch has no embedded mode; use opensearch://host:9200")
        self.url = location.url(9200)
        self.index = index_name(collection)
        self._settings = {"shards": shards, "replicas": replicas, "ef_construction": ef_construction, "m": m}
        headers = dict(client_options.pop("headers", {}) or {})
        if api_key:
            headers["Authorization"] = f"ApiKey {api_key}"
        auth = (user, password or "") if user is not None else None
        self._dirty = False
        try:
            self.client = OpenSearch(
                hosts=[self.url], http_auth=auth, headers=headers or None, verify_certs=verify_certs,
                ssl_show_warn=verify_certs, timeout=timeout, **client_options,
            )
            self.client.info(request_timeout=min(timeout, connect_timeout))
        except os_exc.AuthenticationException as exc:
            raise BackendUnavailableError(f"OpenSearch at {self.url} refused the credentials: {exc}") from exc
        except Exception as exc:
            raise BackendUnavailableError(f"cannot reach OpenSearch at {self.url}: {exc}") from exc

    # -- schema -----------------------------------------------------------------------------

    def read_spec(self) -> CollectionSpec | None:
        if not self.client.indices.exists(index=self.index):
            return None
        mapping = self.client.indices.get_mapping(index=self.index)
        body = next(iter(mapping.values()), {}).get("mappings", {})
        meta = (body.get("_meta") or {}).get(_META_KEY)
        if not meta:
            raise SchemaMismatchError(
                f"OpenSearch index {self.index!r} exists but was not created by m3connect (no _meta.{_META_KEY})"
            )
        return CollectionSpec.from_json(meta)

    def create(self, spec: CollectionSpec) -> None:
        s = self._settings
        body = {
            "settings": {"index": {"knn": True, "number_of_shards": s["shards"], "number_of_replicas": s["replicas"]}},
            "mappings": {
                "_meta": {_META_KEY: spec.to_json()},
                "dynamic": "strict",
                "properties": {
                    "doc_id": {"type": "keyword"},
                    "text": {"type": "text", "index": False},
                    "metadata": {"type": "object", "dynamic": True},
                    "dense": {
                        "type": "knn_vector",
                        "dimension": spec.dense_dim,
                        "method": {
                            "name": "hnsw", "space_type": "innerproduct", "engine": "lucene",
                            "parameters": {"ef_construction": s["ef_construction"], "m": s["m"]},
                        },
                    },
                    "sparse": {"type": "rank_features"},
                    "colbert": {"type": "object", "enabled": False},
                    "m3": {"type": "object", "enabled": False},
                },
                "dynamic_templates": [
                    {"meta_strings": {"path_match": "metadata.*", "match_mapping_type": "string",
                                      "mapping": {"type": "keyword"}}},
                    {"meta_longs": {"path_match": "metadata.*", "match_mapping_type": "long",
                                    "mapping": {"type": "double"}}},
                    {"meta_doubles": {"path_match": "metadata.*", "match_mapping_type": "double",
                                      "mapping": {"type": "double"}}},
                ],
            },
        }
        try:
            self.client.indices.create(index=self.index, body=body)
        except os_exc.TransportError as exc:
            raise BackendError(f"creating OpenSearch index {self.index!r} failed: {exc}") from exc
        self.spec = spec

    def drop(self) -> None:
        self.client.indices.delete(index=self.index, ignore_unavailable=True)
        self._dirty = False

    # -- data -------------------------------------------------------------------------------

    def _colbert_dtype(self) -> str:
        return self.spec.colbert_dtype if self.spec is not None else "float32"

    def _bulk(self, lines: list[str], what: str) -> None:
        """Send NDJSON action lines in requests of at most ~16 MiB; raise listing every failed id."""
        failures: list[str] = []
        chunk: list[str] = []
        size = 0

        def send() -> None:
            try:
                resp = self.client.bulk(body="".join(chunk), index=self.index)
            except os_exc.TransportError as exc:
                raise BackendError(f"OpenSearch {what} into {self.index!r} failed: {exc}") from exc
            if resp.get("errors"):
                for item in resp.get("items", []):
                    (op, res), = item.items()
                    if op == "delete" and res.get("status") == 404:
                        continue
                    if res.get("error"):
                        err = res["error"]
                        reason = err.get("reason") if isinstance(err, dict) else str(err)
                        kind = err.get("type") if isinstance(err, dict) else ""
                        failures.append(f"{res.get('_id')!r}: {kind}: {reason}")

        for line in lines:
            if chunk and size + len(line) > _BULK_BYTES:
                send()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            send()
        self._dirty = True
        if failures:
            shown = "; ".join(failures[:10]) + (f"; ... {len(failures) - 10} more" if len(failures) > 10 else "")
            raise BackendError(f"OpenSearch rejected {len(failures)} document(s) in {what} into {self.index!r}: {shown}")

    def upsert(self, records: Sequence[Record]) -> None:
        dtype = self._colbert_dtype()
        lines = []
        for r in records:
            src = json.dumps(_source(r, dtype), separators=(",", ":"), ensure_ascii=False)
            lines.append(json.dumps({"index": {"_id": r.id}}) + "\n" + src + "\n")
        self._bulk(lines, "upsert")

    def delete(self, ids: Sequence[str]) -> None:
        self._bulk([json.dumps({"delete": {"_id": i}}) + "\n" for i in ids], "delete")

    def flush(self) -> None:
        self.client.indices.refresh(index=self.index)
        self._dirty = False

    def _fresh(self) -> None:
        if self._dirty:
            self.flush()

    def count(self) -> int:
        self._fresh()
        return int(self.client.count(index=self.index)["count"])

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for chunk in self.batched(ids, 1000):
            resp = self.client.mget(index=self.index, body={"ids": chunk}, _source=False)
            out.update(d["_id"] for d in resp["docs"] if d.get("found"))
        return out

    def fetch(self, ids: Sequence[str], *, with_vectors: bool = True) -> dict[str, Record]:
        fields = ["doc_id", "text", "metadata"] + (["dense", "m3"] if with_vectors else [])
        out: dict[str, Record] = {}
        for chunk in self.batched(ids, 200 if with_vectors else 1000):
            resp = self.client.mget(index=self.index, body={"ids": chunk}, _source_includes=fields)
            for d in resp["docs"]:
                if not d.get("found"):
                    continue
                src = d.get("_source") or {}
                rec = Record(id=d["_id"], text=src.get("text", ""), metadata=src.get("metadata") or {})
                if with_vectors:
                    m3 = src.get("m3") or {}
                    rec.dense = np.asarray(src["dense"], np.float32)
                    sp = m3.get("sparse") or {"i": [], "v": []}
                    rec.sparse = {int(t): float(v) for t, v in zip(sp["i"], sp["v"])}
                    rec.colbert = _decode_colbert(m3["colbert"])
                out[rec.id] = rec
        return out

    # -- search -----------------------------------------------------------------------------

    def _search(self, body: dict[str, Any]) -> list[Candidate]:
        self._fresh()
        body.setdefault("_source", False)
        try:
            resp = self.client.search(index=self.index, body=body)
        except os_exc.TransportError as exc:
            raise BackendError(f"OpenSearch search on {self.index!r} failed: {exc}") from exc
        return [(h["_id"], float(h["_score"])) for h in resp["hits"]["hits"]]

    @staticmethod
    def _knn(vector: Any, k: int, filters: list[dict[str, Any]], boost: float = 1.0) -> dict[str, Any]:
        clause: dict[str, Any] = {"vector": np.asarray(vector, np.float32).tolist(), "k": min(k, _MAX_WINDOW)}
        if filters:
            clause["filter"] = {"bool": {"filter": filters}}  # lucene: efficient filtering during the search
        if boost != 1.0:
            clause["boost"] = boost
        return {"knn": {"dense": clause}}

    @staticmethod
    def _rank_features(query: dict[int, float], scale: float = 1.0) -> list[dict[str, Any]]:
        return [
            {"rank_feature": {"field": f"sparse.{int(t)}", "linear": {}, "boost": float(w) * scale}}
            for t, w in query.items() if w > 0
        ]

    @staticmethod
    def _colbert_script(query: Any, scale: float = 1.0) -> dict[str, Any]:
        source = _LATE_INTERACTION if scale == 1.0 else f"params.scale * {_LATE_INTERACTION}"
        return {"source": source, "params": {"query_vectors": np.asarray(query, np.float32).tolist(), "scale": scale}}

    @staticmethod
    def _filtered(filters: list[dict[str, Any]]) -> dict[str, Any]:
        return {"bool": {"filter": filters}} if filters else {"match_all": {}}

    def _filters(self, flt: FilterNode | None) -> list[dict[str, Any]]:
        types: dict[str, str] | None = None
        if _has_range(flt):
            self._fresh()
            mapping = self.client.indices.get_mapping(index=self.index)
            props = next(iter(mapping.values()))["mappings"]["properties"].get("metadata", {}).get("properties", {})
            types = {name: p.get("type", "object") for name, p in props.items()}
        return compile_filter(flt, types)

    def search_route(self, route: str, query: Any, k: int, flt: FilterNode | None) -> list[Candidate]:
        """Top-``k`` of one route. Scores are OpenSearch's (dense: 1+ip or 1/(1-ip); sparse:
        Σ q_w·d_w at ~9-bit precision; colbert: Σ_i transformed max_j), used only for ranking.

        ColBERT has no native index: its route is an exact brute-force ``script_score`` with
        k-NN's ``lateInteractionScore`` over every document passing the filter (fine for small
        and medium indexes; cost grows linearly with the index).
        """
        filters = self._filters(flt)
        size = min(k, _MAX_WINDOW)
        if route == "dense":
            return self._search({"size": size, "query": self._knn(query, size, filters)})
        if route == "sparse":
            should = self._rank_features(query or {})
            if not should:
                return []
            return self._search({"size": size, "query": {"bool": {"should": should, "minimum_should_match": 1,
                                                                  "filter": filters}}})
        if route == "colbert":
            if query is None or len(query) == 0:
                return []
            return self._search({"size": size, "query": {"script_score": {
                "query": self._filtered(filters), "script": self._colbert_script(query)}}})
        raise InvalidInputError(f"unknown route {route!r}; use 'dense', 'sparse' or 'colbert'")

    def engine_search(self, query: dict[str, Any], weights: Weights, k: int, flt: FilterNode | None,
                      depth: int, method: FusionMethod) -> list[Candidate]:
        """Fusion inside OpenSearch (``weighted``) or RRF of the route lists (``rrf``).

        ``weighted``: one request. A bool ``should`` of the dense ``knn`` (``k = depth``, boost
        ``w_d/W``) and the sparse ``rank_feature`` clauses (boost ``q_w·w_s/W``) gathers the union
        of candidates; the top ``depth`` are then rescored with ``lateInteractionScore`` weighted
        ``w_c/(W·n_q)``. The score is OpenSearch's, not M3's exact formula: dense contributes
        ``1+ip`` (``1/(1-ip)`` for ip < 0), sparse uses 9-bit stored weights, and ColBERT sums
        the transformed per-token maxima (``1+max`` ...). A route that missed a document adds 0.
        With only ColBERT weighted, the ColBERT route is a filtered brute-force ``script_score``.

        ``rrf``: the node has no neural-search plugin (so no ``hybrid`` query and no
        ``score-ranker-processor`` pipeline); RRF (k=60) is computed in the client over the
        route lists of :meth:`search_route`.
        """
        routes = [r for r in weights.active_routes
                  if not (r == "sparse" and not query.get("sparse")) and not (r == "colbert" and len(query.get("colbert", [])) == 0)]
        if not routes:
            return []
        if method == "rrf":
            return _rrf([self.search_route(r, query[r], depth, flt) for r in routes], k)
        filters = self._filters(flt)
        total = float(sum(weights))
        should: list[dict[str, Any]] = []
        if "dense" in routes:
            should.append(self._knn(query["dense"], depth, filters, boost=weights.dense / total))
        if "sparse" in routes:
            should.extend(self._rank_features(query["sparse"], weights.sparse / total))
        size = min(k, _MAX_WINDOW)
        colbert_scale = 0.0
        if "colbert" in routes:
            colbert_scale = weights.colbert / total / max(1, len(query["colbert"]))
        if not should:  # ColBERT alone
            return self._search({"size": size, "query": {"script_score": {
                "query": self._filtered(filters), "script": self._colbert_script(query["colbert"], colbert_scale)}}})
        body: dict[str, Any] = {
            "size": size,
            "query": {"bool": {"should": should, "minimum_should_match": 1, "filter": filters}},
        }
        if colbert_scale > 0:
            body["rescore"] = {"window_size": min(max(depth, k), _MAX_WINDOW), "query": {
                "rescore_query": {"script_score": {"query": {"match_all": {}},
                                                   "script": self._colbert_script(query["colbert"])}},
                "query_weight": 1.0, "rescore_query_weight": colbert_scale, "score_mode": "total",
            }}
        return self._search(body)

    def close(self) -> None:
        self.client.close()

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
              ``lateInteractionScore`` (it does not resolve a path inside another object).
              ``colbert_lists=False`` leaves it out: fetches get ~3x faster (the node parses
              less _source), but ColBERT cannot be scored in the engine (fusion="engine"
              with a ColBERT weight, ``colbert_rescore``, ``colbert_bruteforce``); kept in
              ``_meta.m3connect_opensearch``.
    colbert_mean  knn_vector (colbert_dim, innerproduct, lucene): normalised mean of the
              token vectors, the ANN entry point of the ColBERT route (see search_route)
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
_LAYOUT_KEY = "m3connect_opensearch"  # adapter layout options, beside the backend-neutral spec
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


def _source(record: Record, colbert_dtype: str, colbert_lists: bool = True) -> dict[str, Any]:
    assert record.dense is not None and record.sparse is not None and record.colbert is not None
    ids = [int(t) for t in record.sparse]
    vals = [float(v) for v in record.sparse.values()]
    colbert = np.asarray(record.colbert, np.float32)
    if colbert_dtype == "float16":
        colbert = colbert.astype(np.float16).astype(np.float32)
    mean = colbert.astype(np.float64).mean(axis=0) if len(colbert) else np.zeros(colbert.shape[1])
    norm = float(np.linalg.norm(mean))
    mean = mean / norm if norm > 0 else mean
    src = {
        "doc_id": record.id,
        "text": record.text,
        "metadata": record.metadata,
        "dense": np.asarray(record.dense, np.float32).tolist(),
        "sparse": {str(t): v for t, v in zip(ids, vals) if v > 0},
        "colbert": np.round(colbert.astype(np.float64), 6).tolist(),
        "colbert_mean": mean.astype(np.float32).tolist(),
        "m3": {"sparse": {"i": ids, "v": vals}, "colbert": _encode_colbert(colbert, colbert_dtype)},
    }
    if not colbert_lists:
        del src["colbert"]
    return src


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
                 ef_construction: int = 128, m: int = 16, colbert_window: int = 2,
                 colbert_lists: bool = True, colbert_rescore: bool = False, colbert_bruteforce: bool = False,
                 **client_options: Any) -> None:
        super().__init__(collection)
        self.colbert_rescore = bool(colbert_rescore)
        self.colbert_window = max(1, int(colbert_window))
        self.colbert_bruteforce = bool(colbert_bruteforce)
        self.colbert_lists = bool(colbert_lists)  # for a new index; an existing one says in _meta
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
        layout = (body.get("_meta") or {}).get(_LAYOUT_KEY) or {}
        self.colbert_lists = bool(layout.get("colbert_lists", True))
        return CollectionSpec.from_json(meta)

    def create(self, spec: CollectionSpec) -> None:
        s = self._settings
        # derived source (k-NN 3.x default) rebuilds vectors on every _source read: ~3x slower fetches
        body = {
            "settings": {"index": {"knn": True, "knn.derived_source.enabled": False, "number_of_shards": s["shards"], "number_of_replicas": s["replicas"]}},
            "mappings": {
                "_meta": {_META_KEY: spec.to_json(), _LAYOUT_KEY: {"colbert_lists": self.colbert_lists}},
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
                    "colbert_mean": {
                        "type": "knn_vector",
                        "dimension": spec.colbert_dim,
                        "method": {
                            "name": "hnsw", "space_type": "innerproduct", "engine": "lucene",
                            "parameters": {"ef_construction": s["ef_construction"], "m": s["m"]},
                        },
                    },
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
            src = json.dumps(_source(r, dtype, self.colbert_lists), separators=(",", ":"), ensure_ascii=False)
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
    def _knn(vector: Any, k: int, filters: list[dict[str, Any]], boost: float = 1.0,
             field: str = "dense") -> dict[str, Any]:
        clause: dict[str, Any] = {"vector": np.asarray(vector, np.float32).tolist(), "k": min(k, _MAX_WINDOW)}
        if filters:
            clause["filter"] = {"bool": {"filter": filters}}  # lucene: efficient filtering during the search
        if boost != 1.0:
            clause["boost"] = boost
        return {"knn": {field: clause}}

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

    def _need_lists(self, what: str) -> None:
        if not self.colbert_lists:
            raise BackendError(
                f"{what} needs ColBERT vectors in _source for lateInteractionScore, but index {self.index!r} "
                "was created with colbert_lists=False; use fusion='exact' (or recreate the index)"
            )

    def _colbert_search(self, query: Any, size: int, filters: list[dict[str, Any]],
                        scale: float = 1.0, rescore: bool = False, window: int | None = None) -> list[Candidate]:
        """ColBERT candidates: ``colbert_mean`` kNN, optionally rescored with ``lateInteractionScore``."""
        if rescore or self.colbert_bruteforce:
            self._need_lists("ColBERT rescoring in OpenSearch")
        script = self._colbert_script(query, scale)
        if self.colbert_bruteforce:
            return self._search({"size": size, "query": {"script_score": {
                "query": self._filtered(filters), "script": script}}})
        qv = np.asarray(query, np.float64)
        mean = qv.mean(axis=0)
        norm = float(np.linalg.norm(mean))
        mean = mean / norm if norm > 0 else mean
        if not rescore:
            return self._search({"size": size, "query": self._knn(mean, size, filters, field="colbert_mean")})
        window = min(max(window or size * self.colbert_window, size), _MAX_WINDOW)
        return self._search({
            "size": size,
            "query": self._knn(mean, window, filters, field="colbert_mean"),
            "rescore": {"window_size": window, "query": {
                "rescore_query": {"script_score": {"query": {"match_all": {}}, "script": script}},
                "query_weight": 0.0, "rescore_query_weight": 1.0, "score_mode": "total",
            }},
        })

    def search_route(self, route: str, query: Any, k: int, flt: FilterNode | None) -> list[Candidate]:
        """Top-``k`` of one route. Scores are OpenSearch's (dense: 1+ip or 1/(1-ip); sparse:
        Σ q_w·d_w at ~9-bit precision; colbert: Σ_i transformed max_j), used only for ranking.

        ColBERT has no native index. Its route is approximate: a kNN on ``colbert_mean`` (the
        normalised mean of each document's token vectors) with the normalised mean of the query
        vectors; the score is that kNN's (1 + mean·mean). The store rescores candidates
        exactly, so this only has to find them. Options: ``colbert_rescore=True`` gathers
        ``colbert_window * k`` (default 2k) and reorders them with k-NN's ``lateInteractionScore``
        (MaxSim) before cutting to ``k``; ``colbert_bruteforce=True`` scores every document passing
        the filter with ``script_score`` (exact candidates). Both parse ``_source`` per document in
        painless, which is slow (seen: ~4 ms a document for short texts of the 32-d test model;
        brute force over 2,000 such documents ~7 s).
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
            return self._colbert_search(query, size, filters, rescore=self.colbert_rescore)
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
        With only ColBERT weighted, it is the ColBERT route (``colbert_mean`` kNN over
        ``depth`` documents, rescored with ``lateInteractionScore``) scaled by ``w_c/(W·n_q)``.
        The rescore parses ``_source`` in painless per document (~4 ms each seen), so weighted
        fusion with ColBERT costs roughly ``depth`` times that. ColBERT never adds candidates
        when dense or sparse is weighted.

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
        if not should:
            if colbert_scale <= 0:  # e.g. a sparse query whose weights are all zero
                return []
            return self._colbert_search(query["colbert"], size, filters, colbert_scale, rescore=True, window=depth)
        body: dict[str, Any] = {
            "size": size,
            "query": {"bool": {"should": should, "minimum_should_match": 1, "filter": filters}},
        }
        if colbert_scale > 0:
            self._need_lists("weighted engine fusion with a ColBERT weight")
            body["rescore"] = {"window_size": min(max(depth, k), _MAX_WINDOW), "query": {
                "rescore_query": {"script_score": {"query": {"match_all": {}},
                                                   "script": self._colbert_script(query["colbert"])}},
                "query_weight": 1.0, "rescore_query_weight": colbert_scale, "score_mode": "total",
            }}
        return self._search(body)

    def close(self) -> None:
        self.client.close()

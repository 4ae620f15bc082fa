"""LlamaIndex integration: an M3 vector store, a hybrid retriever and a dense embedding.

The vector store encodes node text with BGE-M3 itself (dense + sparse + ColBERT)
and searches with the query *text*, so it sets ``is_embedding_query = False``:
LlamaIndex then does not embed the query a second time.

>>> from llama_index.core import StorageContext, VectorStoreIndex              # doctest: +SKIP
>>> from m3connect.integrations.llamaindex import M3LlamaVectorStore, M3LlamaEmbedding  # doctest: +SKIP
>>> vs = M3LlamaVectorStore(store=connect("qdrant://:memory:", "docs", encoder=enc))  # doctest: +SKIP
>>> index = VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=vs),
...                                         embed_model=M3LlamaEmbedding(encoder=enc))  # doctest: +SKIP
>>> index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=5).retrieve("query")  # doctest: +SKIP

Query modes: ``default`` is dense only ``(1, 0, 0)``; ``sparse`` (and ``text_search``) is
lexical only ``(0, 1, 0)``; ``hybrid`` uses the store's ``hybrid_weights`` (default
``(0.4, 0.2, 0.4)``), or, when the query sets ``alpha`` (LlamaIndex's 0 = keyword,
1 = vector), ``(alpha/2, 1 - alpha, alpha/2)``: ``alpha=0.8`` gives M3's default weights.
``sparse_top_k`` is the number of results in ``sparse`` mode and, in ``hybrid`` mode, the
least number of candidates each route contributes (as in LlamaIndex's own hybrid stores).

:class:`M3LlamaSparseEmbedding` gives M3's lexical weights to LlamaIndex's *native* stores: it is
a ``BaseSparseEmbedding``, and provides ``sparse_doc_fn`` / ``sparse_query_fn`` for
``QdrantVectorStore`` and ``encode_documents`` / ``encode_queries`` for ``MilvusVectorStore``'s
``sparse_embedding_function``:

>>> sparse = M3LlamaSparseEmbedding(encoder=enc)                                    # doctest: +SKIP
>>> QdrantVectorStore(client=client, collection_name="docs", enable_hybrid=True,
...                   **sparse.qdrant_kwargs())                                     # doctest: +SKIP
>>> MilvusVectorStore(uri=..., dim=1024, enable_sparse=True, sparse_embedding_function=sparse)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..defaults import DEFAULT_WEIGHTS
from ..errors import FilterError, InvalidInputError, MissingDependencyError
from ..store import M3Store
from ..types import Vectors

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.base.embeddings.base_sparse import BaseSparseEmbedding
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle
    from llama_index.core.vector_stores.types import (
        BasePydanticVectorStore,
        FilterCondition,
        FilterOperator,
        MetadataFilter,
        MetadataFilters,
        VectorStoreQuery,
        VectorStoreQueryMode,
        VectorStoreQueryResult,
    )
    from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError.for_extra("llama-index-core", "llamaindex") from exc

if TYPE_CHECKING:
    from ..encoder import M3Encoder
    from ..types import Hit

__all__ = [
    "M3LlamaVectorStore",
    "M3LlamaRetriever",
    "M3LlamaEmbedding",
    "M3LlamaSparseEmbedding",
    "metadata_filters_to_m3",
    "weights_for_mode",
    "DEFAULT_HYBRID_WEIGHTS",
]

DEFAULT_HYBRID_WEIGHTS: tuple[float, float, float] = DEFAULT_WEIGHTS
_SCAN_BATCH = 1000  # ids per round trip of M3Store.ids / M3Store.clear (an engine cursor, no cap)

_RANGE = {
    FilterOperator.GT: "$gt",
    FilterOperator.GTE: "$gte",
    FilterOperator.LT: "$lt",
    FilterOperator.LTE: "$lte",
}


# -- filters and weights ---------------------------------------------------------------------


def _one_filter(f: MetadataFilter) -> dict[str, Any]:
    op = FilterOperator(f.operator)
    if op == FilterOperator.EQ:
        return {f.key: f.value}
    if op == FilterOperator.IN:
        values = f.value if isinstance(f.value, (list, tuple)) else [f.value]
        return {f.key: {"$in": list(values)}}
    if op in _RANGE:
        return {f.key: {_RANGE[op]: f.value}}
    raise FilterError(
        f"filter operator {op.value!r} on {f.key!r} is not supported; use ==, in, >, >=, <, <= with AND/OR"
    )


def metadata_filters_to_m3(filters: MetadataFilters | None) -> dict[str, Any] | None:
    """Translate LlamaIndex ``MetadataFilters`` (EQ, IN, GT, GTE, LT, LTE; AND/OR, nested)
    into an m3connect filter dict."""
    if filters is None or not filters.filters:
        return None
    parts: list[dict[str, Any]] = []
    for f in filters.filters:
        if isinstance(f, MetadataFilters):
            sub = metadata_filters_to_m3(f)
            if sub is not None:
                parts.append(sub)
        else:
            parts.append(_one_filter(f))
    if not parts:
        return None
    condition = FilterCondition(filters.condition or FilterCondition.AND)
    if condition == FilterCondition.AND:
        return parts[0] if len(parts) == 1 else {"$and": parts}
    if condition == FilterCondition.OR:
        return parts[0] if len(parts) == 1 else {"$or": parts}
    raise FilterError(f"filter condition {condition.value!r} is not supported; use AND or OR")


def weights_for_mode(
    mode: VectorStoreQueryMode | str,
    alpha: float | None = None,
    hybrid_weights: Sequence[float] = DEFAULT_HYBRID_WEIGHTS,
) -> tuple[float, float, float]:
    """M3 ``(dense, sparse, colbert)`` weights for a LlamaIndex query mode."""
    mode = VectorStoreQueryMode(mode)
    if mode == VectorStoreQueryMode.DEFAULT:
        return (1.0, 0.0, 0.0)
    if mode in (VectorStoreQueryMode.SPARSE, VectorStoreQueryMode.TEXT_SEARCH):
        return (0.0, 1.0, 0.0)
    if mode == VectorStoreQueryMode.HYBRID:
        if alpha is None:
            d, s, c = hybrid_weights
            return (float(d), float(s), float(c))
        a = float(alpha)
        if not 0.0 <= a <= 1.0:
            raise InvalidInputError(f"alpha must be in [0, 1], got {alpha}")
        return (a / 2, 1.0 - a, a / 2)
    raise InvalidInputError(f"query mode {mode.value!r} is not supported; use default, sparse or hybrid")


def _node_from_hit(hit: Hit) -> BaseNode:
    try:
        return metadata_dict_to_node(hit.metadata, text=hit.text)
    except Exception:  # noqa: BLE001 - a document not written through LlamaIndex
        from llama_index.core.schema import TextNode

        return TextNode(id_=hit.id, text=hit.text or "", metadata=dict(hit.metadata))


# -- vector store ----------------------------------------------------------------------------


class M3LlamaVectorStore(BasePydanticVectorStore):
    """A LlamaIndex vector store over any :class:`~m3connect.M3Store`.

    Nodes are stored with their text, their metadata and LlamaIndex's serialised node
    (``_node_content``, ``ref_doc_id``...), so retrieved nodes keep ids, metadata and
    relationships. Metadata filters are translated to the m3connect filter language.
    """

    stores_text: bool = True
    is_embedding_query: bool = False
    flat_metadata: bool = False
    hybrid_weights: tuple[float, float, float] = Field(default=DEFAULT_HYBRID_WEIGHTS)
    fusion: str = Field(default="exact")
    candidate_depth: int | None = Field(default=None)

    _store: M3Store = PrivateAttr()

    def __init__(self, store: M3Store, **kwargs: Any) -> None:
        if not isinstance(store, M3Store):
            raise InvalidInputError(f"store must be an M3Store, got {type(store).__name__}")
        super().__init__(**kwargs)
        self._store = store

    @classmethod
    def class_name(cls) -> str:
        return "M3LlamaVectorStore"

    @property
    def client(self) -> M3Store:
        return self._store

    @property
    def store(self) -> M3Store:
        return self._store

    # -- writing ----------------------------------------------------------------------------

    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        """Encode the nodes' text with M3 and upsert them under their node ids.

        Embeddings LlamaIndex computed for the nodes are not used: the store needs all
        three M3 representations and computes them in one pass.
        """
        nodes = list(nodes)
        if not nodes:
            return []
        texts = [n.get_content() for n in nodes]
        metadata = [node_to_metadata_dict(n, remove_text=True, flat_metadata=self.flat_metadata) for n in nodes]
        return self._store.add(texts, ids=[n.node_id for n in nodes], metadata=metadata, **kwargs)

    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.add(nodes, **kwargs))

    def _ids_matching(self, flt: Mapping[str, Any] | None) -> list[str]:
        """Every id whose metadata matches ``flt`` (filtered in the engine, listed by its cursor)."""
        return list(self._store.ids(flt, batch_size=_SCAN_BATCH))

    def _exists(self) -> bool:
        """Whether the collection exists (``connect`` creates it on the first write): reads of
        one that does not find nothing."""
        return bool(getattr(self._store, "exists", True))

    def _delete_matching(self, flt: Mapping[str, Any] | None) -> None:
        self._store.clear(flt, batch_size=_SCAN_BATCH)  # a collection not created yet: nothing to do

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id``."""
        self._delete_matching({"ref_doc_id": ref_doc_id})

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.delete(ref_doc_id, **delete_kwargs))

    def delete_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None, **delete_kwargs: Any
    ) -> None:
        """Delete nodes by id, by metadata filter, or both (ids that also match the filter)."""
        flt = metadata_filters_to_m3(filters)
        if node_ids is not None:
            ids = list(node_ids)
            if flt is not None:
                ids = [n.node_id for n in self.get_nodes(node_ids=ids, filters=filters)]
            self._store.delete(ids)
        elif flt is not None:
            self._delete_matching(flt)

    def clear(self) -> None:
        """Delete every node (the collection itself stays)."""
        self._delete_matching(None)

    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        flt = metadata_filters_to_m3(filters)
        if node_ids is None and flt is None:
            raise InvalidInputError("get_nodes needs node_ids or filters")
        if not self._exists():
            return []
        if node_ids is not None:
            docs = self._store.get(list(node_ids))
            from ..filters import matches, parse_filter

            node = parse_filter(flt)
            return [
                _node_from_hit(_doc_hit(d)) for d in docs if matches(node, d.metadata)
            ]
        ids = self._ids_matching(flt)
        return [_node_from_hit(_doc_hit(d)) for d in self._store.get(ids)]

    # -- querying ---------------------------------------------------------------------------

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Search with ``query.query_str`` (M3 encodes it), or dense-only with ``query_embedding``.

        ``kwargs`` may override ``weights``, ``fusion`` and ``candidate_depth``.
        """
        mode = VectorStoreQueryMode(query.mode)
        k = query.similarity_top_k
        if mode == VectorStoreQueryMode.HYBRID and query.hybrid_top_k:
            k = query.hybrid_top_k
        elif mode in (VectorStoreQueryMode.SPARSE, VectorStoreQueryMode.TEXT_SEARCH) and query.sparse_top_k:
            k = query.sparse_top_k
        flt = metadata_filters_to_m3(query.filters)
        if query.doc_ids:
            doc_filter = {"ref_doc_id": {"$in": list(query.doc_ids)}}
            flt = doc_filter if flt is None else {"$and": [flt, doc_filter]}
        fusion = kwargs.get("fusion", self.fusion)
        depth = kwargs.get("candidate_depth", self.candidate_depth)
        if depth is None and mode == VectorStoreQueryMode.HYBRID and query.sparse_top_k:
            # at least sparse_top_k candidates per route; the store's default depth when larger
            default = self._store.candidate_depth or max(100, 10 * k)
            depth = max(default, int(query.sparse_top_k), k)
        if query.query_str is None and query.query_embedding is None:
            raise InvalidInputError("VectorStoreQuery needs query_str (or a dense query_embedding)")
        if not self._exists():
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        if query.query_str is not None:
            weights = kwargs.get("weights") or weights_for_mode(query.mode, query.alpha, self.hybrid_weights)
            hits = self._store.search(
                query.query_str, k=k, weights=weights, filter=flt, fusion=fusion, candidate_depth=depth
            )
        else:
            hits = self._store.search_by_vectors(
                Vectors(dense=np.asarray(query.query_embedding, np.float32)),
                k=k, weights=(1.0, 0.0, 0.0), filter=flt, fusion=fusion, candidate_depth=depth,
            )
        if query.node_ids:  # VectorStoreIndex passes [] when the store holds the text
            wanted = set(query.node_ids)
            hits = [h for h in hits if h.id in wanted]
        return VectorStoreQueryResult(
            nodes=[_node_from_hit(h) for h in hits],
            similarities=[h.score for h in hits],
            ids=[h.id for h in hits],
        )

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.query(query, **kwargs))


def _doc_hit(doc: Any) -> Hit:
    from ..types import Hit

    return Hit(doc.id, 0.0, doc.text, dict(doc.metadata))


# -- retriever -------------------------------------------------------------------------------


class M3LlamaRetriever(BaseRetriever):
    """Hybrid M3 retrieval as a LlamaIndex retriever: top-``k`` nodes with M3 scores.

    ``store`` is an :class:`~m3connect.M3Store` or an :class:`M3LlamaVectorStore`;
    ``weights`` are ``(dense, sparse, colbert)``; ``filters`` are LlamaIndex
    ``MetadataFilters`` or an m3connect filter dict.
    """

    def __init__(
        self,
        store: M3Store | M3LlamaVectorStore,
        *,
        k: int = 4,
        weights: Sequence[float] | Mapping[str, float] = DEFAULT_HYBRID_WEIGHTS,
        filters: MetadataFilters | Mapping[str, Any] | None = None,
        fusion: str = "exact",
        candidate_depth: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.store = store.store if isinstance(store, M3LlamaVectorStore) else store
        if not isinstance(self.store, M3Store):
            raise InvalidInputError(f"store must be an M3Store or M3LlamaVectorStore, got {type(store).__name__}")
        self.k = k
        self.weights = weights
        self.filters = filters
        self.fusion = fusion
        self.candidate_depth = candidate_depth

    def _filter(self) -> dict[str, Any] | None:
        if isinstance(self.filters, MetadataFilters):
            return metadata_filters_to_m3(self.filters)
        return None if self.filters is None else dict(self.filters)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if not bool(getattr(self.store, "exists", True)):
            return []
        hits = self.store.search(
            query_bundle.query_str,
            k=self.k,
            weights=self.weights,
            filter=self._filter(),
            fusion=self.fusion,  # type: ignore[arg-type]
            candidate_depth=self.candidate_depth,
        )
        return [NodeWithScore(node=_node_from_hit(h), score=h.score) for h in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.get_running_loop().run_in_executor(None, self._retrieve, query_bundle)


# -- embedding -------------------------------------------------------------------------------


class M3LlamaEmbedding(BaseEmbedding):
    """BGE-M3 dense vectors as a LlamaIndex embed model (for ``VectorStoreIndex``)."""

    max_length: int | None = Field(default=None)
    _encoder: Any = PrivateAttr()

    def __init__(self, encoder: M3Encoder, **kwargs: Any) -> None:
        kwargs.setdefault("model_name", str(getattr(encoder, "model_name", "bge-m3")))
        super().__init__(**kwargs)
        self._encoder = encoder

    @classmethod
    def class_name(cls) -> str:
        return "M3LlamaEmbedding"

    def _dense(self, texts: list[str]) -> list[list[float]]:
        out = self._encoder.encode(
            texts, max_length=self.max_length, return_sparse=False, return_colbert=False, show_progress=False
        )
        vectors: list[list[float]] = out.dense.astype(float).tolist()
        return vectors

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._dense([query])[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._dense([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._dense(list(texts))

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_text_embedding, text)


# -- sparse embedding ------------------------------------------------------------------------


class M3LlamaSparseEmbedding(BaseSparseEmbedding):
    """BGE-M3 lexical weights (``{token_id: weight}``) as a LlamaIndex sparse embedding.

    Besides the ``BaseSparseEmbedding`` interface it offers the shapes LlamaIndex's native
    stores take: :meth:`sparse_doc_fn` / :meth:`sparse_query_fn` (``QdrantVectorStore``; see
    :meth:`qdrant_kwargs`) and :meth:`encode_documents` / :meth:`encode_queries`
    (``MilvusVectorStore(sparse_embedding_function=...)``; registered as its
    ``BaseSparseEmbeddingFunction`` when that package is installed). The weights are M3's raw
    lexical weights: keep IDF modifiers off, the model already weighs the tokens.
    ``max_length`` / ``query_max_length`` cut documents / queries (default: the encoder's).
    """

    max_length: int | None = Field(default=None)
    query_max_length: int | None = Field(default=None)
    _encoder: Any = PrivateAttr()

    def __init__(self, encoder: M3Encoder, **kwargs: Any) -> None:
        kwargs.setdefault("model_name", str(getattr(encoder, "model_name", "bge-m3")))
        super().__init__(**kwargs)
        self._encoder = encoder

    @classmethod
    def class_name(cls) -> str:
        return "M3LlamaSparseEmbedding"

    @property
    def encoder(self) -> Any:
        return self._encoder

    def _sparse(self, texts: Sequence[str], *, query: bool = False) -> list[dict[int, float]]:
        length = (self.query_max_length or self.max_length) if query else self.max_length
        out = self._encoder.encode(
            list(texts), max_length=length, return_dense=False, return_colbert=False, show_progress=False
        )
        return [{int(t): float(w) for t, w in row.items()} for row in out.sparse]

    # BaseSparseEmbedding
    def _get_query_embedding(self, query: str) -> dict[int, float]:
        return self._sparse([query], query=True)[0]

    def _get_text_embedding(self, text: str) -> dict[int, float]:
        return self._sparse([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[dict[int, float]]:
        return self._sparse(texts)

    async def _aget_query_embedding(self, query: str) -> dict[int, float]:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> dict[int, float]:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[dict[int, float]]:
        return await asyncio.get_running_loop().run_in_executor(None, self._get_text_embeddings, texts)

    # QdrantVectorStore: (indices, values) per text
    @staticmethod
    def _split(rows: list[dict[int, float]]) -> tuple[list[list[int]], list[list[float]]]:
        return [list(r) for r in rows], [list(r.values()) for r in rows]

    def sparse_doc_fn(self, texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        """``QdrantVectorStore``'s ``sparse_doc_fn``: token ids and weights per document."""
        return self._split(self._sparse(texts))

    def sparse_query_fn(self, texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        """``QdrantVectorStore``'s ``sparse_query_fn``: token ids and weights per query."""
        return self._split(self._sparse(texts, query=True))

    def qdrant_kwargs(self) -> dict[str, Any]:
        """``QdrantVectorStore(**sparse.qdrant_kwargs())``: hybrid on, M3 for both sparse functions."""
        return {"enable_hybrid": True, "sparse_doc_fn": self.sparse_doc_fn, "sparse_query_fn": self.sparse_query_fn}

    # MilvusVectorStore: BaseSparseEmbeddingFunction
    def encode_documents(self, documents: list[str]) -> list[dict[int, float]]:
        return self._sparse(documents)

    def encode_queries(self, queries: list[str]) -> list[dict[int, float]]:
        return self._sparse(queries, query=True)

    async def async_encode_documents(self, documents: list[str]) -> list[dict[int, float]]:
        return await asyncio.get_running_loop().run_in_executor(None, self.encode_documents, documents)

    async def async_encode_queries(self, queries: list[str]) -> list[dict[int, float]]:
        return await asyncio.get_running_loop().run_in_executor(None, self.encode_queries, queries)


def _register_milvus_sparse_function() -> None:
    import importlib.util

    try:
        if importlib.util.find_spec("llama_index.vector_stores.milvus") is None:
            return
        from llama_index.vector_stores.milvus.utils import BaseSparseEmbeddingFunction  # type: ignore[import-not-found]

        BaseSparseEmbeddingFunction.register(M3LlamaSparseEmbedding)
    except Exception:  # noqa: BLE001, S110 - optional package, or one whose layout changed
        pass


_register_milvus_sparse_function()

"""LangChain integration: an M3 vector store, a hybrid retriever and embeddings.

The store encodes texts with BGE-M3 itself (dense + sparse + ColBERT in one pass),
so the LangChain ``embedding`` object only matters for :meth:`M3VectorStore.from_texts`,
where an :class:`M3DenseEmbeddings` supplies the encoder.

>>> from m3connect import M3Encoder, connect                                   # doctest: +SKIP
>>> from m3connect.integrations.langchain import M3VectorStore, M3Retriever  # doctest: +SKIP
>>> vs = M3VectorStore(connect("qdrant://:memory:", "docs", encoder=M3Encoder()))  # doctest: +SKIP
>>> vs.add_texts(["BGE-M3 is multilingual."], metadatas=[{"lang": "en"}])     # doctest: +SKIP
>>> vs.similarity_search("multilingual", k=3, weights=(0.4, 0.2, 0.4), filter={"lang": "en"})  # doctest: +SKIP
>>> M3Retriever(store=vs.store, k=5, weights=(1, 0.3, 1)).invoke("multilingual")  # doctest: +SKIP
>>> vs.similarity_search("multilingual", weights="sparse")                     # doctest: +SKIP
>>> vs.max_marginal_relevance_search("multilingual", k=3, fetch_k=20)          # doctest: +SKIP

``weights`` take ``(dense, sparse, colbert)`` numbers, a mapping, or a retrieval mode:
``"dense"`` ``(1, 0, 0)``, ``"sparse"`` ``(0, 1, 0)``, ``"colbert"`` ``(0, 0, 1)``, ``"hybrid"``
(dense + sparse, ``(0.4, 0.2, 0)``: M3's default weights without ColBERT, as FlagEmbedding's
``sparse+dense`` score) and ``"m3"`` / ``"all"`` ``(0.4, 0.2, 0.4)``; langchain-qdrant's and
langchain-milvus' ``RetrievalMode`` members are accepted by value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..defaults import DEFAULT_WEIGHTS
from ..errors import InvalidInputError, MissingDependencyError
from ..store import M3Store, connect
from ..types import Vectors

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables.config import run_in_executor
    from langchain_core.vectorstores import VectorStore
    from langchain_core.vectorstores.utils import maximal_marginal_relevance
    from pydantic import ConfigDict
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError.for_extra("langchain-core", "langchain") from exc

if TYPE_CHECKING:
    from ..encoder import M3Encoder
    from ..types import Hit

__all__ = [
    "M3VectorStore",
    "M3Retriever",
    "M3DenseEmbeddings",
    "M3SparseEmbeddings",
    "M3QdrantSparseEmbeddings",
    "SparseVector",
    "DEFAULT_WEIGHTS",
    "RETRIEVAL_MODES",
    "resolve_weights",
]

#: Named retrieval modes accepted wherever ``weights`` are: ``(dense, sparse, colbert)``.
RETRIEVAL_MODES: dict[str, tuple[float, float, float]] = {
    "dense": (1.0, 0.0, 0.0),
    "sparse": (0.0, 1.0, 0.0),
    "colbert": (0.0, 0.0, 1.0),
    "hybrid": (DEFAULT_WEIGHTS[0], DEFAULT_WEIGHTS[1], 0.0),  # dense + sparse
    "m3": DEFAULT_WEIGHTS,
    "all": DEFAULT_WEIGHTS,
}
_SEARCH_KEYS = ("weights", "filter", "fusion", "candidate_depth")
_DELETE_BATCH = 1000  # ids listed and deleted per round of delete(ids=None) (M3Store.clear)


def resolve_weights(weights: Any) -> Any:
    """``weights`` with a retrieval-mode name (or ``RetrievalMode`` enum) turned into numbers.

    Numbers and mappings pass through unchanged (the store checks them).
    """
    if isinstance(weights, Enum):
        weights = weights.value
    if isinstance(weights, str):
        try:
            return RETRIEVAL_MODES[weights.strip().lower()]
        except KeyError:
            raise InvalidInputError(
                f"unknown retrieval mode {weights!r}; use one of {sorted(RETRIEVAL_MODES)} or "
                "(dense, sparse, colbert) weights"
            ) from None
    return weights


def _exists(store: M3Store) -> bool:
    """Whether the collection exists: one that ``connect`` has not created yet (it is created by the
    first write) holds nothing, so reads of it find nothing, as LangChain expects of an empty store."""
    return bool(getattr(store, "exists", True))


def _search_options(kwargs: Mapping[str, Any], weights: Any) -> dict[str, Any]:
    """Pick the M3 search options out of LangChain's ``**kwargs``; refuse unknown ones."""
    unknown = set(kwargs) - set(_SEARCH_KEYS)
    if unknown:
        raise InvalidInputError(f"unknown search options {sorted(unknown)}; use {list(_SEARCH_KEYS)}")
    opts = {key: kwargs[key] for key in _SEARCH_KEYS if kwargs.get(key) is not None}
    opts["weights"] = resolve_weights(opts.get("weights", weights))
    return opts


# -- embeddings ------------------------------------------------------------------------------


class M3DenseEmbeddings(Embeddings):
    """BGE-M3 dense vectors as LangChain ``Embeddings`` (L2-normalised, inner-product ready)."""

    def __init__(self, encoder: M3Encoder, *, max_length: int | None = None) -> None:
        self.encoder = encoder
        self.max_length = max_length

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        out = self.encoder.encode(
            list(texts), max_length=self.max_length, return_sparse=False, return_colbert=False, show_progress=False
        )
        assert out.dense is not None
        vectors: list[list[float]] = out.dense.astype(float).tolist()
        return vectors

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class M3SparseEmbeddings:
    """BGE-M3 lexical weights as ``{token_id: weight}`` dicts.

    This is the shape ``langchain_milvus``'s ``BaseSparseEmbedding`` asks for
    (``embed_query`` → ``dict[int, float]``, ``embed_documents`` → a list of them);
    when ``langchain_milvus`` is installed the class is registered as one.
    :meth:`as_qdrant_sparse` gives the ``langchain_qdrant.SparseEmbeddings`` shape.
    """

    def __init__(self, encoder: M3Encoder, *, max_length: int | None = None) -> None:
        self.encoder = encoder
        self.max_length = max_length

    def embed_documents(self, texts: list[str]) -> list[dict[int, float]]:
        out = self.encoder.encode(
            list(texts), max_length=self.max_length, return_dense=False, return_colbert=False, show_progress=False
        )
        assert out.sparse is not None
        return [{int(t): float(w) for t, w in weights.items()} for weights in out.sparse]

    def embed_query(self, text: str) -> dict[int, float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[dict[int, float]]:
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> dict[int, float]:
        return await run_in_executor(None, self.embed_query, text)

    def as_qdrant_sparse(self) -> M3QdrantSparseEmbeddings:
        """The same weights as ``SparseVector(indices, values)`` objects (``langchain_qdrant``)."""
        return M3QdrantSparseEmbeddings(self)


try:  # langchain_qdrant's own SparseVector when available, else a look-alike
    from langchain_qdrant import SparseVector
except Exception:  # noqa: BLE001 - any import failure means "not installed"

    @dataclass
    class SparseVector:  # type: ignore[no-redef]
        """``indices``/``values`` like ``langchain_qdrant.SparseVector``."""

        indices: list[int] = field(default_factory=list)
        values: list[float] = field(default_factory=list)


class M3QdrantSparseEmbeddings:
    """BGE-M3 lexical weights in the ``langchain_qdrant.SparseEmbeddings`` shape."""

    def __init__(self, sparse: M3SparseEmbeddings) -> None:
        self.sparse = sparse

    @staticmethod
    def _vector(weights: Mapping[int, float]) -> Any:
        return SparseVector(indices=list(weights), values=list(weights.values()))

    def embed_documents(self, texts: list[str]) -> list[Any]:
        return [self._vector(w) for w in self.sparse.embed_documents(texts)]

    def embed_query(self, text: str) -> Any:
        return self._vector(self.sparse.embed_query(text))

    async def aembed_documents(self, texts: list[str]) -> list[Any]:
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> Any:
        return await run_in_executor(None, self.embed_query, text)


def _register_virtual_subclasses() -> None:
    try:
        from langchain_milvus.utils.sparse import BaseSparseEmbedding

        BaseSparseEmbedding.register(M3SparseEmbeddings)
    except Exception:  # noqa: BLE001, S110 - optional package
        pass
    try:
        from langchain_qdrant import SparseEmbeddings

        SparseEmbeddings.register(M3QdrantSparseEmbeddings)
    except Exception:  # noqa: BLE001, S110 - optional package
        pass


_register_virtual_subclasses()


# -- vector store ----------------------------------------------------------------------------


def _to_document(hit: Hit) -> Document:
    return Document(id=hit.id, page_content=hit.text or "", metadata=dict(hit.metadata))


class M3VectorStore(VectorStore):
    """A LangChain ``VectorStore`` over any :class:`~m3connect.M3Store`.

    Searches take M3 options as keyword arguments: ``weights=(dense, sparse, colbert)`` or a
    retrieval mode (``"dense"``, ``"sparse"``, ``"hybrid"``, ``"m3"``...; see the module),
    ``filter`` (m3connect filter dict), ``fusion`` (``"exact"``, ``"engine"``, ``"rrf"``)
    and ``candidate_depth``. Returned documents carry exactly the stored metadata;
    scores come from :meth:`similarity_search_with_score` (or :class:`M3Retriever`,
    which adds them to the metadata). ``retrieval_mode=`` (as in langchain-qdrant) sets the
    default weights by name.
    """

    def __init__(
        self,
        store: M3Store,
        *,
        weights: Sequence[float] | Mapping[str, float] | str = DEFAULT_WEIGHTS,
        retrieval_mode: str | Enum | None = None,
    ) -> None:
        if not isinstance(store, M3Store):
            raise InvalidInputError(f"store must be an M3Store, got {type(store).__name__}")
        self.store = store
        self.weights = resolve_weights(weights if retrieval_mode is None else retrieval_mode)

    @property
    def embeddings(self) -> M3DenseEmbeddings | None:
        encoder = self.store.encoder
        # M3DenseEmbeddings passes return_sparse/return_colbert, which M3Encoder, OnnxM3Encoder and
        # RemoteEncoder take but the Encoder protocol does not declare
        if encoder is None:
            return None
        return M3DenseEmbeddings(cast("M3Encoder", encoder), max_length=self.store.max_length)

    # -- writing ----------------------------------------------------------------------------

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Encode and upsert texts; a missing id (``None``) derives from the content."""
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise InvalidInputError(f"got {len(metadatas)} metadatas for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise InvalidInputError(f"got {len(ids)} ids for {len(texts)} texts")
        if ids is not None and any(i is None for i in ids):
            # the store takes ids for every text or none: give it per-text records instead
            metas = metadatas if metadatas is not None else [None] * len(texts)
            items = [{"text": t, "id": i, "metadata": m} for t, i, m in zip(texts, ids, metas)]
            return self.store.add(items, **kwargs)
        no_none = cast("Sequence[str] | None", ids)  # all ids given, or none
        return self.store.add(texts, ids=no_none, metadata=metadatas, **kwargs)

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        return await run_in_executor(None, self.add_texts, list(texts), metadatas, ids=ids, **kwargs)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete by id (unknown ids are ignored); ``ids=None`` deletes every document.

        Deleting everything keeps the collection and its schema (``store.drop()`` removes it).
        """
        if ids is None:
            self._delete_all()
        else:
            self.store.delete(list(ids))
        return True

    def _delete_all(self) -> None:
        # the engine's id cursor, no search window; a collection not created yet holds nothing
        self.store.clear(batch_size=_DELETE_BATCH)

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        return await run_in_executor(None, self.delete, ids, **kwargs)

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        if not _exists(self.store):
            return []
        return [Document(id=d.id, page_content=d.text, metadata=dict(d.metadata)) for d in self.store.get(list(ids))]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return await run_in_executor(None, self.get_by_ids, ids)

    # -- searching --------------------------------------------------------------------------

    def _hits(self, query: str, k: int, kwargs: Mapping[str, Any]) -> list[Hit]:
        opts = _search_options(kwargs, self.weights)
        return self.store.search(query, k=k, **opts) if _exists(self.store) else []

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [_to_document(h) for h in self._hits(query, k, kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """Documents with their M3 score (higher is better; exact weighted M3 by default)."""
        return [(_to_document(h), h.score) for h in self._hits(query, k, kwargs)]

    def _select_relevance_score_fn(self) -> Any:
        # M3 scores are similarities already (higher is better), not distances.
        return lambda score: score

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        """Dense-only search with a precomputed dense vector (weights ``(1, 0, 0)``)."""
        opts = _search_options(kwargs, (1.0, 0.0, 0.0))
        opts["weights"] = (1.0, 0.0, 0.0)
        if not _exists(self.store):
            return []
        hits = self.store.search_by_vectors(Vectors(dense=np.asarray(embedding, np.float32)), k=k, **opts)
        return [_to_document(h) for h in hits]

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return await run_in_executor(None, self.similarity_search, query, k, **kwargs)

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        return await run_in_executor(None, self.similarity_search_with_score, query, k, **kwargs)

    async def asimilarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return await run_in_executor(None, self.similarity_search_by_vector, embedding, k, **kwargs)

    # -- maximal marginal relevance ---------------------------------------------------------

    def max_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """``fetch_k`` candidates by M3 search (``weights``, ``filter``... as in
        :meth:`similarity_search`), then ``k`` of them chosen by maximal marginal relevance over
        the stored dense vectors: relevance is the dense similarity to the query, diversity the
        dense similarity between documents (``lambda_mult`` 1 = relevance only, 0 = diversity only).
        """
        opts = _search_options(kwargs, self.weights)
        encoder = self.store.encoder
        if encoder is None:
            raise InvalidInputError("max_marginal_relevance_search needs the store's encoder; pass encoder= to connect")
        if not _exists(self.store):
            return []
        q = encoder.encode_one(query, max_length=self.store.max_length)
        hits = self.store.search_by_vectors(q, k=max(fetch_k, k), **opts)
        return self._mmr(q.dense, hits, k, lambda_mult)

    def max_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search` with a dense query vector: dense candidates only."""
        opts = _search_options(kwargs, (1.0, 0.0, 0.0))
        opts["weights"] = (1.0, 0.0, 0.0)
        dense = np.asarray(embedding, np.float32)
        if not _exists(self.store):
            return []
        hits = self.store.search_by_vectors(Vectors(dense=dense), k=max(fetch_k, k), **opts)
        return self._mmr(dense, hits, k, lambda_mult)

    def _mmr(self, query_dense: Any, hits: list[Hit], k: int, lambda_mult: float) -> list[Document]:
        if not hits:
            return []
        if query_dense is None:
            raise InvalidInputError("maximal marginal relevance needs a dense query vector")
        stored = {d.id: d.vectors.dense for d in self.store.get([h.id for h in hits], vectors=("dense",)) if d.vectors}
        hits = [h for h in hits if stored.get(h.id) is not None]
        vectors = [np.asarray(stored[h.id], np.float32) for h in hits]
        # langchain types the list as list[list[float]]; it only hands it to numpy, so arrays do
        chosen = maximal_marginal_relevance(np.asarray(query_dense, np.float32), vectors, lambda_mult, k)  # type: ignore[arg-type]
        return [_to_document(hits[i]) for i in chosen]

    async def amax_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        return await run_in_executor(
            None, self.max_marginal_relevance_search, query, k, fetch_k, lambda_mult, **kwargs
        )

    async def amax_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        return await run_in_executor(
            None, self.max_marginal_relevance_search_by_vector, embedding, k, fetch_k, lambda_mult, **kwargs
        )

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        uri: str = "qdrant://:memory:",
        collection: str = "langchain",
        encoder: M3Encoder | None = None,
        weights: Sequence[float] | Mapping[str, float] | str = DEFAULT_WEIGHTS,
        retrieval_mode: str | Enum | None = None,
        **connect_options: Any,
    ) -> M3VectorStore:
        """Open ``collection`` at ``uri`` and add ``texts``.

        The encoder comes from ``encoder`` or from an :class:`M3DenseEmbeddings` passed as
        ``embedding``; any other ``Embeddings`` is refused, since the store needs all
        three M3 representations.
        """
        if encoder is None:
            encoder = getattr(embedding, "encoder", None)
        if encoder is None:
            raise InvalidInputError(
                "M3VectorStore.from_texts needs an M3 encoder: pass embedding=M3DenseEmbeddings(encoder) "
                "or encoder=M3Encoder(...)"
            )
        store = connect(uri, collection, encoder, **connect_options)
        vs = cls(store, weights=weights, retrieval_mode=retrieval_mode)
        if texts:
            vs.add_texts(texts, metadatas, ids=ids)
        return vs

    @classmethod
    async def afrom_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> M3VectorStore:
        return await run_in_executor(None, lambda: cls.from_texts(texts, embedding, metadatas, **kwargs))


# -- retriever -------------------------------------------------------------------------------


class M3Retriever(BaseRetriever):
    """Hybrid M3 retriever: ``invoke(query)`` returns the top-``k`` documents.

    Each document's metadata is the stored metadata plus ``m3_score`` (the fused
    score) and ``m3_scores`` (per-route ``dense``/``sparse``/``colbert`` scores).
    ``weights`` may be a retrieval mode (``"dense"``, ``"sparse"``, ``"hybrid"``, ``"m3"``...).
    ``invoke`` also accepts ``k``, ``weights``, ``filter``, ``fusion`` overrides.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    store: Any
    k: int = 4
    weights: Any = DEFAULT_WEIGHTS
    filter: dict[str, Any] | None = None
    fusion: str = "exact"
    candidate_depth: int | None = None

    def _store(self) -> M3Store:
        store = self.store.store if isinstance(self.store, M3VectorStore) else self.store
        if not isinstance(store, M3Store):
            raise InvalidInputError(f"store must be an M3Store or M3VectorStore, got {type(store).__name__}")
        return store

    def _search(self, query: str, **overrides: Any) -> list[Document]:
        unknown = set(overrides) - {"k", *_SEARCH_KEYS}
        if unknown:
            raise InvalidInputError(f"unknown retriever options {sorted(unknown)}")
        k = overrides.get("k", self.k)
        store = self._store()
        if not _exists(store):
            return []
        hits = store.search(
            query,
            k=k,
            weights=resolve_weights(overrides.get("weights", self.weights)),
            filter=overrides.get("filter", self.filter),
            fusion=overrides.get("fusion", self.fusion),
            candidate_depth=overrides.get("candidate_depth", self.candidate_depth),
        )
        docs = []
        for h in hits:
            metadata = {**h.metadata, "m3_score": h.score, "m3_scores": dict(h.scores)}
            docs.append(Document(id=h.id, page_content=h.text or "", metadata=metadata))
        return docs

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return self._search(query, **kwargs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return await run_in_executor(None, self._search, query, **kwargs)

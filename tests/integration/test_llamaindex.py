"""LlamaIndex integration: a VectorStoreIndex over M3LlamaVectorStore, end to end.

Every retrieval is checked against the store's own ranking (``M3Store.search`` with the
weights the query mode maps to): same ids in the same order, same text, same metadata.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.schema import QueryBundle  # noqa: E402
from llama_index.core.vector_stores.types import (  # noqa: E402
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from m3connect import FilterError, connect  # noqa: E402
from m3connect.integrations.llamaindex import (  # noqa: E402
    M3LlamaEmbedding,
    M3LlamaRetriever,
    M3LlamaVectorStore,
    metadata_filters_to_m3,
    weights_for_mode,
)
from m3connect.testing import sample_corpus  # noqa: E402

pytestmark = pytest.mark.integration

QUERY = "dense and sparse vectors in one engine"  # has non-empty sparse weights under the tiny model
USER_KEYS = {"lang", "topic", "n"}


def _milvus_available() -> bool:
    try:
        importlib.import_module("m3connect.adapters.milvus")
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.fixture(scope="module", params=["qdrant", "milvus"])
def built(request: pytest.FixtureRequest, encoder: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """(index, vector store) over the sample corpus, one per engine for the module."""
    if request.param == "milvus":
        if not _milvus_available():
            pytest.skip("m3connect.adapters.milvus is not importable yet")
        uri = f"milvus://{tmp_path_factory.mktemp('li-milvus') / 'm3.db'}"
    else:
        uri = "qdrant://:memory:"
    store = connect(uri, collection=f"li_{uuid.uuid4().hex[:12]}", encoder=encoder)
    vs = M3LlamaVectorStore(store=store)
    docs = [
        Document(text=d["text"], id_=d["id"], metadata={"lang": d["lang"], "topic": d["topic"], "n": i})
        for i, d in enumerate(sample_corpus())
    ]
    index = VectorStoreIndex.from_documents(
        docs,
        storage_context=StorageContext.from_defaults(vector_store=vs),
        embed_model=M3LlamaEmbedding(encoder=encoder),
    )
    try:
        yield index, vs
    finally:
        store.drop()
        store.close()


def _same_ranking(nodes: list[Any], hits: list[Any]) -> None:
    assert [n.node.node_id for n in nodes] == [h.id for h in hits]
    assert [n.node.get_content() for n in nodes] == [h.text for h in hits]
    assert [n.score for n in nodes] == pytest.approx([h.score for h in hits])
    for n, h in zip(nodes, hits):
        assert n.node.metadata == {k: h.metadata[k] for k in USER_KEYS}
        assert n.node.ref_doc_id == h.metadata["ref_doc_id"]


@pytest.mark.parametrize(
    ("mode", "alpha", "weights"),
    [
        ("default", None, (1.0, 0.0, 0.0)),
        ("sparse", None, (0.0, 1.0, 0.0)),
        ("hybrid", None, (0.4, 0.2, 0.4)),
        ("hybrid", 0.5, (0.25, 0.5, 0.25)),
    ],
)
def test_query_modes_match_store_ranking(built: Any, mode: str, alpha: float | None, weights: tuple) -> None:
    index, vs = built
    assert weights_for_mode(mode, alpha) == pytest.approx(weights)
    kwargs = {} if alpha is None else {"alpha": alpha}
    retriever = index.as_retriever(vector_store_query_mode=mode, similarity_top_k=5, **kwargs)
    nodes = retriever.retrieve(QUERY)
    hits = vs.store.search(QUERY, k=5, weights=weights)
    assert len(hits) == 5
    _same_ranking(nodes, hits)


def test_filters_match_store_ranking(built: Any) -> None:
    index, vs = built
    filters = MetadataFilters(
        filters=[
            MetadataFilter(key="lang", value=["en", "fr"], operator=FilterOperator.IN),
            MetadataFilters(
                filters=[
                    MetadataFilter(key="n", value=5, operator=FilterOperator.LT),
                    MetadataFilter(key="n", value=30, operator=FilterOperator.GTE),
                ],
                condition=FilterCondition.OR,
            ),
        ],
        condition=FilterCondition.AND,
    )
    m3_filter = metadata_filters_to_m3(filters)
    assert m3_filter == {"$and": [{"lang": {"$in": ["en", "fr"]}}, {"$or": [{"n": {"$lt": 5}}, {"n": {"$gte": 30}}]}]}
    retriever = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=6, filters=filters)
    nodes = retriever.retrieve(QUERY)
    hits = vs.store.search(QUERY, k=6, weights=(0.4, 0.2, 0.4), filter=m3_filter)
    assert hits
    _same_ranking(nodes, hits)
    for n in nodes:
        assert n.node.metadata["lang"] in ("en", "fr")
        assert n.node.metadata["n"] < 5 or n.node.metadata["n"] >= 30

    eq = MetadataFilters(filters=[MetadataFilter(key="topic", value="milvus")])
    nodes = index.as_retriever(similarity_top_k=3, filters=eq).retrieve(QUERY)
    assert nodes and all(n.node.metadata["topic"] == "milvus" for n in nodes)
    _same_ranking(nodes, vs.store.search(QUERY, k=3, weights=(1, 0, 0), filter={"topic": "milvus"}))

    with pytest.raises(FilterError):
        metadata_filters_to_m3(MetadataFilters(filters=[MetadataFilter(key="n", value=1, operator=FilterOperator.NE)]))


def test_m3_retriever_and_embedding_query(built: Any, encoder: Any) -> None:
    _, vs = built
    retriever = M3LlamaRetriever(vs, k=4, weights=(1.0, 0.3, 1.0), filters={"lang": "en"})
    nodes = retriever.retrieve(QUERY)
    _same_ranking(nodes, vs.store.search(QUERY, k=4, weights=(1.0, 0.3, 1.0), filter={"lang": "en"}))

    # A query given only as a dense embedding searches the dense route alone.
    qvec = M3LlamaEmbedding(encoder=encoder).get_query_embedding(QUERY)
    result = vs.query(VectorStoreQuery(query_embedding=qvec, similarity_top_k=4))
    assert result.ids == [h.id for h in vs.store.search(QUERY, k=4, weights=(1, 0, 0))]


async def test_async_query_and_retrieve(built: Any) -> None:
    index, vs = built
    q = VectorStoreQuery(query_str=QUERY, similarity_top_k=3, mode=VectorStoreQueryMode.HYBRID)
    result = await vs.aquery(q)
    assert result.ids == [h.id for h in vs.store.search(QUERY, k=3)]
    nodes = await index.as_retriever(vector_store_query_mode="sparse", similarity_top_k=3).aretrieve(QUERY)
    assert [n.node.node_id for n in nodes] == [h.id for h in vs.store.search(QUERY, k=3, weights=(0, 1, 0))]
    retr = M3LlamaRetriever(vs.store, k=2)
    nodes = await retr.aretrieve(QueryBundle(QUERY))
    assert [n.node.node_id for n in nodes] == [h.id for h in vs.store.search(QUERY, k=2)]


async def test_add_get_and_delete_by_ref_doc(built: Any) -> None:
    index, vs = built
    before = vs.store.count()
    extra = [
        Document(text="temporary note about rivers", id_="tmp-doc", metadata={"lang": "en", "topic": "tmp", "n": 100}),
        Document(text="another temporary note", id_="tmp-doc-2", metadata={"lang": "en", "topic": "tmp", "n": 101}),
    ]
    for doc in extra:
        await index.ainsert(doc)
    assert vs.store.count() == before + 2
    tmp = vs.get_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="topic", value="tmp")]))
    assert sorted(n.ref_doc_id for n in tmp) == ["tmp-doc", "tmp-doc-2"]
    assert [n.get_content() for n in vs.get_nodes(node_ids=[tmp[0].node_id])] == [tmp[0].get_content()]

    index.delete_ref_doc("tmp-doc")
    assert vs.store.count() == before + 1
    await vs.adelete("tmp-doc-2")
    assert vs.store.count() == before
    hits = vs.store.search("temporary note", k=5, filter={"topic": "tmp"})
    assert hits == []


# -- sparse_top_k and the sparse embedding ----------------------------------------------------


def test_sparse_top_k(built: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    index, vs = built
    depths: list[Any] = []
    search = vs.store.search

    def spy(*args: Any, **kwargs: Any) -> Any:
        depths.append(kwargs.get("candidate_depth"))
        return search(*args, **kwargs)

    monkeypatch.setattr(vs.store, "search", spy)
    sparse_q = VectorStoreQuery(query_str=QUERY, mode=VectorStoreQueryMode.SPARSE, similarity_top_k=5, sparse_top_k=3)
    assert vs.query(sparse_q).ids == [h.id for h in vs.store.search(QUERY, k=3, weights=(0, 1, 0))]
    nodes = index.as_retriever(vector_store_query_mode="sparse", similarity_top_k=5, sparse_top_k=2).retrieve(QUERY)
    assert [n.node.node_id for n in nodes] == [h.id for h in vs.store.search(QUERY, k=2, weights=(0, 1, 0))]

    # hybrid: sparse_top_k widens the candidates of each route; k stays similarity_top_k / hybrid_top_k
    hybrid_q = VectorStoreQuery(query_str=QUERY, mode=VectorStoreQueryMode.HYBRID, similarity_top_k=4, sparse_top_k=300)
    expected = search(QUERY, k=4, weights=(0.4, 0.2, 0.4), candidate_depth=300)
    depths.clear()
    assert vs.query(hybrid_q).ids == [h.id for h in expected]
    assert depths == [300]
    hybrid_q = VectorStoreQuery(
        query_str=QUERY, mode=VectorStoreQueryMode.HYBRID, similarity_top_k=4, hybrid_top_k=2, sparse_top_k=3
    )
    depths.clear()
    assert vs.query(hybrid_q).ids == [h.id for h in search(QUERY, k=2)]
    assert depths == [100]  # the store's default depth, max(100, 10 k), is larger


async def test_sparse_embedding_shapes(encoder: Any) -> None:
    from llama_index.core.base.embeddings.base_sparse import BaseSparseEmbedding

    from m3connect.integrations.llamaindex import M3LlamaSparseEmbedding

    sparse = M3LlamaSparseEmbedding(encoder=encoder, query_max_length=6)
    assert isinstance(sparse, BaseSparseEmbedding)
    texts = [QUERY, "BGE-M3 handles long documents and many languages"]
    ref = encoder.encode(texts, return_dense=False, return_colbert=False).sparse
    docs = sparse.get_text_embedding_batch(texts)
    assert docs == [pytest.approx({int(k): float(v) for k, v in r.items()}) for r in ref]
    assert all(isinstance(k, int) and isinstance(v, float) for d in docs for k, v in d.items())
    # one text alone and in a padded batch agree to float32 rounding
    assert sparse.get_text_embedding(texts[0]) == pytest.approx(docs[0], rel=1e-5)
    assert await sparse.aget_text_embedding(texts[1]) == pytest.approx(docs[1], rel=1e-5)
    assert await sparse.aget_text_embedding_batch(texts) == docs

    short = encoder.encode([texts[1]], max_length=6, return_dense=False, return_colbert=False).sparse[0]
    assert sparse.get_query_embedding(texts[1]) == pytest.approx(short)  # queries cut at query_max_length
    assert await sparse.aget_query_embedding(texts[1]) == sparse.get_query_embedding(texts[1])

    indices, values = sparse.sparse_doc_fn(texts)
    assert [dict(zip(i, v)) for i, v in zip(indices, values)] == docs
    q_indices, q_values = sparse.sparse_query_fn([texts[1]])
    assert dict(zip(q_indices[0], q_values[0])) == sparse.get_query_embedding(texts[1])
    assert sparse.encode_documents(texts) == docs
    assert sparse.encode_queries([texts[1]]) == [sparse.get_query_embedding(texts[1])]
    assert await sparse.async_encode_documents(texts) == docs
    assert set(sparse.qdrant_kwargs()) == {"enable_hybrid", "sparse_doc_fn", "sparse_query_fn"}


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local Qdrant")
def test_native_qdrant_store_uses_m3_sparse(encoder: Any) -> None:
    """LlamaIndex's own QdrantVectorStore, hybrid, with M3 lexical weights as its sparse vectors."""
    pytest.importorskip("llama_index.vector_stores.qdrant")
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    from m3connect import scoring
    from m3connect.integrations.llamaindex import M3LlamaSparseEmbedding

    corpus = sample_corpus()[:20]
    sparse = M3LlamaSparseEmbedding(encoder=encoder)
    client = QdrantClient(":memory:")
    try:
        store = QdrantVectorStore(client=client, collection_name="native_m3", **sparse.qdrant_kwargs())
        docs = [Document(text=d["text"], id_=d["id"]) for d in corpus]  # no metadata: the sparse text is the text
        index = VectorStoreIndex.from_documents(
            docs,
            storage_context=StorageContext.from_defaults(vector_store=store),
            embed_model=M3LlamaEmbedding(encoder=encoder),
        )

        # sparse mode: Qdrant's ranking and scores are M3's lexical matching scores
        q = sparse.get_query_embedding(QUERY)
        weights = sparse.encode_documents([d["text"] for d in corpus])
        scored = [(scoring.sparse_score(q, w), d["id"]) for d, w in zip(corpus, weights)]
        expected = sorted(scored, key=lambda t: -t[0])[:4]
        nodes = index.as_retriever(vector_store_query_mode="sparse", similarity_top_k=4, sparse_top_k=4).retrieve(QUERY)
        assert [n.node.ref_doc_id for n in nodes] == [doc_id for _, doc_id in expected]
        assert [n.score for n in nodes] == pytest.approx([s for s, _ in expected], rel=1e-5)

        # hybrid mode: a stored text finds its own document first
        target = corpus[7]
        nodes = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=3, sparse_top_k=3).retrieve(
            target["text"]
        )
        assert nodes[0].node.ref_doc_id == target["id"]
    finally:
        client.close()


def test_store_not_written_yet_reads_empty(encoder: Any) -> None:
    store = connect("qdrant://:memory:", collection=f"li_{uuid.uuid4().hex[:12]}", encoder=encoder)
    vs = M3LlamaVectorStore(store=store)
    q = VectorStoreQuery(query_str=QUERY, similarity_top_k=3, mode=VectorStoreQueryMode.HYBRID)
    assert vs.query(q).ids == []
    assert vs.get_nodes(node_ids=["x"]) == []
    assert vs.get_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="lang", value="en")])) == []
    vs.clear()
    vs.delete("x")
    assert M3LlamaRetriever(vs, k=2).retrieve(QUERY) == []

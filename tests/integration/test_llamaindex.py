"""LlamaIndex integration: a VectorStoreIndex over M3LlamaVectorStore, end to end.

Every retrieval is checked against the store's own ranking (``M3Store.search`` with the
weights the query mode maps to): same ids in the same order, same text, same metadata.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Iterator
from pathlib import Path
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

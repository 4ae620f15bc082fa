"""LangChain integration: the standard LangChain suites plus M3-specific checks.

The standard ``VectorStoreIntegrationTests`` normally embed with ``get_embeddings()``
(``DeterministicFakeEmbedding``). ``M3VectorStore`` does not take an embedding: it
encodes dense + sparse + ColBERT itself with the store's M3 encoder, here the tiny
random checkpoint of the session. The suite's ordering assertions only ask that a
document whose text equals the query ranks first, which holds for M3 whatever the
weights (a text's dense and ColBERT self-similarities are the maximum 1.0), so no
standard test needs overriding.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.vectorstores.utils import maximal_marginal_relevance  # noqa: E402
from langchain_tests.integration_tests import (  # noqa: E402
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)
from langchain_tests.unit_tests import EmbeddingsUnitTests  # noqa: E402

from m3connect import connect  # noqa: E402
from m3connect.integrations import langchain as m3_langchain  # noqa: E402
from m3connect.integrations.langchain import (  # noqa: E402
    RETRIEVAL_MODES,
    M3DenseEmbeddings,
    M3Retriever,
    M3SparseEmbeddings,
    M3VectorStore,
)
from m3connect.testing import sample_corpus  # noqa: E402

pytestmark = pytest.mark.integration


def _milvus_available() -> bool:
    try:
        importlib.import_module("m3connect.adapters.milvus")
    except Exception:  # noqa: BLE001 - adapter missing or its deps not installed
        return False
    return True


@pytest.fixture(scope="module")
def milvus_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lc-milvus") / "m3.db"


def _uri(engine: str, milvus_db: Path) -> str:
    if engine == "milvus":
        if not _milvus_available():
            pytest.skip("m3connect.adapters.milvus is not importable yet")
        return f"milvus://{milvus_db}"
    return "qdrant://:memory:"


def _fresh_store(engine: str, milvus_db: Path, encoder: Any):
    return connect(_uri(engine, milvus_db), collection=f"lc_{uuid.uuid4().hex[:12]}", encoder=encoder)


@pytest.fixture(scope="module")
def corpus_stores(encoder: Any, milvus_db: Path) -> Iterator[dict[str, Any]]:
    """One read-mostly collection per engine holding the sample corpus, built on first use."""
    built: dict[str, Any] = {}

    def get(engine: str):
        if engine not in built:
            store = _fresh_store(engine, milvus_db, encoder)
            docs = sample_corpus()
            store.add(
                [d["text"] for d in docs],
                ids=[d["id"] for d in docs],
                metadata=[{"lang": d["lang"], "topic": d["topic"]} for d in docs],
            )
            built[engine] = store
        return built[engine]

    yield get  # type: ignore[misc]
    for store in built.values():
        store.drop()
        store.close()


# -- standard suites ------------------------------------------------------------------------


class _M3VectorStoreStandard(VectorStoreIntegrationTests):
    engine = "qdrant"

    @pytest.fixture()
    def vectorstore(self, encoder: Any, milvus_db: Path) -> Iterator[M3VectorStore]:  # type: ignore[override]
        store = _fresh_store(self.engine, milvus_db, encoder)
        try:
            yield M3VectorStore(store)
        finally:
            store.drop()
            store.close()


class TestM3VectorStoreQdrant(_M3VectorStoreStandard):
    engine = "qdrant"


class TestM3VectorStoreMilvus(_M3VectorStoreStandard):
    engine = "milvus"


class _M3RetrieverStandard(RetrieversIntegrationTests):
    engine = "qdrant"

    @pytest.fixture(autouse=True)
    def _corpus_store(self, corpus_stores: Any) -> None:
        # retriever_constructor_params is a property, not a fixture: hand it the store here.
        type(self)._store = corpus_stores(self.engine)

    @property
    def retriever_constructor(self) -> type[M3Retriever]:
        return M3Retriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"store": type(self)._store, "k": 2, "weights": (0.4, 0.2, 0.4)}

    @property
    def retriever_query_example(self) -> str:
        return "sparse vectors in an inverted index"


class TestM3RetrieverQdrant(_M3RetrieverStandard):
    engine = "qdrant"


class TestM3RetrieverMilvus(_M3RetrieverStandard):
    engine = "milvus"


class _EncoderParams:
    """``embedding_model_params`` is a property, not a fixture: hand it the session encoder here."""

    @pytest.fixture(autouse=True)
    def _session_encoder(self, encoder: Any) -> None:
        type(self)._encoder = encoder

    @property
    def embeddings_class(self) -> type[M3DenseEmbeddings]:
        return M3DenseEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"encoder": type(self)._encoder}


class TestM3DenseEmbeddingsUnit(_EncoderParams, EmbeddingsUnitTests):
    pass


class TestM3DenseEmbeddingsIntegration(_EncoderParams, EmbeddingsIntegrationTests):
    pass


# -- M3-specific ----------------------------------------------------------------------------


@pytest.fixture(params=["qdrant", "milvus"])
def corpus_vs(request: pytest.FixtureRequest, corpus_stores: Any) -> M3VectorStore:
    return M3VectorStore(corpus_stores(request.param))


QUERY = "dense and sparse vectors in one engine"


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.4, 0.2, 0.4)])
def test_weights_and_filter_pass_through(corpus_vs: M3VectorStore, weights: tuple[float, float, float]) -> None:
    flt = {"lang": {"$in": ["en", "de"]}}
    expected = corpus_vs.store.search(QUERY, k=5, weights=weights, filter=flt)
    got = corpus_vs.similarity_search_with_score(QUERY, k=5, weights=weights, filter=flt)
    assert [d.id for d, _ in got] == [h.id for h in expected]
    assert [s for _, s in got] == pytest.approx([h.score for h in expected])
    assert all(d.metadata["lang"] in ("en", "de") for d, _ in got)
    # metadata comes back exactly as stored, no score keys added
    assert all(set(d.metadata) == {"lang", "topic"} for d, _ in got)

    retriever = M3Retriever(store=corpus_vs, k=5, weights=weights, filter=flt)
    docs = retriever.invoke(QUERY)
    assert [d.id for d in docs] == [h.id for h in expected]
    assert [d.metadata["m3_score"] for d in docs] == pytest.approx([h.score for h in expected])
    assert docs[0].metadata["m3_scores"] == pytest.approx(expected[0].scores)

    via_as_retriever = corpus_vs.as_retriever(search_kwargs={"k": 5, "weights": weights, "filter": flt})
    assert [d.id for d in via_as_retriever.invoke(QUERY)] == [h.id for h in expected]


def test_retriever_invoke_overrides(corpus_vs: M3VectorStore) -> None:
    retriever = M3Retriever(store=corpus_vs.store, k=3)
    docs = retriever.invoke(QUERY, k=2, weights=(0, 1, 0), filter={"topic": "milvus"})
    expected = corpus_vs.store.search(QUERY, k=2, weights=(0, 1, 0), filter={"topic": "milvus"})
    assert [d.id for d in docs] == [h.id for h in expected]
    assert all(d.metadata["topic"] == "milvus" for d in docs)


async def test_async_paths(corpus_vs: M3VectorStore) -> None:
    retriever = M3Retriever(store=corpus_vs, k=4, weights=(0.4, 0.2, 0.4))
    docs = await retriever.ainvoke(QUERY)
    expected = corpus_vs.store.search(QUERY, k=4)
    assert [d.id for d in docs] == [h.id for h in expected]
    found = await corpus_vs.asimilarity_search(QUERY, k=4, weights=(0.4, 0.2, 0.4))
    assert [d.id for d in found] == [h.id for h in expected]
    ids = await corpus_vs.aadd_texts(["an async text"], [{"lang": "en", "topic": "async"}], ids=["async-1"])
    assert ids == ["async-1"]
    assert (await corpus_vs.aget_by_ids(["async-1"]))[0].page_content == "an async text"
    await corpus_vs.adelete(["async-1"])
    assert await corpus_vs.aget_by_ids(["async-1"]) == []


def test_similarity_search_by_vector_is_dense_only(corpus_vs: M3VectorStore) -> None:
    emb = corpus_vs.embeddings
    assert isinstance(emb, M3DenseEmbeddings)
    qvec = emb.embed_query(QUERY)
    assert len(qvec) == corpus_vs.store.encoder.dense_dim
    docs = corpus_vs.similarity_search_by_vector(qvec, k=5, filter={"lang": "en"})
    expected = corpus_vs.store.search(QUERY, k=5, weights=(1, 0, 0), filter={"lang": "en"})
    assert [d.id for d in docs] == [h.id for h in expected]


def test_embeddings_shapes(encoder: Any) -> None:
    dense = M3DenseEmbeddings(encoder)
    docs = dense.embed_documents(["alpha beta", "gamma"])
    assert len(docs) == 2 and all(len(v) == encoder.dense_dim for v in docs)
    assert docs[0] == pytest.approx(dense.embed_query("alpha beta"), abs=1e-5)

    sparse = M3SparseEmbeddings(encoder)
    q = sparse.embed_query("dense sparse colbert")
    ref = encoder.encode_one("dense sparse colbert")["sparse"]
    assert q == pytest.approx({int(k): float(v) for k, v in ref.items()})
    assert all(isinstance(k, int) and isinstance(v, float) for k, v in q.items())
    assert len(sparse.embed_documents(["a", "b"])) == 2

    qdrant_shape = sparse.as_qdrant_sparse().embed_query("dense sparse colbert")
    assert dict(zip(qdrant_shape.indices, qdrant_shape.values)) == pytest.approx(q)
    assert len(sparse.as_qdrant_sparse().embed_documents(["a", "b"])) == 2


def test_from_texts(encoder: Any) -> None:
    vs = M3VectorStore.from_texts(
        ["red apple", "blue sky"],
        M3DenseEmbeddings(encoder),
        metadatas=[{"c": "red"}, {"c": "blue"}],
        ids=["a", "b"],
        uri="qdrant://:memory:",
        collection="from_texts",
    )
    assert vs.similarity_search("blue sky", k=1) == [Document(id="b", page_content="blue sky", metadata={"c": "blue"})]
    with pytest.raises(ValueError):
        M3VectorStore.from_texts(["x"], None, uri="qdrant://:memory:")


# -- delete all, maximal marginal relevance, retrieval modes ----------------------------------


@pytest.mark.parametrize("engine", ["qdrant", "milvus"])
def test_delete_without_ids_deletes_everything(
    engine: str, encoder: Any, milvus_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _fresh_store(engine, milvus_db, encoder)
    try:
        vs = M3VectorStore(store)
        assert vs.delete() is True  # nothing written yet
        monkeypatch.setattr(m3_langchain, "_DELETE_BATCH", 2)  # several rounds
        vs.add_texts([f"text number {i}" for i in range(5)], ids=[f"d{i}" for i in range(5)])
        assert store.count() == 5
        assert vs.delete(ids=None) is True
        assert store.count() == 0
        assert vs.get_by_ids([f"d{i}" for i in range(5)]) == []
        vs.add_texts(["written again"], ids=["again"])  # the collection is still there
        assert [d.id for d in vs.similarity_search("written again", k=3)] == ["again"]
    finally:
        store.drop()
        store.close()


def _mmr_oracle(vs: M3VectorStore, encoder: Any, query_dense: Any, hits: list[Any], k: int, lam: float) -> list[str]:
    """MMR over the candidates' dense vectors as the encoder computes them (not as stored)."""
    dense = encoder.encode([h.text for h in hits], max_length=vs.store.max_length).dense
    return [hits[i].id for i in maximal_marginal_relevance(query_dense, list(dense), lam, k)]


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.1])
def test_max_marginal_relevance(corpus_vs: M3VectorStore, encoder: Any, lam: float) -> None:
    store = corpus_vs.store
    q = encoder.encode_one(QUERY)
    for weights in [(0.4, 0.2, 0.4), "sparse"]:
        w = RETRIEVAL_MODES[weights] if isinstance(weights, str) else weights
        hits = store.search(QUERY, k=12, weights=w, filter={"lang": "en"})
        docs = corpus_vs.max_marginal_relevance_search(
            QUERY, k=4, fetch_k=12, lambda_mult=lam, weights=weights, filter={"lang": "en"}
        )
        assert [d.id for d in docs] == _mmr_oracle(corpus_vs, encoder, q.dense, hits, 4, lam)
        assert all(d.metadata["lang"] == "en" for d in docs)

    by_vector = corpus_vs.max_marginal_relevance_search_by_vector(q.dense.tolist(), k=4, fetch_k=12, lambda_mult=lam)
    dense_hits = store.search(QUERY, k=12, weights=(1, 0, 0))
    assert [d.id for d in by_vector] == _mmr_oracle(corpus_vs, encoder, q.dense, dense_hits, 4, lam)
    if lam == 1.0:  # relevance only: the dense ranking itself
        assert [d.id for d in by_vector] == [h.id for h in dense_hits[:4]]


async def test_max_marginal_relevance_drops_duplicates(encoder: Any, milvus_db: Path) -> None:
    store = _fresh_store("qdrant", milvus_db, encoder)
    try:
        vs = M3VectorStore(store, retrieval_mode="dense")
        docs = sample_corpus()[:15]
        vs.add_texts([d["text"] for d in docs], ids=[d["id"] for d in docs])
        top = vs.similarity_search(QUERY, k=1)[0]
        vs.add_texts([top.page_content], ids=["copy"])  # the same text, the same dense vector
        plain = [d.id for d in vs.similarity_search(QUERY, k=2)]
        assert sorted(plain) == sorted([top.id, "copy"])
        diverse = [d.id for d in vs.max_marginal_relevance_search(QUERY, k=2, fetch_k=10, lambda_mult=0.3)]
        assert len({top.id, "copy"} & set(diverse)) == 1
        retriever = vs.as_retriever(search_type="mmr", search_kwargs={"k": 2, "fetch_k": 10, "lambda_mult": 0.3})
        assert [d.id for d in retriever.invoke(QUERY)] == diverse
        found = await vs.amax_marginal_relevance_search(QUERY, k=2, fetch_k=10, lambda_mult=0.3)
        assert [d.id for d in found] == diverse
        assert vs.max_marginal_relevance_search(QUERY, k=2, filter={"lang": "none"}) == []
    finally:
        store.drop()
        store.close()


def test_retrieval_mode_aliases(corpus_vs: M3VectorStore) -> None:
    import enum

    class RetrievalMode(str, enum.Enum):  # langchain-qdrant's enum, by value
        DENSE = "dense"
        SPARSE = "sparse"
        HYBRID = "hybrid"

    store = corpus_vs.store
    expect = {
        "dense": (1, 0, 0),
        "sparse": (0, 1, 0),
        "colbert": (0, 0, 1),
        "hybrid": (0.4, 0.2, 0),
        "m3": (0.4, 0.2, 0.4),
        "all": (0.4, 0.2, 0.4),
    }
    assert set(RETRIEVAL_MODES) == set(expect)
    for mode, weights in expect.items():
        assert RETRIEVAL_MODES[mode] == pytest.approx(weights), mode
    for mode, weights in expect.items():
        want = [h.id for h in store.search(QUERY, k=4, weights=weights)]
        assert [d.id for d in corpus_vs.similarity_search(QUERY, k=4, weights=mode)] == want, mode
        assert [d.id for d in M3Retriever(store=store, k=4, weights=mode.upper()).invoke(QUERY)] == want, mode
    sparse_ids = [h.id for h in store.search(QUERY, k=3, weights=(0, 1, 0))]
    by_mode = M3VectorStore(store, retrieval_mode=RetrievalMode.SPARSE)
    assert [d.id for d in by_mode.similarity_search(QUERY, k=3)] == sparse_ids
    assert [d.id for d in M3VectorStore(store, weights="sparse").similarity_search(QUERY, k=3)] == sparse_ids
    assert [d.id for d in M3Retriever(store=store, k=3).invoke(QUERY, weights=RetrievalMode.SPARSE)] == sparse_ids
    with pytest.raises(ValueError, match="retrieval mode"):
        corpus_vs.similarity_search(QUERY, weights="semantic")
    with pytest.raises(ValueError, match="retrieval mode"):
        M3VectorStore(store, retrieval_mode="bm25")

"""The pymilvus hybrid-search tutorial, run as written with m3connect's BGEM3EmbeddingFunction.

milvus.io's "Hybrid Search with Milvus" tutorial embeds with milvus-model's
``BGEM3EmbeddingFunction``, inserts ``ef(docs)["dense"][i]`` and the csr row
``ef(docs)["sparse"][[i]]`` (or ``._getrow(i)``) into a FLOAT_VECTOR and a
SPARSE_FLOAT_VECTOR field, and runs ``hybrid_search`` with ``AnnSearchRequest`` and a
``WeightedRanker`` or ``RRFRanker``. Here the same flow runs on Milvus Lite with
``m3connect.compat.BGEM3EmbeddingFunction`` over the tiny test model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("milvus_lite")
pymilvus = pytest.importorskip("pymilvus")

from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker, WeightedRanker  # noqa: E402

from m3connect.compat import BGEM3EmbeddingFunction  # noqa: E402
from m3connect.testing import sample_corpus  # noqa: E402

pytestmark = pytest.mark.integration

COLLECTION = "hybrid_demo"


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory, encoder: Any) -> Any:
    """The tutorial's collection: pk, text, sparse_vector, dense_vector, filled from ``ef(docs)``."""
    ef = BGEM3EmbeddingFunction(encoder, use_fp16=False)
    docs = [d["text"] for d in sample_corpus()][:24]
    docs_embeddings = ef(docs)
    dense_dim = ef.dim["dense"]

    client = MilvusClient(str(Path(tmp_path_factory.mktemp("compat-milvus")) / "tutorial.db"))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("text", DataType.VARCHAR, max_length=2048)
    schema.add_field("sparse_vector", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("dense_vector", DataType.FLOAT_VECTOR, dim=dense_dim)
    index_params = client.prepare_index_params()
    index_params.add_index("sparse_vector", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    index_params.add_index("dense_vector", index_type="AUTOINDEX", metric_type="IP")
    client.create_collection(COLLECTION, schema=schema, index_params=index_params)

    # Half the rows as the MilvusClient tutorial writes them (csr[[i]]), half as the ORM one (_getrow).
    rows = [
        {
            "pk": i,
            "text": docs[i],
            "sparse_vector": docs_embeddings["sparse"][[i]] if i % 2 else docs_embeddings["sparse"]._getrow(i),
            "dense_vector": docs_embeddings["dense"][i],
        }
        for i in range(len(docs))
    ]
    client.insert(COLLECTION, rows)
    client.flush(COLLECTION)
    client.load_collection(COLLECTION)
    try:
        yield client, ef, docs, docs_embeddings
    finally:
        client.drop_collection(COLLECTION)
        client.close()


def _expected_top(ef_out: dict[str, Any], docs_out: dict[str, Any], route: str) -> int:
    """Index of the best document for the query on one route, computed in numpy."""
    if route == "dense":
        scores = np.stack(docs_out["dense"]) @ ef_out["dense"][0]
    else:
        scores = (docs_out["sparse"] @ ef_out["sparse"][[0]].T).toarray().ravel()
    return int(np.argmax(scores))


@pytest.mark.parametrize("doc_index", [3, 10, 17])
def test_tutorial_hybrid_search_finds_the_document(milvus: Any, doc_index: int) -> None:
    client, ef, docs, docs_embeddings = milvus
    query = docs[doc_index]
    query_embeddings = ef([query])
    # The query is a stored text: its own document is the best match on both routes.
    assert _expected_top(query_embeddings, docs_embeddings, "dense") == doc_index
    assert _expected_top(query_embeddings, docs_embeddings, "sparse") == doc_index

    dense_req = AnnSearchRequest([query_embeddings["dense"][0]], "dense_vector", {"metric_type": "IP"}, limit=10)
    sparse_row = query_embeddings["sparse"]._getrow(0)
    sparse_req = AnnSearchRequest([sparse_row], "sparse_vector", {"metric_type": "IP"}, limit=10)
    for ranker in (WeightedRanker(0.7, 1.0), RRFRanker()):
        res = client.hybrid_search(COLLECTION, [sparse_req, dense_req], ranker=ranker, limit=5, output_fields=["text"])
        assert len(res[0]) == 5
        assert res[0][0]["entity"]["text"] == query, type(ranker).__name__

    # The single-route searches of the tutorial, with the csr row as the sparse query.
    dense_hits = client.search(COLLECTION, [query_embeddings["dense"][0]], anns_field="dense_vector", limit=3,
                               search_params={"metric_type": "IP"}, output_fields=["text"])
    sparse_hits = client.search(COLLECTION, [query_embeddings["sparse"][[0]]], anns_field="sparse_vector", limit=3,
                                search_params={"metric_type": "IP"}, output_fields=["text"])
    assert dense_hits[0][0]["entity"]["text"] == query
    assert sparse_hits[0][0]["entity"]["text"] == query
    assert dense_hits[0][0]["distance"] == pytest.approx(1.0, abs=1e-4)  # normalised dense vectors
    weights = ef.encode_queries([query])["sparse"]
    assert sparse_hits[0][0]["distance"] == pytest.approx(float(weights.multiply(weights).sum()), rel=1e-4)

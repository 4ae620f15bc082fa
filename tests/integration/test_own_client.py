"""connect() with the user's own client object: used as it is, never created or closed by m3connect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import m3connect

TEXTS = ["Milvus keeps dense and sparse vectors.", "Qdrant stores ColBERT as a multivector.",
         "OpenSearch scores ColBERT with painless."]


def _round_trip(client, encoder) -> None:  # noqa: ANN001
    store = m3connect.connect(client, collection="own", encoder=encoder)
    store.add(TEXTS, ids=["m", "q", "o"])
    assert store.count() == 3
    assert store.search("multivector ColBERT in Qdrant", k=1)[0].id == "q"
    assert store.search("dense and sparse", k=3, fusion="engine")
    store.close()
    again = m3connect.connect(client, collection="own")  # the same client, still open
    assert again.count() == 3
    again.drop()
    again.close()


def test_milvus_client(tmp_path: Path, encoder) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "own.db"))
    _round_trip(client, encoder)
    assert "own" not in client.list_collections()  # the client still answers after store.close()
    client.close()


@pytest.mark.parametrize("where", [":memory:", "path"])
def test_qdrant_client(where: str, tmp_path: Path, encoder) -> None:
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:") if where == ":memory:" else QdrantClient(path=str(tmp_path / "q"))
    _round_trip(client, encoder)
    assert not client.collection_exists("own")
    client.close()


@pytest.mark.opensearch
@pytest.mark.skipif(os.environ.get("M3_SKIP_OPENSEARCH") == "1", reason="M3_SKIP_OPENSEARCH=1")
def test_opensearch_client(opensearch_url, encoder) -> None:  # noqa: ANN001
    from opensearchpy import OpenSearch

    client = OpenSearch(hosts=[opensearch_url])
    _round_trip(client, encoder)
    assert client.ping()
    client.close()


def test_other_objects_are_refused() -> None:
    with pytest.raises(m3connect.InvalidTypeError, match="MilvusClient, QdrantClient or OpenSearch"):
        m3connect.connect(object(), collection="own")

"""Store options and failure modes outside the shared conformance body."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

import m3connect
from m3connect.store import parse_uri

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "uri",
    ["qdrant://127.0.0.1:1", "milvus://127.0.0.1:1"],
)
def test_unreachable_server_is_a_clear_error(uri: str, encoder) -> None:
    with pytest.raises(m3connect.BackendUnavailableError, match="127.0.0.1:1"):
        m3connect.connect(uri, collection="x", encoder=encoder, timeout=3)


@pytest.mark.parametrize("uri", ["redis://host", "milvus:relative.db", "opensearch:///tmp/x", "milvus://:memory:"])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(m3connect.InvalidInputError):
        parse_uri(uri)


def test_uri_forms() -> None:
    assert parse_uri("qdrant+https://db.example:7000").url(6333) == "https://db.example:7000"
    assert parse_uri("milvus:///abs/m3.db").path == "/abs/m3.db"
    assert parse_uri("opensearch://h").url(9200) == "http://h:9200"


def test_qdrant_stores_colbert_as_float16(encoder, tmp_path) -> None:
    store = m3connect.connect(f"qdrant:///{tmp_path}/q", collection="half", encoder=encoder, colbert_dtype="float16")
    store.add(["half precision token vectors"], ids=["a"])
    rec = store.adapter.fetch(["a"])["a"]
    exact = encoder.encode(["half precision token vectors"]).colbert[0]
    np.testing.assert_allclose(rec.colbert, exact, atol=2e-3)
    assert store.info()["spec"]["colbert_dtype"] == "float16"
    hit = store.search("half precision", k=1)[0]
    assert hit.id == "a"


def test_milvus_lite_stores_float16(encoder, tmp_path) -> None:
    # ColBERT lives in packed byte chunks, so Lite keeps any colbert_dtype (issue 10).
    store = m3connect.connect(f"milvus:///{tmp_path}/m.db", collection="half", encoder=encoder, colbert_dtype="float16")
    store.add(["half precision token vectors"], ids=["a"])
    exact = encoder.encode(["half precision token vectors"]).colbert[0]
    np.testing.assert_array_equal(store.adapter.fetch(["a"])["a"].colbert, exact.astype(np.float16).astype(np.float32))
    assert store.info()["spec"]["colbert_dtype"] == "float16"


def test_bad_colbert_dtype(encoder) -> None:
    with pytest.raises(ValueError, match="colbert_dtype"):
        m3connect.connect("qdrant://:memory:", collection="x", encoder=encoder, colbert_dtype="int4")


def test_open_without_encoder_needs_existing_collection(encoder, tmp_path) -> None:
    with pytest.raises(m3connect.CollectionNotFoundError, match="does not exist"):
        m3connect.connect(f"qdrant:///{tmp_path}/q", collection="nothing")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("module", "client", "extra"),
    [("m3connect.adapters.qdrant", "qdrant_client", "qdrant"), ("m3connect.adapters.milvus", "pymilvus", "milvus")],
)
def test_missing_client_names_pip_command(monkeypatch, module: str, client: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, client, None)  # makes `import client` fail
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'm3connect\[{extra}\]'"):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_query_and_document_max_lengths_are_separate(encoder, tmp_path) -> None:
    seen: list[tuple[str, int | None]] = []

    class Spy:  # the Encoder protocol, recording the limits it is asked for
        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(encoder, name)

        def encode(self, texts, **kw):  # noqa: ANN001, ANN003, ANN201
            seen.append(("doc", kw.get("max_length")))
            return encoder.encode(texts, **kw)

        def encode_one(self, text, **kw):  # noqa: ANN001, ANN003, ANN201
            seen.append(("query", kw.get("max_length")))
            return encoder.encode_one(text, **kw)

    store = m3connect.connect(f"qdrant:///{tmp_path}/q", collection="lim", encoder=Spy(), max_length=64,
                              query_max_length=8)
    store.add(["a long enough document about limits"], ids=["a"])
    assert store.search("limits", k=1)[0].id == "a"
    assert seen == [("doc", 64), ("query", 8)]

"""OpenSearch-specific behaviour of the adapter, on a real node (see opensearch_fixture.py)."""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlsplit

import numpy as np
import pytest

from m3connect import connect
from m3connect.adapters.base import Weights
from m3connect.errors import BackendError, BackendUnavailableError, IngestError, SchemaMismatchError
from m3connect.filters import matches, parse_filter
from m3connect.scoring import colbert_score, combine, dense_score, sparse_score

from .opensearch_fixture import opensearch_url  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.opensearch]

TEXTS = [
    f"document {i} talks about {['cats', 'dogs', 'search engines', 'vector databases'][i % 4]} and more"
    for i in range(24)
]
META = [{"lang": "en" if i % 3 else "de", "year": 2000 + i, "even": i % 2 == 0, "score": i / 4} for i in range(24)]


def _uri(url: str) -> str:
    parts = urlsplit(url)
    scheme = "opensearch+https" if parts.scheme == "https" else "opensearch"
    return f"{scheme}://{parts.hostname}:{parts.port or 9200}"


@pytest.fixture
def store_factory(opensearch_url, encoder):  # noqa: F811
    made = []

    def make(colbert_dtype: str = "float32", name: str | None = None, **options):
        name = name or f"m3test_{uuid.uuid4().hex[:10]}"
        store = connect(_uri(opensearch_url), collection=name, encoder=encoder, colbert_dtype=colbert_dtype, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.drop()
        store.close()


@pytest.fixture
def filled(store_factory):
    store = store_factory()
    ids = store.add(TEXTS, metadata=META, show_progress=False)
    return store, ids


def _raw_client(url: str):
    from opensearchpy import OpenSearch

    return OpenSearch(hosts=[url])


def test_mapping_and_meta_marker(opensearch_url, store_factory, encoder):  # noqa: F811
    store = store_factory(name=f"MixedCase_{uuid.uuid4().hex[:6]}")
    index = store.adapter.index
    assert index == store.adapter.collection.lower()
    client = _raw_client(opensearch_url)
    mapping = client.indices.get_mapping(index=index)[index]["mappings"]
    props = mapping["properties"]
    assert props["dense"]["type"] == "knn_vector"
    assert props["dense"]["dimension"] == encoder.dense_dim
    assert props["dense"]["method"]["space_type"] == "innerproduct"
    assert props["dense"]["method"]["engine"] == "lucene"
    assert props["sparse"]["type"] == "rank_features"
    assert props["m3"] == {"type": "object", "enabled": False}
    assert "m3connect" in mapping["_meta"]
    settings = client.indices.get_settings(index=index)[index]["settings"]["index"]
    assert settings["knn"] == "true"
    # reopening reads the spec back
    again = connect(_uri(opensearch_url), collection=store.adapter.collection, encoder=encoder)
    assert again.adapter.spec == store.adapter.spec
    again.close()


def test_foreign_index_is_refused(opensearch_url, encoder):  # noqa: F811
    name = f"foreign_{uuid.uuid4().hex[:8]}"
    client = _raw_client(opensearch_url)
    client.indices.create(index=name, body={"mappings": {"properties": {"x": {"type": "keyword"}}}})
    try:
        with pytest.raises(SchemaMismatchError, match="not created by m3connect"):
            connect(_uri(opensearch_url), collection=name, encoder=encoder)
    finally:
        client.indices.delete(index=name)


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}"):
        connect(f"opensearch://127.0.0.1:{port}", collection="nope", timeout=2.0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_representations_round_trip(store_factory, encoder, dtype):
    store = store_factory(colbert_dtype=dtype)
    ids = store.add(TEXTS[:6], metadata=META[:6], show_progress=False)
    out = encoder.encode(TEXTS[:6], show_progress=False)
    got = store.adapter.fetch(ids)
    assert set(got) == set(ids)
    for j, rid in enumerate(ids):
        rec = got[rid]
        assert rec.text == TEXTS[j]
        assert rec.metadata == META[j]
        np.testing.assert_array_equal(rec.dense, out.dense[j].astype(np.float32))
        assert rec.sparse == {int(t): float(w) for t, w in out.sparse[j].items()}
        assert rec.colbert.dtype == np.float32 and rec.colbert.shape == out.colbert[j].shape
        if dtype == "float32":
            np.testing.assert_array_equal(rec.colbert, out.colbert[j])
        else:
            np.testing.assert_array_equal(rec.colbert, out.colbert[j].astype(np.float16).astype(np.float32))
            np.testing.assert_allclose(rec.colbert, out.colbert[j], atol=1e-3)
    light = store.adapter.fetch(ids[:2], with_vectors=False)
    assert light[ids[0]].dense is None and light[ids[0]].text == TEXTS[0]
    assert store.get(ids[:2])[1].text == TEXTS[1]


def test_count_delete_existing(filled):
    store, ids = filled
    assert store.count() == len(TEXTS)
    assert store.adapter.existing_ids(ids[:3] + ["missing"]) == set(ids[:3])
    store.delete(ids[:4] + ["missing"])
    assert store.count() == len(TEXTS) - 4
    report = store.ingest(TEXTS, metadata=META, skip_existing=True, show_progress=False)
    assert report.skipped == len(TEXTS) - 4 and report.written == 4
    assert store.count() == len(TEXTS)


def test_bulk_partial_failure_names_ids(store_factory):
    store = store_factory()
    store.add(["a number year"], ids=["ok0"], metadata=[{"year": 2020}], show_progress=False)
    with pytest.raises(IngestError) as info:
        store.add(["fine one", "bad one", "fine two"], ids=["ok1", "bad1", "ok2"],
                  metadata=[{"year": 2021}, {"year": "not a number"}, {"year": 2022}], show_progress=False)
    cause = info.value.__cause__
    assert isinstance(cause, BackendError)
    assert "'bad1'" in str(cause) and "mapper_parsing_exception" in str(cause)
    assert "ok1" not in str(cause)
    store.adapter.flush()
    assert store.adapter.existing_ids(["ok0", "ok1", "bad1", "ok2"]) == {"ok0", "ok1", "ok2"}


def test_routes_and_filters(filled, encoder):
    store, ids = filled
    q = encoder.encode_one("cats and more")
    flt = parse_filter({"$or": [{"lang": "de"}, {"year": {"$gte": 2018}}], "even": True})
    by_id = {i: m for i, m in zip(ids, META)}
    for route in ("dense", "sparse", "colbert"):
        all_hits = store.adapter.search_route(route, q[route], 100, None)
        assert len(all_hits) > 0
        hits = store.adapter.search_route(route, q[route], 100, flt)
        assert hits and all(matches(flt, by_id[i]) for i, _ in hits)
    assert store.adapter.search_route("sparse", {}, 10, None) == []
    expected = {i for i, m in by_id.items() if matches(flt, m)}
    assert {i for i, _ in store.adapter.search_route("colbert", q["colbert"], 100, flt)} == expected
    assert {i for i, _ in store.adapter.search_route("dense", q["dense"], 100, flt)} == expected
    for f, n in (({"lang": {"$in": ["de", "fr"]}}, 8), ({"score": {"$gt": 2.5, "$lte": 4.0}}, 6),
                 ({"score": 1.25}, 1), ({"even": False}, 12), ({"year": 2005}, 1),
                 # wrong-typed values match nothing (as in filters.matches) instead of failing
                 ({"year": "abc"}, 0), ({"even": "x"}, 0), ({"lang": {"$gt": 1}}, 0), ({"even": {"$lt": 5}}, 0),
                 ({"$or": [{"year": "abc"}, {"lang": {"$in": ["de", 3]}}]}, 8), ({"nope": 1}, 0)):
        got = store.adapter.search_route("dense", q["dense"], 100, parse_filter(f))
        assert len(got) == n == sum(matches(parse_filter(f), m) for m in META), f


def _transformed(ip: float) -> float:
    return 1.0 + ip if ip >= 0 else 1.0 / (1.0 - ip)


def test_engine_scores_are_opensearch_transforms(filled, encoder):
    """Single-route engine scores follow OpenSearch's documented transforms of the exact scores."""
    store, ids = filled
    q = encoder.encode_one("vector databases and more")
    recs = store.adapter.fetch(ids)
    dense = store.adapter.engine_search(q, Weights(1, 0, 0), 5, None, 50, "weighted")
    for rid, score in dense:
        assert score == pytest.approx(_transformed(dense_score(q["dense"], recs[rid].dense)), rel=1e-5)
    sparse = store.adapter.engine_search(q, Weights(0, 1, 0), 5, None, 50, "weighted")
    assert sparse
    for rid, score in sparse:
        assert score == pytest.approx(sparse_score(q["sparse"], recs[rid].sparse), rel=2 ** -7)
    colbert = store.adapter.engine_search(q, Weights(0, 0, 1), 5, None, 50, "weighted")
    qv = np.asarray(q["colbert"], np.float32)
    for rid, score in colbert:
        sims = qv @ recs[rid].colbert.T
        want = sum(_transformed(float(m)) for m in sims.max(axis=1)) / len(qv)
        assert score == pytest.approx(want, rel=1e-4)
        assert colbert_score(q["colbert"], recs[rid].colbert) == pytest.approx(
            float(sims.max(axis=1).mean()), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("fusion", ["engine", "rrf"])
def test_engine_fusion_and_rrf(filled, fusion):
    store, ids = filled
    exact = store.search("vector databases and more", k=5)
    hits = store.search("vector databases and more", k=5, fusion=fusion)
    assert len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(set(h.scores) == {"dense", "sparse", "colbert"} for h in hits)
    if fusion == "engine":
        # the tiny random model ties many documents: compare exact scores, not ids
        w = (0.4, 0.2, 0.4)
        assert combine(hits[0].scores, w) >= exact[4].score - 1e-6
    else:  # client-side RRF (k=60) over the route lists
        q = store.encoder.encode_one("vector databases and more")
        depth = 100
        want: dict[str, float] = {}
        for route in ("dense", "sparse", "colbert"):
            for rank, (rid, _) in enumerate(store.adapter.search_route(route, q[route], depth, None), start=1):
                want[rid] = want.get(rid, 0.0) + 1 / (60 + rank)
        for h in hits:
            assert h.score == pytest.approx(want[h.id])
        assert hits[0].score == pytest.approx(max(want.values()))
    flt = {"lang": "de"}
    filtered = store.search("vector databases", k=20, filter=flt, fusion=fusion)
    assert filtered and all(h.metadata["lang"] == "de" for h in filtered)
    if fusion == "rrf":
        assert all(h.score <= 3 / 61 + 1e-9 for h in hits)


def test_bulk_is_split_by_real_bytes(store_factory, monkeypatch):
    from m3connect.adapters import opensearch as os_adapter

    store = store_factory()
    monkeypatch.setattr(os_adapter, "_BULK_BYTES", 4096)  # a few docs per _bulk request
    sent = []
    real_bulk = store.adapter.client.bulk

    def counting_bulk(*args, **kwargs):
        sent.append(len(kwargs["body"]))
        return real_bulk(*args, **kwargs)

    monkeypatch.setattr(store.adapter.client, "bulk", counting_bulk)
    metas = [dict(m) for m in META]
    metas[17]["year"] = "oops"
    with pytest.raises(IngestError) as info:
        store.add(TEXTS, ids=[f"d{i}" for i in range(len(TEXTS))], metadata=metas, show_progress=False)
    assert len(sent) > 2
    assert "'d17'" in str(info.value.__cause__) and "1 document" in str(info.value.__cause__)
    store.adapter.flush()
    assert store.count() == len(TEXTS) - 1


def test_without_colbert_lists(opensearch_url, store_factory, encoder):  # noqa: F811
    store = store_factory(colbert_lists=False)
    ids = store.add(TEXTS, metadata=META, show_progress=False)
    client = _raw_client(opensearch_url)
    src = client.get(index=store.adapter.index, id=ids[0])["_source"]
    assert "colbert" not in src and "m3" in src
    # the layout is read back from _meta on reopen
    again = connect(_uri(opensearch_url), collection=store.adapter.collection, encoder=encoder)
    assert again.adapter.colbert_lists is False
    again.close()
    exact = store.search("vector databases and more", k=5)
    assert len(exact) == 5
    assert len(store.search("vector databases and more", k=5, weights=(0.5, 0.5, 0), fusion="engine")) == 5
    assert len(store.search("vector databases and more", k=5, fusion="rrf")) == 5
    with pytest.raises(BackendError, match="colbert_lists=False"):
        store.search("vector databases and more", k=5, fusion="engine")
    rec = store.adapter.fetch(ids[:1])[ids[0]]
    np.testing.assert_array_equal(rec.colbert, encoder.encode(TEXTS[:1], show_progress=False).colbert[0])

"""OpenSearch-specific behaviour of the adapter, on a real node (see opensearch_fixture.py)."""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlsplit

import numpy as np
import pytest

from m3connect import CollectionSpec, Vectors, connect
from m3connect.adapters.base import Weights
from m3connect.errors import BackendError, BackendUnavailableError, IngestError, SchemaMismatchError
from m3connect.filters import matches, parse_filter
from m3connect.scoring import ROUTES, combine, pair_scores, sparse_score

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
        if options.get("spec") is not None:
            store = connect(_uri(opensearch_url), collection=name, **options)
        else:
            store = connect(_uri(opensearch_url), collection=name, encoder=encoder, colbert_dtype=colbert_dtype,
                            **options)
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


# -- synthetic vectors through the public API (no encoder) ------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _structured_corpus(n: int, dim: int = 64, cdim: int = 32, seed: int = 0, vocab: int = 400) -> list[Vectors]:
    """Topic-structured vectors: dense, sparse and ColBERT agree only partly, as in BGE-M3."""
    rng = np.random.default_rng(seed)
    topics = _unit(rng.normal(size=(12, dim)))
    ctopics = _unit(rng.normal(size=(12, cdim)))
    emb = _unit(rng.normal(size=(vocab, cdim)))
    zipf = 1.0 / np.arange(1, vocab + 1) ** 0.8
    zipf /= zipf.sum()
    out = []
    for _ in range(n):
        t = int(rng.integers(12))
        toks = np.unique(rng.choice(vocab, size=int(rng.integers(4, 24)), p=zipf))
        rows = rng.choice(toks, size=int(rng.integers(3, 20)))
        out.append(Vectors(
            dense=_unit(topics[t] + 0.9 * rng.normal(size=dim)),
            sparse={int(k): float(w) for k, w in zip(toks, rng.uniform(0.02, 0.4, len(toks)))},
            colbert=_unit(emb[rows] + 0.5 * ctopics[t] + 0.5 * rng.normal(size=(len(rows), cdim))),
        ))
    return out


def _spec(name: str, dtype: str = "float32") -> CollectionSpec:
    return CollectionSpec(model=name, fingerprint="v1", dense_dim=64, colbert_dim=32, colbert_dtype=dtype)


# -- schema ---------------------------------------------------------------------------------------

def test_mapping_and_meta_marker(opensearch_url, store_factory, encoder):  # noqa: F811
    store = store_factory(name=f"MixedCase_{uuid.uuid4().hex[:6]}")
    store.add(["the index is created by the first write"], show_progress=False)
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
    assert props["cb"]["type"] == "binary" and props["cb"]["doc_values"] is True
    assert props["sparse_x"]["type"] == "long"
    assert props["m3"] == {"type": "object", "enabled": False}
    assert set(mapping["_source"]["excludes"]) == {"cb", "sparse_x", "colbert_mean"}
    assert "m3connect" in mapping["_meta"] and mapping["_meta"]["m3connect_opensearch"] == {"layout": 2}
    settings = client.indices.get_settings(index=index)[index]["settings"]["index"]
    assert settings["knn"] == "true" and settings["refresh_interval"] == "-1"
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


def test_index_of_an_older_layout_is_refused(opensearch_url, encoder):  # noqa: F811
    """Layout 1 kept ColBERT in _source lists; this version cannot score it in the engine."""
    name = f"oldlayout_{uuid.uuid4().hex[:8]}"
    client = _raw_client(opensearch_url)
    spec = CollectionSpec(model=encoder.model_name, fingerprint=encoder.fingerprint,
                          dense_dim=encoder.dense_dim, colbert_dim=encoder.colbert_dim)
    client.indices.create(index=name, body={"mappings": {
        "_meta": {"m3connect": spec.to_json(), "m3connect_opensearch": {"colbert_lists": True}},
        "properties": {"doc_id": {"type": "keyword"}}}})
    try:
        with pytest.raises(SchemaMismatchError, match="layout 1"):
            connect(_uri(opensearch_url), collection=name, encoder=encoder)
    finally:
        client.indices.delete(index=name)


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}"):
        connect(f"opensearch://127.0.0.1:{port}", collection="nope", timeout=2.0)


# -- data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_representations_round_trip(opensearch_url, store_factory, encoder, dtype):  # noqa: F811
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
    # fields= moves only what is named
    light = store.adapter.fetch(ids[:2] + ["missing"], fields=())
    assert set(light) == set(ids[:2])
    assert light[ids[0]].dense is None and light[ids[0]].sparse is None and light[ids[0]].colbert is None
    assert light[ids[0]].text == TEXTS[0] and light[ids[0]].metadata == META[0]
    only_dense = store.adapter.fetch(ids[:2], fields=("dense",))[ids[1]]
    assert only_dense.dense is not None and only_dense.sparse is None and only_dense.colbert is None
    assert store.get(ids[:2])[1].text == TEXTS[1]
    # the stored _source is light: no ColBERT bytes, no packed sparse, no colbert_mean
    src = _raw_client(opensearch_url).get(index=store.adapter.index, id=ids[0])["_source"]
    assert set(src) == {"doc_id", "text", "metadata", "dense", "sparse", "m3"}


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


def test_transient_bulk_failures_are_retried_then_reported(store_factory, monkeypatch):
    from opensearchpy import exceptions as os_exc

    store = store_factory(retry_backoff=0.0)
    store.add(["first"], ids=["a"], show_progress=False)
    real_bulk = store.adapter.client.bulk
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # a busy node, then a dropped connection
            raise os_exc.TransportError(429, "es_rejected_execution_exception", {}) if calls["n"] == 1 \
                else os_exc.ConnectionTimeout("TIMEOUT", "read timed out", None)
        return real_bulk(*args, **kwargs)

    monkeypatch.setattr(store.adapter.client, "bulk", flaky)
    store.add(["second"], ids=["b"], show_progress=False)
    assert calls["n"] == 3 and store.count() == 2

    def down(*args, **kwargs):
        calls["n"] += 1
        raise os_exc.ConnectionError("N/A", "connection refused", None)

    calls["n"] = 0
    monkeypatch.setattr(store.adapter.client, "bulk", down)
    with pytest.raises(IngestError) as info:
        store.add(["third", "fourth"], ids=["c", "d"], show_progress=False)
    assert info.value.ids == ["c", "d"] and calls["n"] == store.adapter.max_retries + 1
    assert isinstance(info.value.__cause__, BackendUnavailableError)
    monkeypatch.setattr(store.adapter.client, "bulk", real_bulk)
    store.add(["third", "fourth"], ids=["c", "d"], show_progress=False)  # the re-run completes
    assert store.count() == 4


def test_bulk_is_split_by_real_bytes_and_sent_concurrently(store_factory, monkeypatch):
    import threading

    from m3connect.adapters import opensearch as os_adapter

    store = store_factory()
    monkeypatch.setattr(os_adapter, "_BULK_BYTES", 4096)  # a few docs per _bulk request
    sent, threads = [], set()
    real_bulk = store.adapter.client.bulk

    def counting_bulk(*args, **kwargs):
        sent.append(len(kwargs["body"]))
        threads.add(threading.get_ident())
        return real_bulk(*args, **kwargs)

    monkeypatch.setattr(store.adapter.client, "bulk", counting_bulk)
    metas = [dict(m) for m in META]
    metas[17]["year"] = "oops"
    with pytest.raises(IngestError) as info:
        store.add(TEXTS, ids=[f"d{i}" for i in range(len(TEXTS))], metadata=metas, show_progress=False)
    assert len(sent) > 2 and max(sent) <= 4096 * 2
    assert len(threads) == 2  # bulk_concurrency=2
    assert "'d17'" in str(info.value.__cause__) and "1 document" in str(info.value.__cause__)
    store.adapter.flush()
    assert store.count() == len(TEXTS) - 1


def test_empty_sparse_and_colbert_documents(store_factory):
    store = store_factory(spec=_spec("empty"))
    docs = _structured_corpus(4, seed=3)
    docs[1] = Vectors(dense=docs[1].dense, sparse={}, colbert=np.zeros((0, 32), np.float32))
    ids = store.add_vectors(docs, ids=["a", "b", "c", "d"])
    query = _structured_corpus(1, seed=4)[0]
    got = store.adapter.score(ids, query, ROUTES)
    for rid, doc in zip(ids, docs):
        want = pair_scores(query, doc)
        assert got[rid] == pytest.approx(want, abs=1e-6), rid  # MaxSim rows sum in float
    assert got["b"]["sparse"] == 0.0 and got["b"]["colbert"] == 0.0
    rec = store.adapter.fetch(["b"])["b"]
    assert rec.colbert.shape == (0, 32) and rec.sparse == {}
    hits = store.search_by_vectors(query, k=4, weights=(0.4, 0.2, 0.4))
    assert {h.id for h in hits} == set(ids)


# -- search ---------------------------------------------------------------------------------------

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


def test_route_scores(filled, encoder):
    """Dense route scores are exact (OpenSearch's 1+ip inverted); sparse route scores are the
    9-bit rank_features approximation (that is why sparse is not in ``exact_routes``)."""
    store, ids = filled
    assert store.adapter.exact_routes == {"dense"}
    q = encoder.encode_one("vector databases and more")
    recs = store.adapter.fetch(ids)
    dense = store.adapter.search_route("dense", q["dense"], 10, None)
    assert len(dense) == 10
    for rid, s in dense:
        assert s == pytest.approx(float(np.dot(q["dense"].astype(np.float64), recs[rid].dense)), abs=1e-6)
    sparse = store.adapter.search_route("sparse", q["sparse"], 10, None)
    assert sparse
    for rid, s in sparse:
        assert s == pytest.approx(sparse_score(q["sparse"], recs[rid].sparse), rel=2 ** -7)


def test_dense_route_is_the_true_top_k(store_factory):
    """kNN clauses ask Lucene for at least ``ef_search`` neighbours: with k=5 alone, HNSW on
    OpenSearch 2.19 missed the third-best of 60 documents."""
    store = store_factory(spec=_spec("topk"))
    docs = _structured_corpus(60, seed=9)
    ids = [f"t{i}" for i in range(len(docs))]
    store.add_vectors(docs, ids=ids)
    for j in range(5):
        query = _structured_corpus(1, seed=50 + j)[0]
        truth = sorted(((float(np.dot(query.dense.astype(np.float64), d.dense)), rid) for rid, d in zip(ids, docs)),
                       reverse=True)[:5]
        got = store.adapter.search_route("dense", query.dense, 5, None)
        assert [rid for rid, _ in got] == [rid for _, rid in truth]
        np.testing.assert_allclose([s for _, s in got], [s for s, _ in truth], atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_score_in_the_engine_equals_scoring_without_moving_vectors(store_factory, monkeypatch, dtype):
    store = store_factory(spec=_spec(f"score-{dtype}", dtype))
    docs = _structured_corpus(80, seed=1)
    ids = [f"v{i}" for i in range(len(docs))]
    store.add_vectors(docs, ids=ids)
    stored = {rid: store.adapter.fetch([rid])[rid].vectors for rid in ids}  # fp16-rounded where stored so

    def no_vectors(*args, fields=ROUTES, **kwargs):
        raise AssertionError(f"score() fetched vectors {fields!r}")

    monkeypatch.setattr(store.adapter, "fetch", no_vectors)
    query = _structured_corpus(1, seed=2)[0]
    asked = ids[::3] + ["missing"]
    got = store.adapter.score(asked, query, ROUTES)
    assert set(got) == set(ids[::3])
    for rid in ids[::3]:
        want = pair_scores(query, stored[rid])
        for route in ROUTES:
            assert abs(got[rid][route] - want[route]) < 1e-4, (rid, route)
            # dense in double; sparse weights are kept as float32 (these are float64); MaxSim
            # rows sum in float (8 accumulators)
            assert got[rid][route] == pytest.approx(want[route], abs={"dense": 1e-9, "sparse": 1e-7}.get(route, 1e-6))
    assert store.adapter.score(ids[:3], query, ["colbert"])[ids[0]].keys() == {"colbert"}
    empty = Vectors(dense=query.dense, sparse={}, colbert=np.zeros((0, 32), np.float32))
    assert store.adapter.score(ids[:2], empty, ["sparse", "colbert"])[ids[0]] == {"sparse": 0.0, "colbert": 0.0}


def test_exact_query_moves_no_colbert_bytes(store_factory):
    """An exact (0.4, 0.2, 0.4) query answers with ids and numbers: far less than one
    candidate's ColBERT matrix per candidate."""
    spec = CollectionSpec(model="bytes", fingerprint="v1", dense_dim=64, colbert_dim=128)
    store = store_factory(spec=spec)
    rng = np.random.default_rng(5)
    docs = [Vectors(dense=_unit(rng.normal(size=64)), sparse={int(t): 0.2 for t in rng.choice(50, 8, replace=False)},
                    colbert=_unit(rng.normal(size=(60, 128)))) for _ in range(120)]
    store.add_vectors(docs, ids=[f"b{i}" for i in range(len(docs))])
    conn = store.adapter.client.transport.get_connection()
    real = conn.perform_request
    received = []

    def counting(method, url, *args, **kwargs):
        status, headers, data = real(method, url, *args, **kwargs)
        received.append(len(data))
        return status, headers, data

    conn.perform_request = counting
    try:
        hits = store.search_by_vectors(docs[0], k=10, weights=(0.4, 0.2, 0.4))
    finally:
        conn.perform_request = real
    assert len(hits) == 10 and hits[0].id == "b0"
    assert store.last_query_stats.candidates > 50
    one_matrix = 60 * 128 * 4
    assert sum(received) < one_matrix, received  # 50+ candidates' matrices would be > 50x that


def test_colbert_route_candidates_and_bruteforce(store_factory):
    docs = _structured_corpus(60, seed=6)
    ids = [f"c{i}" for i in range(len(docs))]
    query = _structured_corpus(1, seed=7)[0]
    truth = sorted(ids, key=lambda r: -pair_scores(query, docs[ids.index(r)], ["colbert"])["colbert"])
    brute = store_factory(spec=_spec("brute"), colbert_bruteforce=True)
    brute.add_vectors(docs, ids=ids)
    got = brute.adapter.search_route("colbert", query.colbert, 5, None)
    assert [r for r, _ in got] == truth[:5]
    for rid, s in got:
        assert s == pytest.approx(pair_scores(query, docs[ids.index(rid)], ["colbert"])["colbert"], abs=1e-6)
    # the default route is a colbert_mean kNN: it finds candidates, exact fusion ranks them
    store = store_factory(spec=_spec("mean"))
    store.add_vectors(docs, ids=ids)
    assert len(store.adapter.search_route("colbert", query.colbert, 60, None)) == 60
    hits = store.search_by_vectors(query, k=5, weights=(0, 0, 1))
    assert [h.id for h in hits] == truth[:5]


def test_engine_scores_are_exact_m3_within_the_window(filled, encoder):
    """fusion="engine" ranks its last window by M3's exact weighted sum, computed in painless."""
    store, ids = filled
    q = encoder.encode_one("vector databases and more")
    recs = store.adapter.fetch(ids)
    for weights in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.4, 0.2, 0.4), (1, 0.3, 0)]:
        got = store.adapter.engine_search(q, Weights(*weights), 5, None, 100, "weighted")
        assert len(got) == 5, weights
        exact = {rid: combine(pair_scores(q, rec.vectors), weights) for rid, rec in recs.items()}
        if weights == (0, 1, 0):  # only documents sharing a token are candidates
            exact = {rid: s for rid, s in exact.items() if s > 0}
        best = sorted(exact.values(), reverse=True)
        for rank, (rid, score) in enumerate(got):
            assert score == pytest.approx(exact[rid], abs=1e-5), (weights, rid)
            assert score == pytest.approx(best[rank], abs=1e-5), (weights, rank)


@pytest.mark.parametrize("fusion", ["engine", "rrf"])
def test_engine_fusion_and_rrf(filled, fusion):
    store, ids = filled
    exact = store.search("vector databases and more", k=5)
    hits = store.search("vector databases and more", k=5, fusion=fusion)
    assert len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(set(h.scores) == {"dense", "sparse", "colbert"} for h in hits)
    if fusion == "engine":  # all 24 documents are in the window: the same ranking as exact (up to ties)
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in exact], atol=1e-5)
        np.testing.assert_allclose(
            [h.score for h in hits], [combine(h.scores, (0.4, 0.2, 0.4)) for h in hits], atol=1e-5
        )
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
        assert all(h.score <= 3 / 61 + 1e-9 for h in hits)
    flt = {"lang": "de"}
    filtered = store.search("vector databases", k=20, filter=flt, fusion=fusion)
    assert len(filtered) == 8 and all(h.metadata["lang"] == "de" for h in filtered)


SELECTIVE_N = 500


@pytest.fixture(scope="module")
def selective(opensearch_url):  # noqa: F811
    """500 synthetic documents, 2% of them in group "rare"."""
    name = f"m3sel_{uuid.uuid4().hex[:8]}"
    store = connect(_uri(opensearch_url), collection=name, spec=_spec("selective"))
    docs = _structured_corpus(SELECTIVE_N, seed=11)
    ids = [f"s{i:03d}" for i in range(SELECTIVE_N)]
    meta = [{"grp": "rare" if i % 50 == 7 else "common", "i": i} for i in range(SELECTIVE_N)]
    store.add_vectors(docs, ids=ids, metadata=meta)
    yield store, docs, ids, meta
    store.drop()
    store.close()


@pytest.mark.parametrize("weights", [(1, 0, 0), (0, 0, 1), (0.4, 0.2, 0.4)])
@pytest.mark.parametrize("fusion", ["exact", "engine", "rrf"])
def test_selective_filter_gives_k_hits(selective, fusion, weights):
    store, docs, ids, meta = selective
    rare = [i for i, m in enumerate(meta) if m["grp"] == "rare"]
    query = docs[123]  # a "common" document: unfiltered, the rare ones are not its top hits
    k = len(rare)
    assert k == 10
    hits = store.search_by_vectors(query, k=k, weights=weights, filter={"grp": "rare"}, fusion=fusion)
    assert len(hits) == k and {h.id for h in hits} == {ids[i] for i in rare}
    if fusion in ("exact", "engine"):
        truth = sorted(((combine(pair_scores(query, docs[i]), weights), ids[i]) for i in rare),
                       key=lambda t: (-t[0], t[1]))
        assert [h.id for h in hits] == [rid for _, rid in truth]
        np.testing.assert_allclose([h.score for h in hits], [s for s, _ in truth], atol=1e-5)
    unfiltered = {h.id for h in store.search_by_vectors(query, k=k, weights=weights, fusion=fusion)}
    assert len(unfiltered & {ids[i] for i in rare}) < k  # the filter did the work


@pytest.mark.parametrize("weights", [(0.4, 0.2, 0.4), (1, 0.3, 1)])
def test_engine_recall_against_exact(selective, weights):
    """fusion="engine" at the default depth finds (almost) the exact top 10."""
    store, docs, ids, meta = selective
    recalls = []
    for j in range(12):
        query = _structured_corpus(1, seed=100 + j)[0]
        exact = {h.id for h in store.search_by_vectors(query, k=10, weights=weights)}
        engine = {h.id for h in store.search_by_vectors(query, k=10, weights=weights, fusion="engine")}
        recalls.append(len(exact & engine) / 10)
    assert np.mean(recalls) >= 0.95, recalls


def test_engine_stages_hold_recall_on_crowded_dense_scores(store_factory):
    """BGE-M3's dense vectors are anisotropic: inner products crowd into a narrow band, so a
    document the kNN clause missed is not much worse on dense, and ColBERT decides. The exact
    dense + sparse prefetch stage and the 1.5x MaxSim window keep engine recall near exact;
    without them (stage 1 ranks kNN misses with dense = 0) recall collapses."""
    rng = np.random.default_rng(0)
    lean = _unit(rng.normal(size=64))

    def crowded(docs):
        return [Vectors(dense=_unit(3 * lean + d.dense), sparse=d.sparse, colbert=d.colbert) for d in docs]

    store = store_factory(spec=_spec("crowded"))
    docs = crowded(_structured_corpus(400, seed=11))
    store.add_vectors(docs, ids=[f"s{i:03d}" for i in range(len(docs))])
    queries = crowded([_structured_corpus(1, seed=100 + j)[0] for j in range(12)])
    spread = [float(d.dense @ queries[0].dense) for d in docs]
    assert max(spread) - min(spread) < 0.15
    weights = (0.4, 0.2, 0.4)
    exact = [{h.id for h in store.search_by_vectors(q, k=10, weights=weights)} for q in queries]

    def recall(prefetch: float, window: float) -> float:
        store.adapter.engine_prefetch, store.adapter.engine_window = prefetch, window
        got = [{h.id for h in store.search_by_vectors(q, k=10, weights=weights, fusion="engine")} for q in queries]
        return float(np.mean([len(a & b) / 10 for a, b in zip(exact, got)]))

    with_stages = recall(4.0, 1.5)
    without = recall(1.0, 1.0)
    assert with_stages >= 0.9, (with_stages, without)
    assert without < with_stages - 0.2, (with_stages, without)

"""One test body, every engine: the backend conformance suite.

Each engine must give the same answers as the exact scoring module on a small
corpus, where the candidate depth covers every document.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import m3connect
from m3connect import scoring
from m3connect.filters import matches, parse_filter
from m3connect.testing import make_tiny_checkpoint, sample_corpus, synthetic_corpus

pytestmark = pytest.mark.integration

DOCS = sample_corpus()
TEXTS = [d["text"] for d in DOCS]
IDS = [d["id"] for d in DOCS]
META = [
    {"lang": d["lang"], "topic": d["topic"], "rank": i, "score": i / 4, "even": i % 2 == 0, "quote": 'say "hi" \\ o\'k'}
    for i, d in enumerate(DOCS)
]
WEIGHTS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0.4, 0.2, 0.4), (1, 0.3, 1)]
QUERIES = ["hybrid search", "dense sparse vectors", "Модель", "向量数据库", "bread oven"]


@pytest.fixture
def filled(store_factory):
    store = store_factory()
    ids = store.add(TEXTS, ids=IDS, metadata=META)
    assert ids == IDS
    return store


def brute_force(encoder: m3connect.M3Encoder, query: str, weights: Any, flt: Any = None) -> list[tuple[str, float]]:
    """Rank the whole corpus by the scoring module."""
    reps = encoder.encode(TEXTS)
    q = encoder.encode_one(query)
    node = parse_filter(flt)
    ranked = []
    for i, rid in enumerate(IDS):
        if matches(node, META[i]):
            ranked.append((rid, scoring.combine(scoring.pair_scores(q, reps.item(i)), weights)))
    return sorted(ranked, key=lambda t: (-t[1], t[0]))


def test_add_count_get(filled) -> None:
    assert filled.count() == len(DOCS)
    got = filled.get([IDS[3], "missing", IDS[0]])
    assert [d.id for d in got] == [IDS[3], IDS[0]]
    assert got[0].text == TEXTS[3] and got[0].metadata == META[3]


def test_same_id_overwrites(filled) -> None:
    filled.add(["replacement text"], ids=[IDS[0]], metadata=[{"lang": "xx"}])
    assert filled.count() == len(DOCS)
    doc = filled.get([IDS[0]])[0]
    assert doc.text == "replacement text" and doc.metadata == {"lang": "xx"}
    hits = filled.search("replacement text", k=len(DOCS), weights=(1, 1, 1))
    assert [h.id for h in hits].count(IDS[0]) == 1
    assert next(h for h in hits if h.id == IDS[0]).text == "replacement text"


def test_content_ids_make_reruns_idempotent(store_factory) -> None:
    store = store_factory()
    first = store.add(TEXTS[:10])
    second = store.add(TEXTS[:10])
    assert first == second and store.count() == 10


def test_delete(filled) -> None:
    filled.delete([IDS[1], IDS[2], "never-stored"])
    assert filled.count() == len(DOCS) - 2
    assert filled.get([IDS[1]]) == []
    ids = {h.id for h in filled.search(TEXTS[1], k=len(DOCS), weights=(1, 1, 1))}
    assert IDS[1] not in ids and IDS[2] not in ids


@pytest.mark.parametrize("weights", WEIGHTS)
def test_exact_search_equals_brute_force(filled, encoder, weights) -> None:
    for query in QUERIES[:3]:
        hits = filled.search(query, k=10, weights=weights)
        expected = brute_force(encoder, query, weights)
        if weights == (0, 1, 0):  # sparse alone retrieves only documents sharing a token
            expected = [(rid, s) for rid, s in expected if s > 0]
        expected = expected[:10]
        assert [h.id for h in hits] == [rid for rid, _ in expected]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)


def test_hit_score_equals_compute_score(filled, encoder) -> None:
    weights = (0.4, 0.2, 0.4)
    hits = filled.search("hybrid search", k=5, weights=weights)
    ref = encoder.compute_score([("hybrid search", h.text) for h in hits], weights=weights, max_passage_length=8192)
    np.testing.assert_allclose([h.score for h in hits], ref["colbert+sparse+dense"], atol=1e-4)
    for key in ("dense", "sparse", "colbert"):
        np.testing.assert_allclose([h.scores[key] for h in hits], ref[key], atol=1e-4)


FILTERS = [
    {"lang": "en"},
    {"topic": {"$in": ["news", "cooking"]}},
    {"rank": {"$gte": 10, "$lt": 20}},
    {"score": {"$gt": 2.5}},
    {"$or": [{"lang": "de"}, {"topic": "model"}]},
    {"$and": [{"even": True}, {"rank": {"$lte": 30}}]},
    {"quote": 'say "hi" \\ o\'k', "lang": "fr"},
]


@pytest.mark.parametrize("flt", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_filters_match_reference_semantics(filled, encoder, flt) -> None:
    hits = filled.search("search", k=len(DOCS), weights=(1, 1, 1), filter=flt)
    expected = brute_force(encoder, "search", (1, 1, 1), flt)
    assert {h.id for h in hits} == {rid for rid, _ in expected}
    assert all(matches(parse_filter(flt), h.metadata) for h in hits)


def test_filter_value_cannot_change_the_expression(filled) -> None:
    evil = 'x" or metadata["lang"] != "'
    assert filled.search("search", k=10, filter={"lang": evil}) == []


@pytest.mark.parametrize("fusion", ["engine", "rrf"])
def test_engine_fusion_returns_real_hits(filled, fusion) -> None:
    hits = filled.search("hybrid search", k=5, weights=(0.4, 0.2, 0.4), fusion=fusion)
    assert 0 < len(hits) <= 5
    assert len({h.id for h in hits}) == len(hits)
    assert all(h.id in IDS and h.text for h in hits)
    filtered = filled.search("hybrid search", k=5, fusion=fusion, filter={"lang": "en"})
    assert filtered and all(h.metadata["lang"] == "en" for h in filtered)


def test_engine_weighted_fusion_ranks_like_exact_at_full_depth(filled) -> None:
    exact = filled.search("hybrid search", k=3, weights=(0.4, 0.2, 0.4))
    pushed = filled.search("hybrid search", k=3, weights=(0.4, 0.2, 0.4), fusion="engine", candidate_depth=100)
    # With every document a candidate on every route, nothing is missing from the sum.
    assert [h.id for h in pushed] == [h.id for h in exact]


def _persistent(store_factory) -> None:
    if store_factory.engine == "qdrant-memory":
        pytest.skip("an in-memory Qdrant is gone once closed")


def test_reopen_recognises_schema(store_factory, encoder) -> None:
    _persistent(store_factory)
    store = store_factory()
    store.add(TEXTS[:5], ids=IDS[:5])
    store.close()
    again = store_factory()
    assert again.count() == 5
    assert again.info()["spec"]["fingerprint"] == encoder.fingerprint


def test_reopen_with_other_model_is_refused(store_factory, tmp_path) -> None:
    _persistent(store_factory)
    store = store_factory()
    store.add(TEXTS[:2])
    store.close()
    other = m3connect.M3Encoder(make_tiny_checkpoint(tmp_path / "wide", hidden_size=48), device="cpu")
    with pytest.raises(m3connect.SchemaMismatchError, match="dense_dim"):
        store_factory(encoder=other)
    same_shape = m3connect.M3Encoder(make_tiny_checkpoint(tmp_path / "seed1", seed=1), device="cpu")
    with pytest.raises(m3connect.SchemaMismatchError, match="model weights"):
        store_factory(encoder=same_shape)
    survivor = store_factory()
    assert survivor.count() == 2  # nothing was overwritten


def test_bad_input_is_named_and_loses_nothing(filled) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        filled.add(["ok", 42])
    with pytest.raises(ValueError, match="ids has 1 entries"):
        filled.add(["a", "b"], ids=["only-one"])
    with pytest.raises(ValueError, match="k must be"):
        filled.search("q", k=0)
    with pytest.raises(ValueError, match="weights sum to zero"):
        filled.search("q", weights=(0, 0, 0))
    with pytest.raises(m3connect.FilterError, match="unknown operator"):
        filled.search("q", filter={"lang": {"$regex": "e"}})
    with pytest.raises(TypeError):
        filled.search(123)  # type: ignore[arg-type]
    assert filled.count() == len(DOCS)


def test_empty_text_is_refused_and_nothing_is_created(store_factory) -> None:
    store = store_factory()
    for text in ("", "   "):
        with pytest.raises(m3connect.InvalidInputError, match=r"texts\[1\] is empty"):
            store.add(["fine", text], ids=["a", "empty"])
    assert not store.exists  # the check ran before anything was written
    with pytest.raises(m3connect.InvalidInputError, match="query is empty"):
        store.search("")


def test_failed_write_names_batch_and_rerun_resumes(store_factory, monkeypatch) -> None:
    store = store_factory()
    real_upsert = store.adapter.upsert
    calls = {"n": 0}

    def flaky(records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real_upsert(records)

    monkeypatch.setattr(store.adapter, "upsert", flaky)
    with pytest.raises(m3connect.IngestError) as err:
        store.add(TEXTS, ids=IDS, metadata=META, encode_batch_size=10)
    assert err.value.batch_index == 1 and err.value.ids == IDS[10:20]  # the second write batch
    assert "disk full" in str(err.value)
    store.adapter.flush()
    assert store.count() == 10  # the first batch stayed
    monkeypatch.setattr(store.adapter, "upsert", real_upsert)
    report = store.ingest(TEXTS, ids=IDS, metadata=META, encode_batch_size=10, skip_existing=True)
    assert report.skipped == 10 and report.written == len(DOCS) - 10
    assert store.count() == len(DOCS)


def test_truncation_is_reported(store_factory) -> None:
    store = store_factory(max_length=16)
    report = store.ingest(["word " * 100, "short"], ids=["long", "short"])
    assert report.truncated == 1 and store.count() == 2


# -- selective filters: every route filters in the engine ---------------------------------

SELECTIVE_N = 500
SELECTIVE_TEXTS = synthetic_corpus(SELECTIVE_N, min_words=8, max_words=40, seed=21)
SELECTIVE_META = [{"grp": "rare" if i % 50 == 7 else "common", "i": i} for i in range(SELECTIVE_N)]  # 2% rare
SELECTIVE_WEIGHTS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.4, 0.2, 0.4)]


def test_selective_filter_returns_k_matching_hits_on_every_fusion(store_factory, encoder) -> None:
    """A filter matching 2% of the corpus still gives k hits (pre-filtering, not post-filtering)."""
    store = store_factory()
    ids = [f"s{i:03d}" for i in range(SELECTIVE_N)]
    store.add(SELECTIVE_TEXTS, ids=ids, metadata=SELECTIVE_META)
    rare = {ids[i] for i, m in enumerate(SELECTIVE_META) if m["grp"] == "rare"}
    k = len(rare)
    query = SELECTIVE_TEXTS[123]  # a "common" document: unfiltered, the rare ones are not its top hits
    reps = encoder.encode(SELECTIVE_TEXTS)
    q = encoder.encode_one(query)
    for weights in SELECTIVE_WEIGHTS:
        truth = sorted(
            ((scoring.combine(scoring.pair_scores(q, reps.item(i)), weights), ids[i]) for i in range(SELECTIVE_N)
             if ids[i] in rare),
            key=lambda t: (-t[0], t[1]),
        )
        if weights == (0, 1, 0):  # the sparse route finds only documents sharing a token
            truth = [t for t in truth if t[0] > 0]
        for fusion in ("exact", "engine", "rrf"):
            hits = store.search(query, k=k, weights=weights, filter={"grp": "rare"}, fusion=fusion)
            label = f"{fusion} {weights}"
            assert {h.id for h in hits} <= rare, label
            assert len(hits) == len(truth), label
            if fusion == "exact":
                assert [h.id for h in hits] == [rid for _, rid in truth], label
                np.testing.assert_allclose([h.score for h in hits], [s for s, _ in truth], atol=1e-4)


def test_exact_scores_come_from_the_engine_not_fetched_vectors(filled, encoder, monkeypatch) -> None:
    """Exact fusion may fetch only text and metadata; every score comes from the engine's routes
    or from ``Adapter.score``. Adapters whose ``score`` is the base fetch fallback are refused here."""
    from m3connect.adapters.base import Adapter

    if type(filled.adapter).score is Adapter.score:
        pytest.fail(f"{type(filled.adapter).__name__} scores in the client; it must score in the engine")
    real_fetch = filled.adapter.fetch

    def fetch_without_colbert(ids, *, fields=scoring.ROUTES):
        assert "colbert" not in fields, "ColBERT token vectors moved to the client"
        return real_fetch(ids, fields=fields)

    monkeypatch.setattr(filled.adapter, "fetch", fetch_without_colbert)
    for weights in WEIGHTS:
        hits = filled.search("hybrid search", k=10, weights=weights)
        expected = brute_force(encoder, "hybrid search", weights)
        if weights == (0, 1, 0):
            expected = [(rid, s) for rid, s in expected if s > 0]
        assert [h.id for h in hits] == [rid for rid, _ in expected[:10]], weights
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected[:10]], atol=1e-4)


def test_dense_only_exact_search_asks_the_engine_once(filled, encoder, monkeypatch) -> None:
    """Weights (1, 0, 0) cost one engine call, as a raw dense search does: the route's top k
    come back with their texts; no separate fetch, no scoring round."""
    calls: list[str] = []
    adapter = filled.adapter
    for name in ("search_route", "search_route_records", "score", "fetch"):
        real = getattr(adapter, name)
        monkeypatch.setattr(adapter, name, lambda *a, _n=name, _r=real, **kw: calls.append(_n) or _r(*a, **kw))
    hits = filled.search("hybrid search", k=5, weights=(1, 0, 0))
    assert calls == ["search_route_records"] and len(hits) == 5
    assert all(h.text and h.scores.keys() == {"dense"} for h in hits)
    assert filled.last_query_stats.fetched_records == 5


@pytest.mark.parametrize("flt", [None, {"lang": "en"}], ids=["all", "filtered"])
@pytest.mark.parametrize("route", ["dense", "sparse", "colbert"])
def test_route_records_match_route_search_and_fetch(filled, encoder, route, flt) -> None:
    """``search_route_records`` is ``search_route`` plus ``fetch(fields=())``, whichever way
    an engine does it (one call with payloads, or the base class's two)."""
    query = encoder.encode_one("hybrid search")[route]
    node = parse_filter(flt)
    plain = filled.adapter.search_route(route, query, 4, node)
    with_records = filled.adapter.search_route_records(route, query, 4, node)
    assert [rid for rid, _, _ in with_records] == [rid for rid, _ in plain] and plain
    assert [s for _, s, _ in with_records] == pytest.approx([s for _, s in plain], rel=1e-6, abs=1e-6)
    fetched = filled.adapter.fetch([rid for rid, _ in plain], fields=())
    for rid, _, rec in with_records:
        assert (rec.text, rec.metadata) == (fetched[rid].text, fetched[rid].metadata)
        assert rec.dense is None and rec.colbert is None
        assert matches(node, rec.metadata)

"""ColBERT storage options (int8, binary, token pooling) on every engine.

Each engine must report, for the stored form of a document
(:func:`m3connect.colbert_storage.stored_form`), exactly the score of
:mod:`m3connect.scoring`; a reopen with other options is refused; an engine that
cannot score a stored form exactly refuses it before creating anything.
"""

from __future__ import annotations

import numpy as np
import pytest

import m3connect
from m3connect import CollectionSpec, scoring
from m3connect.colbert_storage import stored_form
from m3connect.testing import sample_corpus

pytestmark = pytest.mark.integration

DOCS = sample_corpus()[:16]
TEXTS = [d["text"] for d in DOCS]
IDS = [d["id"] for d in DOCS]
QUERIES = ["hybrid search", "dense sparse vectors", "bread oven"]
#: (colbert_dtype, colbert_pool_factor)
CASES = [("float32", 1), ("float16", 1), ("int8", 1), ("binary", 1), ("float32", 2), ("int8", 2), ("binary", 3)]
QDRANT = {"qdrant-memory", "qdrant-path", "qdrant-edge", "qdrant-server"}
COMPACT = ("int8", "binary")  # stored as bytes: Milvus and OpenSearch only


def _supported(engine: str, dtype: str) -> bool:
    return not (engine in QDRANT and dtype in COMPACT)


def _atol(engine: str, dtype: str) -> float:
    """How close fetched ColBERT rows are to the stored form: exact, except that qdrant-client's
    local mode ignores datatype=float16 and keeps float32 (a Qdrant server and Qdrant Edge round to
    float16); there the scores are float32's, within 1e-4 of float16's."""
    return 1e-3 if engine in ("qdrant-memory", "qdrant-path") and dtype == "float16" else 1e-7


@pytest.mark.parametrize("dtype,factor", CASES, ids=[f"{d}-pool{f}" for d, f in CASES])
def test_scores_equal_the_reference_on_the_stored_form(store_factory, encoder, dtype: str, factor: int) -> None:
    if not _supported(store_factory.engine, dtype):
        pytest.skip(f"{store_factory.engine} refuses {dtype} (test_compact_dtypes_are_refused_at_creation)")
    store = store_factory(colbert_dtype=dtype, colbert_pool_factor=factor)
    store.add(TEXTS, ids=IDS)
    spec = store.spec
    assert (spec.colbert_dtype, spec.colbert_pool_factor) == (dtype, factor)
    docs = encoder.encode(TEXTS)
    stored = {rid: stored_form(docs.colbert[j], spec) for j, rid in enumerate(IDS)}
    if factor > 1:
        assert all(len(stored[rid]) == -(-len(docs.colbert[j]) // factor) for j, rid in enumerate(IDS))

    fetched = store.adapter.fetch(IDS, fields=("colbert",))
    for rid in IDS:  # the engine keeps exactly the stored form
        np.testing.assert_allclose(fetched[rid].colbert, stored[rid], rtol=0, atol=_atol(store_factory.engine, dtype))

    for text in QUERIES:
        q = encoder.encode_one(text)
        hits = store.search_by_vectors(q, k=len(IDS), weights=(0, 0, 1), candidate_depth=len(IDS))
        assert sorted(h.id for h in hits) == sorted(IDS)
        # painless decodes the stored bytes exactly and sums MaxSim rows in float (~1e-7)
        tol = 1e-6 if store_factory.engine == "opensearch" else 1e-4
        for h in hits:
            assert abs(h.score - scoring.colbert_score(q.colbert, stored[h.id])) < tol, h.id
        weights = scoring.Weights(0.4, 0.2, 0.4)
        reference = {
            rid: scoring.combine(scoring.pair_scores(
                q, {"dense": docs.dense[j], "sparse": docs.sparse[j], "colbert": stored[rid]}), weights)
            for j, rid in enumerate(IDS)
        }
        hits = store.search_by_vectors(q, k=5, weights=weights, candidate_depth=len(IDS))
        assert len(hits) == 5
        for h in hits:
            assert abs(h.score - reference[h.id]) < 1e-4, h.id
        best = sorted(reference.values(), reverse=True)[:5]
        np.testing.assert_allclose([h.score for h in hits], best, atol=1e-4)
        if store.adapter.supports_engine_fusion:  # the engine's own MaxSim (painless on OpenSearch)
            pushed = store.search_by_vectors(q, k=3, weights=weights, fusion="engine", candidate_depth=len(IDS))
            for h in pushed:
                assert abs(h.scores["colbert"] - scoring.colbert_score(q.colbert, stored[h.id])) < 1e-4
            if store_factory.engine == "opensearch":
                for h in pushed:
                    assert abs(h.score - reference[h.id]) < 1e-4


@pytest.mark.parametrize("dtype", COMPACT)
def test_compact_dtypes_are_refused_at_creation(store_factory, dtype: str) -> None:
    if _supported(store_factory.engine, dtype):
        store = store_factory(colbert_dtype=dtype)  # accepted: the scores test covers it
        assert store.spec.colbert_dtype == dtype
        return
    with pytest.raises(m3connect.InvalidInputError, match=rf"Qdrant.*colbert_dtype='{dtype}'.*float32 or float16"):
        store_factory(colbert_dtype=dtype)
    with pytest.raises(m3connect.InvalidInputError, match="float32 or float16"):  # with spec= too
        store_factory(encoder=None, spec=CollectionSpec("m", "f", 8, 8, colbert_dtype=dtype))
    # the adapter itself refuses as well (callers that create collections directly)
    store = store_factory(colbert_pool_factor=2)
    with pytest.raises(m3connect.InvalidInputError, match="Qdrant"):
        store.adapter.create(CollectionSpec("m", "f", 8, 8, colbert_dtype=dtype))


def test_reopen_with_other_colbert_storage_is_refused(store_factory, encoder) -> None:
    if store_factory.engine == "qdrant-memory":
        pytest.skip("an in-memory Qdrant is gone once closed")
    dtype = "int8" if _supported(store_factory.engine, "int8") else "float16"
    store = store_factory(colbert_dtype=dtype, colbert_pool_factor=2)
    store.add(TEXTS[:3], ids=IDS[:3])
    store.close()
    with pytest.raises(m3connect.SchemaMismatchError, match="colbert_dtype='float32'"):
        store_factory(colbert_dtype="float32")
    with pytest.raises(m3connect.SchemaMismatchError, match="colbert_pool_factor=1"):
        store_factory(colbert_pool_factor=1)
    with pytest.raises(m3connect.SchemaMismatchError, match="colbert_pool_factor=3"):
        store_factory(colbert_dtype=dtype, colbert_pool_factor=3)
    same = store_factory(colbert_dtype=dtype, colbert_pool_factor=2)
    same.close()
    again = store_factory()  # no options: the stored ones apply, to new writes too
    assert (again.spec.colbert_dtype, again.spec.colbert_pool_factor) == (dtype, 2)
    assert again.count() == 3
    again.add(TEXTS[3:5], ids=IDS[3:5])
    out = encoder.encode(TEXTS[3:5])
    got = again.adapter.fetch(IDS[3:5], fields=("colbert",))
    for j, rid in enumerate(IDS[3:5]):
        np.testing.assert_allclose(got[rid].colbert, stored_form(out.colbert[j], again.spec), rtol=0,
                                   atol=_atol(store_factory.engine, dtype))


def test_a_collection_without_colbert(store_factory, encoder) -> None:
    """``store_colbert=False``: nothing of ColBERT is kept; default searches use dense and
    sparse with exact scores; a ColBERT weight, or reopening with ColBERT, is refused."""
    store = store_factory(store_colbert=False)
    store.add(TEXTS, ids=IDS)
    assert store.spec.store_colbert is False and store.count() == len(IDS)
    stored = store.adapter.fetch(IDS[:3])
    assert all(rec.colbert is not None and len(rec.colbert) == 0 for rec in stored.values())
    docs = encoder.encode(TEXTS)
    q = encoder.encode_one(QUERIES[0])
    want = sorted(((scoring.combine(scoring.pair_scores(q, docs.item(i), ("dense", "sparse")), (0.4, 0.2, 0)), rid)
                   for i, rid in enumerate(IDS)), key=lambda t: (-t[0], t[1]))
    for fusion in ("exact", "engine", "rrf"):
        hits = store.search(QUERIES[0], k=5, fusion=fusion)  # the default weights, without ColBERT
        assert len(hits) == 5 and all(set(h.scores) == {"dense", "sparse"} for h in hits), fusion
    hits = store.search(QUERIES[0], k=5)
    assert [h.id for h in hits] == [rid for _, rid in want[:5]]
    assert [h.score for h in hits] == pytest.approx([s for s, _ in want[:5]], abs=1e-4)
    for weights in [(0.4, 0.2, 0.4), (0, 0, 1)]:
        with pytest.raises(m3connect.InvalidInputError, match="store_colbert=False"):
            store.search(QUERIES[0], weights=weights)
    with pytest.raises(m3connect.InvalidInputError, match="store_colbert=False"):
        store.search(QUERIES[0], weights=(1, 0, 0), candidate_routes=["colbert"])
    if store_factory.engine == "qdrant-memory":
        return  # an in-memory Qdrant is gone once closed
    store.close()
    with pytest.raises(m3connect.SchemaMismatchError, match="store_colbert=True"):
        store_factory(store_colbert=True)
    again = store_factory()  # left out: the stored choice
    assert again.spec.store_colbert is False and again.count() == len(IDS)


def test_reencoded_colbert_on_a_collection_without_it(store_factory, encoder) -> None:
    """``reencode_colbert=True``: ColBERT scored by encoding the candidates' texts again, so a
    collection that keeps none still answers M3's full formula exactly (here every document is a
    candidate, so the ranking is the brute-force one)."""
    store = store_factory(store_colbert=False)
    store.add(TEXTS, ids=IDS)
    docs = encoder.encode(TEXTS)
    q = encoder.encode_one(QUERIES[1])
    want = sorted(((scoring.combine(scoring.pair_scores(q, docs.item(i)), (0.4, 0.2, 0.4)), rid)
                   for i, rid in enumerate(IDS)), key=lambda t: (-t[0], t[1]))
    hits = store.search(QUERIES[1], k=5, reencode_colbert=True)  # default weights, ColBERT included
    assert [h.id for h in hits] == [rid for _, rid in want[:5]]
    assert [h.score for h in hits] == pytest.approx([s for s, _ in want[:5]], abs=1e-4)
    assert all(set(h.scores) == {"dense", "sparse", "colbert"} for h in hits)
    with pytest.raises(m3connect.InvalidInputError, match="fusion='exact'"):
        store.search(QUERIES[1], reencode_colbert=True, fusion="engine")
    with pytest.raises(m3connect.InvalidInputError, match="candidate_routes"):
        store.search(QUERIES[1], weights=(0, 0, 1), reencode_colbert=True)
    assert store.search(QUERIES[1], k=3, weights=(0, 0, 1), reencode_colbert=True,
                        candidate_routes=["dense", "sparse"])[0].id == max(
        IDS, key=lambda rid: scoring.colbert_score(q.colbert, docs.colbert[IDS.index(rid)]))


def test_reencode_colbert_is_refused_where_colbert_is_stored(store_factory) -> None:
    store = store_factory()
    store.add(TEXTS[:3], ids=IDS[:3])
    with pytest.raises(m3connect.InvalidInputError, match="store_colbert=False"):
        store.search(QUERIES[0], reencode_colbert=True)

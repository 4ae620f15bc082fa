"""Precomputed vectors through the public API on every engine: ``connect(spec=)``,
``add_vectors`` and ``search_by_vectors``, checked against a numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest

import m3connect
from m3connect import CollectionSpec, Vectors, scoring
from tests.random_vectors import random_corpus

pytestmark = pytest.mark.integration

SPEC = CollectionSpec(model="precomputed-test", fingerprint="v1", dense_dim=16, colbert_dim=8)


def _corpus(n: int, seed: int = 0) -> list[Vectors]:
    return random_corpus(n, dense_dim=16, colbert_dim=8, vocab=200, max_terms=12, max_rows=9, seed=seed)


def test_add_vectors_then_exact_search_equals_brute_force(store_factory) -> None:
    store = store_factory(encoder=None, spec=SPEC)
    docs = _corpus(60)
    ids = [f"v{i}" for i in range(len(docs))]
    metadata = [{"i": i} for i in range(60)]
    assert store.add_vectors(docs, texts=[f"text {i}" for i in ids], ids=ids, metadata=metadata) == ids
    assert store.count() == 60
    query = _corpus(1, seed=9)[0]
    for weights in [(1, 0, 0), (0.4, 0.2, 0.4), (0, 0, 1), (0.8, 0.1, 0.1)]:
        truth = sorted(((scoring.combine(scoring.pair_scores(query, d), weights), rid) for rid, d in zip(ids, docs)),
                       key=lambda t: (-t[0], t[1]))[:5]
        hits = store.search_by_vectors(query, k=5, weights=weights)
        assert [h.id for h in hits] == [rid for _, rid in truth], weights
        np.testing.assert_allclose([h.score for h in hits], [s for s, _ in truth], atol=1e-5)
        assert hits[0].text == f"text {hits[0].id}"
        if weights == (0.8, 0.1, 0.1):  # most candidates provably miss the top 5: ColBERT skips them
            assert store.last_query_stats.pruned > 0, store.last_query_stats


def test_add_vectors_refuses_bad_vectors_and_stores_nothing(store_factory) -> None:
    store = store_factory(encoder=None, spec=SPEC)
    good = _corpus(2)
    store.add_vectors(good, ids=["a", "b"])
    bad = [
        (Vectors(dense=np.ones(15, np.float32), sparse={}, colbert=good[0].colbert), "dense must have shape"),
        (Vectors(dense=good[0].dense, sparse={"7": 0.1}, colbert=good[0].colbert), "not a non-negative int"),
        (Vectors(dense=good[0].dense, sparse={}, colbert=np.ones((3, 9), np.float32)), "colbert must have shape"),
        (Vectors(dense=good[0].dense * np.nan, sparse={}, colbert=good[0].colbert), "NaN"),
        (Vectors(dense=good[0].dense, sparse=None, colbert=good[0].colbert), "sparse must be a dict"),
        (Vectors(dense=good[0].dense, sparse={}, colbert=good[0].colbert * 2), "L2-normalised"),
    ]
    for vec, message in bad:
        with pytest.raises(m3connect.M3Error, match=message):
            store.add_vectors([good[1], vec], ids=["c", "d"])
    assert store.count() == 2 and store.get(["c"]) == []


def test_spec_and_encoder_are_exclusive(store_factory, encoder) -> None:
    with pytest.raises(m3connect.InvalidInputError, match="either encoder= or spec="):
        store_factory(encoder=encoder, spec=SPEC)

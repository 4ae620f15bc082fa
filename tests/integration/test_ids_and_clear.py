"""Listing ids by filter (``M3Store.ids``), deleting by filter (``M3Store.clear``) and reading
stored vectors back (``M3Store.get(vectors=...)``) on every engine.

The collections hold more documents than one batch, so every engine's cursor pages
(Milvus ``query_iterator``, Qdrant ``scroll``, Qdrant Edge ``EdgeShard.scroll``,
OpenSearch ``helpers.scan``); no zero-vector search and no result window is involved.
"""

from __future__ import annotations

import numpy as np
import pytest

import m3connect
from m3connect import CollectionSpec, Vectors
from m3connect.adapters.base import Adapter
from tests.random_vectors import random_corpus

pytestmark = pytest.mark.integration

SPEC = CollectionSpec(model="ids-test", fingerprint="v1", dense_dim=8, colbert_dim=4)
N = 2500
BATCH = 300  # several batches per listing


def _corpus(n: int, seed: int = 0) -> list[Vectors]:
    return random_corpus(n, dense_dim=SPEC.dense_dim, colbert_dim=SPEC.colbert_dim, vocab=100, max_terms=6,
                         max_rows=5, seed=seed)


def _filled(store_factory, n: int = N, **kwargs) -> tuple[m3connect.M3Store, list[str], list[Vectors]]:
    store = store_factory(encoder=None, spec=SPEC, **kwargs)
    docs = _corpus(n)
    ids = [f"doc-{i}" for i in range(n)]
    store.add_vectors(docs, texts=[f"text {i}" for i in range(n)], ids=ids,
                      metadata=[{"g": i % 5, "n": i, "tag": "odd" if i % 2 else "even"} for i in range(n)])
    assert store.count() == n
    return store, ids, docs


def test_ids_lists_every_id_beyond_one_batch_with_and_without_filter(store_factory) -> None:
    store, ids, _ = _filled(store_factory)
    listed = list(store.ids(batch_size=BATCH))
    assert len(listed) == N and set(listed) == set(ids)  # each id once
    assert set(store.ids()) == set(ids)  # the default batch size
    assert set(store.ids({"g": 2}, batch_size=BATCH)) == {f"doc-{i}" for i in range(N) if i % 5 == 2}
    assert set(store.ids({"n": {"$gte": 1000}}, batch_size=BATCH)) == {f"doc-{i}" for i in range(1000, N)}
    both = {"$and": [{"tag": "odd"}, {"g": {"$in": [1, 3]}}]}
    assert set(store.ids(both, batch_size=BATCH)) == {f"doc-{i}" for i in range(N) if i % 2 and i % 5 in (1, 3)}
    assert list(store.ids({"g": 99}, batch_size=BATCH)) == []
    with pytest.raises(m3connect.InvalidInputError, match="batch_size"):
        store.ids(batch_size=0)


def test_deleting_listed_ids_while_iterating_skips_none(store_factory) -> None:
    """A caller may write inside the loop (no lock is held across it), and deleting ids already
    listed never hides the ones still to come."""
    n = 1000
    store, ids, _ = _filled(store_factory, n=n)
    seen: list[str] = []
    doomed: list[str] = []
    for rid in store.ids(batch_size=BATCH):
        seen.append(rid)
        if int(rid.split("-")[1]) % 5 == 3:
            doomed.append(rid)
        if len(doomed) >= 200:
            store.delete(doomed)
            doomed = []
    store.delete(doomed)
    assert sorted(seen) == sorted(ids)
    assert set(store.ids(batch_size=BATCH)) == {f"doc-{i}" for i in range(n) if i % 5 != 3}


def test_clear_with_filter_removes_exactly_the_matching(store_factory) -> None:
    store, ids, _ = _filled(store_factory)
    assert store.clear({"g": 1}, batch_size=BATCH) == N // 5
    rest = {f"doc-{i}" for i in range(N) if i % 5 != 1}
    assert store.count() == len(rest)
    assert set(store.ids(batch_size=BATCH)) == rest
    assert store.get(["doc-1", "doc-2"]) == [m3connect.Document("doc-2", "text 2", {"g": 2, "n": 2, "tag": "even"})]
    assert store.clear({"g": 1}) == 0  # nothing matches any more
    assert store.clear({"n": {"$lt": 10}}, batch_size=BATCH) == 8  # doc-0..9 without doc-1 and doc-6
    assert store.count() == len(rest) - 8


def test_clear_empties_but_keeps_the_collection(store_factory) -> None:
    store, ids, docs = _filled(store_factory, n=700)
    spec = store.spec
    assert store.clear(batch_size=BATCH) == 700
    assert store.count() == 0 and list(store.ids()) == []
    assert store.exists and store.spec == spec
    assert store.clear() == 0
    store.add_vectors(docs[:3], texts=["a", "b", "c"], ids=["x", "y", "z"], metadata=[{"g": 1}] * 3)
    assert store.count() == 3 and sorted(store.ids()) == ["x", "y", "z"]
    hits = store.search_by_vectors(docs[1], k=1, weights=(1.0, 0.0, 0.0))
    assert [h.id for h in hits] == ["y"] and hits[0].text == "b"
    assert store.adapter.read_spec() == spec  # the engine still holds the schema


@pytest.mark.parametrize("colbert_dtype", ["float32", "float16"])
def test_get_returns_the_stored_vectors(store_factory, colbert_dtype: str) -> None:
    store, ids, docs = _filled(store_factory, n=50, colbert_dtype=colbert_dtype)
    asked = ["doc-7", "missing", "doc-3", "doc-40"]
    plain = store.get(asked)
    assert [d.id for d in plain] == ["doc-7", "doc-3", "doc-40"]
    assert all(d.vectors is None for d in plain)
    got = store.get(asked, vectors=("dense", "sparse", "colbert"))
    assert [d.id for d in got] == ["doc-7", "doc-3", "doc-40"]
    for d in got:
        want = docs[int(d.id.split("-")[1])]
        assert d.text == f"text {d.id.split('-')[1]}" and d.metadata["n"] == int(d.id.split("-")[1])
        assert d.vectors is not None
        np.testing.assert_allclose(d.vectors.dense, want.dense, rtol=1e-6, atol=1e-7)
        assert sorted(d.vectors.sparse) == sorted(want.sparse)
        np.testing.assert_allclose([d.vectors.sparse[t] for t in sorted(want.sparse)],
                                   [want.sparse[t] for t in sorted(want.sparse)], rtol=1e-6)
        assert d.vectors.colbert.shape == want.colbert.shape
        if colbert_dtype == "float16":  # float16 storage (qdrant-client's local mode keeps float32)
            np.testing.assert_allclose(d.vectors.colbert, want.colbert, atol=1e-3)
        else:
            np.testing.assert_allclose(d.vectors.colbert, want.colbert, rtol=1e-6, atol=1e-7)
    only_dense = store.get(["doc-3"], vectors=("dense",))[0].vectors
    assert only_dense is not None and only_dense.sparse is None and only_dense.colbert is None
    np.testing.assert_allclose(only_dense.dense, docs[3].dense, rtol=1e-6, atol=1e-7)
    assert store.get(["doc-3"], vectors="sparse")[0].vectors.sparse.keys() == docs[3].sparse.keys()
    with pytest.raises(m3connect.InvalidInputError, match="routes"):
        store.get(["doc-3"], vectors=("dense", "bm25"))


def test_missing_collection_ids_raise_and_clear_is_zero(store_factory) -> None:
    store = store_factory(encoder=None, spec=SPEC)  # created by the first write, not before
    with pytest.raises(m3connect.CollectionNotFoundError):
        store.ids()
    assert store.clear() == 0 and store.clear({"g": 1}) == 0
    assert not store.exists
    store.add_vectors(_corpus(3), ids=["a", "b", "c"])
    assert sorted(store.ids()) == ["a", "b", "c"]
    store.drop()
    with pytest.raises(m3connect.CollectionNotFoundError):
        store.ids({"g": 1})
    assert store.clear() == 0


class _FailingCursor(Adapter):
    """An adapter whose id cursor fails after its first batch."""

    engine = "fake"

    def __init__(self, exc: Exception) -> None:
        super().__init__("c")
        self.exc = exc
        self.secrets = ("s3cret-token",)

    def iter_ids(self, flt, batch_size=1000):  # type: ignore[override]
        yield ["a"]
        raise self.exc

    def read_spec(self):  # type: ignore[override]
        return None

    def create(self, spec):  # type: ignore[override]
        pass

    def drop(self):  # type: ignore[override]
        pass

    def upsert(self, records):  # type: ignore[override]
        pass

    def delete(self, ids):  # type: ignore[override]
        pass

    def count(self):  # type: ignore[override]
        return 0

    def existing_ids(self, ids):  # type: ignore[override]
        return set()

    def fetch(self, ids, *, fields=()):  # type: ignore[override]
        return {}

    def search_route(self, route, query, k, flt):  # type: ignore[override]
        return []


@pytest.mark.parametrize(
    ("raw", "mapped"),
    [
        (ConnectionRefusedError("refused for s3cret-token"), m3connect.BackendUnavailableError),
        (ValueError("Collection c not found"), m3connect.CollectionNotFoundError),
        (RuntimeError("disk full near s3cret-token"), m3connect.BackendError),
    ],
)
def test_cursor_errors_are_translated_while_iterating(raw: Exception, mapped: type[Exception]) -> None:
    """``iter_ids`` is a generator: the translator covers each step, not only the call."""
    batches = _FailingCursor(raw).iter_ids(None, 10)
    assert next(batches) == ["a"]
    with pytest.raises(mapped) as info:
        next(batches)
    assert "s3cret-token" not in str(info.value)
    with pytest.raises(NotImplementedError):  # the base class has no cursor
        next(Adapter.iter_ids(_FailingCursor(raw), None))

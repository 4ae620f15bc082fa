"""One store shared by threads: 8 searching while one overwrites gives the single-threaded results.

The writer re-writes documents with identical content, so every search must return exactly
what it returned before the threads started, on every engine; any error is a failure (the
Milvus overwrite retires ColBERT chunks while readers may be scoring them, for instance).
"""

from __future__ import annotations

import threading
import time

import pytest

from m3connect.testing import sample_corpus

SEARCHERS = 8
SECONDS = 3.0


@pytest.mark.parametrize("fusion", ["exact", "engine"])
def test_eight_searchers_and_one_writer(store_factory, encoder, fusion: str) -> None:
    store = store_factory()
    docs = sample_corpus()[:40]
    texts = [d["text"] for d in docs]
    ids = [d["id"] for d in docs]
    out = encoder.encode(texts)
    vectors = [out.item(i) for i in range(len(texts))]
    store.add_vectors(vectors, texts=texts, ids=ids)
    queries = [encoder.encode_one(q) for q in ("dense retrieval", "sparse lexical weights", "late interaction")]
    weights = (0.4, 0.2, 0.4)

    def run(q):  # noqa: ANN001, ANN202
        return [(h.id, round(h.score, 5)) for h in store.search_by_vectors(q, k=5, weights=weights, fusion=fusion)]

    expected = [run(q) for q in queries]
    errors: list[BaseException] = []
    mismatches: list[str] = []
    stop = time.monotonic() + SECONDS
    searches = [0]

    def searcher(n: int) -> None:
        try:
            while time.monotonic() < stop:
                q = n % len(queries)
                got = run(queries[q])
                searches[0] += 1
                if got != expected[q]:
                    mismatches.append(f"query {q}: {got} != {expected[q]}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer() -> None:
        try:
            i = 0
            while time.monotonic() < stop:
                chunk = slice(i % len(ids), i % len(ids) + 5)
                store.add_vectors(vectors[chunk], texts=texts[chunk], ids=ids[chunk])
                i += 5
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(SEARCHERS)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors[:3]]
    assert not mismatches, mismatches[:3]
    assert searches[0] >= SEARCHERS  # every thread searched at least once
    assert store.count() == len(ids)

"""Milvus-specific guarantees: in-engine route scores, filters on every route, packed ColBERT.

Runs on Milvus Lite (always) and on a server when ``M3_MILVUS_URI`` names one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import m3connect
from m3connect import scoring
from m3connect.adapters.base import Adapter
from m3connect.filters import parse_filter
from m3connect.testing import synthetic_corpus

pytestmark = pytest.mark.integration

N_DOCS = 500
TEXTS = synthetic_corpus(N_DOCS, min_words=8, max_words=40, seed=5)
IDS = [f"doc-{i}" for i in range(N_DOCS)]
META = [{"grp": "rare" if i % 45 == 7 else "common", "rank": i} for i in range(N_DOCS)]  # 11 of 500 are rare
RARE = {IDS[i] for i in range(N_DOCS) if META[i]["grp"] == "rare"}
QUERIES = ["search engine vectors", "bread oven", "model"]
WEIGHTS = [(1, 0, 0), (0, 0, 1), (0.4, 0.2, 0.4)]
ODD_IDS = ['back\\slash', 'quote"double', "quote'single", 'both \\" \' mixed', "line\nbreak\ttab"]


def _uri(root: Path) -> str:
    server = os.environ.get("M3_MILVUS_URI")
    if server:
        return "milvus://" + server.split("://", 1)[-1]
    return f"milvus:///{root}/m3.db"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("milvus-specific")
    store = m3connect.connect(_uri(root), collection="specific", encoder=encoder)
    store.add(TEXTS, ids=IDS, metadata=META)
    reps = encoder.encode(TEXTS)
    yield store, reps
    store.drop()
    store.close()


@pytest.fixture
def fresh_uri(tmp_path) -> tuple[str, str]:
    return _uri(tmp_path), f"f{abs(hash(str(tmp_path))) % 10**8}"


@pytest.fixture
def fresh(fresh_uri, encoder):
    uri, name = fresh_uri
    store = m3connect.connect(uri, collection=name, encoder=encoder)
    yield store
    store.drop()
    store.close()


def _forbid(monkeypatch, obj: Any, name: str, why: str) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} called: {why}")

    monkeypatch.setattr(obj, name, refuse)


def test_score_equals_scoring_module_and_reads_only_the_candidates(corpus, encoder, monkeypatch) -> None:
    """Dense and sparse are scored in the engine (no vector reaches Python); ColBERT reads
    the candidates' packed chunks and nothing else (MaxSim in the engine was measured to
    be slower on Milvus Lite, see benchmarks/milvus_designs.py)."""
    store, reps = corpus
    adapter = store.adapter
    ids = IDS[::7] + ["never-stored"]
    # No client-side fallback, no fetch of route vectors into Records.
    real_fetch = adapter.fetch

    def fetch(ids_: Any, *, fields: Any = ("dense", "sparse", "colbert")) -> Any:
        assert not set(fields), f"route vectors {set(fields)} were fetched into Python"
        return real_fetch(ids_, fields=fields)

    monkeypatch.setattr(adapter, "fetch", fetch)
    _forbid(monkeypatch, Adapter, "score", "the client-side fallback ran")
    # ColBERT reads exactly the packed chunks of the ids asked, from the companion
    # collection; no query of the main collection returns a vector.
    real_query = adapter.client.query
    read: list[str] = []

    def counting_query(name: str, *args: Any, **kwargs: Any) -> Any:
        rows = real_query(name, *args, **kwargs)
        if name == adapter.colbert_collection:
            read.extend(r["key"] for r in rows)
        else:
            assert not {"dense", "sparse", "colbert_mean"} & set(kwargs.get("output_fields") or []), kwargs
        return rows

    monkeypatch.setattr(adapter.client, "query", counting_query)
    for text in QUERIES:
        q = encoder.encode_one(text)
        got = adapter.score(ids, q, ["dense", "sparse", "colbert"])
        assert set(got) == set(ids[:-1])  # the unknown id is left out
        for rid in ids[:-1]:
            ref = scoring.pair_scores(q, reps.item(IDS.index(rid)))
            for route in ("dense", "sparse", "colbert"):
                assert got[rid][route] == pytest.approx(ref[route], abs=1e-4), (rid, route)
    dim_bytes = reps.colbert[0].shape[1] * 4
    chunks = sum(-(-reps.colbert[IDS.index(r)].shape[0] * dim_bytes // 45000) for r in ids[:-1])
    assert len(read) == chunks * len(QUERIES)  # the candidates' chunks, nothing else


def test_score_of_one_route_reads_nothing_else(corpus, encoder, monkeypatch) -> None:
    store, _ = corpus
    adapter = store.adapter
    _forbid(monkeypatch, adapter, "_load_colbert", "ColBERT was read for a dense-only score")
    got = adapter.score(IDS[:50], encoder.encode_one("model"), ["dense"])
    assert set(got) == set(IDS[:50]) and all(set(v) == {"dense"} for v in got.values())


@pytest.mark.parametrize("fusion", ["exact", "engine", "rrf"])
@pytest.mark.parametrize("weights", WEIGHTS, ids=["dense", "colbert", "all"])
def test_selective_filter_returns_k_matching_hits(corpus, encoder, fusion, weights) -> None:
    store, reps = corpus
    flt = {"grp": "rare"}
    for text in QUERIES[:2]:
        hits = store.search(text, k=10, weights=weights, filter=flt, fusion=fusion)
        assert len(hits) == 10, (fusion, weights, text)
        assert {h.id for h in hits} <= RARE
        assert len({h.id for h in hits}) == 10
        if fusion == "exact":  # exact over every matching document: the brute-force top 10
            q = encoder.encode_one(text)
            truth = sorted(
                ((scoring.combine(scoring.pair_scores(q, reps.item(IDS.index(r))), weights), r) for r in RARE),
                key=lambda t: (-t[0], t[1]),
            )[:10]
            assert [h.id for h in hits] == [r for _, r in truth]
            np.testing.assert_allclose([h.score for h in hits], [s for s, _ in truth], atol=1e-4)


def test_every_route_filters_in_the_engine(corpus, encoder) -> None:
    store, _ = corpus
    q = encoder.encode_one("search engine vectors")
    flt = parse_filter({"grp": "rare"})
    for route in ("dense", "sparse", "colbert"):
        got = store.adapter.search_route(route, q[route], 10, flt)
        assert got and {rid for rid, _ in got} <= RARE, route
    for method in ("weighted", "rrf"):
        for weights in WEIGHTS:
            got = store.adapter.engine_search(q, scoring.Weights(*weights), 10, flt, 100, method)
            assert len(got) == 10 and {rid for rid, _ in got} <= RARE, (method, weights)


def test_engine_weighted_fusion_recall_against_exact(corpus, encoder) -> None:
    store, _ = corpus
    recalls = []
    for text in synthetic_corpus(10, min_words=2, max_words=8, seed=12):
        exact = {h.id for h in store.search(text, k=10)}
        engine = {h.id for h in store.search(text, k=10, fusion="engine")}
        recalls.append(len(exact & engine) / 10)
    assert np.mean(recalls) >= 0.95, recalls


def test_ids_with_backslashes_and_quotes(fresh, encoder) -> None:
    texts = [f"odd id number {i} about search" for i in range(len(ODD_IDS))]
    assert fresh.add(texts, ids=ODD_IDS, metadata=[{"who": i} for i in ODD_IDS]) == ODD_IDS
    assert fresh.count() == len(ODD_IDS)
    assert [d.id for d in fresh.get(ODD_IDS[::-1])] == ODD_IDS[::-1]
    assert fresh.adapter.existing_ids(ODD_IDS + ["other"]) == set(ODD_IDS)
    for rid in ODD_IDS:
        hits = fresh.search("search", k=10, weights=(0.4, 0.2, 0.4), filter={"who": rid})
        assert [h.id for h in hits] == [rid]
    q = encoder.encode_one("odd id")
    got = fresh.adapter.score(ODD_IDS, q, ["dense", "sparse", "colbert"])
    assert set(got) == set(ODD_IDS)
    fresh.add(["replaced"], ids=[ODD_IDS[1]], metadata=[{"who": "x"}])
    assert fresh.get([ODD_IDS[1]])[0].text == "replaced" and fresh.count() == len(ODD_IDS)
    fresh.delete([ODD_IDS[0], ODD_IDS[3]])
    assert fresh.count() == len(ODD_IDS) - 2 and fresh.get([ODD_IDS[0]]) == []
    with pytest.raises(m3connect.M3Error, match="control characters"):
        fresh.add(["x"], ids=["bell\x07"])


def _chunk_rows(store) -> int:
    rows = store.adapter.client.query(store.adapter.colbert_collection, filter="", output_fields=["count(*)"])
    return int(rows[0]["count(*)"])


def test_overwrite_leaves_no_stale_chunks_and_a_crash_keeps_documents_whole(fresh, encoder, monkeypatch) -> None:
    texts = ["word " * n for n in (3, 40, 120)]
    fresh.add(texts, ids=["a", "b", "c"])
    before = _chunk_rows(fresh)
    fresh.add(["short"] * 3, ids=["a", "b", "c"])  # fewer tokens: old chunks must go
    fresh.adapter.flush()
    assert _chunk_rows(fresh) == 3 and before > 3
    # A crash after the new chunks are written, before the document rows: the stored
    # documents stay the old version, complete.
    adapter = fresh.adapter
    real_upsert = adapter.client.upsert

    def crash(name: str, rows: Any, **kwargs: Any) -> Any:
        if name == adapter.collection:
            raise RuntimeError("power cut")
        return real_upsert(name, rows, **kwargs)

    monkeypatch.setattr(adapter.client, "upsert", crash)
    with pytest.raises(m3connect.IngestError):
        fresh.add(["a much longer replacement text " * 5], ids=["b"])
    monkeypatch.setattr(adapter.client, "upsert", real_upsert)
    # A crash while the ColBERT chunks go in: no document row may point at them yet.
    real_insert = adapter.client.insert

    def crash_chunks(name: str, rows: Any, **kwargs: Any) -> Any:
        if name == adapter.colbert_collection:
            raise RuntimeError("disk full")
        return real_insert(name, rows, **kwargs)

    monkeypatch.setattr(adapter.client, "insert", crash_chunks)
    with pytest.raises(m3connect.IngestError):
        fresh.add(["another replacement " * 7], ids=["b"])
    monkeypatch.setattr(adapter.client, "insert", real_insert)
    rec = adapter.fetch(["b"])["b"]
    expected = encoder.encode(["short"]).colbert[0]
    np.testing.assert_allclose(rec.colbert, expected, atol=1e-6)
    assert fresh.get(["b"])[0].text == "short"
    fresh.delete(["b"])  # removes the orphaned chunks of the failed write too
    fresh.adapter.flush()
    assert _chunk_rows(fresh) == 2


def test_older_layout_is_refused_with_a_reason(fresh, fresh_uri, encoder) -> None:
    fresh.add(["x"], ids=["x"])  # the collection is created by the first write
    adapter = fresh.adapter
    spec = json.loads(adapter.spec.to_json())  # no "layout": what the token-row version wrote
    adapter._write_meta(spec)
    with pytest.raises(m3connect.SchemaMismatchError, match="re-ingest"):
        m3connect.connect(fresh_uri[0], collection=fresh_uri[1], encoder=encoder)

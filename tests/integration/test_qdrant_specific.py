"""Qdrant-specific behaviour: Qdrant Edge storage and routing, in-engine scoring, engine fusion."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

import m3connect
from m3connect import scoring
from m3connect.adapters.base import CollectionSpec
from m3connect.filters import matches, parse_filter
from m3connect.store import parse_uri
from m3connect.testing import synthetic_corpus
from m3connect.types import Vectors

pytest.importorskip("qdrant_edge")
pytest.importorskip("qdrant_client")

from m3connect.adapters.qdrant import QdrantAdapter  # noqa: E402
from m3connect.adapters.qdrant_edge import SHARD_DIR, SPEC_FILE, QdrantEdgeAdapter  # noqa: E402

pytestmark = pytest.mark.integration

N = 300
TEXTS = synthetic_corpus(N, min_words=8, max_words=40, seed=31)
IDS = [f"q{i:03d}" for i in range(N)]
META = [{"grp": "rare" if i % 50 == 7 else "common", "i": i, "flag": i % 3 == 0, "n": i % 2} for i in range(N)]
QUERIES = synthetic_corpus(8, min_words=2, max_words=8, seed=32)


def _spec(dense_dim: int = 8, colbert_dim: int = 8, dtype: str = "float32") -> CollectionSpec:
    return CollectionSpec(model="m", fingerprint="f", dense_dim=dense_dim, colbert_dim=colbert_dim, colbert_dtype=dtype)


def _random_vectors(rng: np.random.Generator, n: int, dim: int = 8) -> list[Vectors]:
    out = []
    for _ in range(n):
        d = rng.standard_normal(dim).astype(np.float32)
        c = rng.standard_normal((int(rng.integers(2, 6)), dim)).astype(np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)  # BGE-M3's ColBERT rows are unit vectors
        toks = rng.choice(40, 5, replace=False)
        out.append(Vectors(d / np.linalg.norm(d), {int(t): float(w) for t, w in zip(toks, rng.random(5))}, c))
    return out


@pytest.fixture(scope="module")
def corpus(encoder):
    return encoder.encode(TEXTS)


@pytest.fixture(params=["edge", "local"])
def filled(request, tmp_path, encoder):
    uri = f"qdrant:///{tmp_path}/edge" if request.param == "edge" else f"qdrant+local:///{tmp_path}/local"
    store = m3connect.connect(uri, collection="docs", encoder=encoder)
    store.add(TEXTS, ids=IDS, metadata=META)
    yield store
    store.close()


# -- routing and persistence -----------------------------------------------------------------


def test_plain_qdrant_dir_is_edge_and_reopen_checks_the_spec(tmp_path) -> None:
    uri = f"qdrant:///{tmp_path}/db"
    spec = _spec(dtype="float16")
    store = m3connect.connect(uri, collection="c", spec=spec)
    assert isinstance(store.adapter, QdrantEdgeAdapter)
    store.add_vectors(_random_vectors(np.random.default_rng(0), 5), ids=list("abcde"))
    store.close()

    cdir = tmp_path / "db" / "c"
    assert json.loads((cdir / SPEC_FILE).read_text()) == json.loads(spec.to_json())
    assert (cdir / SHARD_DIR).is_dir()
    assert not [p for p in cdir.iterdir() if p.name.endswith(".tmp")]  # the spec was replaced atomically
    assert not (tmp_path / "db" / "meta.json").exists()  # Edge never looks like qdrant-client local mode

    again = m3connect.connect(uri, collection="c")  # the stored spec opens it without an encoder
    assert again.count() == 5 and again.spec == spec
    again.close()
    with pytest.raises(m3connect.SchemaMismatchError, match="dense_dim"):
        m3connect.connect(uri, collection="c", spec=_spec(dense_dim=16))
    with pytest.raises(m3connect.SchemaMismatchError, match="model weights"):
        m3connect.connect(uri, collection="c", spec=CollectionSpec("m", "other", 8, 8, "float16"))
    survivor = m3connect.connect(uri, collection="c", spec=spec)
    assert survivor.count() == 5
    survivor.close()


def test_edge_read_spec_fresh_foreign_and_tampered(tmp_path) -> None:
    location = parse_uri(f"qdrant:///{tmp_path}/db")
    assert QdrantEdgeAdapter(location, "fresh").read_spec() is None

    (tmp_path / "db" / "foreign").mkdir(parents=True)
    (tmp_path / "db" / "foreign" / "data.bin").write_bytes(b"x")
    with pytest.raises(m3connect.SchemaMismatchError, match="not created by m3connect"):
        m3connect.connect(f"qdrant:///{tmp_path}/db", collection="foreign", spec=_spec())

    store = m3connect.connect(f"qdrant:///{tmp_path}/db", collection="t", spec=_spec())
    assert not (tmp_path / "db" / "t").exists()  # created by the first write, not by connect
    store.add_vectors(_random_vectors(np.random.default_rng(0), 1), ids=["1"])
    store.close()
    spec_file = tmp_path / "db" / "t" / SPEC_FILE
    spec_file.write_text(_spec(dense_dim=12).to_json())  # the spec no longer describes the shard
    with pytest.raises(m3connect.SchemaMismatchError, match="does not match"):
        m3connect.connect(f"qdrant:///{tmp_path}/db", collection="t")


def test_collections_are_separate_shards(tmp_path) -> None:
    uri = f"qdrant:///{tmp_path}/db"
    a = m3connect.connect(uri, collection="a", spec=_spec())
    b = m3connect.connect(uri, collection="b", spec=_spec())
    a.add_vectors(_random_vectors(np.random.default_rng(1), 3), ids=["1", "2", "3"])
    b.add_vectors(_random_vectors(np.random.default_rng(2), 1), ids=["9"])
    assert (a.count(), b.count()) == (3, 1)
    b.drop()
    assert not (tmp_path / "db" / "b").exists() and a.count() == 3
    a.close()


def test_one_shard_per_collection_shared_in_process_locked_across_processes(tmp_path) -> None:
    uri = f"qdrant:///{tmp_path}/db"
    first = m3connect.connect(uri, collection="c", spec=_spec())
    first.add_vectors(_random_vectors(np.random.default_rng(4), 1), ids=["z"])
    first.delete(["z"])
    second = m3connect.connect(uri, collection="c")
    assert second.adapter.shard is first.adapter.shard  # one open shard, not two writers
    first.add_vectors(_random_vectors(np.random.default_rng(5), 2), ids=["a", "b"])
    assert second.count() == 2
    first.close()
    assert second.count() == 2  # still open for the other store
    code = (
        "import sys, m3connect\n"
        "try:\n"
        f"    m3connect.connect({uri!r}, collection='c')\n"
        "except m3connect.BackendUnavailableError as e:\n"
        "    print('refused:', e); sys.exit(3)\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode == 3 and "another process" in other.stdout, other.stdout + other.stderr
    second.close()
    with pytest.raises(m3connect.BackendError, match="not open"):
        second.count()
    third = m3connect.connect(uri, collection="c")
    assert third.count() == 2
    third.close()


def test_legacy_local_mode_directory_still_opens_in_local_mode(tmp_path, encoder) -> None:
    legacy = m3connect.connect(f"qdrant+local:///{tmp_path}/old", collection="docs", encoder=encoder)
    assert isinstance(legacy.adapter, QdrantAdapter)
    legacy.add(TEXTS[:4], ids=IDS[:4])
    legacy.close()
    assert (tmp_path / "old" / "meta.json").exists()  # what the URI routing looks for

    store = m3connect.connect(f"qdrant:///{tmp_path}/old", collection="docs", encoder=encoder)
    assert isinstance(store.adapter, QdrantAdapter)
    assert store.count() == 4 and store.search(TEXTS[2], k=1, weights=(1, 1, 1))[0].id == IDS[2]
    store.close()


def test_missing_edge_package_names_the_pip_command(monkeypatch) -> None:
    module = "m3connect.adapters.qdrant_edge"
    monkeypatch.setitem(sys.modules, "qdrant_edge", None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(m3connect.MissingDependencyError, match=r"qdrant-edge-py.*pip install 'm3connect\[qdrant\]'"):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)


# -- storage ---------------------------------------------------------------------------------


def test_edge_fetch_moves_only_named_vectors_and_keeps_float16(tmp_path) -> None:
    store = m3connect.connect(f"qdrant:///{tmp_path}/db", collection="c", spec=_spec(dtype="float16"))
    vecs = _random_vectors(np.random.default_rng(2), 3)
    store.add_vectors(vecs, texts=["x", "y", "z"], ids=["a", "b", "c"], metadata=[{"k": 1}, {}, {}])
    bare = store.adapter.fetch(["a", "zz"], fields=())
    assert list(bare) == ["a"] and bare["a"].text == "x" and bare["a"].metadata == {"k": 1}
    assert bare["a"].dense is None and bare["a"].sparse is None and bare["a"].colbert is None
    only_sparse = store.adapter.fetch(["b"], fields=("sparse",))["b"]
    assert only_sparse.sparse == pytest.approx(vecs[1].sparse)
    assert only_sparse.dense is None and only_sparse.colbert is None
    full = store.adapter.fetch(["c"])["c"]
    np.testing.assert_allclose(full.dense, vecs[2].dense, rtol=1e-6)
    np.testing.assert_array_equal(full.colbert, vecs[2].colbert.astype(np.float16).astype(np.float32))
    store.close()


@pytest.mark.parametrize("scheme", ["qdrant", "qdrant+local"])
def test_bools_and_numbers_filter_as_the_reference(tmp_path, scheme) -> None:
    store = m3connect.connect(f"{scheme}:///{tmp_path}/db", collection="c", spec=_spec())
    meta = [{"v": True}, {"v": 1}, {"v": False}, {"v": 0}, {"v": 1.0}, {"v": "1"}]
    ids = [str(i) for i in range(len(meta))]
    store.add_vectors(_random_vectors(np.random.default_rng(3), len(meta)), ids=ids, metadata=meta)
    q = _random_vectors(np.random.default_rng(4), 1)[0]

    def found(flt):
        got = {h.id for h in store.search_by_vectors(q, k=10, weights=(1, 0, 0), filter=flt)}
        assert got == {i for i, m in zip(ids, meta) if matches(parse_filter(flt), m)}, flt  # reference semantics
        return got

    assert found({"v": True}) == {"0"}
    assert found({"v": False}) == {"2"}
    assert found({"v": 1}) == {"1", "4"}  # 1 == 1.0, as in the reference
    assert found({"v": 1.0}) == {"1", "4"}
    assert found({"v": {"$in": [True, "1"]}}) == {"0", "5"}
    assert found({"v": {"$gte": 1}}) == {"1", "4"}
    assert found({"v": {"$in": [1, 0]}}) == {"1", "3", "4"}
    store.close()


# -- scoring in the engine -------------------------------------------------------------------


def test_score_equals_the_scoring_module_without_fetching_vectors(filled, encoder, corpus, monkeypatch) -> None:
    real_fetch = filled.adapter.fetch

    def fetch_no_vectors(ids, *, fields=scoring.ROUTES):
        assert not fields, f"vectors {list(fields)} moved to the client"
        return real_fetch(ids, fields=fields)

    monkeypatch.setattr(filled.adapter, "fetch", fetch_no_vectors)
    q = encoder.encode_one("vector search engine")
    ids = IDS[::7] + ["never-stored"]
    got = filled.adapter.score(ids, q, ["dense", "sparse", "colbert"])
    assert set(got) == set(IDS[::7])
    zero_sparse = 0
    for i in range(0, N, 7):
        ref = scoring.pair_scores(q, corpus.item(i))
        for route in ("dense", "sparse", "colbert"):
            assert got[IDS[i]][route] == pytest.approx(ref[route], abs=1e-4), (IDS[i], route)
        zero_sparse += ref["sparse"] == 0
    assert zero_sparse > 0  # documents without a shared token are scored 0, not dropped
    only_sparse = filled.adapter.score(IDS[:20] + ["never-stored"], q, ["sparse"])
    assert set(only_sparse) == set(IDS[:20])
    assert filled.adapter.score([], q, ["dense"]) == {}


# -- engine fusion ---------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(0.4, 0.2, 0.4), (1.0, 0.3, 1.0), (0, 1, 1)])
def test_engine_fusion_recall_against_exact(filled, encoder, weights) -> None:
    recalls = []
    for query in QUERIES:
        exact = filled.search(query, k=10, weights=weights)
        engine = filled.search(query, k=10, weights=weights, fusion="engine")
        recalls.append(len({h.id for h in exact} & {h.id for h in engine}) / max(1, len(exact)))
        by_id = {h.id: h.score for h in exact}
        # the engine's formula is M3's weighted sum: where both rank a document, scores agree
        engine_scores = filled.adapter.engine_search(
            encoder.encode_one(query), scoring.validate_weights(weights), 10, None, 100, "weighted"
        )
        for rid, s in engine_scores:
            if rid in by_id:
                assert s == pytest.approx(by_id[rid], abs=1e-4), (query, rid)
    assert np.mean(recalls) >= 0.95, recalls


def test_selective_filter_returns_k_hits_on_every_fusion(filled, encoder, corpus) -> None:
    rare = {IDS[i] for i, m in enumerate(META) if m["grp"] == "rare"}
    query = TEXTS[123]  # a common document
    q = encoder.encode_one(query)
    for weights in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.4, 0.2, 0.4)]:
        truth = [
            IDS[i] for i in range(N)
            if IDS[i] in rare and (weights != (0, 1, 0) or scoring.pair_scores(q, corpus.item(i))["sparse"] > 0)
        ]
        for fusion in ("exact", "engine", "rrf"):
            hits = filled.search(query, k=len(rare), weights=weights, filter={"grp": "rare"}, fusion=fusion)
            assert {h.id for h in hits} <= rare, (fusion, weights)
            assert len(hits) == len(truth), (fusion, weights)

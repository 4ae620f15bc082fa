"""Distributed ingestion on a local Ray cluster (m3connect.distributed, ``ingest --ray``).

One Ray instance for the module: 2 CPUs, no dashboard, bound to loopback. Each test checks
the distributed result against the single-process ``store.ingest`` of the same corpus: the
same ids, texts, metadata and representations (within 1e-5).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Ray treats the node as a lone machine: it binds and advertises 127.0.0.1, not the host's address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="needs m3connect[ray]")
pytest.importorskip("ray.data")

import m3connect  # noqa: E402
from m3connect import IngestError  # noqa: E402
from m3connect.cli import main  # noqa: E402
from m3connect.distributed import ingest  # noqa: E402
from m3connect.store import document_id  # noqa: E402
from m3connect.testing import sample_corpus, synthetic_corpus  # noqa: E402

pytestmark = pytest.mark.integration

TOL = 1e-5


@pytest.fixture(scope="module")
def ray_local(request: pytest.FixtureRequest):
    # Start the OpenSearch node (if this module will use it) before Ray: a process forked while
    # Ray's gRPC threads run can abort before it execs the JVM.
    if any(item.module is request.module and "opensearch" in item.keywords and not item.get_closest_marker("skip")
           for item in request.session.items):
        request.getfixturevalue("opensearch_url")
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             log_to_driver=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, "Ray must stay on loopback"
    yield
    ray.shutdown()


def _corpus() -> list[dict[str, Any]]:
    """Sample docs with their ids and metadata, plus synthetic texts whose ids derive from content."""
    docs = [{"id": d["id"], "text": d["text"], "metadata": {"lang": d["lang"], "topic": d["topic"]}}
            for d in sample_corpus()]
    docs += [{"text": t, "metadata": {"n": i % 3}} for i, t in enumerate(synthetic_corpus(24, max_words=80, seed=3))]
    return docs


def _ids(docs: list[dict[str, Any]]) -> list[str]:
    return [d.get("id") or document_id(d["text"], d["metadata"]) for d in docs]


def _options(ckpt: Path) -> dict[str, Any]:
    return {"model": str(ckpt), "encoder_options": {"device": "cpu", "dtype": "float32"}, "progress_interval": None}


def _assert_same(a: m3connect.M3Store, b: m3connect.M3Store, ids: list[str]) -> None:
    assert a.count() == b.count() == len(set(ids))
    ra, rb = a.adapter.fetch(ids), b.adapter.fetch(ids)
    assert set(ra) == set(rb) == set(ids)
    for i in ids:
        x, y = ra[i], rb[i]
        assert (x.text, x.metadata) == (y.text, y.metadata), i
        np.testing.assert_allclose(x.dense, y.dense, atol=TOL, rtol=0)
        assert x.colbert.shape == y.colbert.shape, i
        np.testing.assert_allclose(x.colbert, y.colbert, atol=TOL, rtol=0)
        assert x.sparse.keys() == y.sparse.keys(), i
        assert max((abs(x.sparse[k] - y.sparse[k]) for k in x.sparse), default=0.0) <= TOL, i


def test_milvus_lite_one_writer_same_as_single_process(ray_local, encoder, tiny_checkpoint, tmp_path) -> None:
    docs = _corpus()
    single = m3connect.connect(f"milvus:///{tmp_path}/single.db", "c", encoder)
    assert single.ingest(docs, encode_batch_size=16, show_progress=False).ids == _ids(docs)
    lines: list[str] = []
    report = ingest(docs, uri=f"milvus:///{tmp_path}/ray.db", collection="c", encoders=2, writers=3,
                    batch_size=16, log=lines.append, **_options(tiny_checkpoint))
    assert (report.read, report.written, report.skipped, report.count) == (len(docs), len(docs), 0, len(docs))
    assert report.encoders == 2 and report.writers == 1
    assert any("one writer" in line and "not 3" in line for line in lines), lines
    assert report.tokens > 0 and report.failed_ids == []
    distributed = m3connect.connect(f"milvus:///{tmp_path}/ray.db", "c", encoder)  # the actor let go of the file
    try:
        _assert_same(single, distributed, _ids(docs))
    finally:
        distributed.close()
        single.close()


@pytest.mark.opensearch
def test_opensearch_several_writers_same_as_single_process(ray_local, opensearch_url, encoder,
                                                           tiny_checkpoint) -> None:
    uri = "opensearch://" + opensearch_url.split("://", 1)[1]
    name = f"ray_{uuid.uuid4().hex[:8]}"
    docs = _corpus()
    single = m3connect.connect(uri, f"{name}_single", encoder)
    distributed = None
    try:
        single.ingest(docs, encode_batch_size=16, show_progress=False)
        # The source is a ray.data.Dataset here: its rows give the same ids as the list.
        report = ingest(ray.data.from_items(docs), uri=uri, collection=f"{name}_ray", encoders=2, writers=3,
                        batch_size=8, **_options(tiny_checkpoint))
        assert report.writers == 3 and report.encoders == 2
        assert (report.read, report.written, report.count) == (len(docs), len(docs), len(docs))
        distributed = m3connect.connect(uri, f"{name}_ray", encoder)
        _assert_same(single, distributed, _ids(docs))
    finally:
        single.drop()
        if distributed is not None:
            distributed.drop()


def test_failing_writer_names_ids_and_rerun_ends_with_exactly_n(ray_local, tiny_checkpoint, tmp_path) -> None:
    docs = _corpus()
    ids = _ids(docs)
    uri = f"milvus:///{tmp_path}/m.db"
    with pytest.raises(IngestError) as info:
        ingest(docs, uri=uri, collection="c", encoders=1, batch_size=10, _fail_ids={ids[25]},
               **_options(tiny_checkpoint))
    failed = info.value.ids
    assert ids[25] in failed and 0 < len(failed) < len(docs)
    assert repr(ids[25]) in str(info.value)
    report = info.value.report
    assert report.written == len(docs) - len(failed) == report.count
    # The re-run encodes and writes only what is missing, and ends with exactly N.
    again = ingest(docs, uri=uri, collection="c", encoders=1, batch_size=10, **_options(tiny_checkpoint))
    assert (again.written, again.skipped, again.count) == (len(failed), len(docs) - len(failed), len(docs))


def test_cli_ingest_ray_into_qdrant_edge_matches_single_process(ray_local, encoder, tiny_checkpoint, tmp_path,
                                                                capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"
    docs = _corpus()
    with corpus.open("w") as fh:
        for d in docs:
            fh.write(json.dumps({k: v for k, v in {"id": d.get("id"), "text": d["text"], **d["metadata"]}.items()
                                 if v is not None}) + "\n")
        fh.write("{not json\n")
    common = ["ingest", str(corpus), "--collection", "c", "--model", str(tiny_checkpoint), "--device", "cpu",
              "--dtype", "float32", "--batch-size", "8", "--skip-bad-lines", "--json", "--no-progress"]
    assert main([*common, "--uri", f"qdrant:///{tmp_path}/single"]) == 0
    single_out = json.loads(capsys.readouterr().out)
    ray_args = [*common, "--uri", f"qdrant:///{tmp_path}/ray", "--ray", "--encoders", "1", "--writers", "4"]
    assert main(ray_args) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "one writer" in captured.err
    assert (out["read"], out["written"], out["bad_lines"], out["writers"], out["count"]) == (
        single_out["read"], len(docs), 1, 1, len(docs))
    assert out["docs_per_second"] > 0 and out["tokens_per_second"] > 0
    a = m3connect.connect(f"qdrant:///{tmp_path}/single", "c", encoder)
    b = m3connect.connect(f"qdrant:///{tmp_path}/ray", "c", encoder)
    try:
        _assert_same(a, b, _ids(docs))
    finally:
        a.close()
        b.close()
    assert main(ray_args) == 0  # resumed: everything is already stored
    again = json.loads(capsys.readouterr().out)
    assert (again["written"], again["skipped"], again["count"]) == (0, len(docs), len(docs))


def test_token_pooling_and_storage_checks_on_ray(ray_local, encoder, tiny_checkpoint, tmp_path) -> None:
    """``colbert_pool_factor`` pools at ingestion as the single-process store does; another
    storage option than the collection's is refused before anything is written."""
    docs = _corpus()
    single = m3connect.connect(f"milvus:///{tmp_path}/single.db", "c", encoder, colbert_pool_factor=2)
    single.ingest(docs, encode_batch_size=16, show_progress=False)
    report = ingest(docs, uri=f"milvus:///{tmp_path}/ray.db", collection="c", batch_size=16,
                    colbert_pool_factor=2, **_options(tiny_checkpoint))
    assert report.written == len(docs)
    distributed = m3connect.connect(f"milvus:///{tmp_path}/ray.db", "c", encoder)
    try:
        assert distributed.spec.colbert_pool_factor == 2
        _assert_same(single, distributed, _ids(docs))
        assert all(len(r.colbert) < len(encoder.encode_one(r.text).colbert)
                   for r in distributed.adapter.fetch(_ids(docs)[:5]).values())
    finally:
        distributed.close()
        single.close()
    with pytest.raises(m3connect.SchemaMismatchError, match="colbert_pool_factor"):
        ingest(docs[:3], uri=f"milvus:///{tmp_path}/ray.db", collection="c", colbert_pool_factor=3,
               **_options(tiny_checkpoint))
    with pytest.raises(m3connect.SchemaMismatchError, match="colbert_dtype"):
        ingest(docs[:3], uri=f"milvus:///{tmp_path}/ray.db", collection="c", colbert_dtype="float16",
               **_options(tiny_checkpoint))
    again = ingest(docs, uri=f"milvus:///{tmp_path}/ray.db", collection="c", **_options(tiny_checkpoint))
    assert (again.written, again.skipped, again.count) == (0, len(docs), len(docs))


def test_a_collection_without_colbert_on_ray(ray_local, tiny_checkpoint, tmp_path) -> None:
    docs = _corpus()[:12]
    uri = f"qdrant:///{tmp_path}/ray"
    report = ingest(docs, uri=uri, collection="c", store_colbert=False, **_options(tiny_checkpoint))
    assert report.written == len(docs)
    with pytest.raises(m3connect.SchemaMismatchError, match="store_colbert"):
        ingest(docs[:2], uri=uri, collection="c", store_colbert=True, **_options(tiny_checkpoint))
    store = m3connect.connect(uri, "c")
    try:
        assert store.spec.store_colbert is False and store.count() == len(docs)
        assert all(len(r.colbert) == 0 for r in store.adapter.fetch(_ids(docs)).values())
    finally:
        store.close()


def test_cli_ray_options_need_ray(tmp_path, capsys) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "x"}\n')
    assert main(["ingest", str(corpus), "--uri", f"milvus:///{tmp_path}/m.db", "--encoders", "2"]) == 2
    assert "--encoders, --writers and --ray-address need --ray" in capsys.readouterr().err

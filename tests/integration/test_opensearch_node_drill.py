"""Crash drill on a real OpenSearch node: SIGKILL the node mid-ingestion, restart it, re-run.

Runs on a node of its own (the shared one must not die under other tests). The ingestion
must fail with an ``IngestError`` naming exactly the documents of the batch that was not
written; acknowledged batches survive the crash (the translog is fsynced per request); the
re-run (``skip_existing=True``, as ``m3connect ingest`` resumes) ends with exactly N.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import m3connect
from m3connect.testing import synthetic_corpus

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("M3_SKIP_OPENSEARCH") or os.environ.get("M3_OPENSEARCH_URL")),
    reason="needs a local OpenSearch node of its own (not M3_OPENSEARCH_URL)",
)

N = 200
BATCH = 25
KILL_AT = 4  # the node dies just before the 4th batch is written


@pytest.fixture(scope="module")
def node():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from opensearch_node import OpenSearchNode

    started = OpenSearchNode.start()
    yield started
    started.stop()


def test_node_killed_mid_ingest_then_rerun_ends_with_n(node, encoder) -> None:
    uri = "opensearch://" + node.url.split("://", 1)[1]
    texts = synthetic_corpus(N, seed=3)
    ids = [f"doc{i:03d}" for i in range(N)]
    store = m3connect.connect(uri, collection="drill", encoder=encoder, max_retries=1, retry_backoff=0.1,
                              timeout=5.0)
    real_upsert = store.adapter.upsert
    calls = {"n": 0}

    def upsert_then_crash(records):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == KILL_AT:
            node.kill()
        return real_upsert(records)

    store.adapter.upsert = upsert_then_crash  # type: ignore[method-assign]
    with pytest.raises(m3connect.IngestError) as info:
        store.ingest(texts, ids=ids, encode_batch_size=BATCH)
    lost = ids[(KILL_AT - 1) * BATCH : KILL_AT * BATCH]
    assert info.value.ids == lost and info.value.batch_index == KILL_AT - 1
    assert isinstance(info.value.__cause__, m3connect.BackendUnavailableError)
    with pytest.raises(m3connect.BackendUnavailableError):
        store.count()
    store.close()

    node.relaunch()
    store = m3connect.connect(uri, collection="drill", encoder=encoder)
    store.adapter.flush()
    survived = store.adapter.existing_ids(ids)
    assert set(ids[: (KILL_AT - 1) * BATCH]) <= survived  # acknowledged batches outlived the crash
    report = store.ingest(texts, ids=ids, encode_batch_size=BATCH, skip_existing=True)
    assert report.written == N - len(survived) and report.skipped == len(survived)
    assert store.count() == N
    assert store.adapter.existing_ids(ids) == set(ids)
    redone = store.adapter.fetch(lost)  # the lost batch, now complete: all three representations
    fresh = encoder.encode([texts[ids.index(i)] for i in lost])
    for j, rid in enumerate(lost):
        assert redone[rid].colbert is not None and redone[rid].colbert.shape == fresh.colbert[j].shape
        assert redone[rid].dense is not None and redone[rid].sparse
    store.close()

"""Smoke tests of benchmarks/ingest_query.py: --quick runs (the ingest/query mode and the query-scale mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "ingest_query.py"

pytest.importorskip("pymilvus")
pytest.importorskip("qdrant_client")


def test_ingest_query_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-opensearch", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("ingest_query-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    result = json.loads(files[0].read_text())
    assert result["errors"] == []
    assert result["machine"]["versions"]["python"]
    engines = {"milvus", "qdrant"}
    assert {r["engine"] for r in result["ingest"]} == engines
    for r in result["ingest"]:
        assert r["ingest_incl_encoding_docs_s"] > 0 and r["write_only_docs_s"] > 0 and r["adapter_over_raw"] > 0
    for engine in engines:
        modes = {(r["fusion"], r["encoding"]) for r in result["query"] if r["engine"] == engine}
        assert modes == {("exact", False), ("engine", False), ("rrf", False), ("exact", True)}
    rows = {(r["engine"], r["colbert_dtype"]): r for r in result["storage"]}
    assert rows[("qdrant", "float32")]["bytes_per_doc"] > 0
    assert rows[("milvus", "float32")]["bytes_per_doc"] > 0
    assert 0 < rows[("milvus", "float16")]["bytes_per_doc"] < rows[("milvus", "float32")]["bytes_per_doc"]


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def test_query_scale_quick(tmp_path: Path) -> None:
    """The query-scale mode (issue 9) end to end on the embedded engines, tiny dims, in seconds."""
    engines = ["milvus", "qdrant-local"] + (["edge"] if _importable("m3connect.adapters.qdrant_edge") else [])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--query-scale", "--quick", "--engines", ",".join(engines),
         "--out", str(tmp_path), "--slug", "smoke"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = tmp_path / "query-scale-smoke-quick.json"
    assert path.exists() and path.with_suffix(".md").exists(), sorted(p.name for p in tmp_path.iterdir())
    result = json.loads(path.read_text())
    assert result["errors"] == [] and result["complete"]
    assert result["machine"]["cpu_model"] is not None and result["machine"]["versions"]["qdrant-client"]
    assert {r["engine"] for r in result["rows"]} == set(engines)
    signal = result["per_n"]["40"]["route_signal"]
    assert all(v["hit@10"] > 0 for v in signal.values())
    for row in result["rows"]:
        assert row["ingest_docs_s"] > 0 and row["colbert_dtype"] in ("float16", "float32")
        modes = {(tuple(q["weights"]), q["fusion"]) for q in row["queries"]}
        assert modes == {(w, f) for w in [(1.0, 0.0, 0.0), (0.4, 0.2, 0.4)] for f in ("exact", "engine", "rrf")}
        for q in row["queries"]:
            assert "error" not in q, q
            assert q["n_queries"] == 5 and q["p95_ms"] >= q["p50_ms"] > 0
            assert q["fetch_colbert_bytes_per_query"] >= 0 and q["hits_mean"] == 10
            if q["fusion"] == "exact":  # the whole 40-doc corpus is the candidate set: exact = brute force
                assert q["recall_vs_bruteforce"] == 1.0 and q["max_abs_score_diff_vs_bruteforce"] < 1e-3
            else:
                assert 0.0 <= q["recall_vs_exact"] <= 1.0
        for kind in ("dense", "hybrid"):
            assert row["raw"][kind]["p50_ms"] > 0 and row["raw"][kind]["hits_mean"] == 10
        assert row["raw"]["dense"]["recall_vs_bruteforce_dense"] == 1.0
    statuses = {t["status"] for t in result["targets"]}
    assert statuses <= {"PASS", "FAIL", "N/A"} and result["targets"]

"""Smoke test of benchmarks/ingest_query.py: a --quick run without OpenSearch writes its rows."""

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
    assert rows[("milvus", "float16")]["bytes_per_doc"] is None
    assert "Lite stores float32 only" in rows[("milvus", "float16")]["note"]

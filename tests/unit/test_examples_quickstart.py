"""examples/quickstart.py runs end to end, in a fresh directory, without hub access."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "quickstart.py"


def _run(cwd: Path, *args: str) -> str:
    env = dict(os.environ)
    env.pop("M3_MODEL", None)  # exercise the tiny-checkpoint path
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def _check_search_output(out: str) -> None:
    lines = out.splitlines()
    assert any(line.startswith("hybrid search, weights (0.4, 0.2, 0.4)") for line in lines), out
    assert any(line.startswith("filtered search, lang == 'de'") for line in lines), out
    headers = [i for i, line in enumerate(lines) if line.split()[:6] == ["rank", "id", "score", "dense", "sparse", "colbert"]]
    assert len(headers) == 2
    hybrid = lines[headers[0] + 1: headers[0] + 6]
    assert [line.split()[0] for line in hybrid] == ["1", "2", "3", "4", "5"]
    filtered = lines[headers[1] + 1:]
    assert len(filtered) == 3 and all("[de]" in line for line in filtered)


def test_quickstart_qdrant_builds_tiny_model_then_reuses_it(tmp_path):
    out = _run(tmp_path, "--uri", f"qdrant://{tmp_path}/qdrant")
    assert "building a tiny demo checkpoint" in out
    assert (tmp_path / ".m3cache" / "tiny-m3" / "colbert_linear.pt").is_file()
    assert "ingested: 40 written, 0 already stored; 40 documents" in out
    _check_search_output(out)

    # Second run: the checkpoint is reused and nothing is written twice. Milvus Lite
    # (the script's default store) when its adapter is there, else the same Qdrant dir.
    if importlib.util.find_spec("m3connect.adapters.milvus") and importlib.util.find_spec("pymilvus"):
        out = _run(tmp_path)  # default --uri: milvus:///<cwd>/m3connect_demo.db
        assert f"store: milvus://{tmp_path.resolve()}/m3connect_demo.db" in out
        assert "ingested: 40 written" in out
        assert (tmp_path / "m3connect_demo.db").exists()
    else:
        out = _run(tmp_path, "--uri", f"qdrant://{tmp_path}/qdrant")
        assert "ingested: 0 written, 40 already stored; 40 documents" in out
    assert "reusing the tiny demo checkpoint" in out
    _check_search_output(out)


def test_bundled_sample_data_matches_the_package_corpus():
    from m3connect.testing import sample_corpus

    path = REPO / "examples" / "data" / "sample.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert rows == sample_corpus()

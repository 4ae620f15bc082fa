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
    # First contact: no tracebacks, progress bars or download noise on stderr.
    assert proc.stderr.strip() == "", proc.stderr
    return proc.stdout


def _check_search_output(out: str) -> None:
    lines = out.splitlines()
    assert any(line.startswith("hybrid search, weights (0.4, 0.2, 0.4)") for line in lines), out
    assert any(line.startswith("filtered search, lang == 'de'") for line in lines), out
    columns = ["rank", "id", "score", "dense", "sparse", "colbert"]
    headers = [i for i, line in enumerate(lines) if line.split()[:6] == columns]
    assert len(headers) == 2
    hybrid = lines[headers[0] + 1: headers[0] + 6]
    assert [line.split()[0] for line in hybrid] == ["1", "2", "3", "4", "5"]
    # every route shows a real score: a sparse column of zeros would look broken
    assert any(float(line.split()[4]) > 0 for line in hybrid), out
    filtered = lines[headers[1] + 1:]
    assert len(filtered) == 3 and all("[de]" in line for line in filtered)


def test_quickstart_builds_tiny_model_then_reuses_it(tmp_path):
    out = _run(tmp_path)  # default --uri: Qdrant Edge in ./m3connect_demo
    assert "building a tiny demo checkpoint" in out
    assert f"store: qdrant://{tmp_path.resolve()}/m3connect_demo" in out
    assert (tmp_path / ".m3cache" / "tiny-m3" / "colbert_linear.pt").is_file()
    assert "ingested: 40 written, 0 already stored; 40 documents" in out
    _check_search_output(out)

    # Second run: the checkpoint is reused and nothing is written twice.
    out = _run(tmp_path)
    assert "reusing the tiny demo checkpoint" in out
    assert "ingested: 0 written, 40 already stored; 40 documents" in out
    _check_search_output(out)

    # Any store URI works: Milvus Lite in a file.
    if importlib.util.find_spec("pymilvus"):
        out = _run(tmp_path, "--uri", f"milvus://{tmp_path}/demo.db")
        assert "ingested: 40 written" in out
        _check_search_output(out)


def test_bundled_sample_data_matches_the_package_corpus():
    from m3connect.testing import sample_corpus

    path = REPO / "examples" / "data" / "sample.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert rows == sample_corpus()

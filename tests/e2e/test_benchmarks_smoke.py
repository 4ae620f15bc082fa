"""Smoke runs of the scripts in benchmarks/: they run end to end and report sane results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_encode_benchmark_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "encode.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(tmp_path.glob("encode-quick-*.json"))
    assert len(files) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert files[0].with_suffix(".md").is_file()
    report = json.loads(files[0].read_text())

    rows = {r["name"]: r for r in report["rows"]}
    expected = ["flagembedding-fp32", "onnxruntime-fp32", "m3connect-fp32", "m3connect-auto", "m3connect-int8"]
    if report["machine"]["onnxruntime"] is None:  # the onnx extra is not installed
        expected.remove("onnxruntime-fp32")
    if report["auto_dtype"] != "bfloat16":  # bf16 is shown beside auto where auto is fp32
        expected.append("m3connect-bf16")
    assert list(rows) == expected
    for row in rows.values():
        assert len(row["seconds_all"]) >= 2
        assert row["docs_per_s"] > 0 and row["tokens_per_s"] > 0
    assert report["tokens"] > 0 and report["config"]["threads"] >= 1
    assert report["machine"]["torch"] and report["machine"]["transformers"]

    parity = report["parity_fp32"]
    assert parity["ok"], parity
    assert parity["dense_max_abs_diff"] <= 1e-5 and parity["num_tokens_equal"]
    if report["parity_onnx"] is not None:
        assert report["parity_onnx"]["ok"], report["parity_onnx"]
    for mode in (m for m in expected if m.startswith("m3connect-") and m != "m3connect-fp32"):
        fid = report["fidelity"][mode]
        assert fid["dense_cos_min"] > 0.9, (mode, fid)
        assert 0.0 <= fid["top10_overlap_mean"] <= 1.0
    assert len(report["targets"]) == (2 if report["parity_onnx"] is None else 4)

"""The LangChain and LlamaIndex examples run end to end (tiny checkpoint, embedded Qdrant)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

EXAMPLES = {
    "langchain_retriever.py": (
        "langchain_core", ["indexed 40 documents", "similarity_search_with_score", "M3Retriever", "dense="]
    ),
    "llamaindex_query.py": (
        "llama_index.core", ["indexed 40 nodes", "mode=default:", "mode=sparse:", "mode=hybrid:", "M3LlamaRetriever"]
    ),
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Start both examples at once (each builds its own tiny checkpoint) and wait for both."""
    env = {k: v for k, v in os.environ.items() if k != "M3_MODEL"}  # always the tiny checkpoint here
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "examples" / name)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, (module, _) in EXAMPLES.items()
        if _importable(module)
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(runs: dict[str, subprocess.CompletedProcess[str]], name: str) -> None:
    module, expected = EXAMPLES[name]
    if name not in runs:
        pytest.skip(f"{module} is not installed")
    result = runs[name]
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    for text in expected:
        assert text in result.stdout, f"{text!r} missing from the output of {name}:\n{result.stdout}"

"""Shared fixtures: tiny random BGE-M3 checkpoints built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # opensearch_node.py


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random checkpoint in the real layout (safetensors)."""
    from m3connect.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-m3"))


@pytest.fixture(scope="session")
def encoder(tiny_checkpoint: Path):
    from m3connect import M3Encoder

    return M3Encoder(tiny_checkpoint, device="cpu", dtype="float32", show_progress=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The layer a test lives in is its marker: `pytest -m "not e2e"` is the fast loop,
    # `pytest tests/unit` the pure one (seconds).
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, layer))
    if os.environ.get("M3_SKIP_OPENSEARCH") == "1":
        skip = pytest.mark.skip(reason="M3_SKIP_OPENSEARCH=1")
        for item in items:
            if "opensearch" in item.keywords:
                item.add_marker(skip)

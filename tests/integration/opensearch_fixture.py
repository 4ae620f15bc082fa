"""A reusable OpenSearch node fixture.

``opensearch_url`` is ``$M3_OPENSEARCH_URL`` when set, else the URL of a real single-node
OpenSearch (+ k-NN) started from ``scripts/opensearch_node.py`` once per test process and
stopped when the process exits. Register it in a conftest with::

    from tests.integration.opensearch_fixture import opensearch_url  # noqa: F401

The node is a process-wide singleton, so importing the fixture in several modules (or in a
conftest and a module) never starts a second node.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any

import pytest

_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
_NODE: Any = None


def get_opensearch_url() -> str:
    """``$M3_OPENSEARCH_URL`` or the URL of this process's node (started on first call)."""
    global _NODE
    env = os.environ.get("M3_OPENSEARCH_URL")
    if env:
        return env.rstrip("/")
    if _NODE is None:
        if str(_SCRIPTS) not in sys.path:
            sys.path.insert(0, str(_SCRIPTS))
        from opensearch_node import OpenSearchNode

        _NODE = OpenSearchNode.start()
        atexit.register(stop_node)
    return str(_NODE.url)


def stop_node() -> None:
    """Stop the node started by :func:`get_opensearch_url` (idempotent)."""
    global _NODE
    if _NODE is not None:
        _NODE.stop()
        _NODE = None


@pytest.fixture(scope="session")
def opensearch_url() -> Any:
    """Base URL (``http://host:port``) of a running OpenSearch with the k-NN plugin."""
    yield get_opensearch_url()
    stop_node()

"""Which engines the conformance suite runs on.

Embedded Milvus Lite, Qdrant local mode and Qdrant Edge always run. Servers run when an
environment variable names them: ``M3_MILVUS_URI`` (``milvus://host:19530``),
``M3_QDRANT_URL`` (``http://host:6333``) and ``M3_OPENSEARCH_URL``
(``http://host:9200``; without it the suite starts its own OpenSearch node).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pytest


def _server_uri(engine: str, url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = engine + ("+https" if parts.scheme == "https" else "")
    return f"{scheme}://{parts.hostname}:{parts.port or {'milvus': 19530, 'qdrant': 6333, 'opensearch': 9200}[engine]}"


def backend_params() -> list:
    """pytest params: (name, kind) where kind tells the fixture how to build the URI."""
    params = [
        pytest.param(("milvus-lite", None), id="milvus-lite"),
        pytest.param(("qdrant-memory", None), id="qdrant-memory"),
        pytest.param(("qdrant-path", None), id="qdrant-path"),
        pytest.param(("qdrant-edge", None), id="qdrant-edge"),
    ]
    if os.environ.get("M3_MILVUS_URI"):
        uri = _server_uri("milvus", os.environ["M3_MILVUS_URI"])
        params.append(pytest.param(("milvus-server", uri), id="milvus-server"))
    if os.environ.get("M3_QDRANT_URL"):
        uri = _server_uri("qdrant", os.environ["M3_QDRANT_URL"])
        params.append(pytest.param(("qdrant-server", uri), id="qdrant-server"))
    params.append(pytest.param(("opensearch", None), id="opensearch", marks=pytest.mark.opensearch))
    return params

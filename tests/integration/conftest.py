"""Fixtures for engine tests: a fresh collection per test on every reachable engine."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import m3connect
from m3connect import M3Store

from .backends import backend_params

try:  # a session-scoped OpenSearch node (or M3_OPENSEARCH_URL)
    from .opensearch_fixture import opensearch_url  # noqa: F401
except ImportError:  # pragma: no cover - until the OpenSearch fixture exists
    pass

_counter = itertools.count()


@pytest.fixture(params=backend_params())
def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path, encoder: m3connect.M3Encoder
) -> Iterator[Callable[..., M3Store]]:
    """``make(**connect_kwargs)`` opens a fresh collection on the parametrised engine."""
    name, server = request.param
    if name == "milvus-lite":
        uri = f"milvus:///{tmp_path}/m3.db"
    elif name == "qdrant-memory":
        uri = "qdrant://:memory:"
    elif name == "qdrant-path":
        uri = f"qdrant+local:///{tmp_path}/qdrant"
    elif name == "qdrant-edge":
        uri = f"qdrant:///{tmp_path}/edge"
    elif name == "opensearch":
        url = request.getfixturevalue("opensearch_url")
        uri = "opensearch://" + url.split("://", 1)[1]
    else:
        uri = server
    collection = f"t{next(_counter)}_{uuid.uuid4().hex[:8]}"
    opened: list[M3Store] = []

    def make(**kwargs) -> M3Store:
        kwargs.setdefault("collection", collection)
        kwargs.setdefault("encoder", encoder)
        store = m3connect.connect(uri, **kwargs)
        opened.append(store)
        return store

    make.uri = uri  # type: ignore[attr-defined]
    make.engine = name  # type: ignore[attr-defined]
    yield make
    if opened and name in ("milvus-server", "qdrant-server", "opensearch"):
        try:
            opened[0].drop()
        except Exception:
            pass
    for store in opened:
        try:
            store.close()
        except Exception:
            pass

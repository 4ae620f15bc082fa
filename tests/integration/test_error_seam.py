"""Errors at the adapter seam: missing collections, dropped ones, unreachable servers, secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import m3connect
from m3connect.adapters.base import TRANSLATED_METHODS, Adapter

from .backends import backend_params

SECRET = "s3cr3t-Pa55"


def test_after_drop_reads_raise_not_found_and_the_next_write_recreates(store_factory) -> None:
    store = store_factory()
    store.add(["one text", "another text"], ids=["a", "b"])
    store.drop()
    for read in (store.count, lambda: store.search("text"), lambda: store.get(["a"]), store.info):
        with pytest.raises(m3connect.CollectionNotFoundError, match=store.collection):
            read()
    store.delete(["a"])  # nothing to delete: not an error
    store.add(["a third text"], ids=["c"])  # recreated with its full schema, not a default one
    assert store.count() == 1
    assert store.search("third", k=1, weights=(0.4, 0.2, 0.4))[0].id == "c"
    if store_factory.engine != "qdrant-memory":  # each :memory: store is its own database
        store.close()  # qdrant-client's local mode allows one client per directory
        reopened = m3connect.connect(store_factory.uri, collection=store.collection)
        assert reopened.spec == store.spec
        reopened.close()


def test_a_collection_dropped_elsewhere_gives_not_found(store_factory) -> None:
    if store_factory.engine in ("qdrant-memory", "qdrant-path"):
        pytest.skip("each qdrant://:memory: store is its own database; a local-mode directory has one client")
    first = store_factory()
    first.add(["one text"], ids=["a"])
    second = m3connect.connect(store_factory.uri, collection=first.collection)
    second.drop()
    for read in (first.count, lambda: first.get(["a"]), lambda: first.search("one")):
        with pytest.raises(m3connect.CollectionNotFoundError):
            read()
    second.close()


@pytest.mark.parametrize("uri", ["milvus:///{tmp}/m.db", "qdrant:///{tmp}/q", "qdrant+local:///{tmp}/ql"])
def test_reads_never_create(uri: str, tmp_path: Path, encoder) -> None:
    uri = uri.format(tmp=tmp_path)
    store = m3connect.connect(uri, collection="docs", encoder=encoder)
    assert not store.exists
    for read in (store.count, lambda: store.search("text"), lambda: store.get(["a"]), store.info):
        with pytest.raises(m3connect.CollectionNotFoundError, match="docs"):
            read()
    store.close()
    assert list(tmp_path.iterdir()) == []  # nothing on disk
    with pytest.raises(m3connect.CollectionNotFoundError):
        m3connect.connect(uri, collection="docs")  # no encoder: nothing to create it with
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_read_nothing_leaves_no_collection(tmp_path: Path, encoder) -> None:
    store = m3connect.connect(f"milvus:///{tmp_path}/m.db", collection="docs", encoder=encoder)
    report = store.ingest(iter([]))
    assert report.written == 0 and not store.exists
    with pytest.raises(m3connect.InvalidTypeError):
        store.add([None])
    assert list(tmp_path.iterdir()) == []


class _Raising(Adapter):
    engine = "fake"

    def __init__(self, exc: Exception) -> None:
        super().__init__("c")
        self.exc = exc
        self.secrets = (SECRET,)

    def read_spec(self):  # type: ignore[override]
        raise self.exc

    def create(self, spec):  # type: ignore[override]
        raise self.exc

    def drop(self) -> None:
        raise self.exc

    def upsert(self, records) -> None:  # type: ignore[override]
        raise self.exc

    def delete(self, ids) -> None:  # type: ignore[override]
        raise self.exc

    def count(self) -> int:
        raise self.exc

    def existing_ids(self, ids):  # type: ignore[override]
        raise self.exc

    def fetch(self, ids, *, fields=()):  # type: ignore[override]
        raise self.exc

    def search_route(self, route, query, k, flt):  # type: ignore[override]
        raise self.exc


@pytest.mark.parametrize(
    ("raw", "mapped"),
    [
        (ConnectionRefusedError(f"refused for admin:{SECRET}"), m3connect.BackendUnavailableError),
        (TimeoutError("timed out"), m3connect.BackendUnavailableError),
        (ValueError("Collection c not found"), m3connect.CollectionNotFoundError),
        (RuntimeError(f"disk full (token {SECRET})"), m3connect.BackendError),
        (m3connect.InvalidInputError(f"bad value near {SECRET}"), m3connect.InvalidInputError),
    ],
)
def test_the_translator_maps_and_redacts(raw: Exception, mapped: type[Exception]) -> None:
    adapter = _Raising(raw)
    for name in ("count", "read_spec", "drop"):
        with pytest.raises(mapped) as info:
            getattr(adapter, name)()
        assert SECRET not in str(info.value) and "***" in str(info.value) or SECRET not in str(raw)
    assert set(TRANSLATED_METHODS) >= {"count", "fetch", "upsert", "search_route", "score", "engine_search"}


def test_secrets_never_show(tmp_path: Path) -> None:
    uri = f"opensearch://admin:{SECRET}@127.0.0.1:9"  # nothing listens on port 9
    location = m3connect.store.parse_uri(uri)
    assert location.password == SECRET and SECRET not in repr(location)
    assert SECRET not in m3connect.store.safe_uri(uri)
    with pytest.raises(m3connect.BackendUnavailableError) as info:
        m3connect.connect(uri, collection="docs", connect_timeout=0.5)
    assert SECRET not in str(info.value)
    with pytest.raises(m3connect.InvalidInputError) as info:
        m3connect.connect(f"milvus://u:{SECRET}@rel.db", collection="docs")
    assert SECRET not in str(info.value)
    env = {**os.environ, "M3_PASSWORD": SECRET}
    commands = [
        ["info", "--uri", uri],
        ["info", "--uri", "opensearch://127.0.0.1:9", "--json"],
        ["drop", "--uri", f"qdrant://key:{SECRET}@127.0.0.1:9", "--yes"],
        ["info", "--uri", f"bogus://u:{SECRET}@h"],
        ["search", "q", "--uri", "opensearch://127.0.0.1:9", "--api-key", SECRET, "--model", "nowhere"],
    ]
    for args in commands:
        run = subprocess.run([sys.executable, "-m", "m3connect", *args], capture_output=True, text=True,
                             env=env, timeout=120)
        assert run.returncode != 0, args
        assert SECRET not in run.stdout + run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, (args, run.stderr)


def test_every_engine_has_a_translator() -> None:
    import importlib

    for module, cls in [("milvus", "MilvusAdapter"), ("opensearch", "OpenSearchAdapter"),
                        ("qdrant", "QdrantAdapter"), ("qdrant_edge", "QdrantEdgeAdapter")]:
        adapter_cls = getattr(importlib.import_module(f"m3connect.adapters.{module}"), cls)
        for name in TRANSLATED_METHODS:
            method = getattr(adapter_cls, name)
            assert getattr(method, "_m3_translated", False) or method is getattr(Adapter, name), (cls, name)
    assert backend_params()  # the engines above are the ones the conformance suite runs


@pytest.mark.parametrize("uri", ["milvus:///{tmp}/m.db", "qdrant:///{tmp}/q", "qdrant+local:///{tmp}/ql", "qdrant://:memory:"])
def test_unknown_options_are_refused_by_name(uri: str, tmp_path: Path, encoder) -> None:
    with pytest.raises(m3connect.InvalidInputError, match="timeuot"):
        m3connect.connect(uri.format(tmp=tmp_path), collection="docs", encoder=encoder, timeuot=5)
    assert list(tmp_path.iterdir()) == []

"""Store locations: URI parsing, credentials, which adapter serves a location, and the locks
that order threads sharing an embedded store.

>>> parse_uri("qdrant+https://user:key@host:6333")  # doctest: +SKIP
ParsedURI(engine='qdrant', host='host', port=6333, path=None, tls=True, transport='', user='user')
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from .adapters.base import Adapter
from .errors import InvalidInputError, InvalidTypeError, M3Error, redact_error

__all__ = ["ParsedURI", "parse_uri", "safe_uri", "ReadWriteLock"]

_ADAPTERS = {
    "milvus": "m3connect.adapters.milvus:MilvusAdapter",
    "qdrant": "m3connect.adapters.qdrant:QdrantAdapter",
    "qdrant-edge": "m3connect.adapters.qdrant_edge:QdrantEdgeAdapter",
    "opensearch": "m3connect.adapters.opensearch:OpenSearchAdapter",
}
_SCHEMES = ("milvus", "qdrant", "opensearch")


@dataclass(frozen=True)
class ParsedURI:
    """A store URI split into engine and location.

    ``milvus:///abs/file.db`` → embedded file; ``qdrant://:memory:``; ``qdrant:///abs/dir``;
    ``milvus://host:19530``, ``qdrant://host:6333``, ``opensearch://host:9200`` → servers.
    ``+https`` after the engine (``qdrant+https://host``) asks for TLS. ``qdrant:///abs/dir``
    is Qdrant Edge (Qdrant's Rust engine in-process); ``qdrant+local:///abs/dir`` is
    qdrant-client's pure-Python local mode, which also opens a directory it wrote before.
    ``milvus://./m3.db`` (or ``../``, ``~/``) is a path relative to the working directory,
    resolved here. ``user:password@host`` carries credentials (the password never shows in
    ``repr``); for Qdrant the password is the API key.
    """

    engine: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    tls: bool = False
    transport: str = ""
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        return self.host is None

    def url(self, default_port: int) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port or default_port}"


def safe_uri(uri: str) -> str:
    """``uri`` with the password of ``user:password@`` replaced by ``***`` (for messages)."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, tail = rest.partition("/")
    if sep and "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    return f"{scheme}{sep}{netloc}{slash}{tail}"


def parse_uri(uri: str) -> ParsedURI:
    """Parse a store URI; an unknown scheme or an unusable location is an ``InvalidInputError``."""
    if not isinstance(uri, str):
        raise InvalidTypeError(f"uri must be a string, got {type(uri).__name__}")
    shown = safe_uri(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        hint = f"; for a Milvus Lite file say milvus://./{uri}" if uri.endswith(".db") else ""
        raise InvalidInputError(
            f"{shown!r} is not a store URI; expected e.g. milvus:///abs/m3.db, qdrant:///abs/dir or "
            f"opensearch://host:9200{hint}"
        )
    engine, _, transport = scheme.lower().partition("+")
    if engine not in _SCHEMES or transport not in ("", "https", "http") + (("local",) if engine == "qdrant" else ()):
        raise InvalidInputError(f"unknown URI scheme {scheme!r} in {shown!r}; use one of {list(_SCHEMES)}")
    tls = transport == "https"
    if rest == ":memory:":
        if engine != "qdrant":
            raise InvalidInputError(f"{engine} has no in-memory mode; use a file path")
        return ParsedURI(engine, path=":memory:", transport="local")
    if rest.startswith(("./", "../", "~/")) or rest in (".", ".."):
        rest = str(Path(rest).expanduser().resolve())
    if rest.startswith("/"):
        if engine == "opensearch":
            raise InvalidInputError("OpenSearch has no embedded mode; use opensearch://host:9200")
        return ParsedURI(engine, path="/" + rest.lstrip("/"), transport=transport)
    parts = urlsplit(f"//{rest}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidInputError(f"{shown!r}: the port must be a number in 1..65535") from None
    if not parts.hostname:
        raise InvalidInputError(f"{shown!r} names neither a host nor an absolute path")
    if engine != "opensearch" and parts.hostname.endswith((".db", ".sqlite")):
        raise InvalidInputError(
            f"{shown!r} reads as host {parts.hostname!r}; for an embedded file give an absolute path "
            f"({engine}:///abs/path) or one relative to the working directory ({engine}://./{parts.hostname})"
        )
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return ParsedURI(engine, host=parts.hostname, port=port, tls=tls, user=user, password=password)



def _adapter_key(location: ParsedURI) -> str:
    """Which adapter serves a location: embedded Qdrant directories go to Qdrant Edge,
    except ``qdrant+local://`` and directories that qdrant-client's local mode wrote."""
    if location.engine != "qdrant" or not location.embedded or location.transport in ("local", "client"):
        return location.engine
    if (Path(location.path or "") / _QDRANT_LOCAL_MARKER).exists():
        return "qdrant"
    return "qdrant-edge"


_QDRANT_LOCAL_MARKER = "meta.json"  # qdrant-client's local mode keeps its catalogue there


def location_of_client(client: Any) -> ParsedURI:
    """Where a user's own client object points: a ``pymilvus.MilvusClient``, a
    ``qdrant_client.QdrantClient`` (local or remote) or an ``opensearchpy.OpenSearch``.
    m3connect then neither creates nor closes that client."""
    kind = f"{type(client).__module__.partition('.')[0]}.{type(client).__name__}"
    if kind == "pymilvus.MilvusClient":
        lite = str(client.get_server_version()).startswith("milvus_lite")
        if lite:
            return ParsedURI("milvus", path=f"client:{id(client)}", transport="client")
        return ParsedURI("milvus", host="client", transport="client")
    if kind == "qdrant_client.QdrantClient":
        inner = getattr(client, "_client", None)
        if type(inner).__name__ == "QdrantLocal":
            return ParsedURI("qdrant", path=f"client:{id(client)}", transport="client")
        return ParsedURI("qdrant", host="client", transport="client")
    if kind == "opensearchpy.OpenSearch":
        hosts = getattr(client.transport, "hosts", None) or [{}]
        return ParsedURI("opensearch", host=str(hosts[0].get("host", "client")), port=hosts[0].get("port"),
                         transport="client")
    raise InvalidTypeError(
        f"uri must be a store URI or a MilvusClient, QdrantClient or OpenSearch client, got {type(client).__name__}"
    )


_SECRET_OPTIONS = ("password", "api_key", "token")


def _with_credentials(location: ParsedURI, options: dict[str, Any]) -> dict[str, Any]:
    """Options with the URI's ``user:password@`` added where no explicit option overrides it."""
    options = dict(options)
    if location.engine == "qdrant":
        if location.password and "api_key" not in options:
            options["api_key"] = location.password
    else:
        if location.user and "user" not in options:
            options["user"] = location.user
        if location.password is not None and "password" not in options:
            options["password"] = location.password
    return options


def _secrets(options: Mapping[str, Any]) -> tuple[str, ...]:
    found: list[str] = []
    for name in _SECRET_OPTIONS:
        value = options.get(name)
        if isinstance(value, str) and value:
            found.append(value)
            found.extend(part for part in value.split(":")[1:] if part)  # Milvus token "user:password"
    return tuple(found)


def _adapter_class(location: ParsedURI) -> type[Adapter]:
    module_name, _, cls_name = _ADAPTERS[_adapter_key(location)].partition(":")
    cls: type[Adapter] = getattr(importlib.import_module(module_name), cls_name)
    return cls


def check_options(location: ParsedURI, options: Mapping[str, Any]) -> None:
    """Refuse options the engine would ignore: an embedded store takes only its adapter's own
    keywords; a server's client gets the rest (and refuses what it does not know)."""
    cls = _adapter_class(location)
    params = inspect.signature(cls.__init__).parameters
    named = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    passthrough = any(p.kind is p.VAR_KEYWORD for p in params.values()) and not location.embedded
    unknown = sorted(set(options) - named - {"self", "location", "collection"})
    if unknown and not passthrough:
        accepted = sorted(named - {"self", "location", "collection"})
        where = "an embedded store" if location.embedded else "this engine"
        raise InvalidInputError(
            f"{cls.engine} ({where}) does not take the option(s) {unknown}; it takes {accepted}"
        )


def _load_adapter(location: ParsedURI, collection: str, options: dict[str, Any]) -> Adapter:
    cls = _adapter_class(location)
    check_options(location, options)
    secrets = _secrets(options)
    try:
        # every engine adapter takes (location, collection, **options); the base class only (collection)
        factory = cast(Callable[..., Adapter], cls)
        adapter = factory(location, collection, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise InvalidInputError(f"{cls.engine} does not take the option {str(exc).rpartition(' ')[2]}") from None
    except M3Error as exc:
        raise redact_error(exc, secrets)  # noqa: B904 - the same exception, redacted in place
    adapter.secrets = secrets
    return adapter



class ReadWriteLock:
    """Many readers or one writer. Embedded engines share one per location, so that threads of
    one process never see a half-applied overwrite (Milvus Lite applies an upsert as a delete
    and an insert; a search in between would miss the document on some routes)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _NoLock:
    """Servers order concurrent requests themselves."""

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        yield

    write = read


_EMBEDDED_LOCKS: dict[tuple[str, str], ReadWriteLock] = {}
_EMBEDDED_LOCKS_GUARD = threading.Lock()


def _lock_for(location: ParsedURI) -> ReadWriteLock | _NoLock:
    if not location.embedded or location.path == ":memory:":
        return ReadWriteLock() if location.embedded else _NoLock()
    with _EMBEDDED_LOCKS_GUARD:
        return _EMBEDDED_LOCKS.setdefault((location.engine, os.path.realpath(location.path or "")), ReadWriteLock())

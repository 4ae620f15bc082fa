"""Scale-out ingestion on Ray Data: read → encode in an actor pool → parallel writers.

>>> from m3connect.distributed import ingest                                   # doctest: +SKIP
>>> ingest("corpus.jsonl", uri="opensearch://os:9200", collection="docs",   # doctest: +SKIP
...        model="BAAI/bge-m3", encoders=8, writers=4, ray_address="auto")

The pipeline is one streaming Ray Dataset:

1. **read**: a file or directory (JSONL, CSV/TSV, Parquet, ``.txt``/``.md``; read by the same
   code as ``m3connect ingest``, on the driver's node), any ``ray.data.Dataset`` with a text
   column, or an in-memory list of texts / dicts / :class:`~m3connect.Document`. Ids are
   derived exactly as :meth:`M3Store.ingest` derives them (content hash unless given).
2. **encode**: a pool of ``encoders`` actors, one model each (``num_gpus=1`` per actor when the
   cluster has GPUs, CPU actors otherwise). Each actor first asks the store which ids of its
   batch are already stored (``skip_existing``) and encodes only the rest, in the encoder's own
   token-budget batches.
3. **write**: ``writers`` actors call :meth:`M3Store.add_vectors`, which cuts batches by bytes.
   Engines that one process must own (Milvus Lite files, Qdrant local directories) get one
   writer, an actor pinned to the driver's node that also answers the encoders' existence
   checks; servers get ``writers`` independent connections.

Exactly once by construction: ids are deterministic, so a retried Ray task (Ray Data retries
tasks whose worker died) or a re-run overwrites instead of duplicating, and with
``skip_existing`` a re-run encodes only what is missing. A write that fails does not stop the
job; at the end :class:`~m3connect.IngestError` names the ids that were not stored.
Needs ``pip install 'm3connect[ray]'``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .adapters.base import CollectionSpec
from .defaults import DEFAULT_MODEL
from .errors import IngestError, InvalidInputError, M3Error, MissingDependencyError, SchemaMismatchError

__all__ = ["ingest", "DistributedReport", "EncoderFactory"]

logger = logging.getLogger("m3connect.distributed")

# Row kinds flowing through the pipeline (column "kind").
_DOC, _SKIPPED, _STATS, _DUPLICATE = 0, 1, 2, 3
_FAILED_IDS_SHOWN = 10


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError.for_extra("ray[data] (needed for distributed ingestion)", "ray") from None
    return ray


def _pa() -> Any:
    import pyarrow as pa

    return pa


# -- report -----------------------------------------------------------------------------------


@dataclass
class DistributedReport:
    """What one distributed ingestion did (``failed_ids`` empty unless writes failed)."""

    read: int = 0
    written: int = 0
    skipped: int = 0
    duplicates: int = 0
    bad_lines: int = 0
    first_bad: str | None = None
    truncated: int = 0
    tokens: int = 0
    batches: int = 0
    failed_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: from the start of the job to its first stored batch (actor start-up, model loads)
    startup_seconds: float = 0.0
    #: (seconds since the start, documents done) after each stored batch
    timeline: list[tuple[float, int]] = field(default_factory=list)
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    encoders: int = 0
    writers: int = 0
    device: str = ""
    count: int | None = None

    @property
    def docs_per_second(self) -> float:
        return self.read / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["timeline"]
        out["docs_per_second"] = round(self.docs_per_second, 2)
        out["tokens_per_second"] = round(self.tokens_per_second, 1)
        return out


# -- encoders ---------------------------------------------------------------------------------


class EncoderFactory:
    """Builds the encoder inside each actor: a model name or directory (``M3Encoder``), an
    ``http(s)://`` encoder service (``RemoteEncoder``), or any picklable zero-argument callable
    returning an :class:`~m3connect.Encoder`."""

    def __init__(self, model: Any, **options: Any) -> None:
        self.model = model
        self.options = {k: v for k, v in options.items() if v is not None}

    def __call__(self) -> Any:
        if callable(self.model) and not isinstance(self.model, (str, os.PathLike)):
            return self.model(**self.options)
        from .remote import is_remote_model

        if is_remote_model(self.model):
            from .remote import RemoteEncoder

            options = {k: v for k, v in self.options.items() if k in ("max_length", "dtype", "timeout", "retries")}
            return RemoteEncoder(str(self.model), **options)
        from . import M3Encoder

        return M3Encoder(self.model, **{"show_progress": False, **self.options})

    def __repr__(self) -> str:
        return f"EncoderFactory({self.model!r})"


def _spec_of(encoder: Any, storage: Mapping[str, Any]) -> CollectionSpec:
    return CollectionSpec(model=encoder.model_name, fingerprint=encoder.fingerprint,
                          dense_dim=encoder.dense_dim, colbert_dim=encoder.colbert_dim, **storage)


def _probe_spec(factory: EncoderFactory, storage: Mapping[str, Any]) -> CollectionSpec:
    """Load the encoder once to learn the spec of a collection that does not exist yet."""
    return _spec_of(factory(), storage)


def _check_spec(collection: str, stored: CollectionSpec, encoder: Any) -> None:
    for name, have in (("dense_dim", stored.dense_dim), ("colbert_dim", stored.colbert_dim),
                       ("fingerprint", stored.fingerprint)):
        want = getattr(encoder, name)
        if have != want:
            raise SchemaMismatchError(
                f"collection {collection!r} holds vectors of model {stored.model!r} ({name}={have}), but the "
                f"encoder is {encoder.model_name!r} ({name}={want}). Use another collection name."
            )


# -- store access -----------------------------------------------------------------------------


def _open_adapter(uri: str, collection: str, options: Mapping[str, Any]) -> Any:
    from .store import _load_adapter, _with_credentials, parse_uri

    location = parse_uri(uri)
    return _load_adapter(location, collection, _with_credentials(location, dict(options)))


def _store_on(adapter: Any, spec: CollectionSpec | None) -> Any:
    """An encoder-less store on ``adapter``, creating the collection for ``spec`` if missing;
    ``None`` if it is missing and there is no spec."""
    from .store import M3Store

    stored = adapter.read_spec()
    if stored is None:
        if spec is None:
            return None
        adapter.create(spec)
        stored = spec
    adapter.open(stored)
    return M3Store(adapter, None)


def _open_store(uri: str, collection: str, spec: CollectionSpec | None, options: Mapping[str, Any]) -> Any:
    adapter = _open_adapter(uri, collection, options)
    store = _store_on(adapter, spec)
    if store is None:
        adapter.close()
    return store


def _decode_vectors(table: Any, colbert_dim: int) -> list[Any]:
    from .types import Vectors

    cols = {name: table.column(name).to_pylist() for name in
            ("dense", "sparse_ids", "sparse_w", "colbert", "colbert_rows")}
    out = []
    for dense, sid, sw, colbert, rows in zip(cols["dense"], cols["sparse_ids"], cols["sparse_w"],
                                             cols["colbert"], cols["colbert_rows"]):
        out.append(Vectors(
            dense=np.frombuffer(dense, np.float32),
            sparse=dict(zip(np.frombuffer(sid, np.int64).tolist(), np.frombuffer(sw, np.float64).tolist())),
            colbert=np.frombuffer(colbert, np.float32).reshape(rows, colbert_dim),
        ))
    return out


def _col(table: Any, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_pylist())


def _write_table(store: Any, table: Any, fail_ids: frozenset[str]) -> dict[str, Any]:
    """Store the encoded rows of one batch; count every kind of row; never raise."""
    kinds = _col(table, "kind")
    summary: dict[str, Any] = {
        "rows": int(np.isin(kinds, (_DOC, _SKIPPED, _DUPLICATE)).sum()),
        "written": 0, "skipped": int((kinds == _SKIPPED).sum()), "duplicates": int((kinds == _DUPLICATE).sum()),
        "bad": int(_col(table, "bad").sum()),
        "first_bad": next((s for s in table.column("first_bad").to_pylist() if s), ""),
        "tokens": int(_col(table, "tokens").sum()),
        "truncated": int(_col(table, "truncated").sum()),
        "encode_seconds": float(_col(table, "encode_seconds").sum()),
        "write_seconds": 0.0, "failed_ids": "[]", "error": "",
    }
    import pyarrow.compute as pc

    docs = table.filter(pc.equal(table.column("kind"), _DOC))
    if docs.num_rows == 0:
        return summary
    ids = docs.column("id").to_pylist()
    t0 = time.perf_counter()
    try:
        if fail_ids and fail_ids.intersection(ids):
            raise RuntimeError("injected write failure (_fail_ids)")
        vectors = _decode_vectors(docs, store.spec.colbert_dim)
        metadata = [pickle.loads(m) for m in docs.column("meta").to_pylist()]
        store.add_vectors(vectors, texts=docs.column("text").to_pylist(), ids=ids, metadata=metadata)
        summary["written"] = len(ids)
    except Exception as exc:  # a failed batch names its ids; the job goes on
        summary["failed_ids"] = json.dumps(ids)
        summary["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        logger.warning("writing %d documents (ids %s...) failed: %s", len(ids), ids[0], summary["error"])
    summary["write_seconds"] = time.perf_counter() - t0
    return summary


class _LocalSink:
    """Store access through this process's own connection (servers: one per writer/encoder)."""

    def __init__(self, uri: str, collection: str, spec: CollectionSpec, options: Mapping[str, Any],
                 fail_ids: frozenset[str] = frozenset()) -> None:
        self.args = (uri, collection, spec, dict(options))
        self.fail_ids = fail_ids
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            uri, collection, spec, options = self.args
            self._store = _open_store(uri, collection, spec, options)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self.args, "fail_ids": self.fail_ids, "_store": None}

    def existing(self, ids: list[str]) -> set[str]:
        return set(self.store.adapter.existing_ids(ids))

    def write(self, table: Any) -> dict[str, Any]:
        return _write_table(self.store, table, self.fail_ids)


class _ActorSink:
    """Store access through the one store actor (engines that one process must own)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def existing(self, ids: list[str]) -> set[str]:
        return set(_ray().get(self.handle.existing.remote(ids)))

    def write(self, table: Any) -> dict[str, Any]:
        return dict(_ray().get(self.handle.write.remote(table)))


class _StoreOwner:
    """The single owner of an embedded store (made a Ray actor, pinned to the driver's node)."""

    def __init__(self, uri: str, collection: str, options: Mapping[str, Any], fail_ids: frozenset[str]) -> None:
        self.uri, self.collection, self.options, self.fail_ids = uri, collection, dict(options), fail_ids
        self.adapter: Any = None
        self.store: Any = None

    def read_spec(self) -> CollectionSpec | None:
        if self.adapter is None:
            self.adapter = _open_adapter(self.uri, self.collection, self.options)
        if self.store is None:
            self.store = _store_on(self.adapter, None)
        return None if self.store is None else self.store.spec

    def create(self, spec: CollectionSpec) -> CollectionSpec:
        self.read_spec()
        if self.store is None:
            self.store = _store_on(self.adapter, spec)
        created: CollectionSpec = self.store.spec
        return created

    def existing(self, ids: list[str]) -> list[str]:
        return sorted(self.store.adapter.existing_ids(ids))

    def write(self, table: Any) -> dict[str, Any]:
        return _write_table(self.store, table, self.fail_ids)

    def count(self) -> int:
        return int(self.store.count())

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()
            self.adapter = self.store = None

    def pid(self) -> int:
        return os.getpid()

    def exit(self) -> None:
        """End this process gracefully (Milvus Lite closes its database in an exit hook), so
        the file lock is free when the driver reopens it."""
        self.close()
        _ray().actor.exit_actor()


# -- pipeline stages ---------------------------------------------------------------------------


def _schema() -> Any:
    pa = _pa()
    return pa.schema([
        ("id", pa.string()), ("text", pa.string()), ("meta", pa.binary()), ("kind", pa.int8()),
        ("bad", pa.int64()), ("first_bad", pa.string()), ("tokens", pa.int64()), ("truncated", pa.bool_()),
        ("encode_seconds", pa.float64()), ("dense", pa.binary()), ("sparse_ids", pa.binary()),
        ("sparse_w", pa.binary()), ("colbert", pa.binary()), ("colbert_rows", pa.int32()),
    ])


def _table(rows: list[dict[str, Any]]) -> Any:
    schema = _schema()
    defaults = {"id": "", "text": "", "meta": b"", "kind": _DOC, "bad": 0, "first_bad": "", "tokens": 0,
                "truncated": False, "encode_seconds": 0.0, "dense": b"", "sparse_ids": b"", "sparse_w": b"",
                "colbert": b"", "colbert_rows": 0}
    columns = {name: [r.get(name, defaults[name]) for r in rows] for name in schema.names}
    return _pa().table(columns, schema=schema)


def _record_rows(items: Iterable[Any]) -> Iterable[dict[str, Any]]:
    """(id, text, pickled metadata) rows, ids derived exactly as ``M3Store.ingest`` does."""
    from .store import M3Store

    for _, rid, text, meta in M3Store._records_from(items, None, None):
        yield {"id": rid, "text": text, "meta": pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)}


def _read_file(batch: Any, *, path: str, fmt: str, reader_options: dict[str, Any], rows_per_block: int) -> Any:
    """Stream one file or directory as blocks of rows (a generator: Ray Data streams them)."""
    from .cli import _Reader

    reader = _Reader(Path(path), fmt, **reader_options)
    pending: list[dict[str, Any]] = []
    for row in _record_rows(reader):
        pending.append(row)
        if len(pending) >= rows_per_block:
            yield _table(pending)
            pending = []
    pending.append({"kind": _STATS, "bad": reader.bad, "first_bad": reader.first_bad or ""})
    yield _table(pending)


def _normalise_dataset(batch: Any, *, text_field: str, id_field: str, metadata_fields: list[str] | None) -> Any:
    """Rows of a user's ``ray.data.Dataset`` → pipeline rows (same rules as the file readers)."""
    from .cli import BadRecordError, _Reader

    rows = batch.to_pylist()
    if metadata_fields is None and "metadata" in batch.column_names:
        items = [{"id": r.get(id_field), "text": r.get(text_field),
                  "metadata": {k: v for k, v in (r.get("metadata") or {}).items() if v is not None}} for r in rows]
    else:
        shape = _Reader(Path("."), "jsonl", text_field=text_field, id_field=id_field,
                        metadata_fields=metadata_fields, skip_bad=False)
        items = []
        for n, r in enumerate(rows):
            try:
                items.append(shape._record(r, f"dataset row {n}"))
            except BadRecordError as exc:
                raise InvalidInputError(str(exc)) from None
    return _table(list(_record_rows(items)))


class _Encode:
    """One encoder actor: skip stored ids, encode the rest, emit vectors as bytes columns."""

    def __init__(self, factory: EncoderFactory, spec: CollectionSpec, collection: str, sink: Any,
                 skip_existing: bool, max_length: int | None, threads: int | None) -> None:
        if threads:
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:  # a RemoteEncoder needs no torch
                pass
        self.encoder = factory()
        _check_spec(collection, spec, self.encoder)
        self.sink = sink
        self.skip_existing = skip_existing
        self.max_length = max_length

    def __call__(self, batch: Any) -> Any:
        rows = batch.to_pylist()
        last = {r["id"]: i for i, r in enumerate(rows) if r["kind"] == _DOC}
        for i, r in enumerate(rows):
            if r["kind"] == _DOC and last[r["id"]] != i:
                r["kind"] = _DUPLICATE  # within a batch the last occurrence wins, as in store.ingest
        if self.skip_existing and last:
            have = self.sink.existing(list(last))
            for r in rows:
                if r["kind"] == _DOC and r["id"] in have:
                    r["kind"] = _SKIPPED
        todo = [r for r in rows if r["kind"] == _DOC]
        if todo:
            t0 = time.perf_counter()
            out = self.encoder.encode([r["text"] for r in todo], max_length=self.max_length, show_progress=False)
            seconds = time.perf_counter() - t0
            truncated = set(out.truncated)
            for j, r in enumerate(todo):
                v = out.item(j)
                sparse = v.sparse or {}
                colbert = np.ascontiguousarray(v.colbert, np.float32)
                r.update(
                    dense=np.ascontiguousarray(v.dense, np.float32).tobytes(),
                    sparse_ids=np.fromiter(sparse.keys(), np.int64, len(sparse)).tobytes(),
                    sparse_w=np.fromiter(sparse.values(), np.float64, len(sparse)).tobytes(),
                    colbert=colbert.tobytes(), colbert_rows=int(colbert.shape[0]),
                    tokens=int(out.num_tokens[j]) if out.num_tokens else 0, truncated=j in truncated,
                )
            todo[0]["encode_seconds"] = seconds
        return _table(rows)


class _Write:
    """One writer: ``add_vectors`` of each encoded batch, one summary row per batch."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def __call__(self, batch: Any) -> Any:
        summary = self.sink.write(batch)
        return _pa().Table.from_pylist([summary])


# -- driver -----------------------------------------------------------------------------------


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing cause of a Ray error (an M3Error or a bad record), else ``exc``."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException) and inner is not e:  # a Ray wrapper: look inside
            stack.append(inner)
            continue
        if isinstance(e, M3Error) or type(e).__name__ in ("BadRecordError", "FileNotFoundError"):
            return e
        stack.extend([e.__cause__, e.__context__])
    return exc


def _without_ray_notes(exc: BaseException) -> BaseException:
    """``exc`` without the retry advice Ray Data appends to a failed task's message."""
    text = str(exc)
    cut = text.find("Failed to apply UDF transform")
    if cut <= 0:
        return exc.with_traceback(None)
    try:
        clean = type(exc)(text[:cut].rstrip())
    except Exception:
        return exc.with_traceback(None)
    clean.__dict__.update({k: v for k, v in exc.__dict__.items() if k != "args"})
    return clean


def _cluster(ray: Any) -> tuple[float, float, float]:
    """(total CPUs, CPUs of the biggest node, total GPUs) of the alive nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes] or [0.0]
    gpus = sum(float(n.get("Resources", {}).get("GPU", 0)) for n in nodes)
    return sum(cpus), max(cpus), gpus


class _Pinned:
    """``ray_remote_args_fn`` that keeps the file reader on the driver's node (where the file is)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args

    def __call__(self) -> dict[str, Any]:
        return dict(self.args)


def _source_dataset(ray: Any, source: Any, *, batch_size: int, fmt: str, reader_options: dict[str, Any],
                    pin: dict[str, Any]) -> tuple[Any, str]:
    ds_type = ray.data.Dataset
    if isinstance(source, ds_type):
        ds = source.map_batches(
            _normalise_dataset, batch_format="pyarrow", batch_size=batch_size, num_cpus=0,
            fn_kwargs={k: reader_options[k] for k in ("text_field", "id_field", "metadata_fields")},
        )
        return ds, "a ray.data.Dataset"
    if isinstance(source, (str, os.PathLike)):
        from .cli import _detect_format

        path = Path(source).expanduser().resolve()
        fmt = _detect_format(path, fmt)
        ds = ray.data.from_items([{"path": str(path)}]).map_batches(
            _read_file, batch_format="pyarrow", batch_size=1, num_cpus=0,
            fn_kwargs={"path": str(path), "fmt": fmt, "reader_options": reader_options,
                       "rows_per_block": batch_size}, ray_remote_args_fn=_Pinned(pin),
        )
        return ds, f"{path} ({fmt})"
    if isinstance(source, (str, bytes, Mapping)) or not isinstance(source, Iterable):
        raise InvalidInputError("source must be a path, a ray.data.Dataset or a list of texts/dicts/Documents")
    rows = list(_record_rows(source))
    tables = [_table(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)] or [_table([])]
    return ray.data.from_arrow(tables), f"{len(rows)} in-memory records"


def ingest(
    source: Any,
    *,
    uri: str,
    collection: str = "m3connect",
    model: Any = DEFAULT_MODEL,
    encoder_options: Mapping[str, Any] | None = None,
    encoders: int | None = None,
    writers: int | None = None,
    batch_size: int = 256,
    skip_existing: bool = True,
    max_length: int | None = None,
    colbert_dtype: str | None = None,
    colbert_pool_factor: int | None = None,
    store_colbert: bool | None = None,
    cpus_per_encoder: float | None = None,
    gpus_per_encoder: float | None = None,
    writer_cpus: float = 0,
    fmt: str = "auto",
    text_field: str = "text",
    id_field: str = "id",
    metadata_fields: Sequence[str] | None = None,
    skip_bad: bool = False,
    delimiter: str | None = None,
    store_options: Mapping[str, Any] | None = None,
    ray_address: str | None = None,
    ray_init_options: Mapping[str, Any] | None = None,
    progress_interval: float | None = 10.0,
    log: Callable[[str], None] | None = None,
    raise_on_failure: bool = True,
    _fail_ids: Iterable[str] = (),
) -> DistributedReport:
    """Encode and store ``source`` on a Ray cluster; returns a :class:`DistributedReport`.

    Args:
        source: a file or directory path, a ``ray.data.Dataset`` (a ``text_field`` column,
            optionally ``id_field`` and either a ``metadata`` column of dicts or other columns),
            or a list of texts / dicts with ``text``/``id``/``metadata`` / Documents.
        uri, collection: where to store (as :func:`m3connect.connect`). ``qdrant://:memory:``
            lives in one process and is refused.
        model: hub id or directory (``M3Encoder`` in each actor), an ``http(s)://`` encoder
            service, or a picklable zero-argument callable returning an encoder.
        encoder_options: keyword arguments of ``M3Encoder`` (``dtype``, ``device``, ...).
        encoders: encoder actors (default: one per GPU, else 1).
        writers: writer actors for servers (default 2); embedded engines always get 1.
        batch_size: documents per encode call and write (the encoder cuts each call into
            token-budget forward passes; the store cuts writes by bytes).
        skip_existing: do not re-encode ids already stored (resume a killed job).
        cpus_per_encoder / gpus_per_encoder: resources of each encoder actor (default: 1 GPU
            and 1 CPU on GPU clusters; else the CPUs of the biggest node shared out).
        writer_cpus: CPUs reserved per writer (default 0: writers mostly wait on the engine).
        colbert_dtype / colbert_pool_factor / store_colbert: ColBERT storage of a new
            collection (default float32, no pooling, stored; see :func:`m3connect.connect`). For an existing collection,
            leave them out or give its own: another value is a ``SchemaMismatchError``.
        fmt, text_field, id_field, metadata_fields, skip_bad, delimiter: as ``m3connect ingest``.
        store_options: engine options passed to :func:`m3connect.connect` (credentials...).
        ray_address: ``None`` uses the running Ray (or starts a local one); ``"auto"`` or
            ``ray://host:10001`` joins a cluster. Ray started here is shut down at the end.
        progress_interval: seconds between progress lines (``None``: no progress lines).
        log: where status and progress lines go (default: the ``m3connect.distributed`` logger).
        raise_on_failure: raise :class:`IngestError` naming the failed ids (else only report them).
    """
    ray = _ray()
    from .store import _check_storage, _storage_options, parse_uri

    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
    for name, value in (("encoders", encoders), ("writers", writers)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    location = parse_uri(uri)
    if location.path == ":memory:":
        raise InvalidInputError("qdrant://:memory: lives inside one process; use qdrant:///abs/dir or a server")
    storage = _storage_options(colbert_dtype, colbert_pool_factor, store_colbert)
    CollectionSpec("check", "check", 1, 1, **storage)  # the spec's own errors for bad values, as connect()
    say = log or logger.info
    options = dict(store_options or {})
    fail_ids = frozenset(_fail_ids)
    factory = model if isinstance(model, EncoderFactory) else EncoderFactory(model, **dict(encoder_options or {}))

    owned = not ray.is_initialized()
    if owned:
        init = {"address": ray_address, "include_dashboard": False, "log_to_driver": True}
        init.update(ray_init_options or {})
        ray.init(**init)
    owner: Any = None
    owner_pid: int | None = None
    quiet: dict[str, Any] = {}
    try:
        total_cpus, node_cpus, total_gpus = _cluster(ray)
        use_gpu = (gpus_per_encoder or 0) > 0 or (gpus_per_encoder is None and total_gpus >= 1)
        n_enc = encoders or (int(total_gpus) if use_gpu else 1)
        gpus = (gpus_per_encoder or 1.0) if use_gpu else 0.0
        if use_gpu and n_enc * gpus > total_gpus:
            raise InvalidInputError(f"{n_enc} encoders x {gpus} GPU need {n_enc * gpus:g} GPUs; "
                                    f"the cluster has {total_gpus:g}")
        if cpus_per_encoder is not None:
            cpus = float(cpus_per_encoder)
        elif use_gpu:
            cpus = 1.0
        else:
            cpus = float(max(1, min(int(node_cpus), int(total_cpus // n_enc))))
        if n_enc * cpus > total_cpus:
            raise InvalidInputError(f"{n_enc} encoders x {cpus:g} CPUs need {n_enc * cpus:g} CPUs; "
                                    f"the cluster has {total_cpus:g}")
        device = f"{n_enc} GPU actor(s)" if use_gpu else f"{n_enc} CPU actor(s) x {cpus:g} CPU"

        # Engines one process must own get one store actor on this node; servers M writers.
        here = ray.get_runtime_context().get_node_id()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        pin = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=here, soft=False)}
        if location.embedded:
            n_wr = 1
            why = "Milvus Lite file" if location.engine == "milvus" else "Qdrant local directory"
            say(f"{uri}: a {why} takes one writer process: 1 writer (on this node)"
                + (f", not {writers}" if writers and writers > 1 else ""))
            owner = ray.remote(num_cpus=0, max_restarts=0)(_StoreOwner).options(**pin).remote(
                uri, collection, options, fail_ids)
            owner_pid = ray.get(owner.pid.remote())
            stored = ray.get(owner.read_spec.remote())
        else:
            n_wr = writers or 2
            probe = _open_adapter(uri, collection, options)
            try:
                stored = probe.read_spec()
            finally:
                probe.close()
        if stored is None:  # a new collection: its spec comes from the model, loaded once here
            task = ray.remote(num_cpus=min(cpus, 1.0), num_gpus=gpus)(_probe_spec)
            spec = ray.get(task.remote(factory, storage))
            if owner is not None:
                spec = ray.get(owner.create.remote(spec))
            else:
                created = _open_store(uri, collection, spec, options)
                spec = created.spec
                created.close()
            say(f"created collection {collection!r} for {spec.model} (fingerprint {spec.fingerprint})")
        else:
            _check_storage(collection, stored, storage, storage)
            spec = stored

        if owner is not None:
            enc_sink: Any = _ActorSink(owner)
            wr_sink: Any = enc_sink
        else:
            enc_sink = _LocalSink(uri, collection, spec, options)
            wr_sink = _LocalSink(uri, collection, spec, options, fail_ids)

        reader_options = {"text_field": text_field, "id_field": id_field, "skip_bad": skip_bad,
                          "metadata_fields": list(metadata_fields) if metadata_fields is not None else None,
                          "delimiter": delimiter}
        quiet.update(_quiet(ray))
        ds, what = _source_dataset(ray, source, batch_size=batch_size, fmt=fmt,
                                   reader_options=reader_options, pin=pin)
        threads = None if use_gpu else max(1, int(cpus))
        ds = ds.map_batches(
            _Encode, batch_format="pyarrow", batch_size=batch_size, **_pool(ray, n_enc),
            num_cpus=cpus, num_gpus=gpus or None,
            fn_constructor_kwargs={"factory": factory, "spec": spec, "collection": collection, "sink": enc_sink,
                                   "skip_existing": skip_existing, "max_length": max_length,
                                   "threads": threads},
        )
        ds = ds.map_batches(_Write, batch_format="pyarrow", batch_size=batch_size, **_pool(ray, n_wr),
                            num_cpus=writer_cpus, fn_constructor_kwargs={"sink": wr_sink})
        for name in quiet:  # datasets may carry their own copy of the context
            if hasattr(getattr(ds, "context", None), name):
                setattr(ds.context, name, False)
        say(f"ingesting {what} into {collection!r} at {uri}: {device}, {n_wr} writer(s), "
            f"batches of {batch_size}, skip_existing={skip_existing}")

        report = DistributedReport(encoders=n_enc, writers=n_wr, device=device)
        t0 = last = time.perf_counter()
        first_failed_batch = -1
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not report.batches:
                report.startup_seconds = time.perf_counter() - t0
            for s in batch.to_pylist():
                report.batches += 1
                report.read += s["rows"]
                report.written += s["written"]
                report.skipped += s["skipped"]
                report.duplicates += s["duplicates"]
                report.bad_lines += s["bad"]
                report.first_bad = report.first_bad or s["first_bad"] or None
                report.tokens += s["tokens"]
                report.truncated += s["truncated"]
                report.encode_seconds += s["encode_seconds"]
                report.write_seconds += s["write_seconds"]
                if s["error"]:
                    report.failed_ids.extend(json.loads(s["failed_ids"]))
                    report.errors.append(s["error"])
                    if first_failed_batch < 0:
                        first_failed_batch = report.batches - 1
            now = time.perf_counter()
            report.timeline.append((round(now - t0, 3), report.read))
            if progress_interval is not None and now - last >= progress_interval:
                last = now
                report.seconds = now - t0
                say(_progress_line(report))
        report.seconds = time.perf_counter() - t0
        if owner is not None:
            report.count = ray.get(owner.count.remote())
        else:
            counter = _open_store(uri, collection, spec, options)
            report.count = counter.count()
            counter.close()
        say(_progress_line(report, final=True))
    except Exception as exc:
        cause = _unwrap(exc)
        if cause is exc:
            raise
        raise _without_ray_notes(cause) from None
    finally:
        for name, value in quiet.items():
            setattr(ray.data.DataContext.get_current(), name, value)
        if owner is not None:
            _stop_owner(ray, owner, owner_pid)
        if owned:
            ray.shutdown()
    if report.failed_ids and raise_on_failure:
        shown = ", ".join(repr(i) for i in report.failed_ids[:_FAILED_IDS_SHOWN])
        more = len(report.failed_ids) - _FAILED_IDS_SHOWN
        err = IngestError(
            f"{len(report.failed_ids)} documents were not stored ({report.errors[0]}): ids {shown}"
            + (f" and {more} more" if more > 0 else "")
            + f". The other {report.written} are stored; re-run (skip_existing) to write only the missing ones.",
            batch_index=first_failed_batch, ids=report.failed_ids,
        )
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report


def _stop_owner(ray: Any, owner: Any, pid: int | None) -> None:
    """Close the store actor and wait until its process (on this node) is gone: it held the file."""
    try:
        ray.get(owner.exit.remote(), timeout=120)
    except Exception:  # the call ends with the process: an actor error is expected
        pass
    deadline = time.monotonic() + 60
    while pid is not None and _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    ray.kill(owner)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _quiet(ray: Any) -> dict[str, Any]:
    """Ray Data's own progress bars and per-operator logs off (the job prints one line);
    returns the settings to put back."""
    ctx = ray.data.DataContext.get_current()
    saved = {name: getattr(ctx, name) for name in
             ("enable_progress_bars", "enable_operator_progress_bars", "enable_auto_log_stats") if hasattr(ctx, name)}
    for name in saved:
        setattr(ctx, name, False)
    if not logger.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"
    return saved


def _pool(ray: Any, size: int) -> dict[str, Any]:
    """A fixed-size actor pool in the spelling this Ray version prefers."""
    version = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if version >= (2, 51):
        return {"compute": ray.data.ActorPoolStrategy(size=size)}
    return {"concurrency": size}


def _progress_line(r: DistributedReport, *, final: bool = False) -> str:
    head = "done" if final else "progress"
    line = (f"{head}: {r.read} docs ({r.written} written, {r.skipped} skipped"
            + (f", {len(r.failed_ids)} FAILED" if r.failed_ids else "")
            + f") in {r.seconds:.1f} s: {r.docs_per_second:.1f} docs/s, {r.tokens_per_second:.0f} tokens/s")
    if final:
        line += (f"; {r.truncated} truncated, {r.bad_lines} bad lines, {r.batches} batches, "
                 f"{r.encoders} encoders, {r.writers} writers"
                 + ("" if r.count is None else f"; the collection holds {r.count}"))
    return line


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use 'm3connect ingest --ray' or m3connect.distributed.ingest()")

"""Ingestion's parts that need no store: the report, content-derived ids, checked records out
of whatever the caller passed, and the write loop that cuts records into batches by bytes.
:class:`~m3connect.store.M3Store` drives them (encoding, lazy creation, flushing)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .adapters.base import Adapter, CollectionSpec, Record
from .colbert_storage import pool_tokens
from .errors import IngestError, InvalidInputError, InvalidTypeError
from .types import Document
from .validation import _check_id, _check_metadata, _check_text

if TYPE_CHECKING:
    from .uri import ReadWriteLock, _NoLock

__all__ = ["IngestReport", "document_id"]

_log = logging.getLogger(__name__)  # DEBUG: one line per batch written


@dataclass
class IngestReport:
    """What one ingestion did."""

    written: int = 0
    skipped: int = 0
    truncated: int = 0
    batches: int = 0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    ids: list[str] = field(default_factory=list)


def document_id(text: str, metadata: Mapping[str, Any] | None = None) -> str:
    """Deterministic id from content, so re-running an ingestion overwrites, never duplicates."""
    digest = hashlib.sha256(text.encode("utf-8"))
    if metadata:
        digest.update(json.dumps(metadata, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:32]


def _records_from(
    texts: Iterable[Any],
    ids: Sequence[str] | None,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    *,
    need_text: bool = True,
) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
    """Yield (index, id, text, metadata) from texts or record dicts, checking every value.

    Everything is checked before it reaches an engine, so a bad item stops the run with
    a message naming it, and nothing after it is written."""
    if texts is None or isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise InvalidTypeError(
            f"texts must be a list of strings, got {type(texts).__name__}"
            + (": wrap a single text in a list" if isinstance(texts, str) else "")
        )
    if ids is not None and (isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable)):
        raise InvalidTypeError(f"ids must be a list of strings, got {type(ids).__name__}")
    if metadata is not None and (isinstance(metadata, Mapping) or not isinstance(metadata, Iterable)):
        raise InvalidTypeError(f"metadata must be a list of dicts (one per text), got {type(metadata).__name__}")
    id_list = None if ids is None else list(ids)
    meta_list = None if metadata is None else list(metadata)
    count = 0
    for i, item in enumerate(texts):
        count += 1
        text: Any
        rid: Any
        if isinstance(item, Document):
            text, rid, meta = item.text, item.id, dict(item.metadata)
        elif isinstance(item, Mapping):
            text = item.get("text")
            rid = item.get("id")
            meta = dict(item.get("metadata") or {})
        else:
            text, rid, meta = item, None, {}
        _check_text(text, f"texts[{i}]", need_text)
        if id_list is not None:
            if i >= len(id_list):
                raise InvalidInputError(f"ids has {len(id_list)} entries but texts has more")
            rid = id_list[i]
            if rid is None:
                raise InvalidTypeError(f"ids[{i}] is None; give every text an id, or pass no ids at all")
        if meta_list is not None:
            if i >= len(meta_list):
                raise InvalidInputError(f"metadata has {len(meta_list)} entries but texts has more")
            if meta_list[i] is not None and not isinstance(meta_list[i], Mapping):
                raise InvalidTypeError(f"metadata[{i}] is {type(meta_list[i]).__name__}, not a dict")
            meta = dict(meta_list[i] or {})
        if rid is not None:
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise InvalidTypeError(f"ids[{i}] must be a str or int, got {type(rid).__name__}")
            _check_id(str(rid), f"ids[{i}]")
        _check_metadata(meta, f"metadata[{i}]")
        yield i, str(rid) if rid is not None else document_id(text, meta), text, meta
    if id_list is not None and len(id_list) != count:
        raise InvalidInputError(f"ids has {len(id_list)} entries for {count} texts")
    if meta_list is not None and len(meta_list) != count:
        raise InvalidInputError(f"metadata has {len(meta_list)} entries for {count} texts")


def _write_batches(
    adapter: Adapter, records: list[Record], spec: CollectionSpec, lock: ReadWriteLock | _NoLock,
    report: IngestReport,
) -> None:
    """Cut records into batches by bytes and upsert them, each under ``lock``; a failure names its batch."""
    limit = adapter.max_batch_bytes
    if not spec.store_colbert:  # the collection keeps no ColBERT: each matrix is stored empty
        for rec in records:
            rec.colbert = np.zeros((0, spec.colbert_dim), np.float32)
    elif spec.colbert_pool_factor > 1:  # token pooling happens here, once, for every engine
        for rec in records:
            rec.colbert = pool_tokens(rec.colbert, spec.colbert_pool_factor)
    row_bytes = spec.colbert_row_bytes
    batch: list[Record] = []
    size = 0
    ends: list[Record | None] = [*records, None]  # None: write what is left
    for record in ends:
        rec_size = 0 if record is None else record.nbytes(0) + len(record.colbert) * row_bytes  # type: ignore[arg-type]
        if batch and (record is None or size + rec_size > limit):
            try:
                t0 = time.perf_counter()
                with lock.write():
                    adapter.upsert(batch)
                _log.debug("%s %r: wrote batch %d (%d documents, %.0f kB) in %.1f ms", adapter.engine,
                           adapter.collection, report.batches, len(batch), size / 1024,
                           1000 * (time.perf_counter() - t0))
            except (InvalidInputError, InvalidTypeError):
                raise  # a bad record: its message names it; earlier batches are stored
            except Exception as exc:  # adapters raise M3Errors; a wrapped or patched one may not
                raise IngestError(
                    f"writing batch {report.batches} ({len(batch)} documents, ids {batch[0].id!r}...) "
                    f"to {adapter.engine} failed: {exc}. "
                    "Earlier batches are stored; re-run to resume.",
                    batch_index=report.batches,
                    ids=[r.id for r in batch],
                ) from exc
            report.batches += 1
            report.written += len(batch)
            batch, size = [], 0
        if record is not None:
            batch.append(record)
            size += rec_size

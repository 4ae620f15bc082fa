"""Input readers for ``m3connect ingest``: JSONL, CSV/TSV, Parquet and directories of text files,
streamed as ``{"id", "text", "metadata"}`` records; format detection from the path."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import UsageError

__all__ = ["BadRecordError"]

_TEXT_SUFFIXES = {".txt", ".md", ".markdown"}


class BadRecordError(ValueError):
    """One malformed input line or row; the message names the file and line."""



class _Reader:
    """Streams ``{"id", "text", "metadata"}`` records out of one input, counting bad lines."""

    def __init__(self, path: Path, fmt: str, *, text_field: str, id_field: str,
                 metadata_fields: list[str] | None, skip_bad: bool, delimiter: str | None = None) -> None:
        self.path = path
        self.fmt = fmt
        self.text_field = text_field
        self.id_field = id_field
        self.metadata_fields = metadata_fields
        self.skip_bad = skip_bad
        self.delimiter = delimiter
        self.read = 0
        self.bad = 0
        self.first_bad: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        source = {"jsonl": self._jsonl, "csv": self._csv, "parquet": self._parquet, "dir": self._dir}[self.fmt]
        for where, row in source():
            try:
                if isinstance(row, BadRecordError):
                    raise row
                record = self._record(row, where)
            except BadRecordError as exc:
                if not self.skip_bad:
                    raise BadRecordError(f"{exc} (--skip-bad-lines skips and counts such lines)") from None
                self.bad += 1
                self.first_bad = self.first_bad or str(exc)
                continue
            self.read += 1
            yield record

    def _record(self, row: Any, where: str) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise BadRecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
        text = row.get(self.text_field)
        if text is None:
            raise BadRecordError(f"{where}: no {self.text_field!r} field (choose it with --text-field)")
        if not isinstance(text, str):
            raise BadRecordError(f"{where}: field {self.text_field!r} is {type(text).__name__}, not a string")
        rid = row.get(self.id_field)
        if rid == "":
            rid = None
        if rid is not None:
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise BadRecordError(
                    f"{where}: id field {self.id_field!r} is {type(rid).__name__}, not a string or int"
                )
            rid = str(rid)
        if self.metadata_fields is None:
            meta = {k: v for k, v in row.items() if k not in (self.text_field, self.id_field)}
        else:
            meta = {k: row[k] for k in self.metadata_fields if k in row}
        meta = {k: v for k, v in meta.items() if v is not None}
        return {"id": rid, "text": text, "metadata": meta}

    def _jsonl(self) -> Iterator[tuple[str, Any]]:
        with open(self.path, encoding="utf-8") as fh:
            lineno = 0
            while True:
                try:
                    line = fh.readline()
                except UnicodeDecodeError as exc:
                    lineno += 1
                    raise BadRecordError(f"{self.path}, line {lineno}: not UTF-8 text ({exc.reason})") from None
                if not line:
                    return
                lineno += 1
                if not line.strip():
                    continue
                where = f"{self.path}, line {lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield where, BadRecordError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})")

    def _csv(self) -> Iterator[tuple[str, Any]]:
        csv.field_size_limit(2**31 - 1)
        delimiter = self.delimiter or ("\t" if self.path.suffix.lower() == ".tsv" else ",")
        with open(self.path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            try:
                header = reader.fieldnames
            except csv.Error as exc:
                raise BadRecordError(f"{self.path}, line 1: malformed CSV header ({exc})") from None
            if not header:
                return
            if self.text_field not in header:
                raise BadRecordError(
                    f"{self.path}, line 1: the header has no {self.text_field!r} column "
                    f"(columns: {', '.join(header)}; choose one with --text-field)"
                )
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield f"{self.path}, line {reader.line_num}", BadRecordError(
                        f"{self.path}, line {reader.line_num}: malformed CSV ({exc})")
                    continue
                where = f"{self.path}, line {reader.line_num}"
                if None in row or any(v is None for v in row.values()):
                    yield where, BadRecordError(
                        f"{where}: {len(header)} columns expected, the row has a different number"
                    )
                    continue
                yield where, row

    def _parquet(self) -> Iterator[tuple[str, Any]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            from ..errors import MissingDependencyError

            raise MissingDependencyError.for_extra("pyarrow (needed to read Parquet)", "cli") from None
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as exc:
            raise BadRecordError(f"{self.path}: not a readable Parquet file ({exc})") from None
        if self.text_field not in pf.schema_arrow.names:
            raise BadRecordError(
                f"{self.path}: no {self.text_field!r} column (columns: {', '.join(pf.schema_arrow.names)}; "
                "choose one with --text-field)"
            )
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"{self.path}, row {n}", row

    def _dir(self) -> Iterator[tuple[str, Any]]:
        files = sorted(
            p for p in self.path.rglob("*")
            if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(self.path).parts)
        )
        for file in files:
            rel = file.relative_to(self.path).as_posix()
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                yield str(file), BadRecordError(f"{file}: not UTF-8 text ({exc.reason})")
                continue
            yield str(file), {self.id_field: rel, self.text_field: text, "path": rel}


def _detect_format(path: Path, fmt: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_dir():
        if fmt not in ("auto", "dir"):
            raise UsageError(f"{path} is a directory; --format {fmt} needs a file")
        return "dir"
    if fmt != "auto":
        if fmt == "dir":
            raise UsageError(f"--format dir needs a directory, {path} is a file")
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise UsageError(f"cannot tell the format of {path} from its suffix; pass --format jsonl|csv|parquet")

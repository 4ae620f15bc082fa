"""The ``m3connect`` command line: ingest, search, info and eval.

::

    m3connect ingest docs.jsonl --uri milvus:///abs/m3.db --collection docs --model BAAI/bge-m3
    m3connect search "how does hybrid search work" --uri milvus:///abs/m3.db --collection docs -k 5
    m3connect info --uri milvus:///abs/m3.db --collection docs
    m3connect drop --uri milvus:///abs/m3.db --collection docs --yes
    m3connect eval path/to/beir/scifact --model BAAI/bge-m3 --tune --plot quality.png

``--model``, ``--uri`` and ``--collection`` default to ``$M3_MODEL``, ``$M3_URI`` and
``$M3_COLLECTION``; credentials come from ``--user/--password/--api-key/--token`` or
``$M3_USER``, ``$M3_PASSWORD``, ``$M3_API_KEY``, ``$M3_TOKEN`` (or ``user:password@`` in the
URI) and are never printed. Every failure is one line
``m3connect: error: ...`` on stderr, exit status 2 for a bad command line and 1 for
anything that fails while running; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import redact

__all__ = ["main", "build_parser"]

PROG = "m3connect"
_DEFAULT_MODEL = "BAAI/bge-m3"
_TEXT_SUFFIXES = {".txt", ".md", ".markdown"}


class UsageError(Exception):
    """A bad command line (exit status 2)."""


class BadRecordError(ValueError):
    """One malformed input line or row; the message names the file and line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _default_model() -> str:
    return os.environ.get("M3_MODEL") or _DEFAULT_MODEL


# -- argument helpers -------------------------------------------------------------------------


def _parse_weights(text: str) -> tuple[float, float, float]:
    from .scoring import validate_weights

    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--weights must be three numbers 'dense,sparse,colbert' like 0.4,0.2,0.4, got {text!r}") from None
    try:
        w = validate_weights(values)
    except ValueError as exc:
        raise UsageError(f"--weights {text!r}: {exc}") from None
    return (w.dense, w.sparse, w.colbert)


def _parse_filter(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    from .filters import parse_filter

    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--filter is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"--filter must be a JSON object like '{{\"lang\": \"en\"}}', got {text!r}")
    try:
        parse_filter(spec)
    except ValueError as exc:
        raise UsageError(f"--filter {text!r}: {exc}") from None
    return spec


def _check_uri(uri: str | None) -> str:
    """The store URI to use: a bare ``*.db`` path is a Milvus Lite file, as pymilvus takes it."""
    from .store import parse_uri

    if not uri:
        raise UsageError("--uri is required (or set M3_URI), e.g. --uri milvus://./m3.db")
    if "://" not in uri:
        if uri.endswith(".db"):
            uri = "milvus://" + str(Path(uri).expanduser().resolve())
        else:
            raise UsageError(
                f"--uri {uri!r} is not a store URI: say qdrant://./{uri.lstrip('./')} (Qdrant Edge directory), "
                "milvus://./m3.db (Milvus Lite file) or opensearch://host:9200"
            )
    try:
        parse_uri(uri)
    except ValueError as exc:
        raise UsageError(f"--uri: {exc}") from None
    return uri


def _shown_uri(uri: str) -> str:
    from .store import safe_uri

    return safe_uri(uri)


def _fields(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [f.strip() for f in text.split(",") if f.strip()]


def _progress(args: argparse.Namespace) -> bool:
    if getattr(args, "progress", None) is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


def _info(args: argparse.Namespace, message: str) -> None:
    """A status line on stderr (stdout stays clean for --json)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _load_encoder(args: argparse.Namespace) -> Any:
    from .remote import is_remote_model

    if is_remote_model(args.model):  # an 'm3connect serve' server: no torch in this process
        if getattr(args, "device", None) or getattr(args, "dtype", None):
            raise UsageError("--device and --dtype apply to a local model; an encoder server chooses its own")
        from .remote import RemoteEncoder

        return RemoteEncoder(args.model, max_length=getattr(args, "max_length", None))
    from . import M3Encoder

    if not _progress(args):
        try:  # transformers' "Loading weights" bar
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # pragma: no cover - cosmetic only
            pass
    kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "show_progress": False}
    if getattr(args, "max_length", None) is not None:
        kwargs["max_length"] = args.max_length
    return M3Encoder(args.model, **kwargs)


def _connect(args: argparse.Namespace, encoder: Any) -> Any:
    from .store import connect

    options: dict[str, Any] = {}
    for name in ("user", "password", "api_key", "token"):
        if getattr(args, name, None):
            options[name] = getattr(args, name)
    if getattr(args, "colbert_dtype", None):
        options["colbert_dtype"] = args.colbert_dtype
    if getattr(args, "colbert_pool_factor", None):
        options["colbert_pool_factor"] = args.colbert_pool_factor
    if getattr(args, "candidate_depth", None):
        options["candidate_depth"] = args.candidate_depth
    return connect(args.uri, args.collection, encoder, **options)


# -- input readers ----------------------------------------------------------------------------


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
                raise BadRecordError(f"{where}: id field {self.id_field!r} is {type(rid).__name__}, not a string or int")
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
                    yield where, BadRecordError(f"{where}: {len(header)} columns expected, the row has a different number")
                    continue
                yield where, row

    def _parquet(self) -> Iterator[tuple[str, Any]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            from .errors import MissingDependencyError

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


# -- commands ---------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    args.uri = _check_uri(args.uri)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if not args.ray and (args.encoders is not None or args.writers is not None or args.ray_address is not None):
        raise UsageError("--encoders, --writers and --ray-address need --ray")
    path = Path(args.file).expanduser()
    fmt = _detect_format(path, args.format)
    if args.ray:
        return _ingest_on_ray(args, path, fmt)
    reader = _Reader(
        path, fmt, text_field=args.text_field, id_field=args.id_field,
        metadata_fields=_fields(args.metadata_fields), skip_bad=args.skip_bad_lines, delimiter=args.delimiter,
    )
    encoder = _load_encoder(args)
    t0 = time.perf_counter()
    with _connect(args, encoder) as store:
        report = store.ingest(
            reader, encode_batch_size=args.batch_size, skip_existing=args.resume, show_progress=_progress(args),
        )
        total = store.count() if store.exists else 0
    elapsed = time.perf_counter() - t0
    if not store.exists:
        from .errors import InvalidInputError

        raise InvalidInputError(
            f"{path} held no {'records' if fmt != 'dir' else '.txt/.md files'} to ingest "
            f"({reader.bad} bad lines skipped); no collection was created"
        )
    summary = {
        "file": str(path),
        "uri": _shown_uri(args.uri),
        "collection": args.collection,
        "read": reader.read,
        "written": report.written,
        "skipped": report.skipped,
        "bad_lines": reader.bad,
        "truncated": report.truncated,
        "batches": report.batches,
        "seconds": round(elapsed, 3),
        "encode_seconds": round(report.encode_seconds, 3),
        "write_seconds": round(report.write_seconds, 3),
        "docs_per_second": round(reader.read / elapsed, 2) if elapsed > 0 else None,
        "count": total,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    enc_rate = report.written / report.encode_seconds if report.encode_seconds > 0 else 0.0
    print(
        f"{reader.read} read, {report.written} written, {report.skipped} skipped (already stored), "
        f"{reader.bad} bad lines skipped, {report.truncated} truncated, {report.batches} batches"
    )
    print(
        f"{elapsed:.1f} s, {summary['docs_per_second'] or 0:.1f} docs/s "
        f"(encode {report.encode_seconds:.1f} s = {enc_rate:.1f} docs/s, write {report.write_seconds:.1f} s)"
    )
    if reader.first_bad:
        print(f"first bad line: {reader.first_bad}")
    print(f"collection {args.collection!r} at {_shown_uri(args.uri)} now holds {total} documents")
    return 0


def _ingest_on_ray(args: argparse.Namespace, path: Path, fmt: str) -> int:
    """``ingest --ray``: encode in a pool of Ray actors, write from parallel writers."""
    for name in ("encoders", "writers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.colbert_pool_factor not in (None, 1):
        raise UsageError("--colbert-pool-factor is not supported with --ray yet; ingest without --ray")
    from .errors import IngestError
    from .remote import is_remote_model

    if is_remote_model(args.model) and (args.device or args.dtype):
        raise UsageError("--device and --dtype apply to a local model; an encoder server chooses its own")
    from .distributed import ingest

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        report = ingest(
            path, uri=args.uri, collection=args.collection, model=args.model,
            encoder_options={"device": args.device, "dtype": args.dtype, "max_length": args.max_length},
            encoders=args.encoders, writers=args.writers, batch_size=args.batch_size, skip_existing=args.resume,
            colbert_dtype=args.colbert_dtype or "float32", fmt=fmt, text_field=args.text_field, id_field=args.id_field,
            metadata_fields=_fields(args.metadata_fields), skip_bad=args.skip_bad_lines, delimiter=args.delimiter,
            ray_address=args.ray_address, progress_interval=10.0 if _progress(args) else None, log=say,
        )
    except IngestError as exc:
        if getattr(exc, "report", None) is not None and args.json:
            print(json.dumps({"file": str(path), "uri": _shown_uri(args.uri), "collection": args.collection,
                              **exc.report.to_dict()}))  # type: ignore[attr-defined]
        raise
    if args.json:
        print(json.dumps({"file": str(path), "uri": _shown_uri(args.uri), "collection": args.collection,
                          **report.to_dict()}))
        return 0
    print(f"{report.read} read, {report.written} written, {report.skipped} skipped (already stored), "
          f"{report.bad_lines} bad lines skipped, {report.truncated} truncated, {report.batches} batches")
    print(f"{report.seconds:.1f} s, {report.docs_per_second:.1f} docs/s, {report.tokens_per_second:.0f} tokens/s "
          f"({report.device}, {report.writers} writer(s))")
    if report.first_bad:
        print(f"first bad line: {report.first_bad}")
    print(f"collection {args.collection!r} at {_shown_uri(args.uri)} now holds {report.count} documents")
    return 0


def _snippet(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def cmd_search(args: argparse.Namespace) -> int:
    args.uri = _check_uri(args.uri)
    if args.k < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}")
    weights = _parse_weights(args.weights)
    flt = _parse_filter(args.filter)
    encoder = _load_encoder(args)
    with _connect(args, encoder) as store:
        hits = store.search(args.query, k=args.k, weights=weights, filter=flt, fusion=args.fusion)
    if args.json:
        out = {
            "query": args.query,
            "weights": list(weights),
            "fusion": args.fusion,
            "filter": flt,
            "hits": [
                {"rank": i, "id": h.id, "score": h.score, "scores": h.scores, "text": h.text, "metadata": h.metadata}
                for i, h in enumerate(hits, 1)
            ],
        }
        print(json.dumps(out, ensure_ascii=False, default=str))
        return 0
    if not hits:
        print("no hits")
        return 0
    id_w = min(max(len("id"), *(len(h.id) for h in hits)), 32)
    print(f"{'rank':>4}  {'id':<{id_w}}  {'score':>8}  {'dense':>8}  {'sparse':>8}  {'colbert':>8}  text")
    for i, h in enumerate(hits, 1):
        s = h.scores
        cols = "  ".join(f"{s[r]:8.4f}" if r in s else f"{'-':>8}" for r in ("dense", "sparse", "colbert"))
        print(f"{i:>4}  {_snippet(h.id, id_w):<{id_w}}  {h.score:8.4f}  {cols}  {_snippet(h.text, args.width)}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    args.uri = _check_uri(args.uri)
    from .store import parse_uri

    loc = parse_uri(args.uri)
    with _open_existing(args) as store:
        info = store.info()
    info["uri"] = _shown_uri(args.uri)
    info["location"] = {"embedded": loc.embedded, "path": loc.path, "host": loc.host, "port": loc.port, "tls": loc.tls}
    if args.model:
        enc = _load_encoder(args)
        spec = info.get("spec") or {}
        info["encoder"] = {
            "model": enc.model_name,
            "fingerprint": enc.fingerprint,
            "dense_dim": enc.dense_dim,
            "colbert_dim": enc.colbert_dim,
            "device": str(enc.device),
            "dtype": enc.compute_dtype,
            "compatible": spec.get("fingerprint") == enc.fingerprint and spec.get("dense_dim") == enc.dense_dim,
        }
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    spec = info.get("spec") or {}
    print(f"engine:        {info['engine']}")
    print(f"uri:           {info['uri']}")
    print(f"collection:    {info['collection']}")
    print(f"documents:     {info['count']}")
    print(f"model:         {spec.get('model')}")
    print(f"fingerprint:   {spec.get('fingerprint')}")
    print(f"dense dim:     {spec.get('dense_dim')}")
    print(f"colbert dim:   {spec.get('colbert_dim')}")
    print(f"colbert dtype: {spec.get('colbert_dtype')}")
    print(f"schema:        v{spec.get('schema_version')}")
    for key, value in spec.items():
        if key not in ("model", "fingerprint", "dense_dim", "colbert_dim", "colbert_dtype", "schema_version"):
            print(f"{key + ':':<15}{value}")
    if "encoder" in info:
        e = info["encoder"]
        state = "matches the collection" if e["compatible"] else "does NOT match the collection"
        print(f"encoder:       {e['model']} ({e['dense_dim']}-d dense, {e['device']}, {e['dtype']}): {state}")
    return 0


def _open_existing(args: argparse.Namespace) -> Any:
    """Open an existing collection without an encoder; a missing one is a one-line error with a hint."""
    from .errors import CollectionNotFoundError
    from .store import connect

    options = {k: getattr(args, k) for k in ("user", "password", "api_key", "token") if getattr(args, k, None)}
    try:
        return connect(args.uri, args.collection, encoder=None, **options)
    except CollectionNotFoundError:
        raise CollectionNotFoundError(
            f"collection {args.collection!r} does not exist at {_shown_uri(args.uri)}; "
            "create it with 'm3connect ingest'"
        ) from None


def cmd_drop(args: argparse.Namespace) -> int:
    args.uri = _check_uri(args.uri)
    with _open_existing(args) as store:
        count = store.count()
        if not args.yes:
            raise UsageError(
                f"this deletes collection {args.collection!r} at {_shown_uri(args.uri)} and its {count} documents; "
                "add --yes to confirm"
            )
        store.drop()
    print(f"dropped collection {args.collection!r} ({count} documents) at {_shown_uri(args.uri)}")
    return 0


def _fmt_w(w: Sequence[float]) -> str:
    return ",".join(f"{x:g}" for x in w)


def cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluation as ev

    args.uri = _check_uri(args.uri)
    root = Path(args.dataset).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such BEIR dataset directory: {root}")
    corpus_file, queries_file = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_file = root / "qrels" / f"{args.split}.tsv"
    for f in (corpus_file, queries_file, qrels_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; a BEIR dataset has corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    queries = ev.load_queries(queries_file)
    qrels = ev.load_qrels(qrels_file)
    test_ids = sorted(q for q in qrels if q in queries and any(r > 0 for r in qrels[q].values()))
    if args.max_queries:
        test_ids = test_ids[: args.max_queries]
    if not test_ids:
        raise ValueError(f"no query of {queries_file} has a relevant document in {qrels_file}")

    tune_ids: list[str] = []
    tune_qrels = qrels
    if args.tune:
        if args.tune_split:
            tune_file = root / "qrels" / f"{args.tune_split}.tsv"
            if not tune_file.is_file():
                raise FileNotFoundError(f"{tune_file} is missing (from --tune-split {args.tune_split})")
            tune_qrels = ev.load_qrels(tune_file)
            tune_ids = sorted(q for q in tune_qrels if q in queries and any(r > 0 for r in tune_qrels[q].values()))
            if args.max_queries:
                tune_ids = tune_ids[: args.max_queries]
            eval_ids = test_ids
        else:
            if len(test_ids) < 2:
                raise ValueError("--tune without --tune-split needs at least 2 test queries to split")
            tune_ids, eval_ids = ev.split_queries(test_ids, seed=args.seed)
        if not tune_ids:
            raise ValueError("no tuning query has a relevant document")
    grid = ev.weight_grid(args.tune_step) if args.tune else []

    encoder = _load_encoder(args)
    t0 = time.perf_counter()
    with _connect(args, encoder) as store:
        _info(args, f"ingesting {corpus_file} into {args.uri} ({args.collection}) ...")
        report = store.ingest(ev.iter_corpus(corpus_file), encode_batch_size=args.batch_size,
                              skip_existing=True, show_progress=_progress(args))
        _info(args, f"corpus: {report.written} written, {report.skipped} already stored, "
                    f"{store.count()} documents ({time.perf_counter() - t0:.1f} s)")
        depth = args.candidate_depth
        runs: dict[str, dict[str, list[str]]] = {name: {} for name in ev.ROUTE_WEIGHTS}
        search_ids = sorted(set(test_ids) | set(tune_ids))
        qvecs: dict[str, Any] = {}
        t1 = time.perf_counter()
        for qid in search_ids:
            qvecs[qid] = encoder.encode_one(queries[qid])
        for qid in test_ids:
            for name, w in ev.ROUTE_WEIGHTS.items():
                hits = store.search_by_vectors(qvecs[qid], k=100, weights=w, candidate_depth=depth)
                runs[name][qid] = [h.id for h in hits]
        results: dict[str, Any] = {
            name: {"weights": list(w), **ev.mean_metrics(runs[name], qrels)} for name, w in ev.ROUTE_WEIGHTS.items()
        }
        tuned: dict[str, Any] | None = None
        if args.tune:
            cands = {}
            for qid in tune_ids:
                hits = store.search_by_vectors(qvecs[qid], k=3 * depth, weights=(1, 1, 1), candidate_depth=depth)
                cands[qid] = [(h.id, h.scores) for h in hits]
            best, tune_score = ev.tune_weights(cands, tune_qrels, grid, k=10)
            tuned_run = {}
            for qid in eval_ids:
                hits = store.search_by_vectors(qvecs[qid], k=100, weights=best, candidate_depth=depth)
                tuned_run[qid] = [h.id for h in hits]
            test_metrics = ev.mean_metrics(tuned_run, qrels)
            baseline = {
                name: ev.mean_metrics({q: runs[name][q] for q in eval_ids}, qrels) for name in ev.ROUTE_WEIGHTS
            }
            tuned = {
                "weights": list(best),
                "tune_split": args.tune_split or f"random half of {args.split} (seed {args.seed})",
                "tune_queries": len(tune_ids),
                "tune_ndcg@10": tune_score,
                "grid_points": len(grid),
                "test_queries": test_metrics["queries"],
                "test": test_metrics,
                "routes_on_test_queries": baseline,
            }
        search_seconds = time.perf_counter() - t1
    out: dict[str, Any] = {
        "dataset": str(root),
        "split": args.split,
        "model": args.model,
        "uri": args.uri,
        "documents": report.written + report.skipped,
        "queries": len(test_ids),
        "routes": results,
        "tuned": tuned,
        "search_seconds": round(search_seconds, 3),
    }
    if args.plot:
        _plot(results, tuned, Path(args.plot), title=f"{root.name} ({args.split}, {len(test_ids)} queries)")
        out["plot"] = args.plot
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{root.name}: {out['documents']} documents, {len(test_ids)} {args.split} queries, model {args.model}")
    print(f"{'route':<14}{'weights':<14}{'nDCG@10':>9}{'Recall@100':>12}")
    for name, r in results.items():
        print(f"{name:<14}{_fmt_w(r['weights']):<14}{r['ndcg@10']:>9.4f}{r['recall@100']:>12.4f}")
    if tuned:
        t = tuned["test"]
        print(
            f"tuned weights {_fmt_w(tuned['weights'])} (grid of {tuned['grid_points']} on {tuned['tune_queries']} "
            f"queries of {tuned['tune_split']}: nDCG@10 {tuned['tune_ndcg@10']:.4f})"
        )
        print(f"  test ({t['queries']} queries): nDCG@10 {t['ndcg@10']:.4f}, Recall@100 {t['recall@100']:.4f}")
        for name, r in tuned["routes_on_test_queries"].items():
            print(f"  vs {name:<14}nDCG@10 {r['ndcg@10']:.4f}, Recall@100 {r['recall@100']:.4f}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _plot(results: dict[str, Any], tuned: dict[str, Any] | None, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError.for_extra("matplotlib (needed for --plot)", "cli") from None
    names = list(results)
    ndcg = [results[n]["ndcg@10"] for n in names]
    recall = [results[n]["recall@100"] for n in names]
    if tuned:
        names.append("tuned\n(test half)" if "random" in str(tuned["tune_split"]) else "tuned")
        ndcg.append(tuned["test"]["ndcg@10"])
        recall.append(tuned["test"]["recall@100"])
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4))
    width = 0.38
    b1 = ax.bar([i - width / 2 for i in x], ndcg, width, label="nDCG@10")
    b2 = ax.bar([i + width / 2 for i in x], recall, width, label="Recall@100")
    for bars in (b1, b2):
        for bar in bars:
            ax.annotate(f"{bar.get_height():.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_serve(args: argparse.Namespace) -> int:
    from .remote import is_remote_model

    if is_remote_model(args.model):
        raise UsageError("serve needs a local model (a hub id or a directory), not a server URL")
    for name in ("port", "max_queue", "max_texts_per_request", "max_batch_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "port" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}, got {value}")
    from .server import Limits, serve

    limits = Limits(max_queue=args.max_queue, max_texts_per_request=args.max_texts_per_request,
                    batch_window_ms=args.batch_window_ms, gather_ms=args.gather_ms,
                    drain_timeout_s=args.drain_timeout)

    def ready(enc: Any) -> None:
        _info(args, f"serving {enc.model_name} (fingerprint {enc.fingerprint}, {enc.device}, "
                    f"{enc.compute_dtype}) on http://{args.host}:{args.port}")

    serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          max_length=args.max_length, max_batch_tokens=args.max_batch_tokens, limits=limits,
          log_level=args.log_level, on_ready=ready)
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="BGE-M3 dense + sparse + ColBERT search in Milvus, Qdrant or OpenSearch.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--collection", default=os.environ.get("M3_COLLECTION") or "m3connect",
                        help="collection (index) name (default: $M3_COLLECTION or m3connect)")
    creds = common.add_argument_group("credentials (never printed)")
    creds.add_argument("--user", default=os.environ.get("M3_USER") or None, help="user name (default: $M3_USER)")
    creds.add_argument("--password", default=os.environ.get("M3_PASSWORD") or None,
                       help="password (default: $M3_PASSWORD; prefer the variable: arguments show in ps)")
    creds.add_argument("--api-key", default=os.environ.get("M3_API_KEY") or None,
                       help="API key: Qdrant, OpenSearch (default: $M3_API_KEY)")
    creds.add_argument("--token", default=os.environ.get("M3_TOKEN") or None,
                       help="Milvus token 'user:password' or API key (default: $M3_TOKEN)")
    uri_default = os.environ.get("M3_URI") or None
    uri_help = "milvus://./m3.db, milvus:///abs/m3.db, qdrant:///abs/dir, qdrant://host:6333, ... (default: $M3_URI)"

    model = _Parser(add_help=False)
    model.add_argument("--model", default=_default_model(),
                       help="hub id or local directory of the model (default: $M3_MODEL or BAAI/bge-m3)")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    model.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "int8"],
                       help="compute dtype (default auto: float16 on GPU, bfloat16 on CPUs with native "
                            "bf16, else float32)")
    model.add_argument("--max-length", type=int, default=None, help="token limit per text (default: 8192)")

    prog = _Parser(add_help=False)
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="show progress bars (default: when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("ingest", parents=[common, model, prog], help="encode and store a file or directory",
                       description="Encode JSONL, CSV, Parquet or a directory of .txt/.md files and store them. "
                                   "Resumable: ids already stored are skipped unless --no-resume.")
    p.add_argument("file", metavar="FILE", help="a .jsonl, .csv/.tsv or .parquet file, or a directory of .txt/.md files")
    p.add_argument("--uri", default=uri_default, help=uri_help)
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "parquet", "dir"])
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument("--id-field", default="id", help="field holding the id (default: id; absent: derived from content)")
    p.add_argument("--metadata-fields", default=None,
                   help="comma-separated fields stored as metadata (default: all other fields)")
    p.add_argument("--delimiter", default=None, help="CSV delimiter (default: ',' or tab for .tsv)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per encode/write step (default: 256)")
    p.add_argument("--colbert-dtype", default=None, choices=["float32", "float16", "int8", "binary"],
                   help="ColBERT storage of a new collection (default float32; an existing one keeps its own)")
    p.add_argument("--colbert-pool-factor", type=int, default=None,
                   help="token pooling at ingestion: keep 1/N of each document's ColBERT vectors (default 1)")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip ids already stored (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="re-encode and overwrite stored ids")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ray", action="store_true",
                   help="encode on a Ray cluster: a pool of encoder actors, parallel writers (m3connect[ray])")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: 'auto' or ray://HOST:10001 joins a cluster (default: start a local Ray)")
    p.add_argument("--encoders", type=int, default=None,
                   help="with --ray: encoder actors, one model each (default: one per GPU, else 1)")
    p.add_argument("--writers", type=int, default=None,
                   help="with --ray: writer processes for servers (default 2; Milvus Lite/Qdrant dirs: 1)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", parents=[common, model], help="hybrid search",
                       description="Search with M3's weighted fusion of dense, sparse and ColBERT scores.")
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--uri", default=uri_default, help=uri_help)
    p.add_argument("-k", type=int, default=10, help="number of hits (default: 10)")
    p.add_argument("--weights", default="0.4,0.2,0.4", help="dense,sparse,colbert (default: 0.4,0.2,0.4)")
    p.add_argument("--filter", default=None, help='metadata filter as JSON, e.g. \'{"lang": "en"}\'')
    p.add_argument("--fusion", default="exact", choices=["exact", "engine", "rrf"])
    p.add_argument("--candidate-depth", type=int, default=None, help="candidates per route (default: max(100, 10k))")
    p.add_argument("--width", type=int, default=60, help="text snippet width in the table (default: 60)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", parents=[common], help="schema, model and count of a collection")
    p.add_argument("--uri", default=uri_default, help=uri_help)
    p.add_argument("--model", default=None, help="also load this model and check it matches the collection")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16", "int8"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("drop", parents=[common], help="delete a collection and everything stored beside it",
                       description="Delete a collection. Asks for --yes; a missing collection is an error.")
    p.add_argument("--uri", default=uri_default, help=uri_help)
    p.add_argument("--yes", action="store_true", help="confirm the deletion")
    p.set_defaults(func=cmd_drop)

    p = sub.add_parser("eval", parents=[common, model, prog], help="nDCG@10 / Recall@100 on a BEIR dataset",
                       description="Ingest a BEIR dataset and report nDCG@10 and Recall@100 per route "
                                   "(dense, sparse, colbert, dense+sparse, all).")
    p.add_argument("dataset", metavar="DATASET", help="directory with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--uri", default="qdrant://:memory:", help="where to index the corpus (default: qdrant://:memory:)")
    p.add_argument("--split", default="test", help="qrels file to score (default: test)")
    p.add_argument("--max-queries", type=int, default=None, help="score only the first N queries")
    p.add_argument("--candidate-depth", type=int, default=100, help="candidates per route (default: 100)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--colbert-dtype", default=None, choices=["float32", "float16", "int8", "binary"],
                   help="ColBERT storage of a new collection (default float32; an existing one keeps its own)")
    p.add_argument("--colbert-pool-factor", type=int, default=None,
                   help="token pooling at ingestion: keep 1/N of each document's ColBERT vectors (default 1)")
    p.add_argument("--tune", action="store_true", help="grid-search the fusion weights")
    p.add_argument("--tune-split", default=None,
                   help="qrels split to tune on (e.g. dev); default: a random half of the test queries")
    p.add_argument("--tune-step", type=float, default=0.1, help="weight grid step (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tuning half (default: 0)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart of quality per route")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no status lines on stderr")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", parents=[model], help="serve the encoder over HTTP to many clients",
                       description="Hold the model in one process and encode for many clients, batching "
                                   "concurrent requests together. Clients: --model http://HOST:PORT or "
                                   "m3connect.RemoteEncoder. Needs 'm3connect[serve]'.")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per forward pass (default: the encoder's per-device budget)")
    p.add_argument("--max-queue", type=int, default=4096,
                   help="texts waiting, all clients together, before requests get 429 (default: 4096)")
    p.add_argument("--max-texts-per-request", type=int, default=512, help="texts in one request (default: 512)")
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="after an idle spell, how long to wait for more requests to batch (default: 2)")
    p.add_argument("--gather-ms", type=float, default=50.0,
                   help="after a batch, how long to wait at most for its clients' next requests (default: 50)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds in-flight requests may take to finish on shutdown (default: 60)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--quiet", action="store_true", help="no status line on stderr")
    p.set_defaults(func=cmd_serve)
    return parser


# -- entry point ------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        msg = f"{exc.strerror}: {exc.filename}"
    elif isinstance(exc, OSError) and exc.strerror and exc.filename:
        msg = f"{exc.strerror}: {exc.filename}"
    from .errors import M3Error

    if not msg:
        msg = type(exc).__name__
    elif not isinstance(exc, (M3Error, OSError, ValueError, BadRecordError, UsageError)):
        msg = f"{type(exc).__name__}: {msg}"
    msg = " ".join(msg.split())
    if len(msg) > 1200:
        msg = msg[:1200] + "…"
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 runtime error, 2 bad command line)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))
    func: Callable[[argparse.Namespace], int] = args.func
    secrets = [getattr(args, name, None) or "" for name in ("password", "api_key", "token")]
    if not debug:
        # pymilvus logs a full traceback at ERROR for every failed call; the one-line error says it all
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            return func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except UsageError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {redact(_one_line(exc), secrets)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        from .errors import ModelLoadError

        msg = _one_line(exc)
        if isinstance(exc, ModelLoadError) and "hub" in msg and "M3_MODEL" not in msg:
            msg += " (or set M3_MODEL to that directory)"
        print(f"{PROG}: error: {redact(msg, secrets)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

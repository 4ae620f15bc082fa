"""Ingest rate, adapter overhead, query latency and bytes per document, per engine.

One run measures, for every engine available (Milvus Lite file, Qdrant local path, and a
real OpenSearch node that this script starts unless ``--no-opensearch`` or
``$M3_OPENSEARCH_URL``):

1. ingest docs/s with encoding (``M3Store.ingest`` wall time, final flush included) and
   without it (the corpus is encoded once up front; the same ``Record`` objects are then
   written through the public ``M3Store.add_vectors`` — byte-sized batches into
   ``adapter.upsert``, then a flush);
2. adapter overhead: the same pre-encoded data written with the raw client in the engine's
   native fields (Milvus ``client.insert`` into an equivalent document + ColBERT-token
   collection pair; Qdrant ``client.upsert`` of ``PointStruct`` with the same named vectors;
   OpenSearch ``client.bulk`` of the same ``_source`` fields into an index with the same
   mapping), flush included; reported as adapter time / raw time;
3. query latency p50/p95 per fusion mode (exact, engine, rrf) with pre-encoded queries
   (``search_by_vectors``), plus exact fusion including query encoding (``search``);
4. bytes stored per document with ColBERT float32 and float16 (on-disk delta of the
   collection directory / Milvus Lite file, or OpenSearch ``_stats`` store size after
   refresh + flush + force-merge to one segment), beside the theoretical raw ColBERT bytes.

The model is a random checkpoint (``m3connect.testing.make_tiny_checkpoint``), so the
numbers say nothing about retrieval quality, and encoding is much cheaper than BGE-M3's
(hidden 1024, 24 layers): the "with encoding" rate here is an upper bound.

    .venv/bin/python benchmarks/ingest_query.py                 # full run (200 docs, ~5 min on 2 cores)
    .venv/bin/python benchmarks/ingest_query.py --quick --no-opensearch --out /tmp/x

``--query-scale`` runs the query-scale mode instead (issue 9: synthetic BGE-M3-sized vectors
through the public store API, N = 1k and 10k, raw-client anchors, bytes moved, recall); it
lives in ``benchmarks/query_scale.py``, which takes the remaining arguments:

    .venv/bin/python benchmarks/ingest_query.py --query-scale --engines edge,milvus --n 1000
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from m3connect.adapters.base import Record  # noqa: E402
from m3connect.store import M3Store, connect  # noqa: E402
from m3connect.testing import make_tiny_checkpoint, synthetic_corpus  # noqa: E402

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

WEIGHTS = (0.4, 0.2, 0.4)
FUSIONS = ("exact", "engine", "rrf")


# -- helpers ---------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    """Apparent size (sum of st_size) of a file or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                pass
    return total


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def machine_info() -> dict[str, Any]:
    import torch

    cpu = cpu_model()
    versions: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for _mod, dist in (("pymilvus", "pymilvus"), ("milvus_lite", "milvus-lite"),
                      ("qdrant_client", "qdrant-client"), ("opensearchpy", "opensearch-py")):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "not installed"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "host": socket.gethostname(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "loadavg_start": list(os.getloadavg()),
    }


# -- raw-client writers ----------------------------------------------------------------------


def raw_milvus(client: Any, name: str, records: list[Record], dense_dim: int, colbert_dim: int) -> float:
    """Same schema as MilvusAdapter.create (Lite: FLAT), written with plain ``insert``."""
    from pymilvus import DataType

    main = client.create_schema(auto_id=False)
    main.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    main.add_field("text", DataType.VARCHAR, max_length=65535)
    main.add_field("metadata", DataType.JSON)
    main.add_field("n_tokens", DataType.INT64)
    main.add_field("dense", DataType.FLOAT_VECTOR, dim=dense_dim)
    main.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    idx = client.prepare_index_params()
    idx.add_index("dense", index_type="FLAT", metric_type="IP")
    idx.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    tok = client.create_schema(auto_id=False)
    tok.add_field("key", DataType.VARCHAR, is_primary=True, max_length=524)
    tok.add_field("doc_id", DataType.VARCHAR, max_length=512)
    tok.add_field("pos", DataType.INT64)
    tok.add_field("vec", DataType.FLOAT_VECTOR, dim=colbert_dim)
    tidx = client.prepare_index_params()
    tidx.add_index("vec", index_type="FLAT", metric_type="IP")
    client.create_collection(f"{name}__colbert", schema=tok, index_params=tidx)
    client.create_collection(name, schema=main, index_params=idx)

    t0 = time.perf_counter()
    rows, token_rows = [], []
    for r in records:
        rows.append({"id": r.id, "text": r.text, "metadata": r.metadata, "n_tokens": int(r.colbert.shape[0]),
                     "dense": r.dense.astype(np.float32).tolist(),
                     "sparse": {int(k): float(v) for k, v in r.sparse.items()} or {0: 1e-30}})
        for pos, vec in enumerate(r.colbert):
            token_rows.append({"key": f"{r.id}#{pos}", "doc_id": r.id, "pos": pos, "vec": vec.astype(np.float32)})
    for s in range(0, len(token_rows), 4096):
        client.insert(f"{name}__colbert", token_rows[s:s + 4096])
    for s in range(0, len(rows), 512):
        client.insert(name, rows[s:s + 512])
    client.flush(f"{name}__colbert")
    client.flush(name)
    return time.perf_counter() - t0


def raw_qdrant(client: Any, name: str, records: list[Record], dense_dim: int, colbert_dim: int) -> float:
    """Same named vectors as QdrantAdapter.create, ``upsert`` of PointStructs, 256 per call."""
    import uuid

    from qdrant_client import models

    client.create_collection(
        name,
        vectors_config={
            "dense": models.VectorParams(size=dense_dim, distance=models.Distance.DOT),
            "colbert": models.VectorParams(
                size=colbert_dim, distance=models.Distance.DOT, datatype=models.Datatype.FLOAT32,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
                hnsw_config=models.HnswConfigDiff(m=0)),
        },
        sparse_vectors_config={"sparse": models.SparseVectorParams()},
    )
    ns = uuid.UUID("6f1c3a52-6b1e-4f0e-9a39-3a0c5e1f7d21")
    t0 = time.perf_counter()
    for s in range(0, len(records), 256):
        points = [
            models.PointStruct(
                id=str(uuid.uuid5(ns, r.id)),
                vector={"dense": r.dense.tolist(),
                        "sparse": models.SparseVector(indices=list(r.sparse), values=list(r.sparse.values())),
                        "colbert": r.colbert.tolist()},
                payload={"doc_id": r.id, "text": r.text, "metadata": r.metadata},
            )
            for r in records[s:s + 256]
        ]
        client.upsert(name, points=points, wait=True)
    return time.perf_counter() - t0


def raw_opensearch(client: Any, name: str, like_index: str, records: list[Record]) -> float:
    """Index with the adapter index's mapping/settings; ``bulk`` of the same _source, 50 docs a call."""
    mapping = next(iter(client.indices.get_mapping(index=like_index).values()))["mappings"]
    mapping.pop("_meta", None)
    client.indices.create(index=name, body={
        "settings": {"index": {"knn": True, "knn.derived_source.enabled": False,
                               "number_of_shards": 1, "number_of_replicas": 0}},
        "mappings": mapping})
    t0 = time.perf_counter()
    for s in range(0, len(records), 50):
        lines = []
        for r in records[s:s + 50]:
            col = np.asarray(r.colbert, np.float32)
            mean = col.astype(np.float64).mean(axis=0)
            mean = mean / (np.linalg.norm(mean) or 1.0)
            src = {
                "doc_id": r.id, "text": r.text, "metadata": r.metadata,
                "dense": r.dense.astype(np.float32).tolist(),
                "sparse": {str(int(t)): float(v) for t, v in r.sparse.items() if v > 0},
                "colbert": np.round(col.astype(np.float64), 6).tolist(),
                "colbert_mean": mean.astype(np.float32).tolist(),
                "m3": {"sparse": {"i": [int(t) for t in r.sparse], "v": [float(v) for v in r.sparse.values()]},
                       "colbert": {"b64": base64.b64encode(col.astype("<f4").tobytes()).decode("ascii"),
                                   "shape": list(col.shape), "dtype": "float32"}},
            }
            lines.append(json.dumps({"index": {"_id": r.id}}) + "\n" + json.dumps(src, separators=(",", ":")) + "\n")
        resp = client.bulk(body="".join(lines), index=name)
        if resp.get("errors"):
            raise RuntimeError("raw bulk reported errors")
    client.indices.refresh(index=name)
    return time.perf_counter() - t0


def opensearch_store_bytes(client: Any, index: str) -> int:
    client.indices.refresh(index=index)
    client.indices.flush(index=index)
    client.indices.forcemerge(index=index, max_num_segments=1, request_timeout=300)
    client.indices.refresh(index=index)
    stats = client.indices.stats(index=index, metric="store")
    return int(stats["indices"][index]["primaries"]["store"]["size_in_bytes"])


# -- measurements ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, encoder: Any, texts: list[str], ids: list[str],
                 metas: list[dict[str, Any]], records: list[Record], queries: list[str],
                 qreps: list[dict[str, Any]], work: Path) -> None:
        self.args, self.enc, self.texts, self.ids, self.metas = args, encoder, texts, ids, metas
        self.records, self.queries, self.qreps, self.work = records, queries, qreps, work
        self.n = len(texts)
        self.ingest_rows: list[dict[str, Any]] = []
        self.query_rows: list[dict[str, Any]] = []
        self.storage_rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, str]] = []

    # one engine ---------------------------------------------------------------------------

    def uri(self, engine: str, tag: str) -> tuple[str, Path | None]:
        if engine == "milvus":
            d = self.work / f"milvus-{tag}"
            d.mkdir(parents=True, exist_ok=True)
            return f"milvus://{d}/m3.db", d
        if engine == "qdrant":
            d = self.work / f"qdrant-{tag}"
            d.mkdir(parents=True, exist_ok=True)
            return f"qdrant+local://{d}", d  # qdrant-client local mode (qdrant:///dir is Qdrant Edge)
        return self.os_uri, None

    def write_path(self, store: M3Store) -> float:
        t0 = time.perf_counter()
        ids = store.add_vectors(
            [r.vectors for r in self.records], texts=[r.text for r in self.records],
            ids=[r.id for r in self.records], metadata=[r.metadata for r in self.records],
        )  # the public write path: byte-sized batches, then a flush
        dt = time.perf_counter() - t0
        assert len(ids) == self.n, len(ids)
        return dt

    def queries_for(self, engine: str, store: M3Store) -> None:
        nq = len(self.qreps)
        warm = min(1, nq)
        for fusion in FUSIONS:
            try:
                for q in self.qreps[:warm]:
                    store.search_by_vectors(q, k=10, weights=WEIGHTS, fusion=fusion)
                lat = []
                for q in self.qreps:
                    t0 = time.perf_counter()
                    hits = store.search_by_vectors(q, k=10, weights=WEIGHTS, fusion=fusion)
                    lat.append((time.perf_counter() - t0) * 1000)
                    assert hits, f"{engine}/{fusion} returned no hits"
                self.query_rows.append({"engine": engine, "fusion": fusion, "encoding": False, "n_queries": nq,
                                        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "mean_ms": float(np.mean(lat))})
            except Exception as exc:  # e.g. an engine without a fusion mode
                self.errors.append({"engine": engine, "step": f"query {fusion}", "error": f"{type(exc).__name__}: {exc}"})
        lat = []
        for q in self.queries:
            t0 = time.perf_counter()
            store.search(q, k=10, weights=WEIGHTS, fusion="exact")
            lat.append((time.perf_counter() - t0) * 1000)
        self.query_rows.append({"engine": engine, "fusion": "exact", "encoding": True, "n_queries": nq,
                                "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "mean_ms": float(np.mean(lat))})

    def run_engine(self, engine: str) -> None:
        n = self.n
        row: dict[str, Any] = {"engine": engine, "n_docs": n}
        print(f"[{engine}] ingest with encoding", flush=True)
        uri, _ = self.uri(engine, "misc")
        misc = connect(uri, collection="bench_ingest", encoder=self.enc, candidate_depth=self.args.candidate_depth)
        t0 = time.perf_counter()
        rep = misc.ingest(self.texts, self.ids, self.metas, show_progress=False)
        wall = time.perf_counter() - t0
        assert rep.written == n
        row.update(ingest_incl_encoding_s=wall, ingest_incl_encoding_docs_s=n / wall,
                   ingest_report_encode_s=rep.encode_seconds, ingest_report_write_s=rep.write_seconds)

        print(f"[{engine}] adapter write path (pre-encoded), fp32", flush=True)
        uri32, dir32 = self.uri(engine, "fp32")
        store = connect(uri32, collection="bench_fp32", encoder=self.enc, colbert_dtype="float32",
                        candidate_depth=self.args.candidate_depth)
        before = dir_bytes(dir32) if dir32 else 0
        wt = self.write_path(store)
        row.update(write_only_s=wt, write_only_docs_s=n / wt)

        print(f"[{engine}] raw client write", flush=True)
        client = misc.adapter.client
        if engine == "milvus":
            raw = raw_milvus(client, "bench_raw", self.records, self.enc.dense_dim, self.enc.colbert_dim)
        elif engine == "qdrant":
            raw = raw_qdrant(client, "bench_raw", self.records, self.enc.dense_dim, self.enc.colbert_dim)
        else:
            raw = raw_opensearch(client, "bench_raw", store.adapter.index, self.records)
        row.update(raw_write_s=raw, raw_write_docs_s=n / raw, adapter_over_raw=wt / raw)
        self.ingest_rows.append(row)

        print(f"[{engine}] queries", flush=True)
        self.queries_for(engine, store)

        print(f"[{engine}] storage", flush=True)
        self.storage_rows.append(self.measure_size(engine, "float32", store, dir32, before))
        uri16, dir16 = self.uri(engine, "fp16")
        s16 = connect(uri16, collection="bench_fp16", encoder=self.enc, colbert_dtype="float16")
        b16 = dir_bytes(dir16) if dir16 else 0
        self.write_path(s16)
        self.storage_rows.append(self.measure_size(engine, "float16", s16, dir16, b16))
        if engine == "opensearch":
            for idx in ("bench_ingest", "bench_fp32", "bench_fp16", "bench_raw"):
                misc.adapter.client.indices.delete(index=idx, ignore_unavailable=True)
        misc.close()

    def theory(self, itemsize: int) -> dict[str, Any]:
        toks = sum(int(r.colbert.shape[0]) for r in self.records)
        dim = self.records[0].colbert.shape[1]
        dense = self.records[0].dense.size * 4
        sparse = sum(len(r.sparse) for r in self.records) * 8 / self.n  # int32 id + float32 weight
        colbert = toks * dim * itemsize / self.n
        return {"tokens_per_doc": toks / self.n, "colbert_raw_bytes_per_doc": colbert,
                "vectors_raw_bytes_per_doc": colbert + dense + sparse}

    def measure_size(self, engine: str, dtype: str, store: M3Store, path: Path | None, before: int) -> dict[str, Any]:
        itemsize = 2 if dtype == "float16" else 4
        if engine == "opensearch":
            size = opensearch_store_bytes(store.adapter.client, store.adapter.index)
            how = "_stats primaries.store after refresh+flush+forcemerge(1)"
            store.close()
        else:
            store.close()
            gc.collect()
            time.sleep(0.5)
            assert path is not None
            size = dir_bytes(path) - before
            how = "apparent-size delta of the store dir (write+flush, after close)"
            if engine == "qdrant":
                how += "; qdrant-client local mode pickles vectors into SQLite and ignores the float16 datatype"
            if engine == "milvus":
                how += "; Milvus Lite keeps each document's ColBERT as packed byte chunks in a companion collection"
        return {"engine": engine, "colbert_dtype": dtype, "bytes_per_doc": size / self.n,
                "total_bytes": size, "how": how, **self.theory(itemsize)}


# -- report ----------------------------------------------------------------------------------


def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    out = [
        f"# ingest / query benchmark — {m['host']}",
        "",
        f"- date: {m['date_utc']}; load average at start: {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}; "
        f"at end: {', '.join(f'{x:.2f}' for x in result['loadavg_end'])}",
        f"- CPU: {m['cpu_model']} — {m['cpus_usable']} usable cores (os.cpu_count {m['cpu_count']}), "
        f"torch threads {m['torch_threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- model: random `make_tiny_checkpoint` (hidden {c['hidden_size']}, {c['num_layers']} layers, "
        f"{c['num_heads']} heads, dense/ColBERT dim {c['colbert_dim']}), CPU fp32 — encoding is far cheaper "
        "than real BGE-M3 (1024 wide, 24 layers)",
        f"- corpus: {c['n_docs']} synthetic docs of {c['min_words']}-{c['max_words']} words "
        f"({c['tokens_per_doc']:.1f} tokens/doc avg); {c['n_queries']} queries (+1 warm-up), k=10, weights {tuple(c['weights'])}, "
        f"candidate_depth {c['candidate_depth']} per route (library default 100; lowered to fit the time budget)",
        f"- engines: {', '.join(c['engines'])}{' (OpenSearch: ' + c['opensearch'] + ')' if c.get('opensearch') else ''}",
        f"- total wall time {result['total_seconds']:.0f} s"
        f"{'' if result.get('complete', True) else ' (PARTIAL: engines done ' + ', '.join(c.get('engines_done', [])) + ')'}. Small run on a shared, loaded machine: "
        "treat the numbers as relative, not absolute.",
        "",
        "## Ingest (docs/s)",
        "",
        "| engine | with encoding (`ingest`) | write only (`_write`+flush) | raw client | adapter/raw time |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["ingest"]:
        out.append(f"| {r['engine']} | {fmt(r['ingest_incl_encoding_docs_s'])} | {fmt(r['write_only_docs_s'])} | "
                   f"{fmt(r['raw_write_docs_s'])} | {fmt(r['adapter_over_raw'], 2)}× |")
    out += [
        "",
        "With encoding = `M3Store.ingest` wall time incl. its final flush. Write only = the "
        "pre-encoded vectors through `M3Store.add_vectors` (byte-sized batches → `adapter.upsert`) + "
        "`adapter.flush()`. Raw = the same data through the engine client in native fields "
        "(Milvus `insert` 512 docs / 4096 token rows per call + flush; Qdrant `upsert` 256 "
        "PointStructs, wait=True; OpenSearch `bulk` 50 docs per call + refresh), row building included.",
        "",
        "## Query latency (ms, pre-encoded queries unless noted)",
        "",
        "| engine | fusion | p50 | p95 | mean |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["query"]:
        label = r["fusion"] + (" + query encoding" if r["encoding"] else "")
        out.append(f"| {r['engine']} | {label} | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['mean_ms'])} |")
    out += [
        "",
        "## Bytes stored per document",
        "",
        "| engine | ColBERT dtype | measured bytes/doc | raw ColBERT bytes/doc | raw dense+sparse+ColBERT bytes/doc | how |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in result["storage"]:
        out.append(f"| {r['engine']} | {r['colbert_dtype']} | "
                   f"{fmt(r['bytes_per_doc'], 0) if r['bytes_per_doc'] is not None else r.get('note', 'n/a')} | "
                   f"{fmt(r['colbert_raw_bytes_per_doc'], 0)} | {fmt(r['vectors_raw_bytes_per_doc'], 0)} | "
                   f"{r.get('how', '')} |")
    if result["errors"]:
        out += ["", "## Errors", ""] + [f"- {e['engine']} / {e['step']}: {e['error']}" for e in result["errors"]]
    return "\n".join(out) + "\n"


# -- main ------------------------------------------------------------------------------------


def query_scale_main(argv: list[str]) -> int:
    """Run ``benchmarks/query_scale.py`` with ``argv`` (the ``--query-scale`` mode)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("query_scale", Path(__file__).with_name("query_scale.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["query_scale"] = module
    spec.loader.exec_module(module)
    return int(module.main(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--query-scale" in argv:
        return query_scale_main([a for a in argv if a != "--query-scale"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-docs", type=int, default=None, help="corpus size (default 200, 16 with --quick)")
    ap.add_argument("--n-queries", type=int, default=None, help="queries (default 10, 4 with --quick)")
    ap.add_argument("--min-words", type=int, default=None, help="default 20 (10 with --quick)")
    ap.add_argument("--max-words", type=int, default=None, help="default 120 (40 with --quick)")
    ap.add_argument("--candidate-depth", type=int, default=None,
                    help="candidates per route (default 20; the library default is 100)")
    ap.add_argument("--hidden", type=int, default=None, help="tiny checkpoint width = dense/ColBERT dim (default 128, 64 quick)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run; no OpenSearch unless --opensearch")
    ap.add_argument("--opensearch", action="store_true", help="with --quick: include OpenSearch anyway")
    ap.add_argument("--no-opensearch", action="store_true")
    ap.add_argument("--query-scale", action="store_true",
                    help="run the query-scale mode (benchmarks/query_scale.py; see its --help) with the other arguments")
    ap.add_argument("--engines", default="milvus,qdrant,opensearch")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output directory")
    args = ap.parse_args(argv)
    n_docs = args.n_docs or (16 if args.quick else 200)
    n_queries = args.n_queries or (4 if args.quick else 10)
    args.min_words = args.min_words or (10 if args.quick else 20)
    args.max_words = args.max_words or (40 if args.quick else 120)
    args.candidate_depth = args.candidate_depth or 20
    args.hidden = args.hidden or (64 if args.quick else 128)
    t_start = time.perf_counter()
    machine = machine_info()

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.no_opensearch or (args.quick and not args.opensearch):
        engines = [e for e in engines if e != "opensearch"]
    avail = []
    for e in engines:
        mod = {"milvus": "pymilvus", "qdrant": "qdrant_client", "opensearch": "opensearchpy"}[e]
        try:
            __import__(mod)
            avail.append(e)
        except ImportError:
            print(f"skipping {e}: {mod} not installed", flush=True)

    from m3connect import M3Encoder

    work = Path(tempfile.mkdtemp(prefix="m3-bench-iq-"))
    node = None
    try:
        ckpt = make_tiny_checkpoint(work / "ckpt", hidden_size=args.hidden, num_layers=args.layers,
                                    num_heads=4, intermediate_size=2 * args.hidden)
        enc = M3Encoder(ckpt, device="cpu", dtype="float32", show_progress=False)
        texts = synthetic_corpus(n_docs, min_words=args.min_words, max_words=args.max_words, seed=0)
        ids = [f"doc-{i:06d}" for i in range(n_docs)]
        metas = [{"bucket": i % 5, "lang": "en"} for i in range(n_docs)]
        queries = synthetic_corpus(n_queries, min_words=3, max_words=12, seed=7)
        print(f"encoding {n_docs} docs once (pre-encoded records)", flush=True)
        t0 = time.perf_counter()
        out = enc.encode(texts, show_progress=False)
        encode_s = time.perf_counter() - t0
        records = [Record(id=ids[j], text=texts[j], metadata=metas[j], dense=out.dense[j], sparse=out.sparse[j],
                          colbert=out.colbert[j]) for j in range(n_docs)]
        qreps = [enc.encode_one(q) for q in queries]

        os_label = None
        bench = Bench(args, enc, texts, ids, metas, records, queries, qreps, work)
        if "opensearch" in avail:
            env = os.environ.get("M3_OPENSEARCH_URL")
            try:
                if env:
                    url, os_label = env.rstrip("/"), f"external {env}"
                else:
                    from opensearch_node import OpenSearchNode

                    print("starting OpenSearch node", flush=True)
                    t0 = time.perf_counter()
                    node = OpenSearchNode.start(heap="1g")
                    url = node.url
                    os_label = f"local node {node.version}, heap 1g, started in {time.perf_counter() - t0:.0f} s"
                host_port = url.split("://", 1)[1]
                bench.os_uri = ("opensearch+https://" if url.startswith("https") else "opensearch://") + host_port
            except Exception as exc:
                avail.remove("opensearch")
                bench.errors.append({"engine": "opensearch", "step": "start", "error": f"{type(exc).__name__}: {exc}"})
        tokens_per_doc = float(np.mean([r.colbert.shape[0] for r in records]))
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"ingest_query-{machine['host']}" + ("-quick" if args.quick else "")

        def write(done: list[str]) -> dict[str, Any]:
            """Write JSON + markdown; called after every engine so a killed run keeps its rows."""
            result = {
                "benchmark": "ingest_query",
                "machine": machine,
                "config": {"n_docs": n_docs, "n_queries": n_queries, "min_words": args.min_words,
                           "max_words": args.max_words, "hidden_size": args.hidden, "num_layers": args.layers,
                           "num_heads": 4, "dense_dim": enc.dense_dim, "colbert_dim": enc.colbert_dim,
                           "weights": list(WEIGHTS), "k": 10, "candidate_depth": args.candidate_depth,
                           "quick": args.quick, "engines": avail, "engines_done": list(done),
                           "opensearch": os_label, "tokens_per_doc": tokens_per_doc,
                           "pre_encode_seconds": encode_s, "pre_encode_docs_s": n_docs / encode_s},
                "ingest": bench.ingest_rows,
                "query": bench.query_rows,
                "storage": bench.storage_rows,
                "errors": bench.errors,
                "complete": len(done) == len(avail),
                "loadavg_end": list(os.getloadavg()),
                "total_seconds": time.perf_counter() - t_start,
            }
            (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            (out_dir / f"{stem}.md").write_text(markdown(result))
            return result

        done: list[str] = []
        for engine in avail:
            try:
                bench.run_engine(engine)
            except Exception as exc:
                traceback.print_exc()
                bench.errors.append({"engine": engine, "step": "run", "error": f"{type(exc).__name__}: {exc}"})
            done.append(engine)
            result = write(done)
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)

    result = write(done)
    print(markdown(result))
    print(f"wrote {out_dir / stem}.json and .md")
    return 0 if not bench.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Query-scale benchmark (issue 9, Proof): synthetic BGE-M3-sized vectors through the public store API.

For every engine (Qdrant Edge ``qdrant:///dir``, Milvus Lite ``milvus:///file.db``, a real
OpenSearch node started from ``scripts/opensearch_node.py``, and qdrant-client's local mode
``qdrant+local:///dir`` at small N only) and every corpus size N, one run measures:

- **ingestion** docs/s of the write path only: ``M3Store.add_vectors`` calls (the store's
  checks, byte-cut batches, the adapter's upsert and the final flush of each call); vector
  generation is outside the timer;
- **query latency** p50/p95 of ``M3Store.search_by_vectors`` for ``fusion`` = exact / engine /
  rrf at weights (1, 0, 0) and (0.4, 0.2, 0.4), k = 10, after warm-up queries;
- the **raw client's own anchors** on the same data: its dense search and its dense+sparse
  hybrid query (Qdrant Edge: ``EdgeShard.query`` with two prefetches + ``Fusion.Rrf``;
  Milvus: ``MilvusClient.search`` and ``hybrid_search`` with ``RRFRanker``; OpenSearch: a
  ``knn`` query and a ``bool`` ``should`` of ``knn`` + ``rank_feature`` queries);
- **bytes moved to the client** per query: ``store.adapter.fetch`` and ``store.adapter.score``
  are wrapped and the vectors of the returned records counted (ColBERT separately);
  for OpenSearch also the HTTP request/response bytes, for Milvus the vector payload of
  the client's results, for Qdrant Edge the vectors of the points the shard returns;
- **recall@10**: engine and RRF fusion against exact fusion, and exact fusion against a
  brute-force numpy ranking with the M3 formula (REFERENCE.md section 3; with float16
  ColBERT storage the brute force uses the fp16-rounded document vectors); the largest
  ``|Hit.score - brute force|`` of exact hits too.

The synthetic corpus is built so that rankings mean something: documents come in stories
of 8 (shared terms and directions) on one of 100 topics (centroids and a Zipf-distributed
topic vocabulary over a ~30k-id Zipf vocabulary); a ColBERT row is the token's embedding +
topic centroid + the document's direction (story + own) + noise; sparse weights grow with a
term's rarity (~60 terms a document); the dense vector mixes topic, story and own
directions. A query paraphrases one document: 20 ColBERT rows (35 % tokens sampled from
it, the rest story terms) regenerated with fresh noise, its dense vector plus strong noise,
and 12 sparse terms (35 % a weighted sample of its terms, the rest story terms). No route
alone finds the paraphrased document every time; the M3 combination does best (see
``route_signal`` in the report). All vectors are regenerated deterministically
from ``(seed, doc index)`` in batches, so no engine run holds the corpus in memory.

    .venv/bin/python benchmarks/query_scale.py                       # N = 1k and 10k, all engines
    .venv/bin/python benchmarks/query_scale.py --engines edge,milvus --n 1000
    .venv/bin/python benchmarks/query_scale.py --quick --out /tmp/qs  # smoke run, seconds
    .venv/bin/python benchmarks/ingest_query.py --query-scale ...     # the same, via ingest_query.py

Results: ``benchmarks/results/query-scale-<machine-slug>.{md,json}``, rewritten after every
engine run so that a killed run keeps what it finished.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import m3connect  # noqa: E402
from m3connect import CollectionSpec, Vectors  # noqa: E402

from machine import cpu_model, memory_gib  # noqa: E402  (benchmarks/machine.py)

WEIGHT_SETS: dict[str, tuple[float, float, float]] = {"dense": (1.0, 0.0, 0.0), "m3": (0.4, 0.2, 0.4)}
FUSIONS = ("exact", "engine", "rrf")
ENGINE_LABELS = {
    "edge": "Qdrant Edge",
    "milvus": "Milvus Lite",
    "opensearch": "OpenSearch node",
    "qdrant-local": "Qdrant local (qdrant-client)",
}
TARGET_ENGINES = ("edge", "milvus", "opensearch")
NO_COLBERT_ENGINES = ("edge", "opensearch")
TOKEN_OFFSET = 5  # XLM-R ids 0-3 are special tokens: synthetic token ids start above them
#: mixing weights of the synthetic vectors (see Corpus); tuned so that no route alone finds
#: the paraphrased document every time at N = 10k, and the routes disagree on the rest of the top 10
MIX = {
    "col_topic": 0.5, "col_doc": 0.5, "col_noise": 0.5,  # ColBERT row = token embedding + these
    "col_story": 1.0,  # a document's ColBERT direction = this * story direction + its own
    "dense_topic": 0.6, "dense_story": 1.0, "dense_doc": 0.12, "dense_terms": 0.05,  # dense mix
    "story_share": 0.4,  # share of a document's tokens drawn from its story's terms
    "topic_share": 0.55,  # share of the other tokens drawn from its topic's vocabulary
    "q_col_in_doc": 0.35, "q_col_doc": 0.2, "q_col_noise": 1.0,  # query ColBERT rows (rest: story terms)
    "q_dense_noise": 2.0,  # query dense = doc dense + this * random unit vector
    "q_terms_in_doc": 0.35,  # share of query sparse terms taken from the document (rest: story terms)
}


# -- synthetic corpus ------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Sizes of the synthetic corpus (defaults: BGE-M3's)."""

    dense_dim: int = 1024
    colbert_dim: int = 1024
    vocab: int = 30000
    tokens: int = 150  # ColBERT rows per document: uniform in tokens ± tokens_spread
    tokens_spread: int = 50
    sparse_terms: int = 60  # mean sparse terms per document
    topics: int = 100
    topic_terms: int = 400  # vocabulary of one topic
    query_tokens: int = 20  # ColBERT rows per query
    query_terms: int = 12  # sparse terms per query
    story_size: int = 8  # consecutive documents that share a story (terms and directions)
    story_terms: int = 30
    seed: int = 0


QUICK_SHAPE = Shape(dense_dim=32, colbert_dim=32, vocab=600, tokens=12, tokens_spread=4, sparse_terms=10,
                    topics=4, topic_terms=60, query_tokens=5, query_terms=5, story_size=4, story_terms=8)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


@dataclass
class Doc:
    index: int
    topic: int
    tokens: np.ndarray  # vocabulary rows, one per ColBERT row
    direction: np.ndarray  # the per-document ColBERT direction
    vectors: Vectors


class Corpus:
    """Deterministic synthetic BGE-M3-shaped documents and queries (see the module docstring)."""

    def __init__(self, shape: Shape) -> None:
        self.shape = s = shape
        rng = np.random.default_rng([s.seed, 0])
        self.emb = _unit(rng.standard_normal((s.vocab, s.colbert_dim), dtype=np.float32))
        self.cent_col = _unit(rng.standard_normal((s.topics, s.colbert_dim), dtype=np.float32))
        self.cent_dense = (self.cent_col if s.dense_dim == s.colbert_dim
                           else _unit(rng.standard_normal((s.topics, s.dense_dim), dtype=np.float32)))
        p = 1.0 / (np.arange(s.vocab) + 2.7) ** 1.07  # Zipf-ish term frequencies, rank = row
        p /= p.sum()
        self.cdf = np.cumsum(p)
        idf = -np.log(p)
        self.rarity = ((idf - idf.min()) / (idf.max() - idf.min())).astype(np.float32)
        lo = min(50, s.vocab // 10)  # topic terms avoid the most frequent ("stop") words
        self.topic_vocab = np.stack(
            [rng.choice(np.arange(lo, s.vocab), size=min(s.topic_terms, s.vocab - lo), replace=False)
             for _ in range(s.topics)])
        tp = 1.0 / (np.arange(self.topic_vocab.shape[1]) + 1.0) ** 0.9
        self.topic_cdf = np.cumsum(tp / tp.sum())
        self._stories: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}

    def _draw(self, r: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, r.random(n)), len(cdf) - 1)

    def story(self, sid: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """A story: ``story_size`` consecutive documents on one topic sharing terms and directions."""
        cached = self._stories.get(sid)
        if cached is None:
            s = self.shape
            r = np.random.default_rng([s.seed, 3, sid])
            topic = int(r.integers(s.topics))
            half = max(1, s.story_terms // 2)
            terms = np.concatenate([self.topic_vocab[topic][self._draw(r, self.topic_cdf, half)],
                                    r.integers(min(50, s.vocab // 10), s.vocab, s.story_terms - half)])
            cached = (topic, terms, _unit(r.standard_normal(s.colbert_dim, dtype=np.float32)),
                      _unit(r.standard_normal(s.dense_dim, dtype=np.float32)))
            if len(self._stories) > 4096:
                self._stories.clear()
            self._stories[sid] = cached
        return cached

    def doc(self, i: int) -> Doc:
        s = self.shape
        topic, story_terms, story_col, story_dense = self.story(i // s.story_size)
        r = np.random.default_rng([s.seed, 1, i])
        n_tok = int(r.integers(max(1, s.tokens - s.tokens_spread), s.tokens + s.tokens_spread + 1))
        n_story = int(r.binomial(n_tok, MIX["story_share"]))
        n_topic = int(r.binomial(n_tok - n_story, MIX["topic_share"]))
        toks = np.concatenate([story_terms[r.integers(len(story_terms), size=n_story)],
                               self.topic_vocab[topic][self._draw(r, self.topic_cdf, n_topic)],
                               self._draw(r, self.cdf, n_tok - n_story - n_topic)])
        r.shuffle(toks)
        direction = _unit(MIX["col_story"] * story_col + _unit(r.standard_normal(s.colbert_dim, dtype=np.float32)))
        noise = r.standard_normal((n_tok, s.colbert_dim), dtype=np.float32) * np.float32(MIX["col_noise"] / math.sqrt(s.colbert_dim))
        colbert = self.emb[toks]
        colbert += MIX["col_topic"] * self.cent_col[topic] + MIX["col_doc"] * direction + noise
        colbert = _unit(colbert)
        uniq = np.unique(toks)
        w = (0.02 + 0.33 * self.rarity[uniq] ** 1.5 * r.uniform(0.6, 1.0, len(uniq))).astype(np.float32)
        n_terms = int(np.clip(round(r.normal(s.sparse_terms, s.sparse_terms / 4)), min(4, len(uniq)), len(uniq)))
        keep = np.argsort(-w, kind="stable")[:n_terms]
        sparse = {int(uniq[j]) + TOKEN_OFFSET: float(w[j]) for j in keep}
        own = _unit(r.standard_normal(s.dense_dim, dtype=np.float32))
        dense = MIX["dense_topic"] * self.cent_dense[topic] + MIX["dense_story"] * story_dense + MIX["dense_doc"] * own
        if s.dense_dim == s.colbert_dim:
            dense = dense + MIX["dense_terms"] * _unit(colbert.mean(axis=0))
        return Doc(i, topic, toks, direction, Vectors(dense=_unit(dense), sparse=sparse, colbert=colbert))

    def batch(self, start: int, stop: int) -> tuple[list[Vectors], list[str], list[str], list[dict[str, Any]]]:
        docs = [self.doc(i) for i in range(start, stop)]
        return ([d.vectors for d in docs], [doc_id(d.index) for d in docs],
                [f"synthetic document {d.index} on topic {d.topic}" for d in docs],
                [{"topic": d.topic, "story": d.index // self.shape.story_size, "grp": d.index % 50} for d in docs])

    def query(self, j: int, n_docs: int) -> tuple[int, Vectors]:
        """Query ``j`` for a corpus of ``n_docs``: (index of the paraphrased document, vectors)."""
        s = self.shape
        r = np.random.default_rng([s.seed, 2, j, n_docs])
        d = self.doc(int(r.integers(n_docs)))
        story_terms = self.story(d.index // s.story_size)[1]
        n_in = min(len(d.tokens), round(MIX["q_col_in_doc"] * s.query_tokens))
        pos = r.choice(len(d.tokens), size=n_in, replace=False)
        toks = np.concatenate([d.tokens[pos], story_terms[r.integers(len(story_terms), size=s.query_tokens - n_in)]])
        noise = r.standard_normal((len(toks), s.colbert_dim), dtype=np.float32) * np.float32(MIX["q_col_noise"] / math.sqrt(s.colbert_dim))
        colbert = _unit(self.emb[toks] + MIX["col_topic"] * self.cent_col[d.topic] + MIX["q_col_doc"] * d.direction + noise)
        dense = _unit(d.vectors.dense + MIX["q_dense_noise"] * _unit(r.standard_normal(s.dense_dim, dtype=np.float32)))
        keys = list(d.vectors.sparse)
        w = np.asarray([d.vectors.sparse[t] for t in keys], np.float64)
        n_terms = min(len(keys), round(MIX["q_terms_in_doc"] * s.query_terms))
        chosen = r.choice(len(keys), size=n_terms, replace=False, p=w / w.sum())
        sparse = {int(keys[c]): float(np.float32(0.05 + 0.25 * r.random())) for c in chosen}
        for t in story_terms[r.integers(len(story_terms), size=s.query_terms - n_terms)]:
            sparse.setdefault(int(t) + TOKEN_OFFSET, float(np.float32(0.05 + 0.2 * r.random())))
        return d.index, Vectors(dense=dense, sparse=sparse, colbert=colbert)


def doc_id(i: int) -> str:
    return f"d{i:07d}"


def doc_index(rid: str) -> int:
    return int(rid[1:])


# -- brute force -----------------------------------------------------------------------------


@dataclass
class BruteForce:
    """Per-route exact scores of every query against every document: arrays ``[n_queries, n_docs]``."""

    dense: np.ndarray
    sparse: np.ndarray
    colbert: dict[str, np.ndarray]  # ColBERT storage dtype -> scores
    seconds: float

    def combined(self, weights: Sequence[float], dtype: str) -> np.ndarray:
        wd, ws, wc = weights
        total = self.dense * wd + self.sparse * ws + self.colbert[dtype] * wc
        return total / (wd + ws + wc)

    def top(self, weights: Sequence[float], dtype: str, k: int) -> list[list[str]]:
        scores = self.combined(weights, dtype)
        out = []
        for row in scores:
            order = np.lexsort((np.arange(len(row)), -row))[:k]  # ties: smaller id first, as fusion does
            out.append([doc_id(int(i)) for i in order])
        return out


def brute_force(corpus: Corpus, n: int, queries: list[Vectors], dtypes: Sequence[str], batch: int = 64) -> BruteForce:
    t0 = time.perf_counter()
    s = corpus.shape
    nq = len(queries)
    qd = np.stack([q.dense for q in queries]).astype(np.float32)
    qs = np.zeros((nq, s.vocab + TOKEN_OFFSET), np.float64)
    for j, q in enumerate(queries):
        for t, w in q.sparse.items():
            qs[j, t] = w
    qc = np.concatenate([q.colbert for q in queries]).astype(np.float32)
    q_bounds = np.cumsum([0] + [len(q.colbert) for q in queries])[:-1]
    q_counts = np.asarray([len(q.colbert) for q in queries], np.float64)[:, None]
    dense = np.zeros((nq, n))
    sparse = np.zeros((nq, n))
    colbert = {dt: np.zeros((nq, n)) for dt in dtypes}
    for start in range(0, n, batch):
        docs = [corpus.doc(i).vectors for i in range(start, min(n, start + batch))]
        stop = start + len(docs)
        dense[:, start:stop] = qd.astype(np.float64) @ np.stack([v.dense for v in docs]).astype(np.float64).T
        for i, v in enumerate(docs):
            idx = np.fromiter(v.sparse.keys(), np.int64, len(v.sparse))
            val = np.fromiter(v.sparse.values(), np.float64, len(v.sparse))
            sparse[:, start + i] = qs[:, idx] @ val
        stack = np.concatenate([v.colbert for v in docs])
        d_bounds = np.cumsum([0] + [len(v.colbert) for v in docs])[:-1]
        for dt in dtypes:
            mat = stack.astype(np.float16).astype(np.float32) if dt == "float16" else stack
            best = np.maximum.reduceat(qc @ mat.T, d_bounds, axis=1).astype(np.float64)  # [query rows, docs]
            colbert[dt][:, start:stop] = np.add.reduceat(best, q_bounds, axis=0) / q_counts
    return BruteForce(dense, sparse, colbert, time.perf_counter() - t0)


def route_signal(bf: BruteForce, targets: list[int], dtype: str) -> dict[str, Any]:
    """How well each route alone (and M3) finds the paraphrased document: hit@1, hit@10, MRR."""
    out: dict[str, Any] = {}
    for name, scores in (("dense", bf.dense), ("sparse", bf.sparse), ("colbert", bf.colbert[dtype]),
                         ("m3 (0.4,0.2,0.4)", bf.combined(WEIGHT_SETS["m3"], dtype))):
        ranks = [int((row > row[t]).sum()) + 1 for row, t in zip(scores, targets)]
        out[name] = {"hit@1": float(np.mean([r == 1 for r in ranks])),
                     "hit@10": float(np.mean([r <= 10 for r in ranks])),
                     "mrr": float(np.mean([1.0 / r for r in ranks]))}
    return out


# -- bytes moved to the client ---------------------------------------------------------------


def _vector_bytes(obj: Any, depth: int = 0) -> tuple[int, int]:
    """(all vector bytes, ColBERT-matrix bytes) in a client result, as float32/raw bytes.

    Lists of floats count 4 bytes an element; a list of lists of floats (a multivector)
    counts as ColBERT; numpy arrays count their nbytes (2-d ones as ColBERT); a sparse
    vector 8 bytes a term.
    """
    if depth > 8 or obj is None or isinstance(obj, (str, int, float, bool)):
        return 0, 0
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes), int(obj.nbytes) if obj.ndim == 2 else 0
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj), 0
    if isinstance(obj, Mapping):
        if obj and all(isinstance(key, int) and isinstance(v, float) for key, v in list(obj.items())[:4]):
            return 8 * len(obj), 0  # a sparse vector {id: weight}
        total = col = 0
        for v in obj.values():
            a, b = _vector_bytes(v, depth + 1)
            total, col = total + a, col + b
        return total, col
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(x, float) for x in obj[:4]):
            return 4 * len(obj), 0
        if obj and isinstance(obj[0], (list, tuple)) and obj[0] and isinstance(obj[0][0], float):
            size = sum(4 * len(x) for x in obj)
            return size, size
        total = col = 0
        for v in obj:
            a, b = _vector_bytes(v, depth + 1)
            total, col = total + a, col + b
        return total, col
    vec = getattr(obj, "vector", None)  # Qdrant points
    if vec is not None:
        return _vector_bytes(vec, depth + 1)
    if hasattr(obj, "indices") and hasattr(obj, "values"):  # sparse vectors
        try:
            return 8 * len(obj.indices), 0
        except TypeError:
            return 0, 0
    if hasattr(obj, "__iter__") and not isinstance(obj, (set, frozenset)):
        try:
            return _vector_bytes(list(obj), depth + 1)
        except Exception:
            return 0, 0
    return 0, 0


def _string_bytes(obj: Any, depth: int = 0) -> int:
    """Characters of the strings in a client result (packed payloads)."""
    if depth > 8 or obj is None:
        return 0
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, Mapping):
        return sum(_string_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_string_bytes(v, depth + 1) for v in obj)
    if hasattr(obj, "__iter__") and not isinstance(obj, (bytes, bytearray, set, frozenset, np.ndarray)):
        try:
            return _string_bytes(list(obj), depth + 1)
        except Exception:
            return 0
    return 0


class _ShardProxy:
    """Forwards to a Qdrant Edge shard and counts the vectors of the points it returns."""

    _COUNTED = ("query", "query_batch", "search", "retrieve", "scroll")

    def __init__(self, shard: Any, meter: Meter) -> None:
        object.__setattr__(self, "_shard", shard)
        object.__setattr__(self, "_meter", meter)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._shard, name)
        if name not in self._COUNTED or not callable(attr):
            return attr
        meter = self._meter

        def counted(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            total, col = _vector_bytes(out)
            meter.engine_bytes += total
            meter.engine_colbert_bytes += col
            return out

        return counted


class Meter:
    """Wraps ``store.adapter.fetch``/``score`` (and the engine client where easy) and counts bytes."""

    def __init__(self, store: m3connect.M3Store, engine: str) -> None:
        self.adapter = store.adapter
        self.engine = engine
        self.restore: list[Callable[[], None]] = []
        self.engine_level = "none"
        self.reset()
        self._wrap_adapter()
        try:
            self._wrap_engine()
        except Exception as exc:  # instrumentation must never break the benchmark
            self.engine_level = f"unavailable: {type(exc).__name__}: {exc}"

    def reset(self) -> None:
        self.fetch_calls = self.fetch_records = self.fetch_bytes = self.fetch_colbert_bytes = 0
        self.score_calls = self.score_ids = 0
        self.score_routes: dict[str, int] = {}
        self.engine_bytes = self.engine_colbert_bytes = 0
        self.http_request_bytes = self.http_response_bytes = 0

    def snapshot(self) -> dict[str, Any]:
        return {"fetch_calls": self.fetch_calls, "fetch_records": self.fetch_records,
                "fetch_vector_bytes": self.fetch_bytes, "fetch_colbert_bytes": self.fetch_colbert_bytes,
                "score_calls": self.score_calls, "score_ids": self.score_ids, "score_routes": dict(self.score_routes),
                "engine_vector_bytes": self.engine_bytes, "engine_colbert_bytes": self.engine_colbert_bytes,
                "http_request_bytes": self.http_request_bytes, "http_response_bytes": self.http_response_bytes}

    def _set(self, obj: Any, name: str, value: Any) -> None:
        had = name in getattr(obj, "__dict__", {})
        old = obj.__dict__.get(name) if had else None
        setattr(obj, name, value)
        self.restore.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def _wrap_adapter(self) -> None:
        fetch, score = self.adapter.fetch, self.adapter.score

        def counted_fetch(*args: Any, **kwargs: Any) -> Any:
            out = fetch(*args, **kwargs)
            self.fetch_calls += 1
            self.fetch_records += len(out)
            for rec in out.values():
                v = rec.vectors
                self.fetch_bytes += v.nbytes()
                self.fetch_colbert_bytes += 0 if v.colbert is None else int(v.colbert.nbytes)
            return out

        def counted_score(ids: Sequence[str], query: Any, routes: Sequence[str], *args: Any, **kwargs: Any) -> Any:
            self.score_calls += 1
            self.score_ids += len(ids)
            for r in routes:
                self.score_routes[r] = self.score_routes.get(r, 0) + len(ids)
            return score(ids, query, routes, *args, **kwargs)

        self._set(self.adapter, "fetch", counted_fetch)
        self._set(self.adapter, "score", counted_score)

    def _wrap_engine(self) -> None:
        if self.engine == "opensearch":
            conns = list(self.adapter.client.transport.connection_pool.connections)
            for conn in conns:
                perform = conn.perform_request

                def counted(method: str, url: str, params: Any = None, body: Any = None, *a: Any,
                            _perform: Any = perform, **kw: Any) -> Any:
                    status, headers, data = _perform(method, url, params, body, *a, **kw)
                    self.http_request_bytes += len(body) if isinstance(body, (bytes, str)) else 0
                    self.http_response_bytes += len(data.encode("utf-8") if isinstance(data, str) else data or b"")
                    return status, headers, data

                self._set(conn, "perform_request", counted)
            self.engine_level = "HTTP request/response bytes"
        elif self.engine == "milvus":
            client = self.adapter.client
            companion = getattr(self.adapter, "colbert_collection", None)
            for name in ("search", "query", "get", "hybrid_search", "query_iterator"):
                orig = getattr(client, name, None)
                if orig is None:
                    continue

                def counted(*a: Any, _orig: Any = orig, **kw: Any) -> Any:
                    out = _orig(*a, **kw)
                    total, col = _vector_bytes(out)
                    if companion is not None and (a[0] if a else kw.get("collection_name")) == companion:
                        packed = _string_bytes(out) * 3 // 4  # ColBERT packed as base64 text
                        total, col = total + packed, col + packed
                    self.engine_bytes += total
                    self.engine_colbert_bytes += col
                    return out

                self._set(client, name, counted)
            self.engine_level = ("vector payload of MilvusClient search/query/get/hybrid_search results (float "
                                 f"vectors as float32; the {companion!r} companion's packed ColBERT text as its bytes)")
        elif self.engine == "edge":
            import qdrant_edge

            for name, value in list(vars(self.adapter).items()):
                if isinstance(value, qdrant_edge.EdgeShard):
                    self._set(self.adapter, name, _ShardProxy(value, self))
                    self.engine_level = f"vectors of the points EdgeShard returns (adapter.{name})"
                    break
            else:
                self.engine_level = "unavailable: no EdgeShard attribute on the adapter"

    def close(self) -> None:
        for undo in reversed(self.restore):
            try:
                undo()
            except Exception:
                pass
        self.restore.clear()


def settle(engine: str, store: m3connect.M3Store, limit: float = 180.0) -> float:
    """Wait until the engine's background work after ingestion is done; seconds waited.

    OpenSearch merges segments for a while after a bulk load, on the same cores as the
    queries: whichever mode is timed first (exact (1, 0, 0)) would pay for it and the raw
    anchors, timed last, would not. Waits for two polls in a row with no merge running.
    """
    if engine != "opensearch":
        return 0.0
    a = store.adapter
    t0 = quiet = time.perf_counter()
    calm = 0
    while time.perf_counter() - t0 < limit and calm < 2:
        stats = a.client.indices.stats(index=a.index, metric="merge")
        running = stats["indices"][a.index]["total"]["merges"]["current"]
        calm = calm + 1 if running == 0 else 0
        time.sleep(1.0)
        quiet = time.perf_counter()
    return quiet - t0


# -- raw client anchors ----------------------------------------------------------------------


class Anchor:
    """The engine client's own dense search and dense+sparse hybrid query on the store's data."""

    def __init__(self, engine: str, store: m3connect.M3Store, k: int, depth: int) -> None:
        self.engine, self.adapter, self.k, self.depth = engine, store.adapter, k, depth
        self.describe = ""
        getattr(self, f"_init_{engine.replace('-', '_')}")()

    # Qdrant Edge ---------------------------------------------------------------------------

    def _init_edge(self) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.shard = next((v for v in vars(self.adapter).values() if isinstance(v, qe.EdgeShard)), None)
        if self.shard is None:
            for v in vars(self.adapter).values():  # a Meter proxy
                if isinstance(v, _ShardProxy):
                    self.shard = v._shard
        if self.shard is None:
            raise RuntimeError("the Qdrant Edge adapter holds no EdgeShard attribute")
        self.names = {"dense": "dense", "sparse": "sparse"}
        self.describe = ("EdgeShard.query: Query.Nearest(dense) limit k; hybrid: Prefetch(dense, limit depth) + "
                         "Prefetch(sparse, limit depth), Fusion.Rrf(k=60), limit k; rerank: the same prefetches, "
                         "Query.Nearest(ColBERT rows, using colbert); with_payload=True")

    def _edge_ids(self, points: list[Any]) -> list[str]:
        out = []
        for p in points:
            payload = p.payload or {}
            out.append(str(payload.get("doc_id", payload.get("id", p.id))))
        return out

    def _dense_edge(self, q: Vectors) -> list[str]:
        qe = self.qe
        req = qe.QueryRequest(limit=self.k, query=qe.Query.Nearest(q.dense.tolist(), using=self.names["dense"]),
                              with_payload=True, with_vector=False)
        return self._edge_ids(self.shard.query(req))

    def _hybrid_edge(self, q: Vectors) -> list[str]:
        qe = self.qe
        sv = qe.SparseVector(indices=list(q.sparse), values=list(q.sparse.values()))
        req = qe.QueryRequest(
            limit=self.k,
            prefetches=[qe.Prefetch(limit=self.depth, query=qe.Query.Nearest(q.dense.tolist(), using=self.names["dense"])),
                        qe.Prefetch(limit=self.depth, query=qe.Query.Nearest(sv, using=self.names["sparse"]))],
            query=qe.Fusion.Rrf(k=60), with_payload=True, with_vector=False)
        return self._edge_ids(self.shard.query(req))

    def _rerank_edge(self, q: Vectors) -> list[str]:
        qe = self.qe
        sv = qe.SparseVector(indices=list(q.sparse), values=list(q.sparse.values()))
        req = qe.QueryRequest(
            limit=self.k,
            prefetches=[qe.Prefetch(limit=self.depth, query=qe.Query.Nearest(q.dense.tolist(), using=self.names["dense"])),
                        qe.Prefetch(limit=self.depth, query=qe.Query.Nearest(sv, using=self.names["sparse"]))],
            query=qe.Query.Nearest(q.colbert.tolist(), using="colbert"), with_payload=True, with_vector=False)
        return self._edge_ids(self.shard.query(req))

    # Milvus ---------------------------------------------------------------------------------

    def _init_milvus(self) -> None:
        from pymilvus import DataType

        self.client = self.adapter.client
        self.name = self.adapter.collection
        desc = self.client.describe_collection(self.name)
        fields = desc.get("fields", [])
        self.pk = next((f["name"] for f in fields if f.get("is_primary")), "id")
        dense = [f["name"] for f in fields if f.get("type") == DataType.FLOAT_VECTOR]
        self.dense_field = "dense" if "dense" in dense else dense[0]
        self.sparse_field = next(f["name"] for f in fields if f.get("type") == DataType.SPARSE_FLOAT_VECTOR)
        self.out_fields = [f["name"] for f in fields if f["name"] in ("text", "metadata")]
        self.describe = (f"MilvusClient.search({self.dense_field}, IP, limit k); hybrid_search: AnnSearchRequest "
                         f"{self.dense_field} + {self.sparse_field} (limit depth each), RRFRanker(60), limit k; "
                         f"output_fields={self.out_fields}")

    def _milvus_ids(self, res: Any) -> list[str]:
        hits = res[0] if res else []
        return [str(h.get("id", h.get(self.pk)) if isinstance(h, Mapping) else h.id) for h in hits]

    def _dense_milvus(self, q: Vectors) -> list[str]:
        res = self.client.search(self.name, data=[q.dense.tolist()], anns_field=self.dense_field, limit=self.k,
                                 search_params={"metric_type": "IP"}, output_fields=self.out_fields)
        return self._milvus_ids(res)

    def _hybrid_milvus(self, q: Vectors) -> list[str]:
        from pymilvus import AnnSearchRequest, RRFRanker

        reqs = [AnnSearchRequest(data=[q.dense.tolist()], anns_field=self.dense_field,
                                 param={"metric_type": "IP"}, limit=self.depth),
                AnnSearchRequest(data=[{int(t): float(w) for t, w in q.sparse.items()}], anns_field=self.sparse_field,
                                 param={"metric_type": "IP"}, limit=self.depth)]
        res = self.client.hybrid_search(self.name, reqs, ranker=RRFRanker(60), limit=self.k,
                                        output_fields=self.out_fields)
        return self._milvus_ids(res)

    # OpenSearch -----------------------------------------------------------------------------

    def _init_opensearch(self) -> None:
        self.client = self.adapter.client
        self.index = self.adapter.index
        props = next(iter(self.client.indices.get_mapping(index=self.index).values()))["mappings"]["properties"]
        knn = [n for n, p in props.items() if p.get("type") == "knn_vector"]
        self.dense_field = "dense" if "dense" in knn else knn[0]
        self.sparse_field = next(n for n, p in props.items() if p.get("type") == "rank_features")
        self.source = [f for f in ("doc_id", "text", "metadata") if f in props]
        self.colbert_source = "colbert" in props  # lists for k-NN's lateInteractionScore
        self.describe = (f"knn query on {self.dense_field} (k=k, size k); hybrid: bool should [knn {self.dense_field} "
                         f"k=depth, rank_feature {self.sparse_field}.<id> linear boost=weight per query term], size k; "
                         f"_source={self.source}"
                         + ("; rerank: the hybrid query + rescore window depth with lateInteractionScore"
                            if self.colbert_source else ""))

    def _os_ids(self, resp: Mapping[str, Any]) -> list[str]:
        return [str((h.get("_source") or {}).get("doc_id", h["_id"])) for h in resp["hits"]["hits"]]

    def _dense_opensearch(self, q: Vectors) -> list[str]:
        body = {"size": self.k, "_source": self.source,
                "query": {"knn": {self.dense_field: {"vector": q.dense.tolist(), "k": self.k}}}}
        return self._os_ids(self.client.search(index=self.index, body=body))

    def _hybrid_opensearch(self, q: Vectors) -> list[str]:
        should: list[dict[str, Any]] = [{"knn": {self.dense_field: {"vector": q.dense.tolist(), "k": self.depth}}}]
        should += [{"rank_feature": {"field": f"{self.sparse_field}.{t}", "linear": {}, "boost": float(w)}}
                   for t, w in q.sparse.items() if w > 0]
        body = {"size": self.k, "_source": self.source, "query": {"bool": {"should": should}}}
        return self._os_ids(self.client.search(index=self.index, body=body))

    def _rerank_opensearch(self, q: Vectors) -> list[str]:
        if not self.colbert_source:
            raise LookupError("the index keeps no ColBERT lists in _source for k-NN's lateInteractionScore "
                              "(m3connect stores ColBERT as binary doc values); no raw rerank to compare with")
        should: list[dict[str, Any]] = [{"knn": {self.dense_field: {"vector": q.dense.tolist(), "k": self.depth}}}]
        should += [{"rank_feature": {"field": f"{self.sparse_field}.{t}", "linear": {}, "boost": float(w)}}
                   for t, w in q.sparse.items() if w > 0]
        script = {"source": "lateInteractionScore(params.query_vectors, 'colbert', params._source, 'innerproduct')",
                  "params": {"query_vectors": q.colbert.tolist()}}
        body = {"size": self.k, "_source": self.source, "query": {"bool": {"should": should}},
                "rescore": {"window_size": self.depth, "query": {
                    "rescore_query": {"script_score": {"query": {"match_all": {}}, "script": script}},
                    "query_weight": 0.0, "rescore_query_weight": 1.0, "score_mode": "total"}}}
        return self._os_ids(self.client.search(index=self.index, body=body))

    # qdrant-client local mode ---------------------------------------------------------------

    def _init_qdrant_local(self) -> None:
        self.client = self.adapter.client
        self.name = self.adapter.collection
        self.describe = ("QdrantClient.query_points(dense, limit k); hybrid: Prefetch dense + sparse (limit depth), "
                         "FusionQuery(RRF), limit k; rerank: the same prefetches, query=ColBERT rows using colbert; "
                         "with_payload=True")

    def _local_ids(self, res: Any) -> list[str]:
        return [str((p.payload or {}).get("doc_id", p.id)) for p in res.points]

    def _dense_qdrant_local(self, q: Vectors) -> list[str]:
        return self._local_ids(self.client.query_points(self.name, query=q.dense.tolist(), using="dense",
                                                        limit=self.k, with_payload=True))

    def _hybrid_qdrant_local(self, q: Vectors) -> list[str]:
        from qdrant_client import models

        sv = models.SparseVector(indices=list(q.sparse), values=list(q.sparse.values()))
        res = self.client.query_points(
            self.name, prefetch=[models.Prefetch(query=q.dense.tolist(), using="dense", limit=self.depth),
                                 models.Prefetch(query=sv, using="sparse", limit=self.depth)],
            query=models.FusionQuery(fusion=models.Fusion.RRF), limit=self.k, with_payload=True)
        return self._local_ids(res)

    def _rerank_qdrant_local(self, q: Vectors) -> list[str]:
        from qdrant_client import models

        sv = models.SparseVector(indices=list(q.sparse), values=list(q.sparse.values()))
        res = self.client.query_points(
            self.name, prefetch=[models.Prefetch(query=q.dense.tolist(), using="dense", limit=self.depth),
                                 models.Prefetch(query=sv, using="sparse", limit=self.depth)],
            query=q.colbert.tolist(), using="colbert", limit=self.k, with_payload=True)
        return self._local_ids(res)

    def rerank(self, q: Vectors) -> list[str] | None:
        fn = getattr(self, f"_rerank_{self.engine.replace('-', '_')}", None)
        return None if fn is None else fn(q)

    def dense(self, q: Vectors) -> list[str]:
        return getattr(self, f"_dense_{self.engine.replace('-', '_')}")(q)

    def hybrid(self, q: Vectors) -> list[str]:
        return getattr(self, f"_hybrid_{self.engine.replace('-', '_')}")(q)


# -- helpers ---------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def recall(got: Sequence[str], want: Sequence[str], k: int) -> float:
    want_k = list(want)[:k]
    return len(set(got[:k]) & set(want_k)) / max(1, len(want_k))


def dir_bytes(path: Path) -> int:
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


def rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_slug(cpu: str, cores: int | None) -> str:
    s = re.sub(r"\((R|TM|tm|r)\)|\b(CPU|Processor|with|Radeon|Graphics)\b", " ", cpu)
    s = re.sub(r"\b\d+-Core\b", " ", s)
    s = re.sub(r"[^A-Za-z0-9.]+", "-", s.replace("@", " ")).strip("-").lower()
    return f"{s or 'cpu'}-{cores or 0}c"


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = cpu_model()
    mem = memory_gib()
    versions = {"python": platform.python_version(), "numpy": np.__version__, "m3connect": m3connect.__version__}
    for dist in ("qdrant-edge-py", "pymilvus", "milvus-lite", "qdrant-client", "opensearch-py"):
        try:
            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "not installed"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {"host": socket.gethostname(), "cpu_model": cpu, "cpu_count": os.cpu_count(), "cpus_usable": usable,
            "ram_gib": mem, "platform": platform.platform(), "versions": versions,
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "loadavg_start": list(os.getloadavg())}


# -- one engine at one N ---------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, shape: Shape, work: Path) -> None:
        self.args, self.shape, self.work = args, shape, work
        self.corpus = Corpus(shape)
        self.rows: list[dict[str, Any]] = []  # one per (engine, N)
        self.per_n: dict[int, dict[str, Any]] = {}
        self.errors: list[dict[str, str]] = []
        self.os_url: str | None = None
        self.os_label: str | None = None
        self.node: Any = None

    def prepare_n(self, n: int) -> None:
        t0 = time.perf_counter()
        pairs = [self.corpus.query(j, n) for j in range(self.args.queries + self.args.warmup)]
        qgen = time.perf_counter() - t0
        warm = [q for _, q in pairs[: self.args.warmup]]
        targets = [t for t, _ in pairs[self.args.warmup:]]
        queries = [q for _, q in pairs[self.args.warmup:]]
        print(f"[N={n}] brute force over {n} docs x {len(queries)} queries", flush=True)
        bf = brute_force(self.corpus, n, queries, ("float16", "float32"))
        tokens = [len(q.colbert) for q in queries]
        self.per_n[n] = {"queries": queries, "warm": warm, "targets": targets, "bf": bf,
                         "info": {"n_docs": n, "n_queries": len(queries), "warmup_queries": len(warm),
                                  "query_colbert_rows_mean": float(np.mean(tokens)),
                                  "query_sparse_terms_mean": float(np.mean([len(q.sparse) for q in queries])),
                                  "query_generation_s": qgen, "brute_force_s": bf.seconds,
                                  "route_signal": route_signal(bf, targets, "float16")}}
        print(f"[N={n}] brute force {bf.seconds:.1f} s; signal {json.dumps(self.per_n[n]['info']['route_signal'])}",
              flush=True)

    def uri(self, engine: str, n: int) -> tuple[str, Path | None]:
        d = self.work / f"{engine}-{n}"
        if engine == "edge":
            return f"qdrant://{d}", d
        if engine == "qdrant-local":
            return f"qdrant+local://{d}", d
        if engine == "milvus":
            d.mkdir(parents=True, exist_ok=True)
            return f"milvus://{d}/m3.db", d
        assert self.os_url is not None
        return "opensearch://" + self.os_url.split("://", 1)[1], None

    def connect(self, engine: str, n: int, row: dict[str, Any]) -> tuple[m3connect.M3Store, Path | None]:
        uri, path = self.uri(engine, n)
        s = self.shape
        dtype = self.args.colbert_dtype
        name = f"qs{n}"
        kw: dict[str, Any] = {"collection": name}
        if self.args.depth:
            kw["candidate_depth"] = self.args.depth
        if engine == "opensearch" and self.args.opensearch_ef_search:
            kw["ef_search"] = self.args.opensearch_ef_search
        try:
            store = m3connect.connect(uri, spec=CollectionSpec(model="synthetic", fingerprint="synthetic-v1",
                                                               dense_dim=s.dense_dim, colbert_dim=s.colbert_dim,
                                                               colbert_dtype=dtype), **kw)
        except Exception as exc:
            text = str(exc).lower()
            if dtype != "float16" or not ("float16" in text or "float32" in text):
                raise
            row["colbert_dtype_note"] = f"float16 refused ({type(exc).__name__}: {str(exc)[:200]}); stored float32"
            print(f"[{engine} N={n}] float16 ColBERT refused, falling back to float32", flush=True)
            if path is not None and engine != "milvus":
                shutil.rmtree(path, ignore_errors=True)
            dtype = "float32"
            store = m3connect.connect(uri, spec=CollectionSpec(model="synthetic", fingerprint="synthetic-v1",
                                                               dense_dim=s.dense_dim, colbert_dim=s.colbert_dim,
                                                               colbert_dtype=dtype), **kw)
        row["colbert_dtype"] = store.spec.colbert_dtype
        if store.exists and store.count():
            raise RuntimeError(f"{uri} collection {name} is not empty")
        return store, path

    def ingest(self, store: m3connect.M3Store, n: int, row: dict[str, Any], label: str) -> None:
        write = 0.0
        gen = 0.0
        tokens = 0
        B = self.args.batch
        last = time.perf_counter()
        for start in range(0, n, B):
            t0 = time.perf_counter()
            vecs, ids, texts, metas = self.corpus.batch(start, min(n, start + B))
            tokens += sum(len(v.colbert) for v in vecs)
            t1 = time.perf_counter()
            store.add_vectors(vecs, texts=texts, ids=ids, metadata=metas)
            t2 = time.perf_counter()
            gen += t1 - t0
            write += t2 - t1
            del vecs
            if t2 - last > 30:
                print(f"{label} ingested {start + B}/{n}: {(start + B) / write:.1f} docs/s", flush=True)
                last = t2
        count = store.count()
        if count != n:
            raise RuntimeError(f"count() = {count} after writing {n} documents")
        row.update(ingest_docs_s=n / write, ingest_write_s=write, ingest_generate_s=gen,
                   colbert_rows_per_doc=tokens / n, add_vectors_batch=B, rss_mb_after_ingest=rss_mb())
        print(f"{label} ingest {n / write:.1f} docs/s ({write:.1f} s write, {gen:.1f} s generation)", flush=True)

    def run(self, engine: str, n: int) -> dict[str, Any]:
        label = f"[{engine} N={n}]"
        row: dict[str, Any] = {"engine": engine, "label": ENGINE_LABELS[engine], "n_docs": n}
        self.rows.append(row)
        data = self.per_n[n]
        queries, warm, bf = data["queries"], data["warm"], data["bf"]
        k = self.args.k
        store, path = self.connect(engine, n, row)
        meter: Meter | None = None
        try:
            self.ingest(store, n, row, label)
            if path is not None:
                row["disk_bytes_per_doc"] = dir_bytes(path) / n
            elif engine == "opensearch":
                try:
                    a = store.adapter
                    stats = a.client.indices.stats(index=a.index, metric="store")
                    row["disk_bytes_per_doc"] = stats["indices"][a.index]["primaries"]["store"]["size_in_bytes"] / n
                    if self.node is not None:
                        row["opensearch_node_rss_mb"] = self.node.rss_bytes() / 2**20
                except Exception as exc:
                    row["disk_note"] = f"{type(exc).__name__}: {exc}"
            row["settle_s"] = settle(engine, store)
            dtype = row["colbert_dtype"]
            meter = Meter(store, engine)
            row["engine_bytes_measured"] = meter.engine_level
            depth = self.args.depth or max(100, 10 * k)
            row["candidate_depth"] = depth
            results: dict[tuple[str, str], list[list[str]]] = {}
            row["queries"] = []
            for wname, w in WEIGHT_SETS.items():
                bf_top = bf.top(w, dtype, k)
                for fusion in FUSIONS:
                    q_row: dict[str, Any] = {"weights": list(w), "fusion": fusion}
                    try:
                        for q in warm:
                            store.search_by_vectors(q, k=k, weights=w, fusion=fusion)
                        lat, got, per = [], [], []
                        stats = {"candidates": [], "score_calls": [], "fetched_records": []}
                        max_diff = 0.0
                        for j, q in enumerate(queries):
                            meter.reset()
                            t0 = time.perf_counter()
                            hits = store.search_by_vectors(q, k=k, weights=w, fusion=fusion)
                            lat.append((time.perf_counter() - t0) * 1000)
                            per.append(meter.snapshot())
                            st = store.last_query_stats
                            for key in stats:
                                stats[key].append(getattr(st, key, 0))
                            got.append([h.id for h in hits])
                            if fusion == "exact":
                                comb = bf.combined(w, dtype)[j]
                                for h in hits:
                                    max_diff = max(max_diff, abs(h.score - comb[doc_index(h.id)]))
                        results[(wname, fusion)] = got
                        q_row.update(
                            n_queries=len(queries), p50_ms=pct(lat, 50), p95_ms=pct(lat, 95), mean_ms=float(np.mean(lat)),
                            hits_mean=float(np.mean([len(g) for g in got])),
                            **{f"{key}_mean": float(np.mean(v)) for key, v in stats.items()},
                            **{f"{key}_per_query": float(np.mean([p[key] for p in per]))
                               for key in ("fetch_calls", "fetch_records", "fetch_vector_bytes", "fetch_colbert_bytes",
                                           "score_calls", "score_ids", "engine_vector_bytes", "engine_colbert_bytes",
                                           "http_request_bytes", "http_response_bytes")},
                            colbert_bytes_max=max(max(p["fetch_colbert_bytes"], p["engine_colbert_bytes"]) for p in per),
                            score_routes_per_query={r: sum(p["score_routes"].get(r, 0) for p in per) / len(per)
                                                    for r in ("dense", "sparse", "colbert")},
                        )
                        if fusion == "exact":
                            q_row["recall_vs_bruteforce"] = float(np.mean([recall(g, b, k) for g, b in zip(got, bf_top)]))
                            # The ideal candidate set of exact fusion (m3connect.fusion): the brute-force
                            # top-depth of dense and sparse, or the dense top-k alone for weights (1, 0, 0).
                            # Misses inside it are the engine's approximations (ANN), outside it are by design.
                            dense_only = w[1] == 0 and w[2] == 0
                            misses = outside = 0
                            for j, (g, b) in enumerate(zip(got, bf_top)):
                                missed = [doc_index(x) for x in b if x not in set(g)]
                                if missed:
                                    cand = set(np.argsort(-bf.dense[j], kind="stable")[:k if dense_only else depth].tolist())
                                    if not dense_only:
                                        cand |= {int(i) for i in np.argsort(-bf.sparse[j], kind="stable")[:depth]
                                                 if bf.sparse[j][i] > 0}
                                    misses += len(missed)
                                    outside += sum(1 for i in missed if i not in cand)
                            q_row["exact_misses"] = misses
                            q_row["exact_misses_outside_candidate_set"] = outside
                            q_row["max_abs_score_diff_vs_bruteforce"] = max_diff
                        print(f"{label} {wname} {fusion}: p50 {q_row['p50_ms']:.1f} ms p95 {q_row['p95_ms']:.1f} ms, "
                              f"fetched {q_row['fetch_vector_bytes_per_query'] / 1024:.0f} KiB/q "
                              f"(ColBERT {q_row['fetch_colbert_bytes_per_query'] / 1024:.0f} KiB)", flush=True)
                    except Exception as exc:
                        traceback.print_exc()
                        q_row["error"] = f"{type(exc).__name__}: {exc}"
                        self.errors.append({"engine": engine, "n": str(n), "step": f"query {wname} {fusion}",
                                            "error": q_row["error"][:500]})
                    row["queries"].append(q_row)
                for q_row in row["queries"]:
                    if q_row["weights"] == list(w) and q_row["fusion"] != "exact" and (wname, "exact") in results \
                            and (wname, q_row["fusion"]) in results:
                        q_row["recall_vs_exact"] = float(np.mean(
                            [recall(g, e, k) for g, e in zip(results[(wname, q_row["fusion"])], results[(wname, "exact")])]))
            meter.close()
            meter = None
            self.anchors(engine, store, row, queries, warm, bf, results, depth)
        finally:
            if meter is not None:
                meter.close()
            try:
                store.drop()
            except Exception as exc:
                self.errors.append({"engine": engine, "n": str(n), "step": "drop", "error": f"{type(exc).__name__}: {exc}"})
            try:
                store.close()
            except Exception:
                pass
            del store
            gc.collect()
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        return row

    def anchors(self, engine: str, store: m3connect.M3Store, row: dict[str, Any], queries: list[Vectors],
                warm: list[Vectors], bf: BruteForce, results: dict[tuple[str, str], list[list[str]]], depth: int) -> None:
        k = self.args.k
        raw: dict[str, Any] = {}
        row["raw"] = raw
        try:
            anchor = Anchor(engine, store, k, depth)
        except Exception as exc:
            traceback.print_exc()
            raw["error"] = f"{type(exc).__name__}: {exc}"
            self.errors.append({"engine": engine, "n": str(row["n_docs"]), "step": "raw anchor", "error": raw["error"][:500]})
            return
        raw["describe"] = anchor.describe
        dense_bf = bf.top(WEIGHT_SETS["dense"], row["colbert_dtype"], k)
        m3_bf = bf.top(WEIGHT_SETS["m3"], row["colbert_dtype"], k)
        for kind, fn in (("dense", anchor.dense), ("hybrid", anchor.hybrid), ("rerank", anchor.rerank)):
            if kind == "rerank" and engine == "qdrant-local" and not self.args.local_rerank:
                raw[kind] = {"note": "skipped: pure-Python MaxSim takes seconds a query (--local-rerank runs it)"}
                continue
            if kind == "rerank" and not getattr(anchor, "colbert_source", True):
                raw[kind] = {"note": "n/a: the index keeps no ColBERT lists in _source for k-NN's lateInteractionScore "
                                     "(m3connect stores ColBERT as binary doc values)"}
                continue
            if kind == "rerank" and not hasattr(anchor, f"_rerank_{engine.replace('-', '_')}"):
                raw[kind] = {"note": "no multivector field in this engine"}
                continue
            try:
                for q in warm:
                    fn(q)
                lat, got = [], []
                for q in queries:
                    t0 = time.perf_counter()
                    got.append(fn(q))
                    lat.append((time.perf_counter() - t0) * 1000)
                entry: dict[str, Any] = {"p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "mean_ms": float(np.mean(lat)),
                                         "hits_mean": float(np.mean([len(g) for g in got]))}
                if kind == "dense":
                    entry["recall_vs_bruteforce_dense"] = float(np.mean([recall(g, b, k) for g, b in zip(got, dense_bf)]))
                elif kind == "rerank":
                    entry["recall_vs_bruteforce_m3"] = float(np.mean([recall(g, b, k) for g, b in zip(got, m3_bf)]))
                    if ("m3", "exact") in results:
                        entry["recall_vs_exact_m3"] = float(np.mean(
                            [recall(g, e, k) for g, e in zip(got, results[("m3", "exact")])]))
                elif ("m3", "exact") in results:
                    entry["recall_vs_exact_m3"] = float(np.mean(
                        [recall(g, e, k) for g, e in zip(got, results[("m3", "exact")])]))
                raw[kind] = entry
                print(f"[{engine} N={row['n_docs']}] raw {kind}: p50 {entry['p50_ms']:.1f} ms p95 {entry['p95_ms']:.1f} ms",
                      flush=True)
            except Exception as exc:
                traceback.print_exc()
                raw[kind] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                if kind == "rerank":  # informational anchor: recorded, not a failure of the run
                    continue
                self.errors.append({"engine": engine, "n": str(row["n_docs"]), "step": f"raw {kind}",
                                    "error": raw[kind]["error"][:500]})
        raw["paired"] = self.paired(store, anchor, queries, warm)

    def paired(self, store: m3connect.M3Store, anchor: Anchor, queries: list[Vectors],
               warm: list[Vectors]) -> dict[str, Any]:
        """The targets' pairs timed interleaved, query by query (exact (1, 0, 0) / raw dense, exact
        (0.4, 0.2, 0.4) / raw hybrid): the rows above are timed one block after another, so a block
        that runs while the engine is still warming up (JIT, caches) pays for it alone."""
        k = self.args.k
        out: dict[str, Any] = {}
        for name, weights, raw_fn in (("dense", WEIGHT_SETS["dense"], anchor.dense),
                                      ("hybrid", WEIGHT_SETS["m3"], anchor.hybrid)):
            try:
                ours, theirs = [], []
                for q in warm:
                    store.search_by_vectors(q, k=k, weights=weights)
                    raw_fn(q)
                for j, q in enumerate(queries):
                    for side in ((0, 1) if j % 2 == 0 else (1, 0)):  # alternate who goes first
                        t0 = time.perf_counter()
                        if side == 0:
                            store.search_by_vectors(q, k=k, weights=weights)
                        else:
                            raw_fn(q)
                        (ours if side == 0 else theirs).append((time.perf_counter() - t0) * 1000)
                out[name] = {"exact_p50_ms": pct(ours, 50), "raw_p50_ms": pct(theirs, 50),
                             "exact_p95_ms": pct(ours, 95), "raw_p95_ms": pct(theirs, 95)}
            except Exception as exc:
                traceback.print_exc()
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        return out


# -- targets and report ----------------------------------------------------------------------


def _q(row: dict[str, Any], weights: str, fusion: str) -> dict[str, Any] | None:
    w = list(WEIGHT_SETS[weights])
    return next((q for q in row.get("queries", []) if q["weights"] == w and q["fusion"] == fusion and "p50_ms" in q), None)


def targets(rows: list[dict[str, Any]], target_n: int) -> list[dict[str, Any]]:
    """PASS/FAIL of the issue-9 targets, per engine, at ``target_n`` (or the largest N run, flagged)."""
    out: list[dict[str, Any]] = []
    by_engine: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_engine.setdefault(r["engine"], []).append(r)

    def pick(engine: str) -> tuple[dict[str, Any] | None, str]:
        cands = [r for r in by_engine.get(engine, []) if r.get("queries") or r.get("ingest_docs_s")]
        exact = [r for r in cands if r["n_docs"] == target_n]
        if exact:
            return exact[0], ""
        if not cands:
            return None, ""
        best = max(cands, key=lambda r: r["n_docs"])
        return best, f" (measured at N={best['n_docs']}; N={target_n} did not run)"

    def add(name: str, engine: str, n: int | None, measured: Any, limit: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "engine": engine, "n_docs": n, "measured": measured, "limit": limit,
                    "status": "N/A" if ok is None else ("PASS" if ok else "FAIL"), "note": note})

    for engine in TARGET_ENGINES:
        if engine not in by_engine:
            add("exact (0.4,0.2,0.4) p50 <= 3x raw hybrid p50", engine, None, None, "", None, "engine not run")
            continue
        row, note = pick(engine)
        n = row["n_docs"] if row else None
        raw = (row or {}).get("raw", {})
        ex_m3, ex_d = (_q(row, "m3", "exact"), _q(row, "dense", "exact")) if row else (None, None)
        hyb, dense = raw.get("hybrid", {}), raw.get("dense", {})
        paired = raw.get("paired", {})
        if paired.get("hybrid", {}).get("raw_p50_ms"):  # the interleaved pair is the fair comparison
            ex_m3, hyb = {"p50_ms": paired["hybrid"]["exact_p50_ms"]}, {"p50_ms": paired["hybrid"]["raw_p50_ms"]}
        if paired.get("dense", {}).get("raw_p50_ms"):
            ex_d, dense = {"p50_ms": paired["dense"]["exact_p50_ms"]}, {"p50_ms": paired["dense"]["raw_p50_ms"]}
        if ex_m3 and hyb.get("p50_ms"):
            ratio = ex_m3["p50_ms"] / hyb["p50_ms"]
            add("exact (0.4,0.2,0.4) p50 <= 3x raw hybrid p50", engine, n,
                f"{ex_m3['p50_ms']:.1f} ms / {hyb['p50_ms']:.1f} ms = {ratio:.2f}x", "<= 3.00x", ratio <= 3.0, note)
        else:
            add("exact (0.4,0.2,0.4) p50 <= 3x raw hybrid p50", engine, n, None, "<= 3.00x", None, "missing measurement")
        if ex_d and dense.get("p50_ms"):
            ratio = ex_d["p50_ms"] / dense["p50_ms"]
            add("exact (1,0,0) p50 <= 1.5x raw dense p50", engine, n,
                f"{ex_d['p50_ms']:.1f} ms / {dense['p50_ms']:.1f} ms = {ratio:.2f}x", "<= 1.50x", ratio <= 1.5, note)
        else:
            add("exact (1,0,0) p50 <= 1.5x raw dense p50", engine, n, None, "<= 1.50x", None, "missing measurement")
        if engine in NO_COLBERT_ENGINES:
            measured_rows = [r for r in by_engine[engine] if r.get("queries")]
            worst = max((q.get("colbert_bytes_max", 0) for r in measured_rows for q in r["queries"] if "p50_ms" in q),
                        default=None)
            add("no ColBERT token bytes moved to the client (every fusion x weights, every N)", engine,
                max((r["n_docs"] for r in measured_rows), default=None),
                None if worst is None else f"max {worst:,} bytes/query", "0", None if worst is None else worst == 0)
            if row and row.get("ingest_docs_s"):
                add("ingest >= 100 docs/s (write path, fp16 ColBERT)", engine, n,
                    f"{row['ingest_docs_s']:.1f} docs/s ({row.get('colbert_dtype')})", ">= 100",
                    row["ingest_docs_s"] >= 100 and row.get("colbert_dtype") == "float16", note)
            else:
                add("ingest >= 100 docs/s (write path, fp16 ColBERT)", engine, n, None, ">= 100", None, "missing")
    # issue 9 items 2 and 5 (checked on every engine and N run)
    for r in rows:
        for wname in WEIGHT_SETS:
            ex = _q(r, wname, "exact")
            if ex and "recall_vs_bruteforce" in ex:
                add(f"exact {WEIGHT_SETS[wname]} recall@10 vs brute force = 1.00 (item 2)", r["engine"], r["n_docs"],
                    f"{ex['recall_vs_bruteforce']:.3f}", "1.00", ex["recall_vs_bruteforce"] >= 0.9999)
            en = _q(r, wname, "engine")
            if en and "recall_vs_exact" in en:
                add(f"engine fusion {WEIGHT_SETS[wname]} recall@10 vs exact >= 0.95 (item 5)", r["engine"], r["n_docs"],
                    f"{en['recall_vs_exact']:.3f}", ">= 0.95", en["recall_vs_exact"] >= 0.95)
    return out


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _kib(v: Any) -> str:
    return "—" if v is None else f"{v / 1024:,.1f}"


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    s = c["shape"]
    out = [
        f"# query-scale benchmark — {result['slug']}",
        "",
        f"- date: {m['date_utc']}; host {m['host']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end {', '.join(f'{x:.2f}' for x in result['loadavg_end'])}",
        f"- CPU: {m['cpu_model']}, {m['cpus_usable']} usable cores (os.cpu_count {m['cpu_count']}); "
        f"RAM {_f(m['ram_gib'])} GiB; {m['platform']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + (f"; OpenSearch: {c['opensearch']}" if c.get("opensearch") else ""),
        f"- corpus: synthetic, dense {s['dense_dim']}-d, ColBERT {s['tokens']}±{s['tokens_spread']} rows × "
        f"{s['colbert_dim']}-d (stored {c['colbert_dtype']}), ~{s['sparse_terms']} sparse terms over a "
        f"{s['vocab']:,}-id Zipf vocabulary, {s['topics']} topics; queries: {s['query_tokens']} ColBERT rows, "
        f"{s['query_terms']} sparse terms, paraphrasing one document each",
        f"- k = {c['k']}; candidate depth {c['depth'] or 'library default (max(100, 10k))'}; "
        f"{c['queries']} timed queries + {c['warmup']} warm-up per mode; add_vectors batches of {c['batch']} docs",
        f"- command: `{c['command']}`",
        f"- total wall time {result['total_seconds']:.0f} s{'' if result['complete'] else ' — PARTIAL RUN'}",
        "",
        "Shared 2-core machine: timings carry noise; compare within a row.",
        "",
        "## Does the synthetic corpus carry signal? (brute force, ColBERT fp16)",
        "",
        "Rank of the paraphrased source document when ranking the whole corpus by one route alone.",
        "",
        "| N | route | hit@1 | hit@10 | MRR |",
        "|---:|---|---:|---:|---:|",
    ]
    for n, info in result["per_n"].items():
        for route, v in info["route_signal"].items():
            out.append(f"| {n} | {route} | {v['hit@1']:.2f} | {v['hit@10']:.2f} | {v['mrr']:.3f} |")
    out += ["", "## Ingestion (write path only: `add_vectors`, generation excluded)", "",
            "| engine | N | ColBERT dtype | docs/s | write s | stored bytes/doc | client RSS MiB | node RSS MiB |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        out.append(f"| {r['label']} | {r['n_docs']:,} | {r.get('colbert_dtype', '—')} | {_f(r.get('ingest_docs_s'))} | "
                   f"{_f(r.get('ingest_write_s'))} | {_f(r.get('disk_bytes_per_doc'), 0)} | {_f(r.get('rss_mb_after_ingest'), 0)} | "
                   f"{_f(r.get('opensearch_node_rss_mb'), 0)} |")
    notes = [f"- {r['label']} N={r['n_docs']}: {r['colbert_dtype_note']}" for r in result["rows"] if r.get("colbert_dtype_note")]
    notes.insert(0, "- stored bytes/doc: apparent size of the engine's directory / file after ingestion (OpenSearch: "
                    "index `_stats` primaries store size, no force-merge); client RSS: this process after ingestion "
                    "(embedded engines live in it); node RSS: the OpenSearch JVM.")
    notes += [f"- {r['label']} N={r['n_docs']}: queries timed after its post-ingestion segment merges ended "
              f"({r['settle_s']:.0f} s wait)" for r in result["rows"] if r.get("settle_s")]
    out += [""] + notes
    out += ["", "## Query latency, bytes moved, recall", "",
            "Bytes per query: vectors in the records `adapter.fetch` returned (ColBERT separately), and at the "
            "engine client (OpenSearch: HTTP response bytes; Milvus: vector payload of client results; Qdrant Edge: "
            "vectors of the points the shard returned). Recall@10: engine/RRF fusion against exact fusion; exact "
            "against the brute-force M3 ranking.",
            "",
            "| engine | N | weights | fusion | p50 ms | p95 ms | cand. | fetched KiB/q | ColBERT KiB/q | engine-side KiB/q "
            "| recall@10 vs exact | exact recall@10 vs brute force | max abs score diff |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        for q in r.get("queries", []):
            w = tuple(q["weights"])
            if "error" in q:
                out.append(f"| {r['label']} | {r['n_docs']:,} | {w} | {q['fusion']} | error: {q['error'][:120]} |"
                           " | | | | | | | |")
                continue
            eng = q.get("http_response_bytes_per_query") if r["engine"] == "opensearch" else q.get("engine_vector_bytes_per_query")
            col = max(q["fetch_colbert_bytes_per_query"], q.get("engine_colbert_bytes_per_query", 0))
            out.append(
                f"| {r['label']} | {r['n_docs']:,} | {w} | {q['fusion']} | {_f(q['p50_ms'])} | {_f(q['p95_ms'])} | "
                f"{_f(q.get('candidates_mean'), 0)} | {_kib(q['fetch_vector_bytes_per_query'])} | {_kib(col)} | {_kib(eng)} | "
                f"{_f(q.get('recall_vs_exact'), 3)} | {_f(q.get('recall_vs_bruteforce'), 3)} | "
                f"{'—' if q.get('max_abs_score_diff_vs_bruteforce') is None else format(q['max_abs_score_diff_vs_bruteforce'], '.1e')} |")
    def miss_note(r: dict[str, Any], q: dict[str, Any]) -> str:
        k = result["config"]["k"]
        dense_only = q["weights"][1:] == [0.0, 0.0]
        outside = q.get("exact_misses_outside_candidate_set", q.get("exact_misses_outside_dense_sparse_top_depth", 0))
        where = (f"the brute-force dense top-{k}" if dense_only
                 else f"the brute-force dense ∪ sparse top-{r.get('candidate_depth')}")
        return (f"- {r['label']} N={r['n_docs']:,} {tuple(q['weights'])}: exact fusion missed {q['exact_misses']} of the "
                f"{k * q['n_queries']} brute-force top-{k} documents; {outside} lie outside {where}, the candidate set "
                f"exact fusion draws from at these weights (a miss by design), {q['exact_misses'] - outside} inside it "
                "(the engine's approximate search did not return them)")

    miss_notes = [miss_note(r, q) for r in result["rows"] for q in r.get("queries", []) if q.get("exact_misses")]
    if miss_notes:
        out += [""] + miss_notes
    out += ["", "## Raw client anchors (same data, same queries)", "",
            "`raw dense` and `raw hybrid` are the anchors of the targets. `raw rerank` (information only) is the "
            "engine's own three-route query: dense + sparse prefetch (depth each) re-ranked by ColBERT MaxSim in the "
            "engine (not the M3 weighted formula); Milvus Lite has no multivector field.",
            "",
            "| engine | N | raw dense p50 / p95 ms | raw hybrid p50 / p95 ms | raw rerank p50 / p95 ms "
            "| raw dense recall@10 vs brute-force dense | raw hybrid recall@10 vs exact (0.4,0.2,0.4) "
            "| raw rerank recall@10 vs brute-force (0.4,0.2,0.4) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        raw = r.get("raw", {})
        d, h, rr = raw.get("dense", {}), raw.get("hybrid", {}), raw.get("rerank", {})
        rr_text = (f"{_f(rr.get('p50_ms'))} / {_f(rr.get('p95_ms'))}" if "p50_ms" in rr
                   else ("error" if "error" in rr else "n/a"))
        out.append(f"| {r['label']} | {r['n_docs']:,} | {_f(d.get('p50_ms'))} / {_f(d.get('p95_ms'))} | "
                   f"{_f(h.get('p50_ms'))} / {_f(h.get('p95_ms'))} | {rr_text} | "
                   f"{_f(d.get('recall_vs_bruteforce_dense'), 3)} | {_f(h.get('recall_vs_exact_m3'), 3)} | "
                   f"{_f(rr.get('recall_vs_bruteforce_m3'), 3)} |")
    rerank_errors = [f"- {r['label']} N={r['n_docs']} raw rerank: "
                     f"{r['raw']['rerank'].get('error', r['raw']['rerank'].get('note', ''))[:200]}"
                     for r in result["rows"] if {"error", "note"} & set(r.get("raw", {}).get("rerank", {}))]
    out += [""] + rerank_errors if rerank_errors else []
    descs = {r["label"]: r["raw"]["describe"] for r in result["rows"] if r.get("raw", {}).get("describe")}
    out += [""] + [f"- {label}: {d}" for label, d in descs.items()]
    out += ["", f"## Targets (issue 9, at N = {c['target_n']:,})", "",
            "Latency targets use the interleaved pairs (exact and the raw query alternately, query by query, "
            "after every block above), where measured; the blocks above ran one after another.", "",
            "| target | engine | N | measured | limit | status |", "|---|---|---:|---|---|---|"]
    for t in result["targets"]:
        out.append(f"| {t['target']} | {ENGINE_LABELS.get(t['engine'], t['engine'])} | {_f(t['n_docs'])} | "
                   f"{_f(t['measured'])} | {t['limit']} | **{t['status']}**{' ' + t['note'] if t['note'] else ''} |")
    if result["errors"]:
        out += ["", "## Errors", ""] + [f"- {e['engine']} N={e['n']} / {e['step']}: {e['error']}" for e in result["errors"]]
    return "\n".join(out) + "\n"


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=None,
                    help="comma list of edge, milvus, opensearch, qdrant-local (default all; --quick: no opensearch)")
    ap.add_argument("--n", default=None, help="corpus sizes, comma list (default 1000,10000; --quick 40)")
    ap.add_argument("--local-max-n", type=int, default=1000, help="qdrant-local only runs for N <= this (default 1000)")
    ap.add_argument("--local-rerank", action="store_true", help="also run the raw rerank anchor on qdrant-local")
    ap.add_argument("--queries", type=int, default=None, help="timed queries per mode (default 20; --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up queries per mode (default 2; --quick 1)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--depth", type=int, default=None, help="candidate_depth (default: the library's)")
    ap.add_argument("--batch", type=int, default=None, help="documents per add_vectors call (default 128)")
    ap.add_argument("--colbert-dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--dim", type=int, default=None, help="dense and ColBERT dimension (default 1024; --quick 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-n", type=int, default=10000, help="N at which the issue-9 targets are checked")
    ap.add_argument("--quick", action="store_true", help="smoke run in seconds: tiny dims, N=40, no OpenSearch")
    ap.add_argument("--opensearch", action="store_true", help="with --quick: include OpenSearch anyway")
    ap.add_argument("--opensearch-heap", default="2g")
    ap.add_argument("--opensearch-ef-search", type=int, default=None,
                    help="the OpenSearch adapter's ef_search (default: its own, 100; the raw anchor asks k=10)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--slug", default=None, help="machine slug in the file names (default: CPU model + cores)")
    ap.add_argument("--work", default=None, help="directory for the embedded engines' files (default: a temp dir)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    q = args.quick
    default_engines = "edge,milvus,qdrant-local" + (",opensearch" if args.opensearch else "") if q else \
        "edge,milvus,opensearch,qdrant-local"
    args.engines = [e.strip() for e in (args.engines or default_engines).split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINE_LABELS]
    if bad:
        ap.error(f"unknown engines {bad}; use {list(ENGINE_LABELS)}")
    args.ns = [int(x) for x in (args.n or ("40" if q else "1000,10000")).split(",") if x.strip()]
    args.queries = args.queries or (5 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.batch = args.batch or (16 if q else 128)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    base = QUICK_SHAPE if args.quick else Shape()
    shape = Shape(**{**asdict(base), "seed": args.seed,
                     **({"dense_dim": args.dim, "colbert_dim": args.dim} if args.dim else {})})
    machine = machine_info()
    slug = args.slug or cpu_slug(machine["cpu_model"], machine["cpus_usable"])
    stem = f"query-scale-{slug}" + ("-quick" if args.quick else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="m3-query-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.work:  # Milvus Lite's exit handlers (registered later, run earlier) leave lock files behind
        atexit.register(shutil.rmtree, work, True)
    node = None
    run = Run(args, shape, work)
    plan = [(n, e) for n in args.ns for e in args.engines if not (e == "qdrant-local" and n > args.local_max_n)]
    skipped = [f"qdrant-local N={n} (> --local-max-n {args.local_max_n}: pure-Python engine, reported at small N only)"
               for n in args.ns for e in args.engines if e == "qdrant-local" and n > args.local_max_n]
    done: list[str] = []

    def write() -> dict[str, Any]:
        result = {
            "benchmark": "query-scale", "slug": slug, "machine": machine,
            "config": {"shape": asdict(shape), "engines": args.engines, "ns": args.ns, "queries": args.queries,
                       "warmup": args.warmup, "k": args.k, "depth": args.depth, "batch": args.batch,
                       "colbert_dtype": args.colbert_dtype, "target_n": args.target_n, "quick": args.quick,
                       "opensearch": run.os_label, "skipped": skipped,
                       "command": "python benchmarks/query_scale.py " + " ".join(args.argv)},
            "per_n": {str(n): d["info"] for n, d in run.per_n.items()},
            "rows": run.rows,
            "targets": targets(run.rows, args.target_n),
            "errors": run.errors,
            "done": list(done),
            "complete": len(done) == len(plan),
            "loadavg_end": list(os.getloadavg()),
            "total_seconds": time.perf_counter() - t_start,
        }
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown(result))
        return result

    try:
        if "opensearch" in args.engines:
            env = os.environ.get("M3_OPENSEARCH_URL")
            try:
                if env:
                    run.os_url, run.os_label = env.rstrip("/"), f"external {env}"
                else:
                    sys.path.insert(0, str(REPO / "scripts"))
                    from opensearch_node import OpenSearchNode

                    print("starting OpenSearch node", flush=True)
                    t0 = time.perf_counter()
                    node = run.node = OpenSearchNode.start(heap=args.opensearch_heap)
                    run.os_url = node.url
                    run.os_label = (f"local node {node.version} (k-NN {node.knn_version}), heap {args.opensearch_heap}, "
                                    f"started in {time.perf_counter() - t0:.0f} s")
            except Exception as exc:
                traceback.print_exc()
                run.errors.append({"engine": "opensearch", "n": "-", "step": "start node",
                                   "error": f"{type(exc).__name__}: {exc}"[:500]})
                plan = [(n, e) for n, e in plan if e != "opensearch"]
        for n in args.ns:
            todo = [e for m, e in plan if m == n]
            if not todo:
                continue
            run.prepare_n(n)
            for engine in todo:
                print(f"== {ENGINE_LABELS[engine]} N={n}", flush=True)
                try:
                    run.run(engine, n)
                except Exception as exc:
                    traceback.print_exc()
                    run.errors.append({"engine": engine, "n": str(n), "step": "run",
                                       "error": f"{type(exc).__name__}: {exc}"[:500]})
                done.append(f"{engine}@{n}")
                write()
            del run.per_n[n]["bf"], run.per_n[n]["queries"], run.per_n[n]["warm"]
            gc.collect()
    finally:
        if node is not None:
            try:
                node.stop()
            except Exception:
                pass
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result = write()
    print(markdown(result))
    print(f"wrote {out_dir / stem}.json and .md")
    for t in result["targets"]:
        print(f"{t['status']:4}  {t['target']} — {ENGINE_LABELS.get(t['engine'], t['engine'])} "
              f"N={t['n_docs']}: {t['measured']} (limit {t['limit']}){' ' + t['note'] if t['note'] else ''}")
    return 0 if not run.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())

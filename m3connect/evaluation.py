"""Retrieval quality metrics and BEIR-format helpers for ``m3connect eval``.

The metric functions are pure and follow ``trec_eval``/BEIR conventions:
graded relevance is used as a linear gain, the discount is ``log2(rank + 1)``,
and documents with a relevance of 0 or less count as not relevant.

>>> ndcg_at_k(["a", "b"], {"b": 1}, 10)   # the one relevant doc at rank 2
0.6309297535714575
>>> recall_at_k(["a", "b"], {"b": 1, "c": 1}, 10)
0.5
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ROUTE_WEIGHTS",
    "dcg",
    "ndcg_at_k",
    "recall_at_k",
    "mean_metrics",
    "load_queries",
    "load_qrels",
    "iter_corpus",
    "split_queries",
    "weight_grid",
    "tune_weights",
]

#: The routes of the BGE-M3 paper's tables, as ``(dense, sparse, colbert)`` weights.
ROUTE_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "dense": (1.0, 0.0, 0.0),
    "sparse": (0.0, 1.0, 0.0),
    "colbert": (0.0, 0.0, 1.0),
    "dense+sparse": (1.0, 0.3, 0.0),
    "all": (1.0, 0.3, 1.0),
}


# -- metrics ----------------------------------------------------------------------------------


def dcg(gains: Iterable[float]) -> float:
    """Discounted cumulative gain of gains in rank order: ``sum(g_i / log2(i + 1))``, i from 1."""
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains)))


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """nDCG@k of one ranking against one query's judgements (0.0 when nothing is relevant).

    A document repeated in ``ranked`` earns its gain only the first time.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ideal = dcg(sorted((float(r) for r in qrels.values() if r > 0), reverse=True)[:k])
    if ideal <= 0:
        return 0.0
    seen: set[str] = set()
    gains = []
    for doc in list(ranked)[:k]:
        rel = float(qrels.get(doc, 0)) if doc not in seen else 0.0
        seen.add(doc)
        gains.append(max(rel, 0.0))
    return dcg(gains) / ideal


def recall_at_k(ranked: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Share of the relevant documents found in the top k (0.0 when nothing is relevant)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    relevant = {d for d, r in qrels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(list(ranked)[:k])) / len(relevant)


def mean_metrics(
    run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
    ndcg_k: int = 10, recall_k: int = 100,
) -> dict[str, float]:
    """Mean nDCG@ndcg_k and Recall@recall_k over the queries of ``run`` that have a relevant doc."""
    nd, rc = [], []
    for qid, ranked in run.items():
        judged = qrels.get(qid, {})
        if not any(r > 0 for r in judged.values()):
            continue
        nd.append(ndcg_at_k(ranked, judged, ndcg_k))
        rc.append(recall_at_k(ranked, judged, recall_k))
    n = len(nd)
    return {
        f"ndcg@{ndcg_k}": sum(nd) / n if n else 0.0,
        f"recall@{recall_k}": sum(rc) / n if n else 0.0,
        "queries": n,
    }


# -- BEIR files -------------------------------------------------------------------------------


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def iter_corpus(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records ``{"id", "text", "metadata"}`` from a BEIR ``corpus.jsonl``; text is title + text."""
    path = Path(path)
    for lineno, obj in _jsonl(path):
        if "_id" not in obj:
            raise ValueError(f"{path}:{lineno}: missing '_id'")
        title = str(obj.get("title") or "").strip()
        body = str(obj.get("text") or "").strip()
        text = f"{title} {body}".strip() if title else body
        meta = {"title": title} if title else {}
        yield {"id": str(obj["_id"]), "text": text, "metadata": meta}


def load_queries(path: str | Path) -> dict[str, str]:
    """``{query_id: text}`` from a BEIR ``queries.jsonl``."""
    path = Path(path)
    out: dict[str, str] = {}
    for lineno, obj in _jsonl(path):
        if "_id" not in obj or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{lineno}: a query needs '_id' and a string 'text'")
        out[str(obj["_id"])] = obj["text"]
    return out


def load_qrels(path: str | Path) -> dict[str, dict[str, float]]:
    """``{query_id: {doc_id: relevance}}`` from a BEIR qrels TSV (header ``query-id corpus-id score``)."""
    path = Path(path)
    out: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for lineno, row in enumerate(reader, 1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(row)}")
            try:
                score = float(row[2])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: score {row[2]!r} is not a number") from None
            out.setdefault(row[0].strip(), {})[row[1].strip()] = score
    return out


def split_queries(qids: Iterable[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Split query ids into (tune, test) halves at random, reproducibly for a seed."""
    ids = sorted(qids)
    random.Random(seed).shuffle(ids)
    half = len(ids) // 2
    return sorted(ids[:half]), sorted(ids[half:])


# -- weight tuning ----------------------------------------------------------------------------


def weight_grid(step: float = 0.1) -> list[tuple[float, float, float]]:
    """All ``(dense, sparse, colbert)`` weights on a grid of ``step`` in [0, 1], not all zero,
    with multiples of one another (same ranking) kept once, as the larger one."""
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    n = int(round(1 / step))
    # Descending, so that of two multiples of one another the larger comes first and is kept.
    values = [round(i * step, 6) for i in range(n, -1, -1)]
    seen: set[tuple[float, ...]] = set()
    out: list[tuple[float, float, float]] = []
    for w in product(values, values, values):
        total = sum(w)
        if total <= 0:
            continue
        key = tuple(round(x / total, 6) for x in w)
        if key in seen:
            continue
        seen.add(key)
        out.append(w)
    return out


def tune_weights(
    candidates: Mapping[str, Sequence[tuple[str, Mapping[str, float]]]],
    qrels: Mapping[str, Mapping[str, float]],
    grid: Sequence[Sequence[float]],
    k: int = 10,
) -> tuple[tuple[float, float, float], float]:
    """Pick the weights maximising mean nDCG@k by rescoring fixed candidate sets.

    ``candidates`` maps a query id to ``[(doc_id, {"dense": s, "sparse": s, "colbert": s}), ...]``
    (e.g. the hits of one all-route search); fusion is M3's weighted sum, so each grid
    point only re-ranks the candidates. Ties keep the earlier grid point.
    """
    W = np.asarray(grid, dtype=np.float64)  # [g, 3]
    if W.ndim != 2 or W.shape[1] != 3 or len(W) == 0:
        raise ValueError("grid must be a non-empty list of (dense, sparse, colbert) weights")
    totals = np.zeros(len(W))
    n = 0
    for qid, cands in candidates.items():
        judged = qrels.get(qid, {})
        ideal = dcg(sorted((float(r) for r in judged.values() if r > 0), reverse=True)[:k])
        if ideal <= 0:
            continue
        n += 1
        if not cands:
            continue
        ids = [c[0] for c in cands]
        S = np.array([[s.get("dense", 0.0), s.get("sparse", 0.0), s.get("colbert", 0.0)] for _, s in cands])
        gains = np.array([max(float(judged.get(d, 0.0)), 0.0) for d in ids])
        fused = W @ S.T  # [g, c]; the 1/sum(w) factor does not change a ranking
        # Stable order: higher score first, then id, as the store sorts its hits.
        order_by_id = np.argsort(np.array(ids, dtype=object), kind="stable")
        fused_sorted = fused[:, order_by_id]
        top = np.argsort(-fused_sorted, axis=1, kind="stable")[:, :k]
        g = gains[order_by_id][top]  # [g, k]
        disc = 1.0 / np.log2(np.arange(2, g.shape[1] + 2))
        totals += (g * disc).sum(axis=1) / ideal
    if n == 0:
        raise ValueError("no tuning query has a relevant document")
    best = int(np.argmax(totals))
    w = tuple(float(x) for x in W[best])
    return (w[0], w[1], w[2]), float(totals[best] / n)

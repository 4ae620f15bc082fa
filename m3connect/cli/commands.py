"""The commands: ingest (locally or on Ray), search, info, drop, eval and serve. Each takes the
parsed arguments and returns the exit status."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_WEIGHTS
from .common import (
    UsageError,
    _check_uri,
    _connect,
    _fields,
    _info,
    _load_encoder,
    _open_existing,
    _parse_filter,
    _parse_weights,
    _progress,
    _shown_uri,
)
from .readers import _detect_format, _Reader


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
        from ..errors import InvalidInputError

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
    from ..errors import IngestError
    from ..remote import is_remote_model

    if is_remote_model(args.model) and (args.device or args.dtype):
        raise UsageError("--device and --dtype apply to a local model; an encoder server chooses its own")
    from ..distributed import ingest

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        report = ingest(
            path, uri=args.uri, collection=args.collection, model=args.model,
            encoder_options={"device": args.device, "dtype": args.dtype, "max_length": args.max_length},
            encoders=args.encoders, writers=args.writers, batch_size=args.batch_size, skip_existing=args.resume,
            colbert_dtype=args.colbert_dtype, colbert_pool_factor=args.colbert_pool_factor,
            store_colbert=args.store_colbert,
            fmt=fmt, text_field=args.text_field, id_field=args.id_field,
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
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS if args.weights is None else _parse_weights(args.weights)
    flt = _parse_filter(args.filter)
    encoder = _load_encoder(args)
    with _connect(args, encoder) as store:
        hits = store.search(args.query, k=args.k, weights=weights, filter=flt, fusion=args.fusion,
                            reencode_colbert=args.reencode_colbert)
        weights = store.last_query_stats.weights  # the weights used (a store without ColBERT drops its part)
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
    from ..uri import parse_uri

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
    from .. import evaluation as ev

    args.uri = _check_uri(args.uri)
    root = Path(args.dataset).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such BEIR dataset directory: {root}")
    corpus_file, queries_file = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_file = root / "qrels" / f"{args.split}.tsv"
    for f in (corpus_file, queries_file, qrels_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} is missing; a BEIR dataset has corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
            )
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
        from ..errors import MissingDependencyError

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
    from ..remote import is_remote_model

    if is_remote_model(args.model):
        raise UsageError("serve needs a local model (a hub id or a directory), not a server URL")
    for name in ("port", "max_queue", "max_texts_per_request", "max_batch_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "port" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}, got {value}")
    from ..server import Limits, serve

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


"""Distributed ingestion on Ray (``m3connect.distributed``) against single-process ``store.ingest``.

One run, on one machine, for two random checkpoints in BGE-M3's layout
(``m3connect.testing.make_tiny_checkpoint``):

- ``small`` (hidden 256, 4 layers): encoding dominates, as with BGE-M3 on any hardware;
- ``tiny`` (hidden 32, 2 layers): encoding is nearly free, so the write path and Ray's own
  per-batch overhead show.

For each: the single-process ``M3Store.ingest`` docs/s into OpenSearch (a real node: this
script starts one unless ``$M3_OPENSEARCH_URL`` or ``--no-opensearch``) and into a Milvus Lite
file, then ``m3connect.distributed.ingest`` with 1 and 2 encoder actors x 1, 2 and 4 writers
into OpenSearch, and 1 and 2 encoder actors into Milvus Lite (always one writer). Every run
writes a fresh collection and checks that it ends with exactly N documents.

Reported per run: wall seconds of the whole call (Ray actor start-up and model loads
included), ``startup`` (start to first stored batch) and docs/s both over the whole call and
from the first stored batch on (``after start-up``). Ray runs on a local instance with the machine's CPUs, no
dashboard, bound to 127.0.0.1.

    .venv/bin/python benchmarks/ingest_ray.py                  # ~10 min on 2 cores
    .venv/bin/python benchmarks/ingest_ray.py --quick --no-opensearch --out /tmp/x
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from machine import cpu_model, memory_gib  # noqa: E402  (benchmarks/machine.py)

MODELS = {
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024},
    "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
}


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    cpu = cpu_model()
    mem = memory_gib()
    mem_gib = None if mem is None else round(mem, 1)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("ray", "pyarrow", "opensearch-py", "pymilvus", "milvus-lite"):
        try:
            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "not installed"
    return {
        "host": socket.gethostname(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)), "memory_gib": mem_gib, "gpus": 0,
        "platform": platform.platform(), "versions": versions,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def corpus(n: int) -> list[dict[str, Any]]:
    from m3connect.testing import synthetic_corpus

    return [{"text": t, "metadata": {"i": i, "part": i % 7}}
            for i, t in enumerate(synthetic_corpus(n, min_words=40, max_words=160, seed=7))]


def single_process(uri: str, collection: str, ckpt: Path, docs: list[dict[str, Any]], batch: int,
                   threads: int) -> dict[str, Any]:
    import torch

    import m3connect

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    encoder = m3connect.M3Encoder(ckpt, device="cpu", dtype="float32", show_progress=False)
    load = time.perf_counter() - t0
    store = m3connect.connect(uri, collection, encoder)
    t1 = time.perf_counter()
    report = store.ingest(docs, encode_batch_size=batch, show_progress=False)
    ingest_s = time.perf_counter() - t1
    count = store.count()
    if uri.startswith("opensearch"):
        store.drop()
    store.close()
    return {"mode": f"single-process, {threads} thread{'s' if threads > 1 else ''}", "encoders": 1, "writers": 1,
            "count": count, "written": report.written,
            "seconds": round(load + ingest_s, 2), "startup_seconds": round(load, 2),
            "docs_per_second": round(len(docs) / (load + ingest_s), 2),
            "after_startup_docs_per_second": round(len(docs) / ingest_s, 2),
            "encode_seconds": round(report.encode_seconds, 2), "write_seconds": round(report.write_seconds, 2),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def distributed(uri: str, collection: str, ckpt: Path, docs: list[dict[str, Any]], batch: int,
                encoders: int, writers: int) -> dict[str, Any]:
    from m3connect.distributed import ingest

    t0 = time.perf_counter()
    report = ingest(docs, uri=uri, collection=collection, model=str(ckpt),
                    encoder_options={"device": "cpu", "dtype": "float32"}, encoders=encoders, writers=writers,
                    batch_size=batch, progress_interval=None, log=lambda m: None)
    wall = time.perf_counter() - t0
    if uri.startswith("opensearch"):
        import m3connect

        m3connect.connect(uri, collection).drop()
    steady = _after_startup_rate(report.timeline)
    return {"mode": "ray", "encoders": report.encoders, "writers": report.writers, "count": report.count,
            "written": report.written, "seconds": round(wall, 2), "startup_seconds": round(report.startup_seconds, 2),
            "docs_per_second": round(len(docs) / wall, 2),
            "after_startup_docs_per_second": steady, "tokens_per_second": round(report.tokens_per_second, 1),
            "device": report.device,
            "encode_seconds": round(report.encode_seconds, 2), "write_seconds": round(report.write_seconds, 2),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def _after_startup_rate(timeline: list[tuple[float, int]]) -> float | None:
    """docs/s from the first stored batch to the last one (encoders may have run ahead of the
    writers meanwhile, so this is an upper bound of the warm pipeline's rate)."""
    if len(timeline) < 2 or timeline[-1][0] <= timeline[0][0]:
        return None
    (t0, n0), (t1, n1) = timeline[0], timeline[-1]
    return round((n1 - n0) / (t1 - t0), 2)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Distributed ingestion on Ray vs single-process `store.ingest`",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, no GPU; "
        f"{m['platform']}; Ray {m['versions']['ray']}, torch {m['versions']['torch']}; {m['date_utc']}. "
        f"Load average at start {m['loadavg_start']} (the machine is shared: other jobs ran beside this one).",
        "",
        f"Corpus: {result['docs']} synthetic documents of 40-160 words (~124 tokens each), batches of "
        f"{result['batch_size']}. Checkpoints are random (BGE-M3 layout), fp32 on CPU. OpenSearch: one local "
        "node. `startup`: start of the call to the first stored batch (Ray actors start, each loads the "
        "model); `after start-up`: Ray, docs/s from the first stored batch to the last (an upper bound: "
        "encoders may run ahead while the writers start); single process, the `ingest` call alone. "
        "`encode s`: time inside `encode()` summed over actors. Every run ended with exactly N documents.",
        "",
    ]
    for name, runs in result["models"].items():
        spec = MODELS[name]
        lines += [f"## `{name}` checkpoint (hidden {spec['hidden_size']}, {spec['num_layers']} layers)", "",
                  "| engine | mode | encoders | writers | wall s | startup s | encode s | docs/s (wall) "
                  "| docs/s (after start-up) | load avg | count |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            lines.append(f"| {r['engine']} | {r['mode']} | {r['encoders']} | {r['writers']} | {r['seconds']} | "
                         f"{r['startup_seconds']} | {r['encode_seconds']} | {r['docs_per_second']} | "
                         f"{r['after_startup_docs_per_second']} | {r['loadavg_1m']} | {r['count']} |")
        lines.append("")
    lines += ["## What 2 cores allow", "", result["notes"], ""]
    return "\n".join(lines)


NOTES = (
    "Two cores cannot show scale-out. One encoder actor gets both cores (torch with 2 threads, like the "
    "2-thread baseline) and two actors get one core each, so the machine's encode capacity is the same "
    "in every row; Ray adds a fixed cost per job (worker processes, one model load per actor, a probe "
    "load when the collection is new: the `startup` column, ~10-15 s here) and a small one per batch "
    "(Arrow blocks through the object store; for Milvus Lite one more hop to the store actor). Writers "
    "only matter when encoding is cheap (`tiny`), and then the OpenSearch node competes for the same two "
    "cores. This VM is also shared with other jobs (see the load average per row: 2 cores, load 8-13): "
    "under that contention torch with 2 threads ran ~3x slower than with 1 thread in a separate check, "
    "which is why the 1-thread baseline and the 1-CPU actors can beat the 2-thread ones; compare rows "
    "with care and rerun on an idle machine for numbers to quote. What the runs do establish: every "
    "configuration stores exactly N, Milvus Lite gets one writer, and the per-job start-up cost. On a "
    "cluster the encoder pool is what scales: one actor per GPU (`num_gpus=1`) with its own model, fed "
    "by Ray Data's streaming executor, and M writers into a server engine; throughput is then about "
    "encoders x one GPU's docs/s until the engine's ingest rate is reached."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="small,tiny")
    parser.add_argument("--quick", action="store_true", help="100 docs, tiny model, fewer writer counts")
    parser.add_argument("--no-opensearch", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", default=None, help="file name tag (default: from the CPU model and cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.models = 100, "tiny"
    writer_counts = (1, 4) if args.quick else (1, 2, 4)

    import ray

    from m3connect.testing import make_tiny_checkpoint

    machine = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="m3-ingest-ray-"))
    os_url = None
    if not args.no_opensearch:
        from tests.integration.opensearch_fixture import get_opensearch_url, stop_node

        os_url = get_opensearch_url()
    docs = corpus(args.docs)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024 * 1024)
    result: dict[str, Any] = {"machine": machine, "docs": args.docs, "batch_size": args.batch_size,
                              "models": {}, "notes": NOTES}
    try:
        for name in args.models.split(","):
            ckpt = make_tiny_checkpoint(tmp / name, **MODELS[name])
            runs: list[dict[str, Any]] = []
            engines = [("milvus-lite", lambda: f"milvus:///{tmp}/{uuid.uuid4().hex[:8]}.db", (1,))]
            if os_url:
                engines.insert(0, ("opensearch", lambda: "opensearch://" + os_url.split("://", 1)[1], writer_counts))
            for engine, make_uri, writers in engines:
                for threads in (2, 1):
                    coll = f"b{uuid.uuid4().hex[:8]}"
                    r = single_process(make_uri(), coll, ckpt, docs, args.batch_size, threads)
                    runs.append({"engine": engine, **r})
                    print(json.dumps(runs[-1]), flush=True)
                for enc in (1, 2):
                    for w in writers:
                        coll = f"b{uuid.uuid4().hex[:8]}"
                        r = distributed(make_uri(), coll, ckpt, docs, args.batch_size, enc, w)
                        assert r["count"] == len(docs), r
                        runs.append({"engine": engine, **r})
                        print(json.dumps(runs[-1]), flush=True)
            result["models"][name] = runs
    finally:
        ray.shutdown()
        if os_url and not os.environ.get("M3_OPENSEARCH_URL"):
            stop_node()
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or _tag(machine)
    (out / f"ingest-ray-{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"ingest-ray-{tag}.md").write_text(markdown(result))
    print(f"wrote {out / f'ingest-ray-{tag}.md'} and .json")
    return 0


def _tag(machine: dict[str, Any]) -> str:
    words = machine["cpu_model"].lower().replace("(r)", "").replace("(tm)", "").split()
    brand = "-".join(w for w in words[:3] if w.isalnum()) or "cpu"
    return f"{brand}-{machine['cpu_count']}c"


if __name__ == "__main__":
    sys.exit(main())

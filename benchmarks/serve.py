"""Encoder service throughput: ``m3connect serve`` under 1-64 concurrent clients vs one in-process batch.

One run, one machine, one checkpoint (random XLM-R, hidden 256, 4 layers, 4 heads, intermediate
1024, vocab 8000; CPU fp32). A request list is drawn once: every request holds 1-8 texts of a
synthetic corpus (10-150 words, ``max_length`` 512). Rows:

* ``in-process``: ``M3Encoder.encode(all texts)``, one call (the encoder's own length-sorted
  token-budget batches): the ceiling a server can approach.
* ``serve, N clients``: the server (``create_app`` on uvicorn, as ``m3connect serve`` runs it); N
  threads in the benchmark process, each with its own
  ``RemoteEncoder`` (msgpack, fp32), send the requests in a closed loop (a client sends its next
  request when the previous answer is decoded) until the list is done. Tokens/s counts every
  token of every text (after truncation, CLS/EOS included) over the wall time; latency is per
  request, as the client sees it (encode + HTTP + decode).

The rows are timed round-robin (the order rotates each repetition so background load hits them
alike), after one untimed pass of the whole workload through each side; the best repetition is
reported, the median is in the JSON. Both rows run in one host process (see :class:`Host`), which
also gives CPU time beside wall time. The server's own metrics
(texts per encoder call, requests per call) are read from ``/metrics`` after each row.

    .venv/bin/python benchmarks/serve.py                       # full run, a few minutes on 2 cores
    .venv/bin/python benchmarks/serve.py --quick --out /tmp/s  # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

FULL_SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, vocab_size=8000)
QUICK_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, vocab_size=1000)
TARGET = 0.8  # serve tokens/s at 16+ clients / in-process tokens/s
TARGET_FROM = 16


# -- machine ----------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else model
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(f.group(1).split()) if f else set()
    except OSError:
        pass
    return {"cpu": model, "logical_cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx": any(x.startswith("amx") for x in flags)}


def _cpu_slug(cpu: str, cores: int | None) -> str:
    s = re.sub(r"\((R|TM|tm|r)\)|\b(CPU|Processor|with|Radeon|Graphics)\b", " ", cpu)
    s = re.sub(r"[^A-Za-z0-9.]+", "-", s.replace("@", " ")).strip("-").lower()
    return f"{s or 'cpu'}-{cores or 0}c"


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "starlette", "uvicorn", "httpx", "msgpack"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "?"
    return out


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- the server process -----------------------------------------------------------------------


def _proc_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_metrics(url: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        m = re.match(r"^(m3_batch_texts_(?:sum|count)|m3_batch_requests_sum|m3_tokens_total|m3_encode_seconds_sum)"
                     r"\s+(\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


# -- rows -------------------------------------------------------------------------------------


class Host:
    """One process holding the encoder, serving it over HTTP and running the in-process baseline.

    The server is ``create_app`` on uvicorn (what ``m3connect serve`` runs) in a thread of this
    process; on a "run" line on stdin its main thread times ``encoder.encode(all texts)`` in one
    call, while the server idles. Both rows thus use the same process, heap, weights and thread
    pools: on a shared VM the CPU cost per token of the same ``encode`` call was seen to differ
    2x between two processes, which would otherwise swamp the serving overhead being measured.
    """

    def __init__(self, model: Path, max_length: int, texts_file: Path, limits: dict[str, float]) -> None:
        cmd = [sys.executable, __file__, "--_host", str(model), str(max_length), str(texts_file), json.dumps(limits)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.url = str(self._read()["url"])
        self._read()  # ready: warmed up on the full workload

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the encoder host process exited")
        return dict(json.loads(line))

    def run_inprocess(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _host_main(model: str, max_length: int, texts_file: str, limits: dict[str, float]) -> int:
    from m3connect import M3Encoder
    from m3connect.server import BackgroundServer, Limits, create_app

    texts = json.loads(Path(texts_file).read_text())
    encoder = M3Encoder(model, device="cpu", dtype="float32", max_length=max_length, show_progress=False)
    server = BackgroundServer(create_app(encoder, Limits(**limits))).start()
    print(json.dumps({"url": server.url}), flush=True)
    encoder.encode(texts, max_length=max_length, show_progress=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        out = encoder.encode(texts, max_length=max_length, show_progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"seconds": seconds, "tokens": int(sum(out.num_tokens)), "texts": len(texts),
                          "cpu_seconds": cpu}), flush=True)
    server.stop()
    return 0


def run_clients(url: str, server_pid: int, requests: list[list[str]], clients: int, max_length: int) -> dict[str, Any]:
    from m3connect import RemoteEncoder

    encoders = [RemoteEncoder(url, max_length=max_length, retries=20) for _ in range(clients)]
    before = _server_metrics(url)
    lock = threading.Lock()
    cursor = iter(range(len(requests)))
    latencies: list[float] = []
    tokens = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        enc = encoders[k]
        start.wait()
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                out = enc.encode(requests[i])
            except BaseException as exc:  # noqa: BLE001 - reported after the row
                errors.append(exc)
                return
            lat = time.perf_counter() - t
            tokens[k] += int(sum(out.num_tokens))
            with lock:
                latencies.append(lat)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    c0, s0 = time.process_time(), _proc_cpu_seconds(server_pid)
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    client_cpu, server_cpu = time.process_time() - c0, _proc_cpu_seconds(server_pid) - s0
    for enc in encoders:
        enc.close()
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]!r}")
    after = _server_metrics(url)
    calls = after.get("m3_batch_texts_count", 0) - before.get("m3_batch_texts_count", 0)
    lat = sorted(latencies)
    return {
        "seconds": seconds,
        "tokens": sum(tokens),
        "texts": sum(len(r) for r in requests),
        "requests": len(lat),
        "cpu_seconds": server_cpu + client_cpu,
        "server_cpu_seconds": server_cpu,
        "client_cpu_seconds": client_cpu,
        "p50_ms": 1000 * float(np.percentile(lat, 50)),
        "p95_ms": 1000 * float(np.percentile(lat, 95)),
        "encoder_calls": int(calls),
        "texts_per_call": (after.get("m3_batch_texts_sum", 0) - before.get("m3_batch_texts_sum", 0)) / max(calls, 1),
        "requests_per_call": (after.get("m3_batch_requests_sum", 0) - before.get("m3_batch_requests_sum", 0)) / max(calls, 1),
        # share of the wall time the server's model thread spent inside encoder calls
        "encoder_busy": (after.get("m3_encode_seconds_sum", 0) - before.get("m3_encode_seconds_sum", 0)) / seconds,
    }


# -- report -----------------------------------------------------------------------------------


def write_report(out_dir: Path, result: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    m = result["machine"]
    slug = _cpu_slug(m["cpu"], m["logical_cores"])
    stem = out_dir / f"serve-{slug}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    base = result["rows"]["in-process"]["best"]
    base_cpu = result["rows"]["in-process"]["best_cpu"]
    lines = [
        f"## Encoder service: `m3connect serve` vs in-process ({result['mode']} run)",
        "",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- date: {result['date']}; load average before/after: {result['load_before']} / {result['load_after']}",
        f"- checkpoint: random XLM-R {', '.join(f'{k}={v}' for k, v in result['shape'].items())}, CPU fp32, "
        f"torch threads {result['torch_threads']} (server and in-process alike)",
        f"- workload: {result['n_requests']} requests of 1-8 texts ({result['n_texts']} texts, "
        f"{base['tokens']} tokens after truncation at max_length {result['max_length']}); the same requests "
        "for every row",
        "- one host process holds the encoder: it serves it (`create_app` on uvicorn, what `m3connect serve` runs; "
        f"limits: defaults + {result['server_limits']}) and, for the in-process row, calls "
        "`encoder.encode(all texts)` from its main thread while the server idles; both paths warmed up on the full "
        "workload. Clients: one thread and one `RemoteEncoder` (msgpack, fp32) each, closed loop, in the "
        "benchmark process",
        f"- timing: {result['reps']} repetitions round-robin, **best** shown (median in the JSON)",
        "",
        "| row | clients | best s | tokens/s | vs in-process | tokens / CPU-s | vs in-process | p50 ms | p95 ms "
        "| texts / encoder call | requests / call | model busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        b, bc = row["best"], row["best_cpu"]
        tps = b["tokens"] / b["seconds"]
        ratio = tps / (base["tokens"] / base["seconds"])
        tpc = bc["tokens"] / bc["cpu_seconds"]
        ratio_cpu = tpc / (base_cpu["tokens"] / base_cpu["cpu_seconds"])
        if name == "in-process":
            lines.append(f"| in-process, one encode() | - | {b['seconds']:.2f} | {tps:,.0f} | 1.00x | {tpc:,.0f} | 1.00x "
                         f"| - | - | {b['texts']} | - | - |")
        else:
            lines.append(
                f"| serve | {row['clients']} | {b['seconds']:.2f} | {tps:,.0f} | {ratio:.2f}x | {tpc:,.0f} | "
                f"{ratio_cpu:.2f}x | {b['p50_ms']:.0f} | {b['p95_ms']:.0f} | {b['texts_per_call']:.1f} | "
                f"{b['requests_per_call']:.1f} | {100 * b['encoder_busy']:.0f}% |"
            )
    lines += [
        "",
        "tokens / CPU-s = tokens / CPU seconds used (in-process: the host process; serve: the host process + the "
        "client threads), best repetition by that measure. model busy = time the server's model thread spent inside `encode()` calls "
        "/ wall time of the row. Every repetition is in the JSON (`rows.*.runs`).",
        "",
        result["verdict"],
        "",
    ]
    if result.get("notes"):
        lines += [result["notes"], ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem.with_suffix(".md")


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--_host":
        return _host_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model and workload (smoke run)")
    ap.add_argument("--requests", type=int, default=None, help="requests per row (default 96, quick 40)")
    ap.add_argument("--clients", default="1,4,16,64", help="client counts (default 1,4,16,64)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-window-ms", type=float, default=2.0, help="the server's batching window (default 2)")
    ap.add_argument("--gather-ms", type=float, default=None, help="the server's gather limit (default: Limits')")
    ap.add_argument("--notes", default="", help="a line added to the report")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from m3connect.testing import make_tiny_checkpoint, synthetic_corpus

    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    n_requests = args.requests or (40 if args.quick else 96)
    reps = args.reps or (1 if args.quick else 3)
    clients = [int(c) for c in args.clients.split(",")]
    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(1, 9, size=n_requests)
    pool = synthetic_corpus(int(sizes.sum()), min_words=10, max_words=150, seed=args.seed)
    requests, k = [], 0
    for s in sizes:
        requests.append(pool[k : k + int(s)])
        k += int(s)

    tmp = Path(tempfile.mkdtemp(prefix="m3-serve-bench-"))
    print(f"building checkpoint {shape} ...", flush=True)
    model = make_tiny_checkpoint(tmp / "model", **shape, initializer_range=0.1)
    texts_file = tmp / "texts.json"
    texts_file.write_text(json.dumps([t for r in requests for t in r]))
    load_before = _loadavg()
    limits = {"batch_window_ms": args.batch_window_ms}
    if args.gather_ms is not None:
        limits["gather_ms"] = args.gather_ms
    host = Host(model, args.max_length, texts_file, limits)  # warms itself up in-process
    try:
        url = host.url
        run_clients(url, host.pid, requests, 16, args.max_length)  # and through the server: one untimed pass
        rows: dict[str, list[dict[str, Any]]] = {"in-process": [], **{f"serve-{c}": [] for c in clients}}
        names = list(rows)
        for rep in range(reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                if name == "in-process":
                    r = host.run_inprocess()
                else:
                    r = run_clients(url, host.pid, requests, int(name.split("-")[1]), args.max_length)
                rows[name].append(r)
                print(f"rep {rep + 1}/{reps} {name:>12}: {r['seconds']:.2f} s, "
                      f"{r['tokens'] / r['seconds']:,.0f} tokens/s, {r['tokens'] / r['cpu_seconds']:,.0f} tokens/CPU-s"
                      + (f", p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, {r['texts_per_call']:.1f} texts/call"
                         if "p50_ms" in r else ""), flush=True)
    finally:
        host.close()
    load_after = _loadavg()

    summary: dict[str, Any] = {}
    for name, runs in rows.items():
        best = min(runs, key=lambda r: r["seconds"])
        best_cpu = min(runs, key=lambda r: r["cpu_seconds"])
        summary[name] = {"best": best, "best_cpu": best_cpu, "runs": runs,
                         "median_seconds": statistics.median(r["seconds"] for r in runs)}
        if name != "in-process":
            summary[name]["clients"] = int(name.split("-")[1])
    base = summary["in-process"]["best"]
    base_tps = base["tokens"] / base["seconds"]
    ratios = {c: summary[f"serve-{c}"]["best"]["tokens"] / summary[f"serve-{c}"]["best"]["seconds"] / base_tps
              for c in clients}
    def tps(r: dict[str, Any]) -> float:
        return r["tokens"] / r["seconds"]

    per_rep = {c: [tps(s) / tps(b) for s, b in zip(summary[f"serve-{c}"]["runs"], summary["in-process"]["runs"])]
               for c in clients}
    base_cpu = summary["in-process"]["best_cpu"]
    ratios_cpu = {c: (summary[f"serve-{c}"]["best_cpu"]["tokens"] / summary[f"serve-{c}"]["best_cpu"]["cpu_seconds"])
                  / (base_cpu["tokens"] / base_cpu["cpu_seconds"]) for c in clients}
    judged = {c: r for c, r in ratios.items() if c >= TARGET_FROM}
    met = bool(judged) and all(r >= TARGET for r in judged.values())
    verdict = (
        f"Target: with {TARGET_FROM}+ concurrent clients, >= {TARGET:.1f}x the in-process single-batch tokens/s: "
        + ("**met**" if met else "**not met**") + " ("
        + ", ".join(f"{c} clients {r:.2f}x" for c, r in judged.items()) + "; best vs best). Per repetition "
        "(serve vs the in-process run of the same round): "
        + "; ".join(f"{c} clients " + ", ".join(f"{x:.2f}x" for x in per_rep[c]) for c in clients) + ". "
        "Per CPU-second (best vs best): "
        + ", ".join(f"{c} clients {ratios_cpu[c]:.2f}x" for c in clients) + "."
    )
    print(verdict)
    result = {
        "mode": "quick" if args.quick else "full",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**_cpuinfo(), "hostname": socket.gethostname()},
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "shape": shape,
        "max_length": args.max_length,
        "n_requests": n_requests,
        "n_texts": int(sizes.sum()),
        "reps": reps,
        "server_limits": limits,
        "load_before": load_before,
        "load_after": load_after,
        "rows": summary,
        "ratios": ratios,
        "ratios_per_rep": per_rep,
        "ratios_per_cpu_second": ratios_cpu,
        "target_met": met,
        "verdict": verdict,
        "notes": args.notes,
    }
    print(f"report: {write_report(Path(args.out), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

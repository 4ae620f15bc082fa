"""Where an ``M3Encoder.encode`` call spends its wall time on a GPU, phase by phase.

Companion of ``encode_gpu.py`` (same BGE-M3-shaped random checkpoint and synthetic corpus):
for one max_length it times, with the encoder's own methods, tokenisation, each batch's
launch (host time to queue the forward, heads and copies), its GPU time (CUDA events) and
its finish (split into the wait for the device-to-host copies that follow the forward pass;
fetch: new pageable arrays, paged in, and the copy out of pinned memory; post: lexical weights
and ColBERT slicing), one batch after the other. Beside
those phases it times the whole ``encode``: the threaded pipeline (the GPU default: chunked
tokenisation and batch finishing on background threads) with all three outputs and with fewer,
so the cost of each output shows, and with all three the single-thread pipeline it replaced
(``_threaded = False``: everything tokenised first, batch k finished on the calling thread
while batch k+1 runs). MFU counts each text's own tokens (formula in ``encode_gpu.py``).

Rows: eager bf16, and (on a GPU, unless ``--no-compile``) bf16 with ``compile=True``, timed
after a warm-up ``encode`` that compiles every batch shape.

    python3 benchmarks/encode_gpu_phases.py --out $OUT          # on the GPU machine, ~1.5 min
    .venv/bin/python benchmarks/encode_gpu_phases.py --device cpu --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from encode_gpu import FULL_SHAPE, QUICK_SHAPE, _machine, _tokens_per_word, text_flops  # noqa: E402

from m3connect.encoder import M3Encoder  # noqa: E402
from m3connect.testing import make_tiny_checkpoint, synthetic_corpus  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn: Any, device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def phases(enc: M3Encoder, texts: list[str], length: int, device: torch.device) -> dict[str, Any]:
    """One encode taken apart: tokenise, then per batch launch / GPU / fetch / post, serially."""
    t0 = time.perf_counter()
    ids, _ = enc._tokenize(texts, length)
    tokenize_s = time.perf_counter() - t0
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    launch_s = gpu_s = d2h_s = fetch_s = post_s = 0.0
    batches = 0
    for batch in enc._batches(lengths, order, None):
        rows = [ids[i] for i in batch]
        _sync(device)
        start = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        end = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if start is not None:
            start.record()
        t0 = time.perf_counter()
        launched = enc._launch(rows, True, True, True)
        launch_s += time.perf_counter() - t0
        if end is not None:
            end.record()
            end.synchronize()
            gpu_s += start.elapsed_time(end) / 1000  # type: ignore[union-attr]
        t0 = time.perf_counter()
        if launched.ready is not None:  # the copies to pinned memory queued behind the forward
            launched.ready.synchronize()
        t1 = time.perf_counter()
        d2h_s += t1 - t0
        t0 = t1
        arrays = enc._fetch(launched)
        t1 = time.perf_counter()
        enc._post_process(launched, arrays)
        fetch_s += t1 - t0
        post_s += time.perf_counter() - t1
        batches += 1
    return {
        "tokenize_s": tokenize_s,
        "launch_host_s": launch_s,
        "gpu_s": gpu_s,
        "finish_host_s": d2h_s + fetch_s + post_s,
        "finish_d2h_wait_s": d2h_s,
        "finish_fetch_s": fetch_s,
        "finish_post_s": post_s,
        "batches": batches,
        "tokens": int(lengths.sum()),
    }


def timeline(enc: M3Encoder, texts: list[str], length: int, device: torch.device) -> dict[str, Any]:
    """One threaded ``encode`` with its tokenise / launch / finish calls timed (host clock, ms
    from the call's start, and the thread that ran each), to show what the GPU waits on. On a
    GPU, CUDA events around each launch also give when the device started and ended each batch
    (``gpu_ms``: start, end), from which its idle time inside the call follows."""
    events: list[tuple[str, str, float, float, int]] = []
    gpu_marks: list[tuple[Any, Any]] = []
    cuda = device.type == "cuda"
    originals = {name: getattr(enc, name) for name in ("_tokenize", "_launch", "_finish")}

    def wrap(name: str) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            marks = None
            if cuda and name == "_launch":
                marks = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                marks[0].record()
            try:
                return originals[name](*a, **kw)
            finally:
                if marks is not None:
                    marks[1].record()
                    gpu_marks.append(marks)
                size = len(a[0]) if name != "_finish" else len(a[0].lengths)
                events.append((name.lstrip("_"), threading.current_thread().name, t0, time.perf_counter(), size))

        return run

    for name in originals:
        setattr(enc, name, wrap(name))
    origin = torch.cuda.Event(enable_timing=True) if cuda else None
    try:
        _sync(device)
        start = time.perf_counter()
        if origin is not None:
            origin.record()
        enc.encode(texts, max_length=length)
        _sync(device)
        total = time.perf_counter() - start
    finally:
        for name in originals:
            delattr(enc, name)  # back to the class's methods
    rows = sorted((round((a - start) * 1e3, 1), round((b - start) * 1e3, 1), what, thread, n)
                  for what, thread, a, b, n in events)
    launches = [r for r in rows if r[2] == "launch"]
    finishes = [r for r in rows if r[2] == "finish"]
    gpu: list[tuple[float, float]] = []
    if origin is not None:
        gpu = [(round(origin.elapsed_time(a), 1), round(origin.elapsed_time(b), 1)) for a, b in gpu_marks]
    return {
        # per batch: the device reaching its launch's start and its end (heads included; its
        # copies to the host run on a side stream after that); spans include any wait for kernels
        # still being launched, the gaps are the device idle between batches.
        "gpu_ms": gpu,
        "gpu_spans_ms": round(sum(b - a for a, b in gpu), 1),
        "gpu_gaps_ms": round(sum(a - prev for (a, _), prev in zip(gpu, [0.0] + [e for _, e in gpu])), 1),
        "total_ms": round(total * 1e3, 1),
        "first_launch_start_ms": launches[0][0] if launches else None,
        "last_launch_end_ms": launches[-1][1] if launches else None,
        "last_finish_end_ms": max(r[1] for r in finishes) if finishes else None,
        "batch_rows": [r[4] for r in launches],
        "events_ms": [{"start": a, "end": b, "what": w, "thread": t, "texts": n} for a, b, w, t, n in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=393216)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the compile=True bf16 row (GPU)")
    ap.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak (H100 SXM / H200)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = dict(QUICK_SHAPE if args.quick else FULL_SHAPE)
    tokens = 4096 if args.quick else args.tokens
    report: dict[str, Any] = {"machine": _machine(device), "length": args.length}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "ckpt", **shape)
        words = int(1.2 * args.length / _tokens_per_word(path))
        n_texts = max(1, tokens // args.length)
        texts = synthetic_corpus(n_texts, min_words=words, max_words=words, seed=7)
        cfg = {"hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
               "num_layers": shape["num_layers"], "colbert_dim": shape["hidden_size"]}
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        variants = {dtype: False}
        if device.type == "cuda" and not args.no_compile:
            variants[f"{dtype}-compile"] = True
        for label, compile_ in variants.items():
            enc = M3Encoder(path, device=str(device), dtype=dtype, show_progress=False, compile=compile_)
            enc._threaded = True  # the GPU default; forced so that a CPU smoke run takes the same path
            t0 = time.perf_counter()
            out = enc.encode(texts, max_length=args.length)  # warm-up (compile=True: compiles each shape)
            enc._threaded = False
            enc.encode(texts, max_length=args.length)  # the single-thread path's shapes too
            enc._threaded = True
            _sync(device)
            row: dict[str, Any] = {"compile": compile_, "warmup_s": time.perf_counter() - t0}
            row["phases_serial"] = phases(enc, texts, args.length, device)
            n_tok = int(sum(out.num_tokens))
            flops = sum(text_flops(n, cfg) for n in out.num_tokens)
            ph = row["phases_serial"]
            row["gpu_only_mfu"] = flops / ph["gpu_s"] / (args.peak_tflops * 1e12) if device.type == "cuda" else None
            cases: dict[str, tuple[bool, dict[str, bool]]] = {
                "all": (True, {}),
                "all_single_thread": (False, {}),
                "dense+sparse": (True, {"return_colbert": False}),
                "dense": (True, {"return_colbert": False, "return_sparse": False}),
            }
            for name, (threaded, flags) in cases.items():
                enc._threaded = threaded
                sec = _best(lambda f=flags, e=enc: e.encode(texts, max_length=args.length, **f), device, args.reps)
                row[f"encode_{name}_s"] = sec
                row[f"encode_{name}_tokens_per_s"] = n_tok / sec
                if device.type == "cuda":
                    row[f"encode_{name}_mfu"] = flops / sec / (args.peak_tflops * 1e12)
            enc._threaded = True
            try:
                row["timeline_threaded"] = timeline(enc, texts, args.length, device)
            except Exception as exc:  # a diagnostic: never lose the timings above to it
                row["timeline_threaded"] = {"error": f"{type(exc).__name__}: {exc}"}
            report[label] = row
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "encode-gpu-phases.json").write_text(json.dumps(report, indent=1))
            print(json.dumps({label: row}, indent=1), flush=True)
            del enc, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encode-gpu-phases.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

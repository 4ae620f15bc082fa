"""Where an ``M3Encoder.encode`` call spends its wall time on a GPU, phase by phase.

Companion of ``encode_gpu.py`` (same BGE-M3-shaped random checkpoint and synthetic corpus):
for one max_length it times, with the encoder's own methods, tokenisation, each batch's
launch (host time to queue the forward, heads and copies), its GPU time (CUDA events) and
its finish (waiting for the copies, host post-processing), then the whole ``encode`` with all
three outputs and with fewer, so the cost of each output shows.

    python3 benchmarks/encode_gpu_phases.py --out $OUT          # on the GPU machine, ~1 min
    .venv/bin/python benchmarks/encode_gpu_phases.py --device cpu --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
    """One encode taken apart: tokenise, then per batch launch / GPU / finish, serially."""
    t0 = time.perf_counter()
    ids, _ = enc._tokenize(texts, length)
    tokenize_s = time.perf_counter() - t0
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    launch_s = gpu_s = finish_s = 0.0
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
        enc._finish(launched)
        finish_s += time.perf_counter() - t0
        batches += 1
    return {
        "tokenize_s": tokenize_s,
        "launch_host_s": launch_s,
        "gpu_s": gpu_s,
        "finish_host_s": finish_s,
        "batches": batches,
        "tokens": int(lengths.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=393216)
    ap.add_argument("--reps", type=int, default=3)
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
        for dtype in ("bfloat16",) if device.type == "cuda" else ("float32",):
            enc = M3Encoder(path, device=str(device), dtype=dtype, show_progress=False)
            enc.encode(texts, max_length=args.length)  # warm-up
            row: dict[str, Any] = {"phases_serial": phases(enc, texts, args.length, device)}
            n_tok = row["phases_serial"]["tokens"]
            flops = sum(text_flops(min(args.length, n), cfg) for n in [args.length] * n_texts)
            for name, flags in {
                "all": {},
                "dense+sparse": {"return_colbert": False},
                "dense": {"return_colbert": False, "return_sparse": False},
            }.items():
                sec = _best(lambda f=flags, e=enc: e.encode(texts, max_length=args.length, **f), device, args.reps)
                row[f"encode_{name}_s"] = sec
                row[f"encode_{name}_tokens_per_s"] = n_tok / sec
                if device.type == "cuda":
                    row[f"encode_{name}_mfu"] = flops / sec / 989.4e12
            report[dtype] = row
            print(json.dumps({dtype: row}, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encode-gpu-phases.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

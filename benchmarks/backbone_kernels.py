"""Bare BGE-M3-sized backbone forward on a GPU under other attention kernels and compile modes.

Why: the whole ``encode`` reaches 45% MFU at L=512 on an H200 and its host work already overlaps
the GPU, so 50% needs a faster backbone. This times one full batch (128 x 512 random ids, bf16)
with: eager SDPA as the encoder runs it (no mask: flash), SDPA forced to cuDNN attention, the
additive zero mask the compiled encoder passes (which rules out the flash kernel), and
``torch.compile`` default / ``max-autotune-no-cudagraphs`` with and without that mask.

    python3 benchmarks/backbone_kernels.py --out $OUT     # GPU machine, ~3 min
    .venv/bin/python benchmarks/backbone_kernels.py --device cpu --quick --out /tmp/x
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
import torch._dynamo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from encode_gpu import FULL_SHAPE, QUICK_SHAPE, text_flops  # noqa: E402

from m3connect.encoder import M3Encoder  # noqa: E402
from m3connect.testing import make_tiny_checkpoint  # noqa: E402

PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = dict(QUICK_SHAPE if args.quick else FULL_SHAPE)
    cfg = {"hidden_size": shape["hidden_size"], "num_layers": shape["num_layers"],
           "intermediate_size": shape["intermediate_size"], "colbert_dim": shape["hidden_size"]}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    L = args.length
    batch = max(1, (65536 if not args.quick else 512) // L)
    flops = batch * (text_flops(L, cfg) - L * 2 * cfg["hidden_size"] * (cfg["colbert_dim"] + 1))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"card": name, "peak_tflops": peak, "length": L, "batch": batch, "torch": torch.__version__,
                              "rows": {}}
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "ckpt", **shape)
        enc = M3Encoder(path, device=str(device), dtype=dtype, show_progress=False)
        ids = torch.randint(4, enc.vocab_size - 1, (batch, L), generator=torch.Generator().manual_seed(0)).to(device)
        zero_bias = enc._attention_bias(np.ones((batch, L), dtype=bool))
        backbone = enc._backbone

        def timed(label: str, run: Any, mask: Any, ctx: Any = None) -> None:
            t0 = time.perf_counter()
            try:
                times = []
                with torch.inference_mode():
                    for i in range(args.reps + 2):  # two warm-ups (compiles)
                        _sync(device)
                        t = time.perf_counter()
                        if ctx is not None:
                            with ctx():
                                run(input_ids=ids, attention_mask=mask)
                        else:
                            run(input_ids=ids, attention_mask=mask)
                        _sync(device)
                        if i >= 2:
                            times.append(time.perf_counter() - t)
                best = min(times)
                row = {"seconds": best, "tflops": flops / best / 1e12,
                       "mfu": flops / best / 1e12 / peak if peak else None, "setup_s": time.perf_counter() - t0}
            except Exception as exc:  # one variant failing must not lose the others
                row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            report["rows"][label] = row
            print(label, json.dumps(row), flush=True)
            (args.out / "backbone-kernels.json").write_text(json.dumps(report, indent=1))

        from torch.nn.attention import SDPBackend, sdpa_kernel

        timed("eager, no mask (encoder default)", backbone, None)
        timed("eager, zero additive mask", backbone, zero_bias)
        if device.type == "cuda":
            timed("eager, no mask, cuDNN attention", backbone, None, lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
            timed("eager, no mask, flash attention", backbone, None, lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
        torch._dynamo.config.cache_size_limit = 64
        compiled = torch.compile(backbone, dynamic=False)
        timed("compile default, zero additive mask (encoder compile=True)", compiled, zero_bias)
        timed("compile default, no mask", compiled, None)
        if device.type == "cuda":
            timed("compile default, no mask, cuDNN attention", compiled, None,
                  lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
        torch._dynamo.reset()
        auto = torch.compile(backbone, dynamic=False, mode="max-autotune-no-cudagraphs")
        timed("compile max-autotune-no-cudagraphs, no mask", auto, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
